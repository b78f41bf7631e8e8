"""Write a model block by block as it is made: one shard per finished block, the rest (embeddings, final norm,
head), the index and config.json at the end. With a lazily loaded model (rankwise.lazy) neither the input nor
the output model is ever whole in memory. The folder appears whole or not at all: shards go to a staging
folder beside `out`, renamed over it once the last file is written.

Formats: `safetensors` (quantized layers dequantized, low-rank layers merged: a plain transformers folder),
`compressed-tensors` (each block compressed as `export_compressed_tensors` compresses a whole model) and
`factored` (low-rank layers as their two factors: compress/folder.py's layout).
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..atomic import replace_dir
from ..errors import ConfigError

STREAM_FORMATS = ("safetensors", "compressed-tensors", "factored")


class StreamWriter:
    """`block(i, module)` after each block is final, `finish(model, tokenizer)` once, or `abort()`."""

    def __init__(self, out: str | Path, model: nn.Module, blocks: str, n_blocks: int, format: str = "safetensors",
                 method: str = ""):
        if format not in STREAM_FORMATS:
            raise ConfigError(f"format {format!r} cannot be written block by block; one of {STREAM_FORMATS}")
        self.out, self.blocks, self.n, self.format, self.method = Path(out), blocks, n_blocks + 1, format, method
        self.stem = "factored" if format == "factored" else "model"
        self.ranks: dict[str, int] = {}  # factored: layer → rank
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.made = [p for p in (self.out.parent, *self.out.parent.parents) if not p.exists()]  # removed on abort
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=self.out.name + ".tmp-", dir=self.out.parent))
        self.weight_map: dict[str, str] = {}
        self.shapes: dict[str, tuple] = {}
        self.schemes: dict[str, tuple] = {}  # compressed-tensors: layer → (bits, group, symmetric)
        self.compensation: dict[str, tuple] = {}  # compressed-tensors: layer → its low-rank compensation (A, B)
        self.total = 0

    def _write(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        name = f"{self.stem}-{index + 1:05d}-of-{self.n:05d}.safetensors"
        tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
        save_file(tensors, self.tmp / name, metadata={"format": "pt"})
        for k, v in tensors.items():
            self.weight_map[k] = name
            self.shapes[k] = tuple(v.shape)
            self.total += v.numel() * v.element_size()

    @torch.no_grad()
    def block(self, i: int, module: nn.Module) -> None:
        """Write block i (the module is left as it was)."""
        self._write(i, self._tensors(module, f"{self.blocks}.{i}."))

    def _tensors(self, module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
        from ..compress.linear import lowrank_layers, merge_lowrank_
        from ..quant.linear import dequantize_, quantized_layers

        if self.format == "factored":
            self.ranks |= {prefix + n: m.rank for n, m in lowrank_layers(module).items()}
            return {prefix + k: v for k, v in module.state_dict().items()}
        layers = quantized_layers(module)
        if self.format == "compressed-tensors" and layers:
            from .compressed_tensors import compress_, scheme_key

            plain = dequantize_(copy.deepcopy(module)).float()
            compress_(plain, layers, warn=False)
            self.schemes |= {prefix + n: scheme_key(q) for n, q in layers.items()}
            self.compensation |= {prefix + n: (q.lora_a.clone(), q.lora_b.clone()) for n, q in layers.items()
                                  if q.lora_a is not None}
            quant = {f"{n}.{k}" for n in layers for k in ("weight_scale", "weight_zero_point", "weight_global_scale")}
            return {prefix + k: (v if not v.is_floating_point() or k in quant else v.to(self.dtype))
                    for k, v in plain.state_dict().items()}
        plain = merge_lowrank_(dequantize_(copy.deepcopy(module))) if layers or self.format == "safetensors" else module
        return {prefix + k: v for k, v in plain.state_dict().items()}

    @torch.no_grad()
    def finish(self, model: nn.Module, tokenizer=None) -> Path:
        """Write what lies outside the blocks, the index, config.json (and the quantization config), the
        tokenizer; check the folder holds exactly what the architecture loads; put it in place."""
        try:
            skip = self.blocks + "."
            rest, seen = {}, set()
            for k, v in model.state_dict(keep_vars=True).items():
                if k.startswith(skip) or v.is_meta:
                    continue
                if v.data_ptr() in seen and getattr(model.config, "tie_word_embeddings", False):
                    continue  # a tied head: save_pretrained writes the embedding once
                seen.add(v.data_ptr())
                rest[k] = v.detach()
            self._write(self.n - 1, rest)
            (self.tmp / f"{self.stem}.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}, indent=2))
            config = copy.deepcopy(model.config)
            config.dtype = self.dtype
            if self.format == "factored":
                from ..compress.folder import FIELD

                setattr(config, FIELD, {"ranks": self.ranks, "method": self.method})
            config.save_pretrained(self.tmp)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(self.tmp)
            if self.format == "compressed-tensors":
                self._quantization_config(model).update_config(self.tmp)
            self._check(model)
            if tokenizer is not None:
                tokenizer.save_pretrained(self.tmp)
            if self.compensation:  # written beside the checkpoint, as export_compressed_tensors does
                from .compressed_tensors import write_compensation

                write_compensation(self.compensation, self.tmp / "compensation")
            replace_dir(self.tmp, self.out)
        except BaseException:
            self.abort()
            raise
        return self.out

    def _quantization_config(self, model: nn.Module):
        """The ModelCompressor whose config.json entry a whole-model export would write, built on a meta copy."""
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import QuantizationStatus, apply_quantization_config

        from .compressed_tensors import compression_format, freeze_, quantization_config

        if not self.schemes:
            raise ConfigError("the model holds no quantized layer: nothing to write as compressed-tensors")
        qconfig = quantization_config(self.schemes)
        qconfig.format = compression_format([k[2] for k in self.schemes.values()])
        with torch.device("meta"):
            skeleton = type(model)(model.config)
        apply_quantization_config(skeleton, qconfig)
        freeze_(skeleton)
        compressor = ModelCompressor.from_pretrained_model(skeleton, quantization_format=qconfig.format)
        compressor.quantization_config.quantization_status = QuantizationStatus.COMPRESSED  # as compress_model leaves it
        return compressor

    def _check(self, model: nn.Module) -> None:
        """ConfigError unless the written tensors are the architecture's (compressed layers: their packed forms)."""
        if self.format != "safetensors":
            return
        with torch.device("meta"):
            fresh = type(model)(model.config)
        expected = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
        tied = {k for k in expected if k not in self.shapes and getattr(model.config, "tie_word_embeddings", False)
                and k.endswith("lm_head.weight")}
        missing = sorted(set(expected) - set(self.shapes) - tied)
        unexpected = sorted(set(self.shapes) - set(expected))
        reshaped = sorted(k for k in set(expected) & set(self.shapes) if expected[k] != self.shapes[k])
        if missing or unexpected or reshaped:
            raise ConfigError(f"streamed export to {self.out}: the tensors written do not match {type(model).__name__} "
                              f"(missing {missing[:2]}, unexpected {unexpected[:2]}, other shape {reshaped[:2]}); "
                              "nothing was written. This is a bug in rankwise's export: please report it")

    def abort(self) -> None:
        """Remove what was written, and the folders made for it if nothing else is in them."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        for folder in self.made:
            try:
                folder.rmdir()
            except OSError:  # not empty (another writer's, a report) or gone
                break
