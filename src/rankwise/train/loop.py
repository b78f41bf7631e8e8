"""train(model, train, eval, cfg): one loop for every method — AdamW, warmup + cosine, accumulation,
clipping, periodic eval, atomic checkpoints, exact resume, Ctrl-C saves; data-parallel across ranks."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import Field
from ..progress import progress as progress_bar

from .. import distributed as dist
from ..config import StrictModel
from ..data.sources import Dataset, batchify
from ..errors import RankwiseError
from .evaluate import loss_terms


class TrainConfig(StrictModel):
    """Optimization settings shared by every method."""

    steps: int = Field(60, ge=1)
    batch_size: int = Field(4, ge=1)  # per micro-batch, over all processes together (each takes its share)
    grad_accum: int = Field(1, ge=1)
    lr: float | None = Field(None, gt=0)  # None: the init method's default_lr (`rankwise methods` lists them)
    head_lr: float | None = Field(None, gt=0)  # lr of a trained task head (classification); None: lr
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(5, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine decays to lr × this
    max_grad_norm: float = Field(1.0, gt=0)
    eval_every: int = Field(20, ge=1)
    save_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 0
    # Recompute each block's activations in the backward instead of keeping them: memory of one block's
    # activations instead of all of them, for about one more forward per step.
    gradient_checkpointing: bool = False


class TrainingInterrupted(RankwiseError):
    """Raised after Ctrl-C once a checkpoint is safely written."""


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    final_eval: dict = field(default_factory=dict)
    step: int = 0


def _micro_batch(ds: Dataset, tokenizer, cfg: TrainConfig, index: int) -> dict:
    """This rank's share of micro-batch `index` of a deterministic stream (epoch e visits examples in
    randperm(seed, e)): the stream and so the global batch are the same whatever the number of processes."""
    n, picks = len(ds.examples), []
    for k in range(index * cfg.batch_size, (index + 1) * cfg.batch_size):
        epoch, pos = divmod(k, n)
        perm = _perm(n, cfg.seed, epoch)
        picks.append(ds.examples[perm[pos]])
    picks = picks[dist.rank():: dist.world()]
    return batchify(picks, tokenizer, len(picks))[0]


_PERMS: dict[tuple[int, int, int], list[int]] = {}


def _perm(n: int, seed: int, epoch: int) -> list[int]:
    key = (n, seed, epoch)
    if key not in _PERMS:
        _PERMS[key] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return _PERMS[key]


@torch.no_grad()
def eval_loss(model, batches: list[dict], task: str, device) -> dict:
    """Mean loss over eval batches (+ accuracy for classification), one forward per batch; with several
    processes each scores every world()-th batch and the sums are merged."""
    was = model.training
    model.eval()
    total, count, correct = 0.0, 0, 0
    for b in batches[dist.rank():: dist.world()]:
        b = {k: v.to(device) for k, v in b.items()}
        loss, n, logits = loss_terms(model, b, task, return_logits=True)
        total, count = total + float(loss), count + n
        if task == "seq-cls":
            correct += int((logits.argmax(-1) == b["labels"]).sum())
    model.train(was)
    if dist.active():
        sums = dist.all_reduce_sum_(torch.tensor([total, count, correct], dtype=torch.float64))
        total, count, correct = float(sums[0]), int(sums[1]), int(sums[2])
    res = {"eval_loss": total / max(count, 1)}
    if task == "seq-cls":
        res["eval_accuracy"] = correct / max(count, 1)
    return res


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _param_groups(params: dict, cfg: TrainConfig) -> list[dict]:
    """Adapter weights at lr; a fully trained head (peft's modules_to_save) at head_lr when set."""
    head = [p for n, p in params.items() if "modules_to_save" in n]
    rest = [p for n, p in params.items() if "modules_to_save" not in n]
    groups = [{"params": rest}]
    if head:
        groups.append({"params": head, "lr": cfg.head_lr or cfg.lr})
    return groups


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup (step+1)/(warmup+1),
    so the first step already moves, then cosine decay from 1 to min_ratio over the remaining steps."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _schedule(opt, cfg: TrainConfig):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))


def default_lr(model) -> float:
    """The learning rate of the init method that made this model's adapter (its `default_lr`)."""
    from ..methods import get_init

    plan = getattr(model, "rankwise_plan", None)
    if plan is None:
        raise RankwiseError("lr=None means the init method's default, but this model carries no rankwise plan "
                            "(it was not made by rankwise.adapt_); pass TrainConfig(lr=...)")
    return float(getattr(get_init(plan.method), "default_lr", 5e-4))


class _HardInterrupt(KeyboardInterrupt):
    """A second Ctrl-C inside an update: the state may be half-updated, so no checkpoint is written."""


class _Interrupts:
    """SIGINT → KeyboardInterrupt at once, except inside `critical()`, where it is held until the section
    ends; a checkpoint then never holds a half-applied optimizer step or a step count that lags its weights."""

    def __init__(self):
        self.depth, self.pending, self._prev = 0, False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._prev = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._prev is not None:
            signal.signal(signal.SIGINT, self._prev)
        return False

    def _handler(self, signum, frame):
        if not self.depth:
            raise KeyboardInterrupt
        if self.pending:
            raise _HardInterrupt
        self.pending = True
        print("\nCtrl-C: finishing this step, then saving a checkpoint (press again to stop now, unsaved)",
              file=sys.stderr, flush=True)

    @contextmanager
    def critical(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if self.pending and not self.depth:
            self.pending = False
            raise KeyboardInterrupt


def save_checkpoint(ckpt_dir: Path, step: int, model, opt, sched, keep: int) -> Path:
    """Write checkpoints/step-N atomically (temp folder + rename); keep the newest `keep`. With several processes
    rank 0 writes (the trained state is the same on every rank; the others' RNG states are not needed, since
    the data stream depends on the step alone)."""
    final = ckpt_dir / f"step-{step:06d}"
    if not dist.is_main():
        return final
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=ckpt_dir))
    state = {"step": step, "params": {n: p.detach().cpu() for n, p in _trainable(model).items()},
             "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": torch.get_rng_state()}
    try:
        torch.save(state, tmp / "state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(ckpt_dir.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = sorted(ckpt_dir.glob("step-*")) if ckpt_dir.exists() else []
    return found[-1] if found else None


def _load_checkpoint(path: Path, model, opt, sched) -> int:
    """Restore a checkpoint written by any number of processes (rank 0 reads it and sends it to the others,
    so only rank 0 needs the run folder)."""
    state = torch.load(path / "state.pt", weights_only=False) if dist.is_main() else None
    state = dist.broadcast_object(state)
    params = _trainable(model)
    saved = {n: tuple(t.shape) for n, t in state["params"].items()}
    wanted = {n: tuple(p.shape) for n, p in params.items()}
    if saved != wanted:
        diff = sorted(set(saved) ^ set(wanted)) or [n for n in saved if saved[n] != wanted[n]]
        n = diff[0]
        raise RankwiseError(f"checkpoint {path} does not fit this model: {n} is {saved.get(n, 'absent')} there and "
                            f"{wanted.get(n, 'absent')} here; resume with the run's own config.yaml")
    with torch.no_grad():
        for n, t in state["params"].items():
            params[n].copy_(t)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])


