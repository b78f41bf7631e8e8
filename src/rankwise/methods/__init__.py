"""Registry of adapter initialization methods: one file per method, registered by name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from ..config import StrictModel
from ..errors import ConfigError
from ..calib.stats import LayerStats


class InitConfig(StrictModel):
    """Options every init method shares."""

    rank: int = 8
    alpha: float | None = None  # None: alpha = rank (scaling alpha/rank = 1)
    allocation: str = "uniform"


@dataclass
class LayerInit:
    """Initial adapter weights of one layer: A [r, in], B [out, r]."""

    A: Tensor
    B: Tensor


class InitMethod(Protocol):
    config: type[InitConfig]

    def candidates(self, stats: LayerStats | None, weight: Tensor, cfg: InitConfig, cap: int) -> Tensor:
        """Scores [m ≤ cap], descending, for the allocation to rank across layers."""

    def init(self, stats: LayerStats | None, weight: Tensor, rank: int, cfg: InitConfig, name: str = "") -> LayerInit:
        """Initial A and B for a layer given its rank."""


INITS: dict[str, InitMethod] = {}


def register_init(name: str):
    """Class decorator: register an init method under `name`."""

    def wrap(cls):
        INITS[name] = cls()
        return cls

    return wrap


def config_options(name: str, **values) -> dict:
    """The subset of `values` that method `name`'s config accepts (shared CLI/run options → one method)."""
    fields = get_init(name).config.model_fields
    return {k: v for k, v in values.items() if k in fields}


def get_init(name: str) -> InitMethod:
    from ..methods import eva, lora  # noqa: F401  (registering happens on import)

    if name not in INITS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(sorted(INITS))}")
    return INITS[name]
