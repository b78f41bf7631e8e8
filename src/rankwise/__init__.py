"""rankwise: adapt and compress pretrained transformers from what they compute on your data."""

from .adapt import adapt_, lora_config
from .calib.calibrate import calibrate, token_mask
from .data.sources import load_data
from .errors import RankwiseError
from .export.peft import export
from .models import load_model
from .plan.plan import Plan, LayerPlan, plan
from .calib.stats import LayerStats, Stats
from .targets import find_targets

__all__ = [
    "adapt_", "calibrate", "export", "find_targets", "load_data", "load_model", "lora_config", "plan",
    "token_mask", "LayerPlan", "LayerStats", "Plan", "RankwiseError", "Stats",
]
__version__ = "0.1.0"
