"""Quantizers: one file per method, registered by name; `quantize` / `quantize_` apply them in place.

A quantizer declares what it must observe (`observe`: () for data-free RTN, ("moments",) for GPTQ's
Hessian XᵀX, ("moments", "abs") for AWQ's mean |x|), owns a pydantic config, and turns a group of
linears that read one input into QuantLinear modules. The block-sequential driver (apply.py) calls it
block by block, so later blocks are calibrated on what the quantized earlier blocks compute.
"""

from __future__ import annotations

from typing import Literal, Protocol

from pydantic import Field, field_validator

from ..config import StrictModel
from ..registry import import_all, lookup
from ..targets import pattern_value
from ..numerics.quantize import MAX_BITS, MIN_BITS, Grid


class QuantConfig(StrictModel):
    """Options every quantizer shares."""

    bits: int = Field(4, description=f"bits per weight code, {MIN_BITS}–{MAX_BITS}")
    group_size: int | None = Field(32, description="input columns per scale (null = one scale per output channel); "
                                                   "32 matches GGUF's blocks")
    symmetric: bool = Field(True, description="symmetric grid (zero point fixed at 2^(bits-1)) or asymmetric (one per group)")
    targets: str = Field("all-linear", description="layers to quantize: all-linear (not the output head), names, or re:<regex>")
    compensate: Literal["none", "lorc", "eora"] = Field(
        "none", description="low-rank compensation of each layer's quantization error: lorc (plain SVD of the error, "
                            "ZeroQuant-V2) or eora (weighted by the inputs' XᵀX, needs calibration)")
    compensate_rank: int = Field(16, ge=1, description="rank of the compensation term (capped at a layer's size)")
    bits_pattern: dict[str, int] = Field({}, description="per-layer bits overriding `bits` (module names or dotted "
                                                         "suffixes, the longest match wins; mixed precision and the "
                                                         "planner fill it)")
    rank_pattern: dict[str, int] = Field({}, description="per-layer compensation ranks overriding compensate_rank "
                                                         "(names as in bits_pattern; 0: no compensation for that layer)")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if not MIN_BITS <= v <= MAX_BITS:
            raise ValueError(f"bits must be between {MIN_BITS} and {MAX_BITS}, not {v}")
        return v

    @field_validator("bits_pattern")
    @classmethod
    def _bits_pattern(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {k: b for k, b in v.items() if not MIN_BITS <= b <= MAX_BITS}
        if bad:
            raise ValueError(f"bits must be between {MIN_BITS} and {MAX_BITS}: {bad}")
        return v

    @field_validator("rank_pattern")
    @classmethod
    def _rank_pattern(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {k: r for k, r in v.items() if r < 0}
        if bad:
            raise ValueError(f"compensation ranks must be ≥ 0: {bad}")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError(f"group_size must be positive or null (per channel), not {v}")
        return v

    @property
    def grid(self) -> Grid:
        return Grid(self.bits, self.group_size, self.symmetric)

    def grid_for(self, name: str) -> Grid:
        """The grid of layer `name`: `bits_pattern`'s bits if it names the layer, else `bits`."""
        return Grid(pattern_value(self.bits_pattern, name, self.bits), self.group_size, self.symmetric)

    def rank_for(self, name: str) -> int:
        """The compensation rank of layer `name` (0: none)."""
        return 0 if self.compensate == "none" else pattern_value(self.rank_pattern, name, self.compensate_rank)


class Quantizer(Protocol):
    config: type[QuantConfig]
    observe: tuple[str, ...]  # () = data-free
    summary: str

    def quantize_groups(self, ctx, groups: list[list[str]], cfg: QuantConfig) -> None:
        """Replace the linears of `groups` (each: modules reading one input, in forward order) in ctx.model."""


QUANTIZERS: dict[str, Quantizer] = {}


def register_quantizer(name: str):
    def wrap(cls):
        QUANTIZERS[name] = cls()
        return cls

    return wrap


def get_quantizer(name: str) -> Quantizer:
    import_all(__name__, __path__)
    return lookup(QUANTIZERS, name, "quantization method")


def all_quantizers() -> dict[str, Quantizer]:
    import_all(__name__, __path__)
    return dict(sorted(QUANTIZERS.items()))


from .apply import QuantReport, quantize, quantize_  # noqa: E402  (the verbs use the registry above)
from .linear import QuantLinear, dequantize_, quantized_layers  # noqa: E402

__all__ = ["QuantConfig", "QuantLinear", "QuantReport", "all_quantizers", "dequantize_", "get_quantizer",
           "quantize", "quantize_", "quantized_layers", "register_quantizer"]
