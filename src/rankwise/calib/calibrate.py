"""calibrate(model, batches) → Stats: one observing pass, block by block where the model allows."""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from ..progress import progress as progress_bar

from .. import distributed as dist
from .blocks import BlockRunner, find_blocks
from ..errors import CalibrationError
from ..numerics.linalg import GramAccumulator
from .stats import LayerStats, Stats
from ..targets import find_targets

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
MODES = ("auto", "blockwise", "whole")
OBSERVERS = ("moments", "abs")  # n, Σx, XᵀX (always); Σ|x| per channel (AWQ)


def token_mask(batch: dict[str, Tensor], use_label_mask: bool = True) -> Tensor:
    """[batch, seq] bool: positions whose activations count: attention_mask == 1 and, with per-token
    labels, the positions whose prediction the loss scores.

    A causal LM's loss scores the prediction made at position t against labels[t + 1] (the shift inside
    transformers' loss), and that prediction reads the inputs at t: so position t counts when
    labels[t + 1] != -100. The last prompt token (which predicts the first answer token) is in, the last
    answer token (which predicts nothing scored) is out, exactly the positions the loss sees.
    """
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids)).bool()
    if use_label_mask and "labels" in batch and batch["labels"].shape == ids.shape:
        scored = torch.zeros_like(mask)
        scored[:, :-1] = batch["labels"][:, 1:] != -100
        mask = mask & scored
    return mask


def _select_rows(x: Tensor, mask: Tensor, all_selected: bool = False) -> Tensor:
    """Rows of x [..., d] that belong to selected tokens; inputs without a sequence axis keep all rows; an
    MoE expert's input [n, d] names its token positions in `rankwise_rows` (experts.ExpertLinears)."""
    d = x.shape[-1]
    if all_selected:
        return x.reshape(-1, d)
    rows = getattr(x, "rankwise_rows", None)  # an MoE expert's input: these token positions of the flattened batch
    if rows is not None:
        return x[mask.reshape(-1)[rows]]
    if x.shape[:-1] == mask.shape:
        return x[mask]
    if x.ndim == 2 and x.shape[0] == mask.shape[0]:  # e.g. a pooler reading one vector per sequence
        return x
    if x.numel() // d == mask.numel():
        return x.reshape(-1, d)[mask.reshape(-1)]
    return x.reshape(-1, d)


