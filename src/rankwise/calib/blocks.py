"""Block-by-block execution: cache block inputs, run one block over all batches, move on.

The pattern GPTQ popularised: block i's inputs are block i-1's outputs, so the model never runs
whole and peak memory is one block plus the cached hidden states, whatever the depth.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from ..progress import progress as progress_bar


class _Stop(Exception):
    """Raised by a stand-in to end a forward pass early."""


class _StandIn(nn.Module):
    """Takes a block's place for one pass: calls `on_call(args, kwargs)` instead of the block.

    Attribute reads fall through to the real block (models read e.g. `layer.attention_type`).
    """

    def __init__(self, inner: nn.Module, on_call):
        super().__init__()
        self.__dict__["_inner"] = inner
        self.__dict__["_on_call"] = on_call

    def forward(self, *args, **kwargs):
        return self.__dict__["_on_call"](args, kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_inner"], name)


def _shaped_like(out, h: Tensor):
    """h in the place of a block's hidden-state output, the rest of `out` (a tuple or list) kept."""
    if isinstance(out, (tuple, list)) and len(out) > 1:
        return type(out)([h, *out[1:]])
    return h


class SpilledCache:
    """The hidden states of a pass's batches kept in files (one safetensors file per batch, in a temporary folder
    under `folder`) instead of memory: a list's `len`, `[b]` and `[b] = h`, and `clear()` removing the folder.
    Memory then holds the batch being computed, whatever the number of calibration tokens."""

    def __init__(self, folder: str | Path, n: int):
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.folder, self.n = Path(tempfile.mkdtemp(prefix="rankwise-cache-", dir=folder)), n
        self.devices: list[torch.device | None] = [None] * n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, b: int) -> Tensor | None:
        from safetensors.torch import load_file

        if self.devices[b] is None:
            return None
        return load_file(self.folder / f"{b}.safetensors")["h"].to(self.devices[b])

    def __setitem__(self, b: int, h: Tensor) -> None:
        from safetensors.torch import save_file

        path = self.folder / f"{b}.safetensors"
        save_file({"h": h.detach().contiguous().cpu()}, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
        self.devices[b] = h.device

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.devices = [None] * self.n


def offload_cache(model: nn.Module, folder: str | Path | None) -> nn.Module:
    """Keep the hidden states that block-by-block passes cache (one per calibration batch) in files under
    `folder` instead of memory (None: in memory again); returns the model."""
    model.rankwise_cache_dir = None if folder is None else Path(folder)
    return model


def find_blocks(model: nn.Module, names: list[str]) -> tuple[str, nn.ModuleList] | None:
    """The family's block list (arch table), else the nn.ModuleList holding the most target modules, as
    (qualified name, list), or None."""
    from ..arch import arch_of

    family = arch_of(model)
    best, best_count = None, 0
    for prefix, module in model.named_modules():
        if family is not None and (prefix == family.blocks or prefix.endswith("." + family.blocks)) \
                and isinstance(module, nn.ModuleList) and any(n.startswith(prefix + ".") for n in names):
            return prefix, module
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            count = sum(n.startswith(prefix + ".") for n in names)
            if count > best_count:
                best, best_count = (prefix, module), count
    return best


def _split_hidden(args: tuple, kwargs: dict) -> tuple[Tensor, tuple, dict]:
    if args:
        return args[0], args[1:], dict(kwargs)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


class BlockRunner:
    """Runs calibration one block at a time, feeding each block's outputs to the next.

    What calibration does with the measurements comes in as arguments (no import back into it):
    `forward(batch)` runs the whole model on one batch, `done()` moves the recorder's finished
    statistics into `stats` (merged across ranks, summarized as asked).

    With a per-block `step(names, stats)` (DESIGN.md, extension point 3) each block runs twice: once to
    measure its targets' inputs, then, after step has transformed those targets (quantized them, say),
    once more to compute the inputs of the next block from what the transformed block computes.
    A step that only reads (`transforms=False`: a planner measuring error curves) is called after the
    block's single pass instead.
    `true_sequential` measures and steps the targets in the order their inputs are produced (q/k/v,
    then o_proj, …; modules reading one tensor together), one block pass per group, so later layers
    see earlier layers' transformed outputs.

    A model loaded lazily (`model.rankwise_lazy`, rankwise.lazy) has each block read when the runner reaches
    it and freed once it has passed, after `after_block(i, block)` (e.g. writing the block out).
    `riders`: {key: (when, batches)}: batches carried through every block without being measured, "before"
    or "after" the block's step (the model as it was, and as it becomes, in the same pass); at the end
    `on_output(key, b, output)` receives the model's whole output for each (held-out perplexity, say).
    """

    def __init__(self, model, blocks: tuple[str, nn.ModuleList], names, recorder, stats, forward, done,
                 step=None, true_sequential: bool = False, transforms: bool = True, after_block=None,
                 riders: dict | None = None, on_output=None):
        self.model, (self.prefix, self.blocks) = model, blocks
        self.names, self.recorder, self.stats = list(names), recorder, stats
        self.forward, self.done = forward, done
        self.step, self.true_sequential = step, true_sequential
        self.transforms = step is not None and transforms  # a step that only reads needs no second block pass
        self.lazy = getattr(model, "rankwise_lazy", None)
        self.cache_dir = getattr(model, "rankwise_cache_dir", None)  # offload_cache(): hidden states in files
        self.after_block, self.riders, self.on_output = after_block, dict(riders or {}), on_output
        n_blocks = len(self.blocks)
        self.inside = [[n for n in names if n.startswith(f"{self.prefix}.{i}.")] for i in range(n_blocks)]
        in_blocks = {n for group in self.inside for n in group}
        self.outside = [n for n in names if n not in in_blocks]

    def _forward_all(self, batches, masks, device, stand_in, outputs: list | None = None) -> None:
        """Full forward passes with every block replaced by stand_in(i, b, args, kwargs); the model's outputs
        go to `outputs` when given (a pass that runs to the end)."""
        originals = list(self.blocks)
        current = {"b": 0}
        for i, block in enumerate(originals):
            self.blocks[i] = _StandIn(block, lambda a, k, i=i: stand_in(i, current["b"], a, k))
        try:
            for b, batch in enumerate(batches):
                current["b"] = b
                self.recorder.start_batch(masks[b], b)
                try:
                    out = self.forward(batch)
                    if outputs is not None:
                        outputs.append(out)
                except _Stop:
                    pass
        finally:
            for i, block in enumerate(originals):
                self.blocks[i] = block

    def _measure(self, block: nn.Module, group: list[str], hidden: list, calls: list, masks: list) -> None:
        """Run the block over every batch for the recorder, each pass stopped as soon as every module of
        `group` has had its input recorded (the rest of the block is not needed to measure them).

        Stopping is turned off if the first batch calls a module of the group twice (shared weights)."""
        modules = dict(self.model.named_modules())
        calls_seen: list[str] = []
        wanted = set(group)

        def seen(module, args, name):  # registered after the recorder's hook, so it runs after it
            calls_seen.append(name)
            if stop and wanted.issubset(calls_seen):
                raise _Stop

        stop = False
        handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: seen(m, a, n)) for n in group]
        try:
            for b in range(len(hidden)):
                self.recorder.start_batch(masks[b], b)
                calls_seen.clear()
                try:
                    block(hidden[b], *calls[b][0], **calls[b][1])
                except _Stop:
                    pass
                if b == 0:
                    stop = len(calls_seen) == len(set(calls_seen))
        finally:
            for h in handles:
                h.remove()

    def _propagate(self, block: nn.Module, hidden: list, calls: list, masks: list, final: list | None, bar) -> None:
        """hidden[b] ← block(hidden[b]) for every batch; the last block's whole outputs also go to `final`."""
        for b in range(len(hidden)):
            self.recorder.start_batch(masks[b], b)
            out = block(hidden[b], *calls[b][0], **calls[b][1])
            hidden[b] = out[0] if isinstance(out, (tuple, list)) else out
            if final is not None:
                final[b] = out
            bar.update(1)

    def _phases(self, block: nn.Module, hidden: Tensor, call: tuple, names: list[str]) -> list[list[str]]:
        """The block's targets in groups to measure and step: one group, or (true_sequential) one per
        distinct input tensor, in the order the block computes them (found on the first batch)."""
        if not self.true_sequential:
            return [list(names)]
        modules = dict(self.model.named_modules())
        order: list[tuple[Tensor, str]] = []  # holds the inputs, so no two can share an address
        handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: order.append((a[0], n))) for n in names]
        try:
            block(hidden, *call[0], **call[1])
        finally:
            for h in handles:
                h.remove()
        groups: dict[int, list[str]] = {}
        seen: set[str] = set()
        for x, n in order:
            if n not in seen:
                seen.add(n)
                groups.setdefault(id(x), []).append(n)
        order.clear()
        left = [n for n in names if n not in seen]  # not called on the first batch
        return list(groups.values()) + ([left] if left else [])

    def _block_name(self, i: int) -> str:
        return f"{self.prefix}.{i}"

    def _capture(self, batches, masks, device) -> tuple[list, list]:
        """Pass 1 over `batches`: the model's prefix only (embeddings, masks, rotary tables); returns block 0's
        inputs and each block's call arguments [block][batch]."""
        n_blocks, last = len(self.blocks), len(self.blocks) - 1
        hidden = [None] * len(batches) if self.cache_dir is None else SpilledCache(self.cache_dir, len(batches))
        self._caches.append(hidden)
        calls: list[list] = [[None] * len(batches) for _ in range(n_blocks)]
        like: dict[type, object] = {}  # what a block returns, learned once per block class from a real block

        def capture(i, b, args, kwargs):
            h, rest, kw = _split_hidden(args, kwargs)
            calls[i][b] = (rest, kw)
            if i == 0:
                hidden[b] = h
            if i == last:
                raise _Stop
            inner = self.blocks[i].__dict__["_inner"]
            if type(inner) not in like:  # a model may unpack what a block returns (DeBERTa: states, attention)
                like[type(inner)] = inner(h, *rest, **kw)
            return _shaped_like(like[type(inner)], h)

        # lazily loaded: the first block of each class is read for this pass (to learn what it returns)
        firsts = {}
        for i, block in enumerate(self.blocks):
            firsts.setdefault(type(block), i)
        if self.lazy is not None:
            for i in firsts.values():
                self.lazy.load(self._block_name(i))
        self._forward_all(batches, masks, device, capture)
        if self.lazy is not None:
            for i in firsts.values():
                if i > 0:
                    self.lazy.free(self._block_name(i))
        if any(c is None for row in calls for c in row):
            raise RuntimeError("blockwise calibration: the model did not call every block; use mode='whole'")
        return hidden, calls

    def _carry(self, when: str, i: int, block, riding: dict, bar) -> None:
        """Riders of this phase ("before"/"after" the step) through block i, unmeasured."""
        active, self.recorder.active = self.recorder.active, set()
        for key, (w, batches) in self.riders.items():
            if w == when:
                hidden, calls, final = riding[key]
                masks = [torch.ones(b["input_ids"].shape, dtype=torch.bool) for b in batches]
                self._propagate(block, hidden, calls[i], masks, final if i == len(self.blocks) - 1 else None, bar)
                calls[i] = None
        self.recorder.active = active

    def _deliver(self, device, riding: dict) -> None:
        """The riders' whole model outputs, replayed from their last block's outputs, to on_output."""
        self.recorder.active = set()
        for key, (_, batches) in self.riders.items():
            final = riding[key][2]
            masks = [torch.ones(b["input_ids"].shape, dtype=torch.bool) for b in batches]
            outputs: list = []
            self._forward_all(batches, masks, device, lambda i, b, a, k: final[b], outputs)
            for b, out in enumerate(outputs):
                self.on_output(key, b, out)
            final.clear()

    def run(self, batches, masks, device, progress: bool) -> None:
        self._caches: list = []  # every hidden-state cache of this run, emptied however it ends
        try:
            self._run(batches, masks, device, progress)
        finally:
            for cache in self._caches:
                cache.clear()  # drop the cached activations before handing GPU memory back
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _run(self, batches, masks, device, progress: bool) -> None:
        n_blocks, last = len(self.blocks), len(self.blocks) - 1
        # Pass 1: the model's prefix only (embeddings, masks, rotary tables); records each block's call.
        self.recorder.active = set()
        riding = {}
        for key, (when, rider_batches) in self.riders.items():
            ones = [torch.ones(b["input_ids"].shape, dtype=torch.bool) for b in rider_batches]
            riding[key] = (*self._capture(rider_batches, ones, device), [None] * len(rider_batches))
        self.recorder.active = set(self.outside)
        hidden, calls = self._capture(batches, masks, device)
        self.done()
        if self.step is not None and self.recorder.active:
            before = [n for n in self.outside if n in self.stats.layers or n in self.recorder.aliases]
            if before:  # targets ahead of the blocks; the blocks' cached inputs were computed before the step
                self.step(before, self.stats)

        final: list = [None] * len(batches)
        per_block = len(batches) + sum(len(b) for _, b in self.riders.values())
        bar = progress_bar(total=n_blocks * per_block, disable=not progress, leave=False, unit="batch")
        for i, block in enumerate(self.blocks):
            bar.set_description(f"calibrate block {i + 1}/{n_blocks}")
            if self.lazy is not None:
                self.lazy.load(self._block_name(i))
            self._carry("before", i, block, riding, bar)
            if self.transforms:
                for group in self._phases(block, hidden[0], calls[i][0], self.inside[i]):
                    self.recorder.active = set(group)
                    self._measure(block, group, hidden, calls[i], masks)
                    self.done()
                    self.step(group, self.stats)
            # Without a transforming step this one pass both measures and feeds the next block; with one, it only feeds.
            self.recorder.active = set() if self.transforms else set(self.inside[i])
            self._propagate(block, hidden, calls[i], masks, final if i == last else None, bar)
            calls[i] = None  # this block's arguments are no longer needed
            if not self.transforms:
                self.done()
                if self.step is not None and self.inside[i]:
                    self.step(list(self.inside[i]), self.stats)
            self._carry("after", i, block, riding, bar)
            if self.after_block is not None:
                self.after_block(i, block)
            if self.lazy is not None:
                self.lazy.free(self._block_name(i))
        bar.close()
        if self.riders:
            self._deliver(device, riding)

        # Pass 3, only for targets after the blocks (e.g. a pooler): replay the last block's outputs.
        tail = [n for n in self.outside if n not in self.stats.layers and n not in self.recorder.aliases]
        if tail:
            self.recorder.active = set(tail)
            self._forward_all(batches, masks, device, lambda i, b, a, k: final[b])
            self.done()
            if self.step is not None:
                self.step(tail, self.stats)
        final.clear()
