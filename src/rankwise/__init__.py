"""rankwise: adapt and compress pretrained transformers from what they compute on your data."""

from .adapt import adapt_, lora_config
from .calibrate import calibrate, token_mask
from .data import load_data
from .errors import RankwiseError
from .export import export
from .models import load_model
from .plan import Plan, LayerPlan, plan
from .stats import LayerStats, Stats
from .targets import find_targets

__all__ = [
    "adapt_", "calibrate", "export", "find_targets", "load_data", "load_model", "lora_config", "plan",
    "token_mask", "LayerPlan", "LayerStats", "Plan", "RankwiseError", "Stats",
]
__version__ = "0.1.0"
