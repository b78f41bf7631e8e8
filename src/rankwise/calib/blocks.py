"""Block-by-block execution: cache block inputs, run one block over all batches, move on.

The pattern GPTQ popularised: block i's inputs are block i-1's outputs, so the model never runs
whole and peak memory is one block plus the cached hidden states, whatever the depth.
"""

from __future__ import annotations

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
    """

    def __init__(self, model, blocks: tuple[str, nn.ModuleList], names, recorder, stats, forward, done,
                 step=None, true_sequential: bool = False, transforms: bool = True):
        self.model, (self.prefix, self.blocks) = model, blocks
        self.names, self.recorder, self.stats = list(names), recorder, stats
        self.forward, self.done = forward, done
        self.step, self.true_sequential = step, true_sequential
        self.transforms = step is not None and transforms  # a step that only reads needs no second block pass
        n_blocks = len(self.blocks)
        self.inside = [[n for n in names if n.startswith(f"{self.prefix}.{i}.")] for i in range(n_blocks)]
        in_blocks = {n for group in self.inside for n in group}
        self.outside = [n for n in names if n not in in_blocks]

    def _forward_all(self, batches, masks, device, stand_in) -> None:
        """Full forward passes with every block replaced by stand_in(i, b, args, kwargs)."""
        originals = list(self.blocks)
        current = {"b": 0}
        for i, block in enumerate(originals):
            self.blocks[i] = _StandIn(block, lambda a, k, i=i: stand_in(i, current["b"], a, k))
        try:
            for b, batch in enumerate(batches):
                current["b"] = b
                self.recorder.start_batch(masks[b], b)
                try:
                    self.forward(batch)
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

    def run(self, batches, masks, device, progress: bool) -> None:
        n_blocks, last = len(self.blocks), len(self.blocks) - 1
        hidden: list[Tensor | None] = [None] * len(batches)
        calls: list[list] = [[None] * len(batches) for _ in range(n_blocks)]

        like: dict[int, object] = {}  # what block i returns, learned once from the real block

        def capture(i, b, args, kwargs):
            h, rest, kw = _split_hidden(args, kwargs)
            calls[i][b] = (rest, kw)
            if i == 0:
                hidden[b] = h
            if i == last:
                raise _Stop
            if i not in like:  # a model may unpack what a block returns (DeBERTa: states, attention)
                like[i] = self.blocks[i].__dict__["_inner"](h, *rest, **kw)
            return _shaped_like(like[i], h)

        # Pass 1: the model's prefix only (embeddings, masks, rotary tables); records each block's call.
        self.recorder.active = set(self.outside)
        self._forward_all(batches, masks, device, capture)
        if any(c is None for row in calls for c in row):
            raise RuntimeError("blockwise calibration: the model did not call every block; use mode='whole'")
        self.done()
        if self.step is not None and self.recorder.active:
            before = [n for n in self.outside if n in self.stats.layers or n in self.recorder.aliases]
            if before:  # targets ahead of the blocks; the blocks' cached inputs were computed before the step
                self.step(before, self.stats)

        final: list = [None] * len(batches)
        bar = progress_bar(total=n_blocks * len(batches), disable=not progress, leave=False, unit="batch")
        for i, block in enumerate(self.blocks):
            bar.set_description(f"calibrate block {i + 1}/{n_blocks}")
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
        bar.close()

        # Pass 3, only for targets after the blocks (e.g. a pooler): replay the last block's outputs.
        tail = [n for n in self.outside if n not in self.stats.layers and n not in self.recorder.aliases]
        if tail:
            self.recorder.active = set(tail)
            self._forward_all(batches, masks, device, lambda i, b, a, k: final[b])
            self.done()
            if self.step is not None:
                self.step(tail, self.stats)
        hidden.clear()  # drop the cached activations before handing GPU memory back
        final.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
