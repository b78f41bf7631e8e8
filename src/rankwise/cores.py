"""Trainable structures peft lacks, as a LoRA layer whose A and B are frozen and a small core between them
is trained: y = W·x + s·B·R·A·x with R [r, r] (LoRA-SB) or R = diag(d), d [r] (SVFit).

The core sits in peft's own LoRA layer as its `lora_A` module (x ↦ R·(A·x)), so the one training loop
trains, checkpoints and resumes it like any adapter parameter, and peft's forward, merge and delta weight
work unchanged: `CoreDown.weight` is R·A, i.e. the adapter read as a plain LoRA. `fold_cores_` makes that
literal (an nn.Linear holding R·A), which is what export writes: a plain peft LoRA adapter on the original
base.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CoreDown(nn.Module):
    """x [..., in] ↦ R·(A·x) [..., r]: A [r, in] a frozen buffer, R [r, r] or its diagonal [r] trained."""

    def __init__(self, a: Tensor, core: Tensor):
        super().__init__()
        if core.ndim not in (1, 2) or core.shape[0] != a.shape[0] or (core.ndim == 2 and core.shape[1] != a.shape[0]):
            raise ValueError(f"a core for rank {a.shape[0]} is [r] or [r, r]; got {tuple(core.shape)}")
        self.out_features, self.in_features = a.shape
        self.register_buffer("frozen", a.detach().clone().contiguous())
        self.core = nn.Parameter(core.detach().clone().to(a.dtype))

    @property
    def weight(self) -> Tensor:
        """R·A [r, in]: what a plain LoRA's A would be."""
        return self.core @ self.frozen if self.core.ndim == 2 else self.core[:, None] * self.frozen

    def forward(self, x: Tensor) -> Tensor:
        h = F.linear(x, self.frozen)
        return F.linear(h, self.core) if self.core.ndim == 2 else h * self.core

    def extra_repr(self) -> str:
        kind = "full" if self.core.ndim == 2 else "diagonal"
        return f"in_features={self.in_features}, rank={self.out_features}, core={kind}"


def install_core_(layer, adapter: str, core: Tensor) -> None:
    """Turn peft LoRA layer `layer` (A, B already set) into B·R·A with R = `core` trained, A and B frozen."""
    a = layer.lora_A[adapter].weight.detach()
    layer.lora_A[adapter] = CoreDown(a, core.to(a.device))
    layer.lora_B[adapter].weight.requires_grad_(False)


def has_cores(model: nn.Module) -> bool:
    return any(isinstance(m, CoreDown) for m in model.modules())


@torch.no_grad()
def fold_cores_(model: nn.Module) -> None:
    """Replace every CoreDown by an nn.Linear holding R·A (in place; use on a copy): the adapter becomes a
    plain LoRA with the same output, which peft saves and loads as such."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, CoreDown):
                w = child.weight.detach()
                lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
                lin.weight.copy_(w)
                lin.weight.requires_grad_(False)
                setattr(parent, name, lin)
