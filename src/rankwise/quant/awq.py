"""AWQ (Lin et al. 2024): scale salient input channels up before rounding, by mean |x|^α, α searched
on the layers' output error; then a per-group clipping search; then round to nearest."""

from __future__ import annotations

import torch
from pydantic import Field

from . import QuantConfig, register_quantizer
from .fold import fold_, fold_source
from ..numerics.quantize import awq_search, clip_search, rtn


class AWQConfig(QuantConfig):
    """AWQ's options (grid sizes as in the paper's code)."""

    n_grid: int = Field(20, description="exponents α ∈ {0, 1/n, …, (n−1)/n} tried for s = mean|x|^α", gt=0)
    duo_scaling: bool = Field(True, description="scales from activation and weight magnitudes, mean|x|^α / mean|w|^(1−α) "
                                                "(AutoAWQ's and llm-compressor's default); false: mean|x|^α only (the paper)")
    clip: bool = Field(True, description="search each group's clipping range on its output error")
    max_shrink: float = Field(0.5, description="smallest clipping range tried, as 1 − max_shrink of the full range",
                              ge=0, lt=1)
    explicit_scales: bool = Field(True, description="where no earlier op can absorb the scale, keep it on the layer "
                                                    "(false: such layers get no scaling; GGUF/compressed-tensors "
                                                    "cannot store an explicit scale)")


@register_quantizer("awq")
class AWQ:
    config = AWQConfig
    observe = ("moments", "abs")
    summary = "AWQ (Lin et al. 2024): activation-aware channel scales (folded where possible) + clipping, then RTN"

    def quantize_groups(self, ctx, groups, cfg: AWQConfig) -> None:
        # Scales first, last group first: o_proj's scale goes into v_proj's rows before v_proj is rounded.
        plans = []
        for group in reversed(groups):
            st, h = ctx.stats[group[0]], ctx.hessian(group[0])
            weights = [ctx.linear(n).weight.detach().float() for n in group]
            s, _ = awq_search(weights, st.abs_mean, h, ctx.grid(group[0]), cfg.n_grid, cfg.duo_scaling)
            source = fold_source(ctx.model, group)
            if source is not None:
                fold_(ctx.model, source, s)
                mode = f"scale folded into {source[1]}"
            elif cfg.explicit_scales:
                mode = "explicit input scale"
            else:
                s, mode = torch.ones_like(s), "no earlier op to fold a scale into: unscaled"
            plans.append((group, s, source is not None, mode))
        for group, s, folded, mode in reversed(plans):
            h = ctx.hessian(group[0])
            h_scaled = h / (s[:, None] * s[None, :])  # the inputs the scaled weights see: X·diag(1/s)
            for name in group:
                w = ctx.linear(name).weight.detach().float()
                ws = w * s[None, :]
                clip = clip_search(ws, h_scaled, ctx.grid(name), cfg.n_grid, cfg.max_shrink) if cfg.clip else 1.0
                explicit = not folded and mode.startswith("explicit")
                ctx.replace(name, *rtn(ws, ctx.grid(name), clip), input_scale=s if explicit else None,
                            folded=s if folded else None, reference=w, note=mode)
