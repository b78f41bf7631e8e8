"""MiLoRA (Wang et al. 2024, arXiv:2406.09044): adapt W's minor singular components, keep the principal ones."""

from __future__ import annotations

from . import InitConfig, register_init
from .pissa import Pissa


class MiloraConfig(InitConfig):
    pass


@register_init("milora")
class Milora(Pissa):
    """W = U S Vᵀ; A, B from the r smallest triplets (U_{-r}, S_{-r}, V_{-r}), W ← W − s·B·A (Sec. 3)."""

    config = MiloraConfig
    summary = "MiLoRA (Wang et al. 2024): A, B from the r minor singular triplets of W; W ← W − s·B·A"
    which = "bottom"
    default_lr = 3e-3  # benchmarks/init_zoo.py: of the rates run on both tasks, the one whose worse task is closest to its best (best on both)
