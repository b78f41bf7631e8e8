"""Write only: what the ecosystem loads. Adapters: peft folders; models: a registry of formats.

`export_model(model, out, format)` writes a (possibly quantized or compressed) model as `safetensors`
(a plain transformers folder: quantized layers dequantized, low-rank layers merged), `factored` (the
low-rank layers kept as their two factors; compress/folder.py), `compressed-tensors` or `gguf` (one file).
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

from ..errors import ConfigError
from .peft import export, export_merged, read_adapter_meta

FORMATS: dict[str, callable] = {}


def register_format(name: str):
    def wrap(fn):
        FORMATS[name] = fn
        return fn

    return wrap


@register_format("safetensors")
def export_dense(model, out: str | os.PathLike, tokenizer=None, **_) -> Path:
    """A plain transformers folder: every quantized layer replaced by its float weight, every low-rank
    layer by B·A."""
    from ..atomic import staging_dir
    from ..compress.linear import merge_lowrank_
    from ..conv1d import restore_conv1d_
    from ..experts import fuse_experts_
    from ..quant.linear import dequantize_
    from .check import check_reloadable

    out = Path(out)
    plain = restore_conv1d_(fuse_experts_(merge_lowrank_(dequantize_(copy.deepcopy(model)))))
    check_reloadable(plain, f"safetensors export to {out}")
    with staging_dir(out) as tmp:
        plain.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


@register_format("factored")
def _factored(model, out, tokenizer=None, method: str = "", **_) -> Path:
    from ..compress.folder import save_factored
    from ..quant.linear import quantized_layers

    if quantized_layers(model):
        raise ConfigError("the factored folder holds low-rank and float layers only; this model also has quantized "
                          "layers: export it as 'safetensors' (merged)")
    return save_factored(model, out, tokenizer, method)


def _refuse_factored(model, fmt: str) -> None:
    from ..compress.linear import lowrank_layers

    names = list(lowrank_layers(model))
    if names:
        raise ConfigError(f"{fmt} cannot hold low-rank (SVD-compressed) layers such as {names[0]}; export as "
                          "'safetensors' (merged dense) or 'factored'")


@register_format("compressed-tensors")
def _compressed_tensors(model, out, tokenizer=None, **_) -> Path:
    from .compressed_tensors import export_compressed_tensors

    _refuse_factored(model, "compressed-tensors")
    return export_compressed_tensors(model, out, tokenizer)


@register_format("gguf")
def _gguf(model, out, tokenizer=None, qtype: str = "auto", **_) -> Path:
    from .gguf import write_gguf

    _refuse_factored(model, "GGUF")
    out = Path(out)
    path = out if out.suffix == ".gguf" else out / "model.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(record=True) as caught:  # one line for all layers, not one per layer
        warnings.simplefilter("always")
        written = write_gguf(model, path, qtype=qtype, tokenizer=tokenizer)
    if caught:
        warnings.warn(f"GGUF: {len(caught)} tensor(s) written with re-quantization or a fallback type; the first: "
                      f"{caught[0].message}", stacklevel=2)
    return written


def export_model(model, out: str | os.PathLike, format: str = "safetensors", tokenizer=None, **options) -> Path:
    """Write `model` to `out` in `format` (see FORMATS); returns the folder or file written."""
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; available: {', '.join(FORMATS)}")
    return FORMATS[format](model, out, tokenizer=tokenizer, **options)


__all__ = ["FORMATS", "export", "export_dense", "export_merged", "export_model", "read_adapter_meta", "register_format"]
