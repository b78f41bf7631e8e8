"""Random LoRA init (Hu et al. 2021; peft's default): A Kaiming-uniform, B = 0; needs no data."""

from __future__ import annotations

import math
import zlib

import torch
from pydantic import Field
from torch import Tensor

from ..calib.stats import LayerStats
from ..methods import InitConfig, LayerInit, register_init


class LoraInitConfig(InitConfig):
    """Options of the random init; `seed` makes A reproducible per layer."""

    seed: int = Field(0, description="seed of A (each layer draws from seed and its name)")


@register_init("lora")
class RandomLora:
    """A ~ U(-b, b) with b = 1/sqrt(in_features) (kaiming_uniform_ with a = sqrt(5), as nn.Linear and peft)."""

    config = LoraInitConfig
    needs = "none"
    reads_weight = False  # random A, zero B
    summary = "LoRA (Hu et al. 2021; peft's default): A Kaiming-uniform, B = 0"
    changes_base = False
    default_lr = 3e-3  # benchmarks/init_zoo.py: of the rates run on both tasks, the one whose worse task is closest to its best (SST-2 0.996 of best, GSM8K 1.000)

    def candidates(self, stats: LayerStats | None, weight: Tensor, cfg: LoraInitConfig, cap: int) -> Tensor:
        return torch.zeros(0)

    def init(self, stats: LayerStats | None, weight: Tensor, rank: int, cfg: LoraInitConfig, name: str = "",
             scale: float = 1.0) -> LayerInit:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + _stable_hash(name))
        a = torch.empty(rank, weight.shape[1])
        bound = 1 / math.sqrt(weight.shape[1])
        a.uniform_(-bound, bound, generator=g)
        return LayerInit(a.to(weight.dtype), torch.zeros(weight.shape[0], rank, dtype=weight.dtype))


def _stable_hash(name: str) -> int:
    return zlib.crc32(name.encode())

