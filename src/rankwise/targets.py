"""Which linear layers to adapt: "all-linear", a list of names, or a regex."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from .errors import TargetError

# Task heads are trained whole (or left alone), never given an adapter by "all-linear".
_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear in the model, by qualified name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _head_names(model: nn.Module) -> set[str]:
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if (out is not None and module is out) or name.split(".")[-1] in _HEAD_NAMES:
            heads.add(name)
    return heads


def _matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def find_targets(model: nn.Module, targets: str | Sequence[str] = "all-linear") -> list[str]:
    """Resolve a target spec to module names.

    "all-linear": every nn.Linear but the output head; a list: names or dotted suffixes
    ("q_proj", "layers.0.mlp.up_proj"); any other string: a regex matched against full names.
    """
    linears = linear_modules(model)
    if targets == "all-linear":
        heads = _head_names(model)
        found = [n for n in linears if n not in heads]
    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise TargetError(f"target regex {targets!r} is not valid: {e}") from None
        found = [n for n in linears if pattern.fullmatch(n)]
    else:
        keys = list(targets)
        found = [n for n in linears if any(_matches(n, k) for k in keys)]
        modules = dict(model.named_modules())
        for key in keys:
            hits = [n for n in modules if _matches(n, key)]
            bad = [n for n in hits if n not in linears]
            if bad and not any(n in linears for n in hits):
                kind = type(modules[bad[0]]).__name__
                raise TargetError(
                    f"target {key!r} matches {bad[0]!r}, a {kind}; rankwise adapts nn.Linear layers only"
                )
    if not found:
        raise TargetError(
            f"no linear layer matches targets={targets!r}. Linear layers in this model: "
            f"{_summarize(list(linears))}. Use 'all-linear', names such as 'q_proj', or a regex."
        )
    return found


def _summarize(names: list[str], limit: int = 12) -> str:
    """Short listing: distinct leaf names first (what users usually type), then a few full names."""
    leaves = sorted({n.split(".")[-1] for n in names})
    shown = ", ".join(names[:limit]) + (f", … ({len(names)} in all)" if len(names) > limit else "")
    return f"leaf names [{', '.join(leaves)}]; full names [{shown}]"
