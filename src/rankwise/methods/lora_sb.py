"""LoRA-SB (Ponkshe et al. 2024, arXiv:2411.19557): frozen A and B from the first full step, train an r×r core.

Adam's first step on the full weight is ΔW₁ ≈ −η₁·sign(G) (bias-corrected moments, ε → 0), with G the
mean-loss weight gradient on the calibration data and η₁ the first step's learning rate. Its best rank-r
approximation P_r·Σ_r·Q_rᵀ gives B = P_r and A = Q_rᵀ, frozen, and the trained core R = Σ_r/s, so that
s·B·R·A = [ΔW₁]_r at the start (no base offset: the model starts where that first step would take it).
Every later update s·B·ΔR·A stays in span(P_r) ⊗ span(Q_r); r² parameters per layer.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from ..numerics.lowrank import svd_part
from . import InitConfig, LayerInit, register_init


class LoraSBConfig(InitConfig):
    first_lr: float | None = Field(None, gt=0, description="η₁ of the simulated first Adam step −η₁·sign(G); null: "
                                                           "the run's first learning rate (lr/(warmup+1)), in Python "
                                                           "the default lr over 6 (the default warmup of 5 steps)")


@register_init("lora-sb")
class LoraSB:
    """B = P_r, A = Q_rᵀ frozen, core R = Σ_r/s trained, from the SVD of −η₁·sign(G)."""

    config = LoraSBConfig
    needs = "none"
    needs_grad = True
    summary = "LoRA-SB (Ponkshe et al. 2024): A, B frozen from the first full Adam step's rank-r SVD; an r×r core trained"
    changes_base = False
    default_lr = 3e-3  # benchmarks/init_zoo.py: of the rates run on both tasks, the one whose worse task is closest to its best (SST-2 0.989, GSM8K 0.970)

    def candidates(self, stats, weight: Tensor, cfg: LoraSBConfig, cap: int) -> Tensor:
        return torch.zeros(0)

    def init(self, stats, weight: Tensor, rank: int, cfg: LoraSBConfig, name: str = "", scale: float = 1.0,
             grad: Tensor | None = None) -> LayerInit:
        eta = cfg.first_lr if cfg.first_lr is not None else self.default_lr / 6
        u, s, vh = svd_part(-eta * torch.sign(grad), rank)
        core = torch.diag(s / scale)
        return LayerInit(vh.to(weight.dtype).contiguous(), u.to(weight.dtype).contiguous(), core=core.to(weight.dtype))
