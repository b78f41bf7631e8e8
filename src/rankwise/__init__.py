"""rankwise: adapt and compress pretrained transformers from what they compute on your data."""

from .adapt import adapt_, lora_config
from .calib.calibrate import calibrate, token_mask
from .compress import compress, compress_planned, mixed_precision
from .conv1d import linearize_conv1d_
from .experts import fuse_experts_, unfuse_experts_
from .data.sources import load_data
from .errors import RankwiseError
from .export import export_model
from .export.peft import export
from .models import load_model
from .plan.plan import Plan, LayerPlan, plan
from .quant import dequantize_, quantize, quantize_
from .calib.stats import LayerStats, Stats
from .targets import find_targets

__all__ = [
    "adapt_", "calibrate", "compress", "compress_planned", "dequantize_", "export", "export_model", "find_targets", "fuse_experts_", "linearize_conv1d_", "unfuse_experts_", "quantize", "quantize_", "load_data", "load_model", "lora_config", "mixed_precision", "plan",
    "token_mask", "LayerPlan", "LayerStats", "Plan", "RankwiseError", "Stats",
]
__version__ = "0.1.0"
