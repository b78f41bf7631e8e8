"""LowRankLinear: a linear layer stored as two smaller ones, y = up(down(x)), W ≈ B·A of rank k."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quant.linear import replace_by_linear, set_module


class LowRankLinear(nn.Module):
    """y = B·(A·x) + b with A = `down.weight` [k, in], B = `up.weight` [out, k], b = `up.bias`.

    Saves parameters when k·(in + out) < in·out. `weight` is B·A, computed on access, so code that
    reads `.weight` (evaluation, export) works unchanged.
    """

    rankwise_linear = True  # one linear layer to targets.find_targets (its factors are not targets themselves)

    def __init__(self, a: Tensor, b: Tensor, bias: Tensor | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        k, n_in = a.shape
        n_out = b.shape[0]
        dtype = dtype or a.dtype
        self.in_features, self.out_features, self.rank = n_in, n_out, k
        self.down = nn.Linear(n_in, k, bias=False, device=a.device, dtype=dtype)
        self.up = nn.Linear(k, n_out, bias=bias is not None, device=a.device, dtype=dtype)
        with torch.no_grad():
            self.down.weight.copy_(a)
            self.up.weight.copy_(b)
            if bias is not None:
                self.up.bias.copy_(bias)

    @property
    def weight(self) -> Tensor:
        return self.up.weight @ self.down.weight

    @property
    def bias(self) -> Tensor | None:
        return self.up.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.up(F.linear(x, self.down.weight))

    @property
    def n_params(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def lowrank_layers(model: nn.Module) -> dict[str, LowRankLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def merge_lowrank_(model: nn.Module) -> nn.Module:
    """Replace every LowRankLinear by an nn.Linear holding B·A (in place): a plain dense model."""
    for name, m in lowrank_layers(model).items():
        with torch.no_grad():
            replace_by_linear(model, name, m.weight, m.bias)
    return model


def factor_(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """Put a zero LowRankLinear of the given rank in place of each named linear (the skeleton a saved
    factored folder's weights load into)."""
    for name, k in ranks.items():
        lin = model.get_submodule(name)
        w = lin.weight
        a = torch.zeros(k, w.shape[1], dtype=w.dtype, device=w.device)
        b = torch.zeros(w.shape[0], k, dtype=w.dtype, device=w.device)
        set_module(model, name, LowRankLinear(a, b, None if lin.bias is None else lin.bias.detach()))
    return model
