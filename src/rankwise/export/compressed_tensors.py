"""compressed-tensors checkpoints (`pack-quantized`; `int-quantized` for asymmetric grids) of a rankwise-quantized model.

transformers loads them with plain `from_pretrained` (tested here); no one has checked that vLLM serves
them, so rankwise does not claim it. Our grid maps onto
compressed-tensors' int grid one to one: its code is q − 2^(b−1) ∈ [−2^(b−1), 2^(b−1) − 1] and its
zero point z − 2^(b−1) (0 when symmetric), with the same scales, so the saved integers are ours: the
library re-derives them as round(W/s + z′) from the exact weight (q − z)·s and our own scales.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..atomic import staging_dir
from ..errors import QuantError
from ..quant.linear import QuantLinear, dequantize_, quantized_layers
from .check import check_reloadable


def scheme_key(q: QuantLinear) -> tuple:
    """(bits, group_size, symmetric): what decides a layer's compressed-tensors scheme."""
    return (q.grid.bits, q.grid.group_size, q.grid.symmetric)


def quantization_config(schemes: dict[str, tuple]):
    """compressed-tensors' QuantizationConfig for {layer name: scheme_key}."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    groups: dict[tuple, list[str]] = {}
    for name, key in schemes.items():
        groups.setdefault(key, []).append(name)
    config_groups = {}
    for i, ((bits, group_size, symmetric), names) in enumerate(groups.items()):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                                strategy="channel" if group_size is None else "group", group_size=group_size)
        config_groups[f"group_{i}"] = QuantizationScheme(targets=names, weights=args)
    return QuantizationConfig(config_groups=config_groups, format=compression_format([k[2] for k in schemes.values()], warn=False))


ASYMMETRIC_NOTE = ("asymmetric grids are written int-quantized, one int8 per code (not packed): compressed-tensors "
                   "0.20's pack-quantized format, which its W4A16_ASYM preset writes, packs the zero points too "
                   "([rows/8, groups] int32), and transformers 5.23 refuses that shape on load; quantize with "
                   "--symmetric for a packed checkpoint")


def compression_format(symmetric: list[bool], warn: bool = True) -> str:
    """pack-quantized (int32 words of codes); int-quantized when a grid is asymmetric (ASYMMETRIC_NOTE)."""
    if all(symmetric):
        return "pack-quantized"
    if warn:
        warnings.warn(f"compressed-tensors: {ASYMMETRIC_NOTE}", stacklevel=3)
    return "int-quantized"


def check_model_type(model: nn.Module) -> None:
    """QuantError, before any work, for a model whose compressed-tensors checkpoint would not reload: a family
    the architecture table marks so (MoE experts, ModernBERT), or fused MoE experts of a family without entry."""
    from ..arch import arch_of
    from ..targets import fused_experts

    kind = getattr(model.config, "model_type", type(model).__name__)
    family = arch_of(model)
    why = family.no_compressed_tensors if family is not None else None
    experts = fused_experts(model) if why is None else {}
    if experts:
        why = f"fused MoE experts ({next(iter(experts))}) do not reload in transformers 5.23"
    if why:
        raise QuantError(f"{kind}: a compressed-tensors checkpoint does not reload: {why}; use --format safetensors "
                         "(dequantized, reloads)")


def _check_exportable(layers: dict[str, QuantLinear]) -> None:
    if not layers:
        raise QuantError("the model holds no quantized layer (rankwise.quantize first, or export the float model as 'safetensors')")
    scaled = [n for n, q in layers.items() if q.input_scale is not None]
    if scaled:
        more = f" and {len(scaled) - 1} more layers keep" if len(scaled) > 1 else " keeps"
        raise QuantError(f"{scaled[0]}{more} an explicit AWQ input scale, which compressed-tensors cannot "
                         "store; quantize with awq explicit_scales=false, or export as 'safetensors'")


@torch.no_grad()
def compress_(plain: nn.Module, layers: dict[str, QuantLinear], warn: bool = True):
    """Turn `plain` (float32, the quantized layers dequantized; a whole model or one block, `layers` named
    relative to it) into its compressed-tensors form in place; returns the ModelCompressor."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config

    qconfig = quantization_config({n: scheme_key(q) for n, q in layers.items()})
    qconfig.format = compression_format([q.grid.symmetric for q in layers.values()], warn)
    apply_quantization_config(plain, qconfig)
    for name, q in layers.items():
        mod = plain.get_submodule(name)
        mod.weight.data = q.grid_weight().to(mod.weight.dtype)  # the grid alone; a compensation goes beside it
        half = 2 ** (q.grid.bits - 1)
        mod.weight_scale.data = q.scale.to(mod.weight_scale.dtype).reshape(mod.weight_scale.shape)
        zp = (q.zero.to(torch.int32) - half).reshape(mod.weight_zero_point.shape)
        mod.weight_zero_point.data = zp.to(mod.weight_zero_point.dtype)
    freeze_(plain)
    compressor = ModelCompressor.from_pretrained_model(plain, quantization_format=qconfig.format)
    compressor.compress_model(plain)
    return compressor


