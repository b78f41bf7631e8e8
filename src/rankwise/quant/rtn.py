"""RTN: round each weight to the nearest point of its group's grid (data-free baseline)."""

from __future__ import annotations

from . import QuantConfig, register_quantizer
from ..numerics.quantize import rtn


class RTNConfig(QuantConfig):
    """Round-to-nearest: scales from each group's range, no calibration."""


@register_quantizer("rtn")
class RTN:
    config = RTNConfig
    observe: tuple[str, ...] = ()
    summary = "round-to-nearest on a symmetric/asymmetric, per-channel or grouped grid; data-free"

    def quantize_groups(self, ctx, groups, cfg: RTNConfig) -> None:
        for group in groups:
            for name in group:
                ctx.replace(name, *rtn(ctx.linear(name).weight.detach(), ctx.grid(name)))
