"""Model families: the one place that knows where a family keeps its blocks, folds, experts and GGUF names.

`arch_of(model)` is the family's entry (families.py), or None for a model_type without one: such a model
still goes through the generic path (blocks found by search, no scale folding, no GGUF), and
`note_generic(model)` says so once.
"""

from __future__ import annotations

import warnings

from torch import nn

from .families import FAMILIES
from .spec import Arch, Fold, Gguf

__all__ = ["Arch", "Fold", "Gguf", "FAMILIES", "arch_of", "model_type", "note_generic", "block_of", "gguf_families"]

_BY_TYPE = {t: a for a in FAMILIES for t in a.model_types}


def model_type(model_or_config) -> str:
    """The config's model_type ("" when there is none)."""
    config = getattr(model_or_config, "config", model_or_config)
    return str(getattr(config, "model_type", "") or "")


def arch_of(model_or_config) -> Arch | None:
    """The table entry of this model's (or config's) family, or None."""
    return _BY_TYPE.get(model_type(model_or_config))


def gguf_families() -> list[str]:
    """The model_types that GGUF export writes, in table order."""
    return [t for a in FAMILIES if a.gguf is not None for t in a.model_types]


def block_of(arch: Arch, name: str) -> tuple[str, str] | None:
    """(block prefix "….layers.3", name inside the block "self_attn.q_proj") of a module name, or None if
    the name is not inside one of the family's blocks."""
    marker = f"{arch.blocks}."
    head, sep, rest = name.rpartition(marker) if name.startswith(marker) else name.rpartition("." + marker)
    if not sep:
        return None
    index, _, inner = rest.partition(".")
    if not index.isdigit() or not inner:
        return None
    return f"{head}{sep}{index}".lstrip("."), inner


def note_generic(model: nn.Module, what: str) -> None:
    """Warn once per model that its family has no entry in the architecture table, and what that costs."""
    if arch_of(model) is not None or getattr(model, "_rankwise_generic_noted", False):
        return
    kind = model_type(model) or type(model).__name__
    warnings.warn(f"{kind}: rankwise's architecture table has no entry for this family, so it goes the generic "
                  f"way: {what}. Families with an entry: {', '.join(t for a in FAMILIES for t in a.model_types[:1])}",
                  stacklevel=3)
    object.__setattr__(model, "_rankwise_generic_noted", True)
