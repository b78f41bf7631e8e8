"""transformers' Conv1D (GPT-2 and its kin) as nn.Linear while rankwise works on it, and back for checkpoints.

Conv1D computes x·W + b with W stored [in, out]: the transpose of nn.Linear's weight, nothing else. rankwise's
calibration, inits, quantizers and compressors all read [out, in] linears, so `linearize_conv1d_` swaps each
Conv1D for the nn.Linear computing the same (a `Conv1DLinear`, whose state dict keeps Conv1D's layout, so a
plain `save_pretrained` still writes what GPT-2 loads; their names kept in `model.rankwise_conv1d`, whatever
replaces them later), and every dense export calls `restore_conv1d_` so the folder holds GPT-2's own modules. peft adapters need no change: LoRA's A and B are the
same for both, and peft sets fan_in_fan_out itself when it meets a Conv1D on load.
"""

from __future__ import annotations

import torch
from torch import nn

from .quant.linear import set_module


def _conv1d_type():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    return isinstance(module, _conv1d_type())


class Conv1DLinear(nn.Linear):
    """The nn.Linear a Conv1D computes, whose state dict keeps Conv1D's [in, out] layout: `save_pretrained` of a
    linearized model still writes the checkpoint GPT-2 loads, and a GPT-2 checkpoint loads into it."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        w = destination[prefix + "weight"]
        destination[prefix + "weight"] = w.t() if keep_vars else w.t().contiguous()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        if key in state_dict and state_dict[key].shape == (self.in_features, self.out_features):
            state_dict = {**state_dict, key: state_dict[key].t()}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@torch.no_grad()
def linearize_conv1d_(model: nn.Module) -> list[str]:
    """Replace every Conv1D by an equal nn.Linear (weight transposed; its state dict keeps Conv1D's layout), in
    place; return their names."""
    names = [n for n, m in model.named_modules() if is_conv1d(m)]
    for name in names:
        conv = model.get_submodule(name)
        w = conv.weight
        lin = Conv1DLinear(w.shape[0], w.shape[1], bias=conv.bias is not None, device=w.device, dtype=w.dtype)
        lin.weight = nn.Parameter(w.t().contiguous(), requires_grad=w.requires_grad)
        if conv.bias is not None:
            lin.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=conv.bias.requires_grad)
        set_module(model, name, lin)
    model.rankwise_conv1d = sorted(set(getattr(model, "rankwise_conv1d", [])) | set(names))
    return names


@torch.no_grad()
def restore_conv1d_(model: nn.Module) -> nn.Module:
    """Put a Conv1D back in place of every linear linearize_conv1d_ made (float weights: dequantize or merge
    first). Returns the model."""
    Conv1D = _conv1d_type()
    for name in getattr(model, "rankwise_conv1d", []):
        lin = model.get_submodule(name)
        if type(lin) not in (nn.Linear, Conv1DLinear):
            raise TypeError(f"{name} is a {type(lin).__name__}; restore_conv1d_ needs float linears (dequantize first)")
        conv = Conv1D(lin.out_features, lin.in_features).to(device=lin.weight.device, dtype=lin.weight.dtype)
        conv.weight = nn.Parameter(lin.weight.detach().t().contiguous(), requires_grad=False)
        conv.bias = nn.Parameter(lin.bias.detach().clone() if lin.bias is not None
                                 else torch.zeros_like(conv.bias), requires_grad=False)
        set_module(model, name, conv)
    model.rankwise_conv1d = []
    return model

