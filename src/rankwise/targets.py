"""Which linear layers to adapt: "all-linear", names ("q_proj,v_proj" or a list), or "re:<regex>".

One syntax everywhere: the same string means the same in Python, YAML and on the command line."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence

from torch import nn

from .errors import TargetError

# Task heads are trained whole (or left alone), never given an adapter by "all-linear".
_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or a compressed linear of rankwise's (QuantLinear, LowRankLinear: `rankwise_linear = True`)."""
    return isinstance(module, nn.Linear) or getattr(module, "rankwise_linear", False)


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer in the model, by qualified name, in module order: nn.Linear and rankwise's
    compressed linears, these as one layer each (a LowRankLinear's own two factors are not listed)."""
    found: dict[str, nn.Module] = {}
    inside: tuple[str, ...] = ()  # prefixes of compressed linears seen (named_modules visits parents first)
    for n, m in model.named_modules():
        if is_linear(m) and not n.startswith(inside):
            found[n] = m
            if getattr(m, "rankwise_linear", False):
                inside += (f"{n}.",)
    return found


def task_heads(model: nn.Module) -> list[str]:
    """The top-level modules of a task model that are not its base model (transformers' `base_model`):
    BERT's classifier, DistilBERT's pre_classifier + classifier, RoBERTa's classifier (dense, out_proj),
    DeBERTa's pooler + classifier, ModernBERT's head + classifier, a decoder's score or lm_head. A base
    model alone has none. These are trained whole or left alone, never given an adapter."""
    base = getattr(model, "base_model", None)
    if not isinstance(base, nn.Module) or base is model:
        return []
    return [n for n, child in model.named_children() if child is not base and any(True for _ in child.parameters())]


def _head_names(model: nn.Module) -> set[str]:
    heads = set(task_heads(model))
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if (out is not None and module is out) or name.split(".")[-1] in _HEAD_NAMES:
            heads.add(name)
    return heads


def _in_head(name: str, heads: set[str]) -> bool:
    return any(name == h or name.startswith(h + ".") for h in heads)


def _matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def parse_targets(targets: str | Sequence[str]) -> str | re.Pattern | list[str]:
    """"all-linear", a compiled regex (from "re:<regex>"), or a list of names (a comma-separated string)."""
    if isinstance(targets, str):
        spec = targets.strip()
        if spec == "all-linear":
            return spec
        if spec.startswith("re:"):
            try:
                return re.compile(spec[3:])
            except re.error as e:
                raise TargetError(f"target regex {spec[3:]!r} is not valid: {e}") from None
        targets = spec.split(",")
    names = [str(t).strip() for t in targets if str(t).strip()]
    if not names:
        raise TargetError(f"targets={targets!r} names no layer; use 'all-linear', names such as 'q_proj,v_proj', or 're:<regex>'")
    return names


def find_targets(model: nn.Module, targets: str | Sequence[str] = "all-linear") -> list[str]:
    """Resolve a target spec to module names.

    "all-linear": every nn.Linear but the output head; names or dotted suffixes ("q_proj",
    "layers.0.mlp.up_proj"), as a list or one comma-separated string; "re:<regex>": a regex that must
    match a full module name.
    """
    linears = linear_modules(model)
    spec = parse_targets(targets)
    if spec == "all-linear":
        warn_fused_experts(model)
        heads = _head_names(model)
        found = [n for n in linears if not _in_head(n, heads)]
    elif isinstance(spec, re.Pattern):
        found = [n for n in linears if spec.fullmatch(n)]
    else:
        keys = spec
        found = [n for n in linears if any(_matches(n, k) for k in keys)]
        modules = dict(model.named_modules())
        for key in keys:
            hits = [n for n in modules if _matches(n, key)]
            bad = [n for n in hits if n not in linears]
            if bad and not any(n in linears for n in hits):
                kind = type(modules[bad[0]]).__name__
                raise TargetError(
                    f"target {key!r} matches {bad[0]!r}, a {kind}; rankwise adapts linear layers only"
                )
            if not hits:  # a typo must not leave its layers silently out
                raise TargetError(f"no linear layer matches target {key!r}; {closest(key, list(linears))}")
    if not found:
        _refuse_conv1d(model)
        raise TargetError(
            f"no linear layer matches targets={targets!r}. Linear layers in this model: "
            f"{_summarize(list(linears))}. Use 'all-linear', names such as 'q_proj,v_proj', or 're:<regex>'."
        )
    return found


def _refuse_conv1d(model: nn.Module) -> None:
    """TargetError for a model whose projections are transformers' Conv1D (GPT-2 and its kin: weight stored
    [in, out]), which rankwise does not adapt, quantize or compress."""
    conv = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    if conv:
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise TargetError(f"{kind}: its projections ({conv[0]} and {len(conv) - 1} more) are transformers' Conv1D "
                          "layers (weights stored transposed); call rankwise.linearize_conv1d_(model) first, which "
                          "turns them into the nn.Linear they compute (rankwise.load_model does it)")


def fused_experts(model: nn.Module) -> dict[str, int]:
    """{name: numel} of the 3-D parameters of fused MoE experts (transformers 5's Mixtral, Qwen3-MoE, …):
    weights no linear-layer target covers."""
    return {n: p.numel() for n, p in model.named_parameters() if p.ndim == 3}


def warn_fused_experts(model: nn.Module) -> None:
    """Say once per model that its fused experts are left as they are (float, no adapter)."""
    experts = fused_experts(model)
    if not experts or getattr(model, "_rankwise_experts_warned", False):
        return
    import warnings

    share = sum(experts.values()) / max(sum(p.numel() for p in model.parameters()), 1)
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    warnings.warn(f"{kind}: {share:.0%} of the weights are fused MoE expert parameters ({next(iter(experts))}, "
                  f"{len(experts)} tensors) that no linear-layer target covers: they stay as they are. Call "
                  "rankwise.unfuse_experts_(model) first (rankwise.load_model and quantize do) to make each expert's "
                  "projections linear layers", stacklevel=3)
    object.__setattr__(model, "_rankwise_experts_warned", True)


def closest(key: str, names: Sequence[str]) -> str:
    """'closest: …' naming the layer names (leaf or full) nearest to a mistyped key."""
    leaves = sorted({n.split(".")[-1] for n in names})
    near = difflib.get_close_matches(key, leaves, n=3, cutoff=0.5) + difflib.get_close_matches(key, list(names), n=3, cutoff=0.5)
    return f"closest: {', '.join(near)}" if near else f"layers here: {_summarize(list(names))}"


def pattern_value(pattern: Mapping[str, object], name: str, default=None):
    """The value a per-layer pattern ({name or dotted suffix: value}) gives layer `name`: an exact key first,
    then the longest suffix that matches ("down_proj", "layers.0.mlp.down_proj"), else `default`."""
    if name in pattern:
        return pattern[name]
    keys = [k for k in pattern if _matches(name, k)]
    return pattern[max(keys, key=len)] if keys else default


def check_pattern(pattern: Mapping[str, object], names: Sequence[str], what: str) -> None:
    """TargetError for a key of a per-layer pattern that names none of the layers `names` (a typo would
    otherwise leave those layers at the default without a word)."""
    for key in pattern:
        if not any(_matches(n, key) for n in names):
            raise TargetError(f"{what} key {key!r} matches none of the targeted layers; {closest(key, names)}")


def _summarize(names: list[str], limit: int = 12) -> str:
    """Short listing: distinct leaf names first (what users usually type), then a few full names."""
    leaves = sorted({n.split(".")[-1] for n in names})
    shown = ", ".join(names[:limit]) + (f", … ({len(names)} in all)" if len(names) > limit else "")
    return f"leaf names [{', '.join(leaves)}]; full names [{shown}]"
