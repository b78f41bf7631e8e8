"""LoRA-One (Zhang, Liu & Chen 2025, arXiv:2502.01235): start the adapter at one rank-r gradient step.

With −G = U·S·Vᵀ (G the mean-loss weight gradient on the calibration data), B = U_r·√S_r/√(γ·σ₁) and
A = √S_r·V_rᵀ/√(γ·σ₁), so s·B·A = s·[−G]_r/(γ·σ₁): a step along the best rank-r approximation of the
full negative gradient, of spectral size s/γ (the reference code's normalization by σ₁, γ = 128 there).
The base is not offset: the model starts one small step away from W, in the subspace that step spans.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from ..numerics.lowrank import split_factors, svd_part
from . import InitConfig, LayerInit, register_init


class LoraOneConfig(InitConfig):
    gamma: float = Field(128.0, gt=0, description="γ: the initial step s·B·A has spectral norm s/γ (reference: 128)")


@register_init("lora-one")
class LoraOne:
    """A, B spectral factors of −G's top r, normalized by σ₁ and γ; no base change."""

    config = LoraOneConfig
    needs = "none"
    needs_grad = True
    summary = "LoRA-One (Zhang et al. 2025): B·A = [−G]_r/(γ·σ₁), one rank-r step of the weight gradient"
    changes_base = False
    default_lr = 3e-3  # benchmarks/init_zoo.py: of the rates run on both tasks, the one whose worse task is closest to its best (best on both; the paper's math setting was 2e-4)

    def candidates(self, stats, weight: Tensor, cfg: LoraOneConfig, cap: int) -> Tensor:
        return torch.zeros(0)

    def init(self, stats, weight: Tensor, rank: int, cfg: LoraOneConfig, name: str = "", scale: float = 1.0,
             grad: Tensor | None = None) -> LayerInit:
        u, s, vh = svd_part(-grad, rank)
        a, b = split_factors(u, s, vh, cfg.gamma * float(s[0].clamp_min(1e-30)))  # B·A = [−G]_r/(γ·σ₁), split evenly
        return LayerInit(a.to(weight.dtype).contiguous(), b.to(weight.dtype).contiguous())
