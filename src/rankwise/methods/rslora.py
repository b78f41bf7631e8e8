"""rsLoRA (Kalajdzievski 2023, arXiv:2312.03732): LoRA's init with the rank-stabilized scaling γ_r = α/√r."""

from __future__ import annotations

from pydantic import Field

from . import register_init
from .lora import LoraInitConfig, RandomLora


class RsLoraConfig(LoraInitConfig):
    rslora: bool = Field(True, description="scale the adapter by alpha/√r (rsLoRA's point; false = plain LoRA)")


@register_init("rslora")
class RsLora(RandomLora):
    """A Kaiming-uniform, B = 0 (as LoRA); peft scales B·A by α/√r instead of α/r (Theorem 3.2), written to
    adapter_config.json as use_rslora, so that larger ranks keep learning instead of being damped by 1/r."""

    config = RsLoraConfig
    summary = "rsLoRA (Kalajdzievski 2023): LoRA's init, scaling alpha/√r so that larger ranks keep learning"
    default_lr = 1e-3  # benchmarks/init_zoo.py: of the rates run on both tasks, the one whose worse task is closest to its best (SST-2 1.000, GSM8K 0.977)
