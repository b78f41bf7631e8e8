"""One block in memory: a model built on the meta device whose blocks are read from the safetensors shards
when the block runner reaches them and dropped once it has passed (DESIGN.md, "Scale").

`lazy_model(folder, cls, config, dtype)` builds the architecture with no weights, reads everything outside
the block stack (embeddings, final norm, head: what runs before the first block and after the last), and
leaves the blocks on the meta device. `model.rankwise_lazy` (a `Lazy`) then loads and frees one block at a
time: `load("model.layers.3")`, `free("model.layers.3")`. Tensors are read from memory-mapped shards, so a
block costs its own size in memory and nothing else.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch
from torch import nn

from .errors import ModelLoadError


class NotLazy(Exception):
    """This checkpoint or architecture cannot be read block by block; the reason is the message."""


class Shards:
    """The tensors of a safetensors checkpoint (one file, or shards listed in `<stem>.safetensors.index.json`),
    by name, read on demand. Every shard is opened (its header checked) at once, so a missing or truncated
    shard is an error naming it and a tensor it should hold before any work starts."""

    def __init__(self, folder: str | Path, stem: str = "model"):
        from safetensors import safe_open

        folder = Path(folder)
        index = folder / f"{stem}.safetensors.index.json"
        if index.exists():
            wanted: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (folder / f"{stem}.safetensors").exists():
            wanted = {}
        else:
            raise NotLazy(f"{folder} holds no {stem}.safetensors (nor a shard index)")
        files = sorted(set(wanted.values())) or [f"{stem}.safetensors"]
        self.folder, self.where, self._open = folder, {}, {}
        for name in files:
            first = next((k for k, f in wanted.items() if f == name), None)
            holds = f" (it should hold {first})" if first else ""
            if not (folder / name).exists():
                raise ModelLoadError(f"{folder}: shard {name} is missing{holds}; the checkpoint is incomplete")
            try:
                handle = safe_open(str(folder / name), framework="pt")
            except Exception as e:  # safetensors raises its own error type for a damaged header or a short file
                raise ModelLoadError(f"{folder}: shard {name} is truncated or damaged{holds}: {e}") from None
            for key in handle.keys():
                self.where[key] = name
            del handle
        absent = [k for k, f in wanted.items() if k not in self.where]
        if absent:
            raise ModelLoadError(f"{folder}: tensor {absent[0]} is listed in {index.name} for shard {wanted[absent[0]]}, "
                                 f"which does not hold it ({len(absent)} tensor(s) in all); the checkpoint is damaged")

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def _handle(self, name: str):
        from safetensors import safe_open

        if name not in self._open:
            self._open[name] = safe_open(str(self.folder / name), framework="pt")
        return self._open[name]

    def release(self) -> None:
        """Close the shards: a memory-mapped page read stays resident (and counted) while its file is mapped."""
        self._open.clear()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(self.where[key]).get_slice(key).get_shape())

    def get(self, key: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        t = self._handle(self.where[key]).get_tensor(key)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device)


def _key_map(model: nn.Module, shards: Shards) -> dict[str, str]:
    """model tensor name → checkpoint name, for every parameter and persistent buffer the model needs
    (tied parameters under their first name); NotLazy if one is absent or has another shape (a checkpoint
    that transformers converts while loading: legacy names, per-expert MoE tensors, …)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    names = [n for n, _ in model.named_parameters()]
    persistent = set(model.state_dict(keep_vars=True))
    names += [n for n, _ in model.named_buffers() if n in persistent]
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    out = {}
    for n in names:
        options = [n, f"{prefix}.{n}", n.removeprefix(f"{prefix}.")] if prefix else [n]
        key = next((k for k in options if k in shards), None)
        if key is None:
            if n.endswith("inv_freq") or not isinstance(tensors[n], nn.Parameter) and n not in persistent:
                continue
            raise NotLazy(f"the checkpoint has no tensor for {n}")
        if shards.shape(key) != tuple(tensors[n].shape):
            raise NotLazy(f"{key} is {shards.shape(key)} in the checkpoint, {tuple(tensors[n].shape)} in the model")
        out[n] = key
    return out


