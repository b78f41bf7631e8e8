"""The factored folder: a transformers folder whose low-rank layers are stored as their two factors.

Layout: what `save_pretrained` writes, with `<layer>.down.weight` [k, in] and `<layer>.up.weight`
[out, k] (+ `<layer>.up.bias`) in place of `<layer>.weight`, and one extra config.json field,
`rankwise_lowrank = {"ranks": {layer: k}, "method": …}`; the weights are named `factored*.safetensors`
(not `model*.safetensors`), so plain `from_pretrained` stops with "no file named model.safetensors"
instead of initialising the factored layers' missing weights at random and loading the rest.
`rankwise.load_model(folder)` (and every rankwise command's `--model`) reads it: the architecture is built
from config.json, the listed layers are factored, and the weights are loaded strictly (a missing or
unexpected tensor is an error). For other tools write the merged dense folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..atomic import staging_dir
from ..conv1d import linearize_conv1d_
from ..errors import ModelLoadError
from .linear import factor_, lowrank_layers

FIELD = "rankwise_lowrank"
WEIGHTS = "factored"  # factored.safetensors, or factored-0000i-of-0000n.safetensors + factored.safetensors.index.json


def save_factored(model: nn.Module, out: str | os.PathLike, tokenizer=None, method: str = "") -> Path:
    """Write `model` (with LowRankLinear layers) as a factored folder; returns it."""
    ranks = {n: m.rank for n, m in lowrank_layers(model).items()}
    out = Path(out)
    config = model.config
    setattr(config, FIELD, {"ranks": ranks, "method": method})
    try:
        with staging_dir(out) as tmp:
            model.save_pretrained(tmp)
            _rename_weights(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    finally:
        delattr(config, FIELD)  # the in-memory model (and a merged export of it) stays a plain model
    return out


def _rename_weights(folder: Path) -> None:
    """model*.safetensors (and the shard index) → factored*.safetensors, the index's map rewritten."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v.replace("model", WEIGHTS, 1) for k, v in data["weight_map"].items()}
        (folder / f"{WEIGHTS}.safetensors.index.json").write_text(json.dumps(data, indent=2))
        index.unlink()
    for f in sorted(folder.glob("model*.safetensors")):
        f.rename(folder / f.name.replace("model", WEIGHTS, 1))


def is_factored(config) -> bool:
    return isinstance(getattr(config, FIELD, None), dict)


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    stem = WEIGHTS if any(path.glob(f"{WEIGHTS}*.safetensors")) else "model"  # "model": folders before the rename
    index = path / f"{stem}.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [f"{stem}.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(path / f))
    return state


def load_factored(path: str | os.PathLike, cls, config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build `cls` (a transformers model class, or an Auto class) from `config`, factor the recorded
    layers, load the weights."""
    path = Path(path)
    ranks = getattr(config, FIELD)["ranks"]
    # built in `dtype` (not cast after): buffers such as the rotary frequencies stay float32, as from_pretrained keeps them
    model = cls.from_config(config, dtype=dtype) if hasattr(cls, "from_config") else cls(config).to(dtype)
    saved = (getattr(config, "architectures", None) or [None])[0]
    if saved is not None and type(model).__name__ != saved:
        raise ModelLoadError(f"{path} is a factored {saved}; it reloads only as that architecture, not as "
                             f"{type(model).__name__} (merge it first: the merged/ folder loads as any task)")
    linearize_conv1d_(model)  # GPT-2: factored layers were nn.Linear-shaped; the others load in Conv1D's layout
    try:
        factor_(model, ranks)
    except AttributeError as e:
        raise ModelLoadError(f"{path}: config.json's {FIELD} names a layer this architecture lacks ({e})") from None
    state = _state_dict(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    loaded = {p.data_ptr() for k, p in model.state_dict().items() if k in state}
    untied = [k for k in missing if model.state_dict()[k].data_ptr() not in loaded]
    if untied or unexpected:
        raise ModelLoadError(f"{path}: the weights do not match the factored architecture (missing: {untied[:3]}, "
                             f"unexpected: {list(unexpected)[:3]}); was the folder written by rankwise compress?")
    delattr(model.config, FIELD)
    return model.eval()