def _log(metrics_path: Path | None, row: dict) -> None:
    if metrics_path is not None and dist.is_main():
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _trim_metrics(path: Path, step: int) -> list[dict]:
    """Drop logged lines past `step` (written after the checkpoint we resume from)."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("step", 0) <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def train(model, train_ds: Dataset, eval_ds: Dataset | None, cfg: TrainConfig, tokenizer,
          run_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
          resume_hint: str = "", loss_fn=None) -> TrainResult:
    """Train the model's trainable parameters (adapters, heads, factors) for cfg.steps optimizer steps.

    loss_fn(model, batch) → (summed loss, count): the objective (default: the task's cross-entropy;
    PELA's recovery passes its distillation losses), summed over the tokens the task's loss scores
    (labels[:, 1:] != -100 for causal LM); each step minimizes Σ loss / Σ count."""
    device = next(model.parameters()).device
    params = _trainable(model)
    if not params:
        raise RankwiseError("the model has no trainable parameters (adapt_ it first)")
    if cfg.lr is None:
        cfg = cfg.model_copy(update={"lr": default_lr(model)})
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(_param_groups(params, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = _schedule(opt, cfg)
    run_dir = Path(run_dir) if run_dir is not None else None
    ckpt_dir = run_dir / "checkpoints" if run_dir else None
    metrics = run_dir / "metrics.jsonl" if run_dir else None
    if cfg.batch_size < dist.world():
        raise RankwiseError(f"batch_size {cfg.batch_size} is smaller than the number of processes ({dist.world()}); "
                            f"each micro-batch is shared out among them, so raise it to at least {dist.world()}")
    main = dist.is_main()
    if run_dir is not None and main:
        run_dir.mkdir(parents=True, exist_ok=True)
    result, start = TrainResult(), 0
    last = dist.broadcast_object(latest_checkpoint(ckpt_dir) if resume and ckpt_dir is not None and main else None)
    if last is not None:
        start = _load_checkpoint(last, model, opt, sched)
        result.history = _trim_metrics(metrics, start) if main else []
    elif metrics is not None and main and metrics.exists():
        metrics.unlink()
    eval_batches = batchify(eval_ds.examples, tokenizer, cfg.batch_size) if eval_ds else []
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    bar = progress_bar(total=cfg.steps, initial=start, disable=not (progress and main), desc="train", unit="step")
    step, t_last = start, time.perf_counter()
    with _Interrupts() as interrupts:
        try:
            while step < cfg.steps:
                count, loss_sum, tokens = _forward_backward(model, params, train_ds, tokenizer, cfg, step, device, loss_fn)
                # From the update to the checkpoint, state and step count change together or not at all.
                with interrupts.critical():
                    row = _update(opt, sched, params, cfg, step, count, loss_sum, tokens)
                    step += 1
                    dt, t_last = time.perf_counter() - t_last, time.perf_counter()
                    row |= {"step": step, "tokens_per_s": row.pop("tokens") / dt}
                    if eval_batches and (step % cfg.eval_every == 0 or step == cfg.steps):
                        row |= eval_loss(model, eval_batches, train_ds.task, device)
                        t_last = time.perf_counter()  # eval time is not training throughput
                    result.history.append(row)
                    _log(metrics, row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
                    bar.update(1)
                    if ckpt_dir is not None and (step % cfg.save_every == 0 or step == cfg.steps):
                        save_checkpoint(ckpt_dir, step, model, opt, sched, cfg.keep_checkpoints)
        except _HardInterrupt:
            bar.close()
            last = latest_checkpoint(ckpt_dir) if ckpt_dir is not None else None
            raise TrainingInterrupted(f"stopped inside step {step + 1}: no checkpoint written for it"
                                      + (f"; the last one is {last}" if last else "")) from None
        except KeyboardInterrupt:
            bar.close()
            if ckpt_dir is None:
                raise
            interrupts.depth += 1  # further Ctrl-C while saving is ignored (pending, never re-raised)
            path = save_checkpoint(ckpt_dir, step, model, opt, sched, cfg.keep_checkpoints)
            raise TrainingInterrupted(f"interrupted at step {step}; checkpoint saved to {path}. "
                                      f"Resume with: {resume_hint or 'train(..., resume=True)'}") from None
    bar.close()
    model.eval()
    result.step = step
    result.final_eval = {k: v for k, v in (result.history[-1] if result.history else {}).items() if k.startswith("eval_")}
    return result


def enable_checkpointing(model) -> None:
    """Gradient checkpointing of every block (transformers' own, non-reentrant: the frozen base's inputs need no
    gradient for the adapters' gradients to flow); a model that does not support it is refused by name."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise RankwiseError(f"{type(model).__name__} does not support gradient checkpointing; "
                            "train without --gradient-checkpointing")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def _forward_backward(model, params, ds, tokenizer, cfg, step, device, loss_fn=None) -> tuple[int, float, int]:
    """Gradients of optimizer step `step`'s micro-batches (loss normalized by the step's scored count over all
    ranks; a custom loss_fn scores the same tokens as the task's loss, so the count is known before the
    forwards). Returns the scored count, the summed loss and the tokens, over all ranks."""
    micro = [_micro_batch(ds, tokenizer, cfg, step * cfg.grad_accum + j) for j in range(cfg.grad_accum)]
    micro = [{k: v.to(device) for k, v in b.items()} for b in micro]
    count = sum(_count(b, ds.task) for b in micro)
    if dist.active():
        count = int(dist.all_reduce_sum_(torch.tensor([count], dtype=torch.float64)).item())
    model.zero_grad(set_to_none=True)
    total = 0.0
    for b in micro:
        loss, _ = loss_fn(model, b) if loss_fn is not None else loss_terms(model, b, ds.task)
        (loss / max(count, 1)).backward()
        total += float(loss.detach())
    tokens = sum(int(b["attention_mask"].sum()) for b in micro)
    if dist.active():
        total, tokens = _sync_gradients(params, total, tokens)
    return count, total, tokens


def _sync_gradients(params: dict, total: float, tokens: int) -> tuple[float, int]:
    """Sum the trainable gradients, the loss and the tokens over the ranks (one all_reduce per dtype). Each rank
    divided its loss by the global scored count, so the sum is the gradient of the global mean, the same as
    one process on the whole batch; DDP's average of per-rank means would weight ranks equally whatever their
    token counts. The same gradients everywhere keep clipping and AdamW, and so the weights, identical."""
    by_dtype: dict[torch.dtype, list] = {}
    for p in params.values():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = dist.all_reduce_sum_(torch.cat([p.grad.reshape(-1) for p in group]))
        for p, g in zip(group, flat.split([p.numel() for p in group])):
            p.grad.copy_(g.view_as(p.grad))
    sums = dist.all_reduce_sum_(torch.tensor([total, tokens], dtype=torch.float64))
    return float(sums[0]), int(sums[1])


def _update(opt, sched, params, cfg, step, count, total, tokens) -> dict:
    """Clip, apply one optimizer step and advance the schedule; returns the step's log row."""
    grad_norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm))
    lr = opt.param_groups[0]["lr"]
    opt.step()
    sched.step()
    if not math.isfinite(total):
        raise RankwiseError(f"the loss became non-finite at step {step + 1}; lower the learning rate (now {cfg.lr:g})")
    return {"loss": total / max(count, 1), "lr": lr, "grad_norm": grad_norm,
            "tokens": tokens}


def _count(b: dict, task: str) -> int:
    return b["labels"].numel() if task == "seq-cls" else int((b["labels"][:, 1:] != -100).sum())
