"""What a run on a compressed base writes besides the adapter: the frozen base itself (compressed-tensors
for a quantized one, a factored folder for an SVD one) and the merged model quantized again on the
base's grids, with the error that costs."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from ..compress.folder import save_factored
from ..compress.linear import lowrank_layers
from ..numerics.quantize import rtn
from ..peft_layers import merged_copy
from ..quant.linear import QuantLinear, quantized_layers, set_module
from .compressed_tensors import export_compressed_tensors


def unloaded_base(peft_model):
    """A copy of the model under the adapter, the LoRA layers removed (not merged)."""
    return copy.deepcopy(peft_model).unload()


def export_base(peft_model, out: str | os.PathLike, tokenizer=None) -> Path | None:
    """Write the compressed base: compressed-tensors (quantized) or factored (SVD); None for a float base.
    The adapter folder then loads on it with peft (`load_compensated(out)`, then PeftModel.from_pretrained)."""
    base = unloaded_base(peft_model)
    if quantized_layers(base):
        return export_compressed_tensors(base, out, tokenizer)
    if lowrank_layers(base):
        return save_factored(base, out, tokenizer)
    return None


@torch.no_grad()
def requantize(peft_model) -> tuple[torch.nn.Module, dict[str, float]]:
    """The merged model (adapter folded into the effective weights) rounded again onto each quantized layer's
    grid (RTN, fresh scales): (that model, {layer: ‖W_merged − Q‖_F / ‖W_merged‖_F}). A layer the adapter
    does not touch keeps its codes as they are (error 0)."""
    grids = {n.removesuffix(".base_layer"): q for n, q in quantized_layers(peft_model.get_base_model()).items()}
    merged = merged_copy(peft_model)
    errors = {}
    for name, q in grids.items():
        lin = merged.get_submodule(name)
        if isinstance(lin, QuantLinear):  # no LoRA layer on it: nothing was merged, its grid point is exact
            errors[name] = 0.0
            continue
        w = lin.weight.detach().float()
        wg = w if q.input_scale is None else w * q.input_scale.float()[None, :]  # the grid holds W·diag(c)
        again = QuantLinear(*rtn(wg, q.grid), q.grid, lin.bias, q.input_scale, q.compute_dtype)
        errors[name] = float((w - again.weight.float()).norm() / w.norm().clamp_min(1e-30))
        set_module(merged, name, again)
    return merged, errors


def export_requantized(peft_model, out: str | os.PathLike, tokenizer=None) -> tuple[Path, dict[str, float]]:
    """requantize(), written as compressed-tensors; returns (folder, per-layer relative weight errors)."""
    model, errors = requantize(peft_model)
    return export_compressed_tensors(model, out, tokenizer), errors