class Recorder:
    """Forward pre-hooks on target modules; each distinct input tensor is measured once.

    Modules reading the very same tensor (q/k/v, gate/up) are grouped on first sight: the first
    becomes the canonical entry, the others aliases of it. A tensor is recognised by its address,
    layout and dtype, and by a weak reference to the one first seen there: a match needs that
    tensor still alive, so its memory cannot have been freed and reused by another. Nothing keeps
    an input alive (holding them all kept ~400 MB for 4×256 tokens on SmolLM2 in whole-model mode).
    """

    def __init__(self, model: nn.Module, names: Sequence[str], observe: Sequence[str] = ("moments",)):
        unknown = set(observe) - set(OBSERVERS)
        if unknown:
            raise CalibrationError(f"unknown observers {sorted(unknown)}; known: {OBSERVERS}")
        self.names = list(names)
        self.acc: dict[str, GramAccumulator] = {}
        self.abs_acc: dict[str, Tensor] | None = {} if "abs" in observe else None
        self.aliases: dict[str, str] = {}
        self.active: set[str] = set()
        self.mask: Tensor | None = None
        self.batch_index = 0
        self._all_selected = False
        self._seen: dict[tuple, tuple[weakref.ref, str]] = {}  # (ptr, shape, stride, dtype) -> (tensor, canonical)
        modules = dict(model.named_modules())
        self._handles = [modules[n].register_forward_pre_hook(self._hook(n)) for n in self.names]

    def start_batch(self, mask: Tensor, index: int) -> None:
        self.mask, self.batch_index = mask, index
        self._all_selected = bool(mask.all())
        self._seen.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._seen.clear()

    def _hook(self, name: str):
        def hook(module, args):
            if name in self.active and args and isinstance(args[0], Tensor):
                self._record(name, args[0])

        return hook

    def _record(self, name: str, x: Tensor) -> None:
        key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)
        first = self._seen.get(key)
        if first is not None and first[0]() is None:  # that tensor is gone: its memory may now be another's
            first = None
        if name not in self.acc and name not in self.aliases:
            if first is not None:
                self.aliases[name] = first[1]
                return
            self.acc[name] = GramAccumulator(x.shape[-1], device=x.device)
        if name in self.aliases:
            if first is None or first[1] != self.aliases[name]:
                raise CalibrationError(f"{name} shared its input with {self.aliases[name]} once but not in batch {self.batch_index}")
            return
        self._seen[key] = (weakref.ref(x), name)  # weak: see the class docstring
        rows = _select_rows(x, self.mask.to(x.device), self._all_selected)
        # NaN/inf anywhere in the rows makes their float64 sum non-finite: a [d] check, not [n, d].
        if self.abs_acc is not None:
            total = rows.abs().sum(0, dtype=torch.float64)
            self.abs_acc[name] = total if name not in self.abs_acc else self.abs_acc[name] + total
        if not torch.isfinite(self.acc[name].update(rows)).all():
            raise CalibrationError(
                f"non-finite activations (NaN or inf) at the input of {name} in batch {self.batch_index}; "
                "check the model weights and dtype (fp16 overflow?) and the input ids"
            )

    def pop_stats(self, names: Sequence[str]) -> dict[str, LayerStats]:
        """Move the finished accumulators of these canonical names into LayerStats."""
        out = {}
        for n in names:
            acc = self.acc.pop(n)
            abs_sum = None if self.abs_acc is None else self.abs_acc.pop(n, torch.zeros_like(acc.shift))
            out[n] = LayerStats(acc.n, acc.shift, acc.sum_shifted, acc.m2, abs_sum=abs_sum)
        return out


def _model_inputs(batch: dict[str, Tensor], device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUT_KEYS}


def _check_batches(batches, use_label_mask: bool) -> list[Tensor]:
    if not batches:
        raise CalibrationError("no calibration batches: the data source gave nothing to measure")
    masks = [token_mask(b, use_label_mask) for b in batches]
    if sum(int(m.sum()) for m in masks) == 0:
        raise CalibrationError(
            "every token is masked (attention_mask == 0 or labels == -100): nothing to measure. "
            "Check the data, or pass use_label_mask=False to measure prompt tokens too."
        )
    return masks


