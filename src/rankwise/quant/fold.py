"""Where a per-input-channel scale can be folded into the op that produces a layer's input.

AWQ multiplies a layer's weight columns by s and must divide its input by s. That division is free when
the input comes straight out of an op whose output channels can be rescaled and that feeds nothing else;
which ops those are is each family's `folds` in the architecture table (arch/families.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..arch import arch_of, block_of, note_generic


class FoldSource(NamedTuple):
    """The op absorbing 1/s: kind "norm" (its weight, offset + w for Gemma's norms, and bias) or "rows" (the last
    `rows` output rows of a linear, all of them unless fused)."""

    kind: str
    name: str
    offset: float = 0.0
    rows: int | None = None


def fold_source(model: nn.Module, group: list[str]) -> FoldSource | None:
    """The op whose output channels can absorb 1/s for this group of linears reading one input, or None.

    An op that is already compressed cannot absorb a scale (a quantized one would leave its grid; a factored
    one has no weight of its own to scale), so it does not count; nor does a norm without a weight (ModernBERT's
    first attn_norm is an Identity).
    """
    arch = arch_of(model)
    if arch is None:
        note_generic(model, "AWQ's scales cannot be folded into earlier ops and stay explicit on the layers")
        return None
    where = [block_of(arch, n) for n in group]
    if any(w is None for w in where) or len({w[0] for w in where}) != 1:
        return None
    block, inner = where[0][0], {w[1] for w in where}
    config = getattr(model, "config", None)
    for fold in arch.folds:
        if set(fold.reads) == inner and (fold.when is None or fold.when(config)):
            return _checked(model, fold, f"{block}.{fold.source}", model.get_submodule(group[0]), arch.norm_offset)
    return None


def _checked(model: nn.Module, fold, name: str, reader: nn.Module, offset: float) -> FoldSource | None:
    try:
        src = model.get_submodule(name)
    except AttributeError:
        return None
    if getattr(src, "rankwise_linear", False) or not isinstance(getattr(src, "weight", None), Tensor):
        return None
    if fold.kind == "norm":
        return FoldSource("norm", name, offset)
    n_in = reader.in_features
    if src.weight.shape[0] != fold.parts * n_in:  # grouped KV heads: v's rows are not o's inputs
        return None
    return FoldSource("rows", name, 0.0, n_in if fold.parts > 1 else None)


@torch.no_grad()
def fold_(model: nn.Module, source: tuple, s: Tensor) -> None:
    """Divide the source op's output channel c by s[c] (in place)."""
    kind, name, offset, rows = FoldSource(*source)
    mod = model.get_submodule(name)
    if kind == "norm":  # x̂·(offset + w) / s = x̂·(offset + w') with w' = (offset + w)/s − offset
        mod.weight.copy_((mod.weight + offset) / s.to(mod.weight) - offset)
        if getattr(mod, "bias", None) is not None:
            mod.bias.div_(s.to(mod.bias))
        return
    part = slice(mod.weight.shape[0] - rows, None) if rows else slice(None)
    mod.weight[part].div_(s.to(mod.weight)[:, None])
    if getattr(mod, "bias", None) is not None:
        mod.bias[part].div_(s.to(mod.bias))
