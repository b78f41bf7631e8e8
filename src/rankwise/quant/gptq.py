"""GPTQ (Frantar et al. 2022): quantize columns one by one, compensating each rounding error on the
columns still to come through the inverse Hessian H = XᵀX of the layer's calibration inputs."""

from __future__ import annotations

import warnings

import torch
from pydantic import Field

from . import QuantConfig, register_quantizer
from ..errors import QuantError
from ..numerics.quantize import gptq

FEW_TOKENS_DAMP = 0.1  # dampening when a layer saw fewer calibration tokens than it has input channels


class GPTQConfig(QuantConfig):
    """GPTQ's options (defaults as in the paper's code and llm-compressor)."""

    damp: float = Field(0.01, description="dampening λ = damp · mean(diag H) added to H's diagonal", gt=0)
    block_size: int = Field(128, description="columns per lazy batch update", gt=0)
    act_order: bool = Field(False, description="quantize columns by descending H_jj (groups stay contiguous: static groups)")
    true_sequential: bool = Field(False, description="within a block, calibrate o_proj after q/k/v are quantized, "
                                                     "down_proj after gate/up, …")


@register_quantizer("gptq")
class GPTQ:
    config = GPTQConfig
    observe = ("moments",)
    summary = "GPTQ (Frantar et al. 2022): column sweep with inverse-Hessian error feedback, from XᵀX"

    def quantize_groups(self, ctx, groups, cfg: GPTQConfig) -> None:
        for group in groups:
            h = ctx.hessian(group[0])  # one Hessian for the modules that read the same input
            damp, note = cfg.damp, ""
            tokens = ctx.tokens(group[0])
            if tokens < h.shape[0] and damp < FEW_TOKENS_DAMP:
                damp, note = FEW_TOKENS_DAMP, f"{tokens} tokens < {h.shape[0]} inputs: damp {cfg.damp:g} → {FEW_TOKENS_DAMP}"
                warnings.warn(f"{', '.join(group)}: {tokens} calibration tokens for {h.shape[0]} input channels, so "
                              f"the Hessian XᵀX is singular; at least {h.shape[0]} tokens are needed (better: several "
                              f"times that). Dampening was raised from {cfg.damp:g} to {damp:g} to keep it invertible.",
                              stacklevel=2)
            # Rows are independent given H: one sweep over the stacked weights of the layers that share
            # the input and the grid (q/k/v: 3 → 1; with mixed precision, one per bit width).
            by_grid: dict = {}
            for n in group:
                by_grid.setdefault(ctx.grid(n), []).append(n)
            for grid, names in by_grid.items():
                self._sweep(ctx, names, h, grid, damp, note, cfg)

    @staticmethod
    def _sweep(ctx, names: list[str], h, grid, damp: float, note: str, cfg: GPTQConfig) -> None:
        weights = [ctx.linear(n).weight.detach() for n in names]
        try:
            res = gptq(torch.cat(weights), h, grid, damp=damp, block_size=cfg.block_size, act_order=cfg.act_order)
        except ValueError as e:
            raise QuantError(f"{', '.join(names)}: {e}; check the calibration data reaching these layers") from None
        if res.damp != damp:
            note = (note + "; " if note else "") + f"H + λI did not factor: damp raised to {res.damp:g}"
        rows = [w.shape[0] for w in weights]
        for name, c, sc, z in zip(names, res.codes.split(rows), res.scale.split(rows), res.zero.split(rows)):
            ctx.replace(name, c, sc, z, note=note)
