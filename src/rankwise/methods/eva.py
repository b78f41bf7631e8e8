"""EVA: Explained Variance Adaptation (Paischer et al. 2024, arXiv:2410.07170)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from ..calib.stats import LayerStats
from ..methods import InitConfig, LayerInit, register_init


class EvaConfig(InitConfig):
    """EVA options; semantics follow peft's EvaConfig."""

    rho: float = Field(2.0, ge=1.0, description="each layer offers round(rank·rho) candidate components (1 = uniform)")
    whiten: bool = Field(True, description="scale A's rows like peft's whiten: divide by sqrt of the data's singular values "
                         "(on by default: better than plain EVA on SST-2 and GSM8K, benchmarks/init_zoo.py; "
                         "false = the paper's and peft's default)")
    adjust_scaling: bool = Field(True, description="alpha follows each layer's rank so alpha/rank stays as configured")
    allocation: str = Field("explained-variance", description="uniform, or explained-variance (EVA's redistribution)")


@register_init("eva")
class Eva:
    """A = top right-singular vectors of the layer's mean-centred inputs, B = 0.

    The right-singular vectors of the centred inputs X − 1μᵀ [n, d] are the eigenvectors of the
    scatter Σ(x−μ)(x−μ)ᵀ; the explained-variance ratio of component i is λ_i / tr(scatter)
    (paper Sec. 3.2). These ratios are the candidates the budget is spread over.
    """

    config = EvaConfig
    needs = "spectrum"
    reads_weight = False  # A from the inputs' spectrum, B zero: the weight's shape and dtype only
    summary = "EVA (Paischer et al. 2024): A = top principal directions of the layer's inputs, B = 0; ranks by explained variance"
    changes_base = False
    # Plain EVA's A passes 55–85× more of the inputs' energy than a Kaiming-initialized A (‖AX‖²/‖X‖² on
    # MiniLM/SST-2 and SmolLM2/GSM8K, benchmarks/convergence.py), so one Adam step moves the output further
    # and its best rate was lower (1e-3 on both tasks); whitened (the default) it takes random LoRA's rates.
    default_lr = 3e-3  # benchmarks/init_zoo.py: of the rates run on both tasks, the one whose worse task is closest to its best (whitened: SST-2 0.988 of best, GSM8K 1.000)

    def candidates(self, stats: LayerStats, weight: Tensor, cfg: EvaConfig, cap: int) -> Tensor:
        vals, _, trace = stats.spectrum(cap)
        return (vals / trace).float() if trace > 0 else torch.zeros_like(vals, dtype=torch.float32)

    def init(self, stats: LayerStats, weight: Tensor, rank: int, cfg: EvaConfig, name: str = "", scale: float = 1.0) -> LayerInit:
        vals, vecs, _ = stats.spectrum(rank)
        a = vecs[:rank].clone()
        if cfg.whiten:
            # peft divides by sqrt(singular value) of the centred data; singular value = sqrt(λ). The floor
            # (1e-8 of the top λ, so no row exceeds 100× the top row's norm) only acts on near-empty
            # directions, which a rank larger than the inputs' own would otherwise blow up.
            top = float(vals[0]) if len(vals) else 0.0
            a = a / vals[:rank].clamp_min(max(top * 1e-8, 1e-12)).pow(0.25)[:, None]
        b = torch.zeros(weight.shape[0], rank, dtype=torch.float64)
        return LayerInit(a.to(weight.dtype), b.to(weight.dtype))
