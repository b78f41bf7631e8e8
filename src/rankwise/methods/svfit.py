"""SVFit (Sun et al. 2024, arXiv:2409.05926): train only the top-r singular values of each weight.

W = U·S·Vᵀ = W_r + W_e with W_r = U_r·diag(σ)·V_rᵀ; U_r, V_r and the residual W_e stay frozen, σ (r numbers
per layer) is trained: the singular values are the learnable scales of W's principal rank-one directions.
Written as W + s·B·diag(d)·A with B = U_r/s and A = V_rᵀ, i.e. W + U_r·diag(d)·V_rᵀ with d = σ − σ₀ starting
at 0: the same model and, without weight decay, the same training (∂L/∂d_i = u_iᵀ·G·v_i = ∂L/∂σ_i), while
the base stays untouched and W·x is computed at the start.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..numerics.lowrank import svd_part
from . import InitConfig, LayerInit, register_init


@register_init("svfit")
class SVFit:
    """B = U_r/s, A = V_rᵀ frozen; the diagonal core d [r] (the change of the top-r singular values) trained from 0."""

    config = InitConfig
    needs = "none"
    summary = "SVFit (Sun et al. 2024): only the top-r singular values of W trained (U_r, V_r frozen)"
    changes_base = False
    default_lr = 1e-1  # benchmarks/init_zoo.py: of the rates run on both tasks, the one whose worse task is closest to its best (best on both, at the top of a full 7-rate grid)

    def candidates(self, stats, weight: Tensor, cfg: InitConfig, cap: int) -> Tensor:
        return torch.zeros(0)

    def init(self, stats, weight: Tensor, rank: int, cfg: InitConfig, name: str = "", scale: float = 1.0) -> LayerInit:
        u, _, vh = svd_part(weight, rank)
        core = torch.zeros(rank, dtype=weight.dtype)
        return LayerInit(vh.to(weight.dtype).contiguous(), (u / scale).to(weight.dtype).contiguous(), core=core)
