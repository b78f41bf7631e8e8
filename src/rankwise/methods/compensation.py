"""The compensation term as the starting adapter: B·A = the best rank-r fit of the quantization error
W − Q, weighted by the inputs' XᵀX (EoRA, Liu et al. 2024) or plain (LoRC, Yao et al. 2023); the codes
are kept as they are, so the model starts as the compensated quantized model."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from ..errors import PlanError
from ..numerics.lowrank import lowrank_fit
from . import InitConfig, LayerInit, register_init
from .loftq import adapter_factors, as_quantized, bare_copy, effective


class CompensationConfig(InitConfig):
    weighted: bool = Field(True, description="weight the error by the inputs' XᵀX (EoRA); false: plain SVD of W − Q (LoRC)")


@register_init("compensation")
class Compensation:
    """s·B·A = lowrank_fit(W − Q, XᵀX, r): the model at init is Q + the rank-r compensation (EoRA)."""

    config = CompensationConfig
    needs = "moments"
    needs_original = True
    summary = "compensation (EoRA / LoRC): adapter = best rank-r fit of W − Q, weighted by XᵀX; codes kept"
    changes_base = False
    default_lr = 5e-4

    def candidates(self, stats, weight: Tensor, cfg: CompensationConfig, cap: int) -> Tensor:
        return torch.zeros(0)

    def init(self, stats, weight: Tensor, rank: int, cfg: CompensationConfig, name: str = "", scale: float = 1.0,
             original: Tensor | None = None, module=None) -> LayerInit:
        q = as_quantized(module, name, "compensation")
        gram = None
        if cfg.weighted:
            if stats is None or stats.xtx is None:
                raise PlanError("compensation (weighted) needs the inputs' XᵀX: calibrate with keep='full'")
            gram = stats.xtx / max(stats.n, 1)
        error = original.to(q.codes.device).double() - effective(q)
        fit = lowrank_fit(error, gram, rank)
        a, b = fit.factors(rank)
        a, b = adapter_factors(a, b, scale, weight.dtype)
        left = 1 - float(fit.errors[rank] / fit.errors[0]) if float(fit.errors[0]) > 0 else 0.0
        note = f"the rank-{rank} term takes {left:.1%} of the {'output-weighted ' if gram is not None else ''}error"
        return LayerInit(a, b, base=bare_copy(q) if q.lora_a is not None else None, note=note)