def calibrate(
    model: nn.Module,
    batches: Sequence[dict[str, Tensor]],
    targets: str | Sequence[str] = "all-linear",
    *,
    mode: str = "auto",
    use_label_mask: bool = True,
    keep: str | int = "full",
    progress: bool = True,
    observe: Sequence[str] = ("moments",),
    step=None,
    true_sequential: bool = False,
    transforms: bool = True,
    after_block=None,
    riders: dict | None = None,
    on_output=None,
) -> Stats:
    """Measure n, Σx and XᵀX of every target's inputs over `batches` (no weight is touched).

    mode: "blockwise" runs one transformer block at a time over cached hidden states (peak memory:
    one block, its statistics, the cache); "whole" hooks a full forward; "auto" picks blockwise
    when the model has a stack of blocks. keep: "full" keeps XᵀX (mergeable, savable); an int k
    keeps only the top-k centred eigenpairs per module, dropped to that size block by block.
    observe: what to measure beside the moments ("abs": Σ|x| per channel, for AWQ).

    step(names, stats): called once the statistics of these target modules are final (`stats[name]`; modules
    reading one tensor come together); it may transform them, e.g. quantize. Blockwise, each block is
    then run again, so the next block's inputs are what the transformed block computes (true_sequential:
    the same within a block, see BlockRunner). In whole-model mode step sees every target at the end.
    transforms=False: step only reads the statistics (and may free them), so each block runs once.
    after_block, riders, on_output: see BlockRunner (blockwise only): a lazily loaded model (rankwise.lazy) is
    read one block at a time, and must run blockwise.
    """
    if mode not in MODES:
        raise CalibrationError(f"mode {mode!r} is not one of {MODES}")
    names = find_targets(model, targets)
    masks = _check_batches(batches, use_label_mask)
    if dist.sharded(model):
        dist.same_count(len(batches), "calibration batches")
    device = next(p for p in model.parameters() if not p.is_meta).device
    blocks = find_blocks(model, names) if mode != "whole" else None
    lazy = getattr(model, "rankwise_lazy", None) is not None
    if lazy and blocks is None:
        raise CalibrationError("a model loaded block by block (lazy) needs its block stack among the targets' parents")
    if (riders or after_block) and blocks is None:
        raise CalibrationError("riders and after_block need blockwise mode")
    if mode == "blockwise" and blocks is None:
        kind = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
        raise CalibrationError(f"{kind}: blockwise mode needs a stack of blocks (an nn.ModuleList) holding the targets, "
                               "and this model has none; use mode='whole' (one full forward pass per batch)")
    recorder = Recorder(model, names, observe)
    stats = Stats(order=names)
    stats.aliases = recorder.aliases  # live while calibrating, so a step can look groups up; copied at the end
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if blocks is None:
                _run_whole(model, batches, masks, recorder, stats, keep, device, progress)
                if step is not None:
                    step(list(names), stats)
            else:
                BlockRunner(model, blocks, names, recorder, stats, forward=lambda b: _forward(model, b, device),
                            done=lambda: finish(recorder, stats, list(recorder.acc), keep),
                            step=step, true_sequential=true_sequential, transforms=transforms, after_block=after_block,
                            riders=riders, on_output=on_output).run(batches, masks, device, progress)
    finally:
        recorder.remove()
        model.train(was_training)
    stats.aliases = dict(recorder.aliases)
    missing = [n for n in names if n not in stats.layers and n not in stats.aliases]
    modules = dict(model.named_modules())
    # layers inside an MoE expert (quantized or not) see only the tokens routed to it, possibly none
    inside = tuple(f"{n}." for n, m in modules.items() if getattr(m, "rankwise_experts", False))
    idle = {n for n in names if n.startswith(inside) and (n in missing or stats[n].n == 0)} if inside else set()
    stats.unrouted = [n for n in names if n in idle]  # (an expert that only padding reached counts too)
    for n in idle:
        stats.layers.pop(n, None)
        stats.aliases.pop(n, None)
    missing = [n for n in missing if n not in idle]
    if missing:
        raise CalibrationError(f"these target modules were never called in the forward pass: {missing[:5]}")
    empty = [n for n, st in stats.layers.items() if st.n == 0]
    if empty:
        raise CalibrationError(f"no unmasked token reached {empty[:5]}; check attention_mask and labels")
    return stats


def finish(recorder: Recorder, stats: Stats, canonical: list[str], keep: str | int) -> None:
    """Move finished statistics into `stats`, merged across ranks, summarized if keep is an int."""
    stats.layers.update(recorder.pop_stats(canonical))
    stats.all_reduce_(canonical)
    if keep != "full":
        for n in canonical:
            stats.layers[n].summarize_(int(keep))


def _run_whole(model, batches, masks, recorder, stats, keep, device, progress) -> None:
    recorder.active = set(recorder.names)
    for i, batch in enumerate(progress_bar(batches, desc="calibrate", disable=not progress, leave=False)):
        recorder.start_batch(masks[i], i)
        _forward(model, batch, device)
    finish(recorder, stats, list(recorder.acc), keep)


def _forward(model: nn.Module, batch: dict[str, Tensor], device):
    """One forward pass on the batch's model inputs (no KV cache: calibration never generates)."""
    extra = {"use_cache": False} if _has_cache(model) else {}
    return model(**_model_inputs(batch, device), **extra)


def _has_cache(model: nn.Module) -> bool:
    return hasattr(getattr(model, "config", None), "use_cache")