def freeze_(model: nn.Module) -> None:
    """Mark every module with a quantization scheme frozen (what ModelCompressor expects before compressing)."""
    from compressed_tensors.quantization import QuantizationStatus

    for m in model.modules():
        if getattr(m, "quantization_scheme", None) is not None:
            m.quantization_status = QuantizationStatus.FROZEN


@torch.no_grad()
def export_compressed_tensors(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Write `model` (with QuantLinear layers) as a compressed-tensors pack-quantized folder; returns it."""

    check_model_type(model)
    layers = quantized_layers(model)
    _check_exportable(layers)
    # Exact weights (q − z)·s as nn.Linear, in float32: compressed-tensors gives the scales the weight's
    # dtype and re-derives the codes as round(W/s + z′), which bfloat16 weights and scales would not keep.
    plain = dequantize_(copy.deepcopy(model)).float()
    check_reloadable(plain, f"compressed-tensors export to {out_dir}")
    compressor = compress_(plain, layers)
    out = Path(out_dir)
    with staging_dir(out) as tmp:
        plain.save_pretrained(tmp)
        compressor.update_config(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if any(q.lora_a is not None for q in layers.values()):
            export_compensation(model, tmp / "compensation")
    return out


def load_compensated(ckpt: str | os.PathLike, cls=None):
    """A compressed-tensors checkpoint written by rankwise, with its `compensation/` adapter applied if it has one.

    The recipe, for use without rankwise: `model = AutoModelForCausalLM.from_pretrained(ckpt)`;
    `model.hf_quantizer.compressor.decompress_model(model)` (peft needs each layer's `weight`, and
    transformers keeps 4- and 8-bit pack-quantized layers packed; its `CompressedTensorsConfig(dequantize=True)`
    decodes every layer with the first config group's scheme in transformers 5.23, wrong for mixed bits);
    then `PeftModel.from_pretrained(model, ckpt / "compensation")`.
    """
    from transformers import AutoModelForCausalLM

    ckpt = Path(ckpt)
    model = (cls or AutoModelForCausalLM).from_pretrained(ckpt)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "compressor"):
        quantizer.compressor.decompress_model(model)
    if (ckpt / "compensation" / "adapter_config.json").exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, ckpt / "compensation")
    return model.eval()


@torch.no_grad()
def export_compensation(model: nn.Module, out_dir: str | os.PathLike) -> Path:
    """The layers' low-rank compensations B·A as a peft LoRA adapter (scaling 1) for the quantized checkpoint:
    `load_compensated(ckpt)` (in this module) loads both."""
    return write_compensation({n: (q.lora_a, q.lora_b) for n, q in quantized_layers(model).items()
                               if q.lora_a is not None}, out_dir)


def write_compensation(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], out_dir: str | os.PathLike) -> Path:
    """{layer: (A [k, in], B [out, k])} as a peft LoRA adapter folder with scaling 1 (alpha = rank per layer),
    the factors stored in float16 (float16-exact already, see Context._compensate: stored as counted)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    ranks = {n: a.shape[0] for n, (a, _) in factors.items()}
    r = max(ranks.values())
    cfg = LoraConfig(r=r, lora_alpha=r, target_modules=sorted(factors), init_lora_weights=False,
                     rank_pattern={n: k for n, k in ranks.items() if k != r},
                     alpha_pattern={n: k for n, k in ranks.items() if k != r})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out)
    tensors = {}
    for n, (a, b) in factors.items():  # peft's names in a saved adapter: the adapter name left out
        tensors[f"base_model.model.{n}.lora_A.weight"] = a.detach().half().contiguous()
        tensors[f"base_model.model.{n}.lora_B.weight"] = b.detach().half().contiguous()
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out
