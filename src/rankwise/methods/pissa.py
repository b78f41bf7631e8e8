"""PiSSA (Meng et al. 2024, arXiv:2404.02948): adapt W's principal part, freeze the residual."""

from __future__ import annotations

import zlib

import torch
from pydantic import Field
from torch import Tensor

from ..calib.stats import LayerStats
from ..numerics.lowrank import split_factors, svd_part
from . import InitConfig, LayerInit, register_init


class PissaConfig(InitConfig):
    niter: int | None = Field(None, ge=0, description="null: exact SVD; N: randomized SVD with N power iterations (peft's pissa_niter_N)")
    seed: int = Field(0, description="seed of the randomized SVD (with niter)")


@register_init("pissa")
class Pissa:
    """W = U S Vᵀ; A = √(S_r/s)·V_rᵀ, B = U_r·√(S_r/s) (top r), W ← W − s·B·A (Eq. 2–3)."""

    config = PissaConfig
    needs = "none"
    summary = "PiSSA (Meng et al. 2024): A, B from the top-r singular triplets of W; W ← W − s·B·A"
    changes_base = True
    default_lr = 1e-3  # benchmarks/init_zoo.py: of the rates run on both tasks, the one whose worse task is closest to its best (best on both)
    which = "top"

    def candidates(self, stats: LayerStats | None, weight: Tensor, cfg: PissaConfig, cap: int) -> Tensor:
        return torch.zeros(0)  # no data-driven scores: ranks are uniform

    def init(self, stats, weight: Tensor, rank: int, cfg: PissaConfig, name: str = "", scale: float = 1.0) -> LayerInit:
        niter, seed = getattr(cfg, "niter", None), getattr(cfg, "seed", 0)
        u, s, vh = svd_part(weight, rank, self.which, niter=niter, seed=seed * 1_000_003 + zlib.crc32(name.encode()))
        a, b = split_factors(u, s, vh, scale)
        return LayerInit(a.to(weight.dtype), b.to(weight.dtype), residual=True)
