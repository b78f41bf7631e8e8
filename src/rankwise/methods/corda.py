"""CorDA (Yang et al. 2024, arXiv:2406.05223): context-oriented decomposition of W·C, C the inputs' covariance."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ..calib.stats import LayerStats
from ..numerics.lowrank import dampened_inverse, split_factors
from . import InitConfig, LayerInit, register_init


class CordaConfig(InitConfig):
    mode: Literal["ipm", "kpm"] = Field("ipm", description="ipm: adapt the r largest components of W·C (instruction-previewed); "
                                                           "kpm: the r smallest, keeping what the data uses most (knowledge-preserved)")


@register_init("corda")
class Corda:
    """C = XᵀX/n over calibration tokens (dampened: C + λI); W·C = U S Vᵀ; V ← C⁻¹V; A = √(S_r/s)·V_rᵀ,
    B = U_r·√(S_r/s); W ← W − s·B·A (Sec. 3.1, Eq. 4–5). The r largest (ipm) or smallest (kpm) triplets.

    peft's preprocess_corda divides each calibration sequence by its largest activation before summing
    and needs batches of one sequence; here C is the plain second moment over every unmasked token,
    from the same block-wise calibration as EVA (any batch size, no second pass).
    """

    config = CordaConfig
    needs = "moments"
    summary = "CorDA (Yang et al. 2024): SVD of W·C (C: input covariance), mapped back by C⁻¹; ipm/kpm; W ← W − s·B·A"
    changes_base = True
    default_lr = 3e-4  # benchmarks/init_zoo.py: of the rates run on both tasks, the one whose worse task is closest to its best (best on both)
    _last = None

    def candidates(self, stats, weight: Tensor, cfg: CordaConfig, cap: int) -> Tensor:
        return torch.zeros(0)

    def init(self, stats: LayerStats, weight: Tensor, rank: int, cfg: CordaConfig, name: str = "", scale: float = 1.0) -> LayerInit:
        # q/k/v (gate/up) share one input and come one after another: invert their C once. One entry only,
        # so memory stays at one layer's d×d pair (caching all of them would be ~1.6 GB on SmolLM2).
        if self._last is None or self._last[0] is not stats:
            self._last = (stats, dampened_inverse(stats.xtx / max(stats.n, 1)))
        fixed, inv, damp = self._last[1]
        u, s, vh = torch.linalg.svd(weight.double() @ fixed, full_matrices=False)
        sl = slice(0, rank) if cfg.mode == "ipm" else slice(s.shape[0] - rank, s.shape[0])
        a, b = split_factors(u[:, sl], s[sl], vh[sl] @ inv, scale)
        d = weight.shape[1]
        why = [f"C from {stats.n} tokens for {d} channels: rank ≤ {stats.n}"] if stats.n < d else []
        why += ["λ raised from 0.01 until the inverse held"] if damp > 0.01 else []
        note = f"covariance dampened: C + λI, λ = {damp:g}·mean(diag C)" + (f" (ill-conditioned: {'; '.join(why)})" if why else "")
        return LayerInit(a.to(weight.dtype), b.to(weight.dtype), residual=True, note=note)
