"""The task loss every stage shares: training, evaluation and the gradient statistics of calibration."""

from __future__ import annotations

import torch.nn.functional as F


def loss_terms(model, batch: dict, task: str, return_logits: bool = False):
    """(summed loss, count[, logits]): token cross-entropy on labels != -100 for causal LM (label t+1 is
    predicted at t), example cross-entropy for classification."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if task == "seq-cls":
        loss, n = F.cross_entropy(out.logits.float(), batch["labels"], reduction="sum"), batch["labels"].numel()
    else:
        logits, labels = out.logits[:, :-1].float(), batch["labels"][:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")
        n = int((labels != -100).sum())
    return (loss, n, out.logits) if return_logits else (loss, n)
