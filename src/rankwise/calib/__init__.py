"""Observe only: calibrate(model, batches) → Stats, block by block where the model allows."""

from .calibrate import calibrate, token_mask
from .stats import LayerStats, Stats

__all__ = ["calibrate", "token_mask", "LayerStats", "Stats"]
