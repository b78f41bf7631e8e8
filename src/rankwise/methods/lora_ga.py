"""LoRA-GA (Wang et al. 2024, arXiv:2407.05000): align the first step of LoRA with full fine-tuning's.

With G = U·S·Vᵀ the mean-loss weight gradient on the calibration data, one SGD step on (A, B) moves the
model by −η·s²·(B·Bᵀ·G + G·Aᵀ·A) (first order). Taking A and B from 2r singular vectors of G (default
"ArB2r", as the reference code: A = c·V[:, :r]ᵀ, B = c·U[:, r:2r]) makes that step −η·s²·c²·[G]₂ᵣ, the
best rank-2r approximation of the full step (Sec. 3.2). The stable scale c = out^{1/4}/√γ (Sec. 3.3)
keeps the update size independent of the width. The base becomes W − s·B·A, so the model computes W·x
at the start.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ..numerics.lowrank import svd_part
from . import InitConfig, LayerInit, register_init


class LoraGAConfig(InitConfig):
    direction: Literal["ArB2r", "A2rBr", "ArBr"] = Field(
        "ArB2r", description="which singular vectors of G: ArB2r (A = V[:r], B = U[r:2r], the paper's), A2rBr "
                             "(A = V[r:2r], B = U[:r]) or ArBr (interleaved: B = U[0:2r:2], A = V[1:2r:2])")
    scale: Literal["stable", "unit", "gd"] = Field(
        "stable", description="stable: A and B × out^{1/4}/√gamma (Sec. 3.3); unit: orthonormal; gd: both ÷ s")
    gamma: float = Field(16.0, gt=0, description="γ of the stable scale (the paper's and the reference's 16)")


@register_init("lora-ga")
class LoraGA:
    """A, B from the SVD of the weight gradient, scaled so the first step approximates full fine-tuning."""

    config = LoraGAConfig
    needs = "none"
    needs_grad = True
    summary = "LoRA-GA (Wang et al. 2024): A, B from 2r singular vectors of the weight gradient; W ← W − s·B·A"
    changes_base = True
    default_lr = 3e-4  # benchmarks/init_zoo.py: of the rates run on both tasks, the one whose worse task is closest to its best (best on both; the paper used 2e-5 on 7B models)

    def candidates(self, stats, weight: Tensor, cfg: LoraGAConfig, cap: int) -> Tensor:
        return torch.zeros(0)  # uniform ranks

    def init(self, stats, weight: Tensor, rank: int, cfg: LoraGAConfig, name: str = "", scale: float = 1.0,
             grad: Tensor | None = None) -> LayerInit:
        k = min(2 * rank, *grad.shape)
        if k < 2 * rank:
            raise ValueError(f"{name}: LoRA-GA takes 2r = {2 * rank} singular vectors of a {tuple(grad.shape)} gradient")
        u, _, vh = svd_part(grad, k)
        if cfg.direction == "ArB2r":
            a, b = vh[:rank], u[:, rank:2 * rank]
        elif cfg.direction == "A2rBr":
            a, b = vh[rank:2 * rank], u[:, :rank]
        else:
            a, b = vh[1:2 * rank:2], u[:, 0:2 * rank:2]
        c = {"stable": grad.shape[0] ** 0.25 / cfg.gamma**0.5, "unit": 1.0, "gd": 1.0 / scale}[cfg.scale]
        return LayerInit((c * a).to(weight.dtype).contiguous(), (c * b).to(weight.dtype).contiguous(), residual=True)
