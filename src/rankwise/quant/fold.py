"""Where a per-input-channel scale can be folded into the op that produces a layer's input.

AWQ multiplies a layer's weight columns by s and must divide its input by s. That division is free
when the input comes straight out of an op whose output channels can be rescaled and that feeds
nothing else: the RMSNorm before q/k/v or gate/up in pre-norm decoders (its output feeds only those),
v_proj's rows before o_proj (attention mixes tokens, not channels; only without grouped KV heads),
up_proj's rows before down_proj (down's input is act(gate)·up). BERT's LayerNorms also feed the
residual stream, so only value → attention.output.dense folds there.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


PRE_NORM_DECODERS = {"llama", "mistral", "qwen2", "qwen3"}


def _llama_source(model: nn.Module, group: list[str]) -> tuple[str, str] | None:
    block, _, rest = group[0].rpartition(".")
    block = block.rpartition(".")[0]  # …layers.i
    leaves = {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in group}
    if leaves == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}:
        return "norm", f"{block}.input_layernorm"
    if leaves == {"mlp.gate_proj", "mlp.up_proj"}:
        return "norm", f"{block}.post_attention_layernorm"
    if leaves == {"self_attn.o_proj"}:
        v, o = model.get_submodule(f"{block}.self_attn.v_proj"), model.get_submodule(group[0])
        return ("rows", f"{block}.self_attn.v_proj") if v.out_features == o.in_features else None
    if leaves == {"mlp.down_proj"}:
        return "rows", f"{block}.mlp.up_proj"
    return None


def fold_source(model: nn.Module, group: list[str]) -> tuple[str, str] | None:
    """(kind, module name) of the op whose output channels can absorb 1/s for this group, or None.

    kind "norm": a norm's weight (and bias); "rows": a linear's output rows (and bias). An op that is
    already compressed cannot absorb a scale (a quantized one would leave its grid; a factored one has no
    weight of its own to scale), so it does not count.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    found = None
    if model_type in PRE_NORM_DECODERS:
        found = _llama_source(model, group)
    elif model_type == "bert" and len(group) == 1 and group[0].endswith("attention.output.dense"):
        found = "rows", group[0].removesuffix("output.dense") + "self.value"
    if found is None:
        return None
    try:
        src = model.get_submodule(found[1])
    except AttributeError:
        return None
    return None if getattr(src, "rankwise_linear", False) else found  # quantized or factored: no plain rows


@torch.no_grad()
def fold_(model: nn.Module, source: tuple[str, str], s: Tensor) -> None:
    """Divide the source op's output channel c by s[c] (in place)."""
    kind, name = source
    mod = model.get_submodule(name)
    if kind == "norm":
        mod.weight.div_(s.to(mod.weight))
    else:
        mod.weight.div_(s.to(mod.weight)[:, None])
    if getattr(mod, "bias", None) is not None:
        mod.bias.div_(s.to(mod.bias))
