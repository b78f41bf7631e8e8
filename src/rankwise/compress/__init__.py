"""Compress: SVD compression (svd, asvd, svd-llm) under a parameter budget, per-layer mixed precision
under an average-bits budget, and the joint planner of bits and ranks under a memory budget.

Every method plans from one block-by-block pass over the calibration data (per-layer error curves on
the original model) and applies block-sequentially, so later blocks see the compressed blocks' outputs.
"""

from .folder import is_factored, load_factored, save_factored
from .linear import LowRankLinear, lowrank_layers, merge_lowrank_
from .planner import PlanConfig, PlanReport, apply_plan, compress_planned, parse_size, plan
from .svd import METHODS, CompressReport, SVDConfig, compress


def mixed_precision(model, batches, avg_bits: float = 3.5, progress: bool = True, **options) -> PlanReport:
    """Per-layer bits meeting an average-bits budget (no compensation, no SVD): the planner's special case."""
    return compress_planned(model, batches, progress, avg_bits=avg_bits, **options)


__all__ = ["METHODS", "CompressReport", "LowRankLinear", "PlanConfig", "PlanReport", "SVDConfig", "apply_plan",
           "compress", "compress_planned", "is_factored", "load_factored", "lowrank_layers", "merge_lowrank_",
           "mixed_precision", "parse_size", "plan", "save_factored"]
