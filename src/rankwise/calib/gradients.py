"""calibrate_gradients(model, batches) → Stats.grads: the weight gradient of the task loss, per target layer.

For every target W [out, in]: G_sum = Σ over the calibration batches of ∂(summed token loss)/∂W, and the
count of scored tokens, so that G = G_sum / count is the gradient of the mean loss over all calibration
tokens (LoRA-GA, LoRA-One, LoRA-SB start from it). Both are sums, so halves of the data, or ranks of a
distributed run, merge by adding. Only the targets' weights require grad while it runs, and what is kept
is their .grad, moved (not copied) into the Stats: memory = the targets' gradients; the activations of one
batch live only for its backward pass. The model runs in eval mode (no dropout: the same data give the same
gradient bit for bit) and no weight is changed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from ..progress import progress as progress_bar

from ..errors import CalibrationError
from ..losses import loss_terms
from ..targets import find_targets
from .stats import Stats


def batch_task(batch: dict[str, Tensor]) -> str:
    """'seq-cls' for one label per example, 'causal-lm' for one per token."""
    if "labels" not in batch:
        raise CalibrationError("gradient statistics need labelled batches (a task loss): give 'labels' "
                               "(token labels for causal LM, one class per example for classification)")
    return "seq-cls" if batch["labels"].ndim == 1 else "causal-lm"


def calibrate_gradients(model: nn.Module, batches: Sequence[dict[str, Tensor]], targets="all-linear",
                        stats: Stats | None = None, progress: bool = True) -> Stats:
    """Add the targets' summed weight gradients (and the scored-token count) to `stats` (a new Stats if None).

    Returns the Stats; `stats.gradient(name)` is then the mean-loss gradient [out, in] float32.
    """
    names = find_targets(model, targets) if stats is None else list(stats.order)
    stats = stats if stats is not None else Stats(order=names)
    if not batches:
        raise CalibrationError("no calibration batches: gradient statistics need labelled data")
    modules = {n: model.get_submodule(n) for n in names}
    bad = [n for n, m in modules.items() if not isinstance(getattr(m, "weight", None), nn.Parameter)]
    if bad:
        kind = type(modules[bad[0]]).__name__
        raise CalibrationError(f"gradient statistics need float linear layers; {bad[0]} is a {kind} (a compressed base "
                               "has no weight to differentiate): use a method that needs no gradient there")
    weights = {n: m.weight for n, m in modules.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    saved = {n: w.grad for n, w in weights.items()}
    was_training = model.training
    device = next(model.parameters()).device
    count = 0
    try:
        for p in flags:
            p.requires_grad_(False)
        for w in weights.values():
            w.grad = None
            w.requires_grad_(True)
        model.eval()
        for i, batch in enumerate(progress_bar(batches, desc="gradients", disable=not progress, leave=False)):
            b = {k: v.to(device) for k, v in batch.items()}
            with torch.enable_grad():
                loss, n = loss_terms(model, b, batch_task(b))
                if not torch.isfinite(loss):
                    raise CalibrationError(f"non-finite loss in calibration batch {i}; check the model and the labels")
                loss.backward()
            count += n
        part = Stats(order=names, grads={n: (w.grad if w.grad is not None else torch.zeros_like(w)).float()
                                          for n, w in weights.items()}, grad_count=count)
        for w in weights.values():
            w.grad = None
        part.all_reduce_grads_()  # a distributed run: every rank now holds the sums over all ranks' batches
        if part.grad_count == 0:
            raise CalibrationError("no scored token in the calibration batches (every label is -100)")
        for n, g in part.grads.items():
            stats.grads[n] = g if n not in stats.grads else stats.grads[n] + g
        stats.grad_count += part.grad_count
    finally:
        for n, w in weights.items():
            w.grad = saved[n]
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return stats
