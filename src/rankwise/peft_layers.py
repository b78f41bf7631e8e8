"""peft LoRA on rankwise's compressed linears (QuantLinear, LowRankLinear): QLoRA-style training on a
quantized or SVD-compressed base, through peft's own LoRA layer and its custom-module hook."""

from __future__ import annotations

import torch
from torch import nn

from .quant.linear import plain_linear


def _lora_linear():
    from peft.tuners.lora.layer import Linear

    class CompressedLoraLinear(Linear):
        """peft's lora.Linear over a frozen compressed base: y = base(x) + s·B·A·x. The base is never
        written: merging needs a float weight, so `materialize_bases_` first swaps in an nn.Linear."""

        def _get_in_out_features(self, module: nn.Module):
            return module.in_features, module.out_features

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            base = self.get_base_layer()
            if isinstance(base, nn.Linear):  # materialized
                return super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
            base = type(base).__name__
            raise NotImplementedError(f"cannot merge a LoRA adapter into a {base} (its weight is computed, not stored); "
                                      "call rankwise.peft_layers.materialize_bases_(model) first, or export the "
                                      "adapter and the compressed base separately")

    return CompressedLoraLinear


_CLASS = None


def lora_class():
    """The LoRA layer class peft should build for a compressed linear (created once, peft imported lazily)."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _lora_linear()
    return _CLASS


def compressed_types(model: nn.Module) -> list[type]:
    """The compressed-linear classes present in `model` (empty for a plain float model)."""
    return sorted({type(m) for m in model.modules() if getattr(m, "rankwise_linear", False)}, key=lambda t: t.__name__)


def register_compressed(config, model: nn.Module):
    """Tell a peft LoraConfig how to wrap the compressed linears of `model` (no-op without any)."""
    types = compressed_types(model)
    if types:
        config._register_custom_module({t: lora_class() for t in types})
    return config


def merged_copy(peft_model):
    """A copy of the model with the adapter folded into the effective (float) base weights, peft unloaded."""
    import copy

    from .cores import fold_cores_

    merged = copy.deepcopy(peft_model)
    fold_cores_(merged)
    materialize_bases_(merged)
    return merged.merge_and_unload()


@torch.no_grad()
def materialize_bases_(peft_model) -> None:
    """Replace each compressed base under a LoRA layer by an nn.Linear holding its effective float weight,
    so that peft's merge works (in place; use on a copy)."""
    cls = lora_class()
    for module in peft_model.modules():
        if isinstance(module, cls):
            base = module.get_base_layer()
            module.base_layer = plain_linear(base.weight.detach(), base.bias).requires_grad_(False)