class Lazy:
    """Loads and frees the tensors under a module name of a meta-built model (see the module docstring)."""

    def __init__(self, model: nn.Module, shards: Shards, keys: dict[str, str], dtype: torch.dtype, blocks: str):
        self.model, self.shards, self.keys, self.dtype, self.blocks = model, shards, keys, dtype, blocks
        self.device = torch.device("cpu")

    def _slots(self, prefix: str, skip: str | None = None):
        """(module, attribute, full name) of every parameter/buffer under `prefix` the checkpoint holds,
        those under `skip` left out."""
        root = self.model.get_submodule(prefix) if prefix else self.model
        for mname, module in root.named_modules():
            full = ".".join(p for p in (prefix, mname) if p)
            if skip is not None and (full == skip or full.startswith(skip + ".")):
                continue
            for attr, t in list(module._parameters.items()) + list(module._buffers.items()):
                name = f"{full}.{attr}" if full else attr
                if t is not None and name in self.keys:
                    yield module, attr, name

    def load(self, prefix: str = "", skip: str | None = None) -> None:
        """Read every tensor under `prefix` (all of the model with "") still on the meta device from the shards."""
        for module, attr, name in self._slots(prefix, skip):
            old = module._parameters[attr] if attr in module._parameters else module._buffers[attr]
            if old.is_meta:
                value = self.shards.get(self.keys[name], self.dtype if old.is_floating_point() else None, self.device)
                _replace(module, attr, value)

    def free(self, prefix: str) -> None:
        """Put every tensor under `prefix` back on the meta device (its memory is released)."""
        root = self.model.get_submodule(prefix)
        for module in root.modules():
            for attr, t in list(module._parameters.items()) + list(module._buffers.items()):
                if t is not None and not t.is_meta:
                    _replace(module, attr, torch.empty_like(t, device="meta"))
        self.shards.release()
        gc.collect()  # copies made of the block (for writing it) may sit in reference cycles, holding its tensors
        trim_heap()

    def read(self, name: str) -> torch.Tensor:
        """One tensor of the model (by its name in the model) read from the checkpoint, not installed."""
        try:
            return self.shards.get(self.keys[name], self.dtype, self.device)
        finally:
            self.shards.release()

    def hollow(self) -> None:
        """Every tensor still on the meta device replaced by a zero-stride view of one zero: shapes, dtypes and
        devices for code that builds on the model (peft wrapping its linears) with no memory behind them.
        The model computes nothing meaningful after this: only for writing what does not read the base."""
        for module in self.model.modules():
            for attr, t in list(module._parameters.items()) + list(module._buffers.items()):
                if t is not None and t.is_meta:
                    _replace(module, attr, torch.zeros((), dtype=t.dtype, device=self.device).expand(t.shape))
        self.model.rankwise_hollow = True


def _libc():
    """glibc, or False where there is none (macOS, musl): the heap calls below are then skipped."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim, _LIBC.mallopt  # noqa: B018 (both must exist)
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def steady_heap() -> None:
    """Allocations of 128 KiB and more straight from the system (glibc's mallopt M_MMAP_THRESHOLD), so that a
    freed block's tensors go back to it at once. By default glibc raises that threshold to the size of each
    large buffer freed (up to 32 MiB) and serves the next ones from its heap, which then grows block after
    block with pieces it keeps for reuse."""
    libc = _libc()
    if libc:
        libc.mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD (a fixed value also turns its dynamic adjustment off)


def trim_heap() -> None:
    """Hand freed heap memory back to the system (glibc's malloc_trim)."""
    libc = _libc()
    if libc:
        libc.malloc_trim(0)


_LIBC = None


def _replace(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=module._parameters[attr].requires_grad)
    else:
        module._buffers[attr] = value


def lazy_model(folder: Path, cls, config, dtype: torch.dtype, blocks: str) -> nn.Module:
    """`cls` built from `config` on the meta device, every tensor outside `blocks` (the block stack's
    qualified name, from the architecture table) read from the shards; NotLazy when the checkpoint's
    tensors do not map one to one onto the model's. `blocks`: the stack's name or its dotted suffix."""
    from accelerate import init_empty_weights

    steady_heap()
    shards = Shards(folder)
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config, dtype=dtype)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # the head is the embedding: one tensor in the checkpoint, one name in the key map
    stacks = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and (n == blocks or n.endswith("." + blocks))]
    if len(stacks) != 1:
        raise NotLazy(f"no single block stack named {blocks!r} in {type(model).__name__}")
    blocks = stacks[0]
    keys = _key_map(model, shards)
    lazy = Lazy(model, shards, keys, dtype, blocks)
    lazy.load("", skip=blocks)  # embeddings, final norm, head: everything but the blocks
    shards.release()
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.rankwise_lazy = lazy
    return model
