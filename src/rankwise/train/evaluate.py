"""evaluate: perplexity (sliding window), classification accuracy, GSM8K-style exact match."""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from ..progress import progress as progress_bar

from ..errors import DataError
from ..losses import loss_terms  # noqa: F401  (train's and calibration's task loss, re-exported here)

_NUMBER = re.compile(r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


@torch.no_grad()
def perplexity(model, token_ids: list[int], window: int = 256, stride: int = 128, batch_size: int = 4,
               progress: bool = False) -> dict:
    """Perplexity of one token stream with a sliding window (Press et al.'s strided evaluation).

    Windows of `window` tokens start every `stride`; each scores only the tokens the previous window
    did not, so every token after the first is predicted once, with up to window − stride tokens of
    context. A window's first token has no context inside it, so consecutive windows overlap by at
    least one token (stride is capped at window − 1). Returns {"perplexity", "nll", "tokens"}.
    """
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    total = NllSum()
    batches = window_batches(token_ids, window, stride, batch_size)
    for batch in progress_bar(batches, disable=not progress, desc="perplexity", leave=False):
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        total.add(out.logits, batch["labels"])
    model.train(was)
    return total.result()


def window_batches(token_ids: list[int], window: int, stride: int, batch_size: int) -> list[dict]:
    """The strided windows of `perplexity` as batches {input_ids, attention_mask, labels} (labels −100 on the
    tokens an earlier window already scored)."""
    if len(token_ids) < 2:
        raise DataError(f"perplexity needs at least 2 tokens (got {len(token_ids)})")
    if window < 2 or not 0 < stride <= window:
        raise DataError(f"need window ≥ 2 and stride in (0, window]; got stride={stride}, window={window}")
    stride = min(stride, window - 1)
    jobs, prev_end = [], 0
    for begin in range(0, len(token_ids) - 1, stride):
        end = min(begin + window, len(token_ids))
        jobs.append((begin, end, end - max(prev_end, begin + 1)))  # tokens scored in this window
        prev_end = end
        if end == len(token_ids):
            break
    batches = []
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i : i + batch_size]
        width = max(e - b for b, e, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, (b, e, n_new) in enumerate(chunk):
            seq = torch.tensor(token_ids[b:e])
            ids[r, : e - b], mask[r, : e - b] = seq, 1
            labels[r, e - b - n_new : e - b] = seq[-n_new:]
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


class NllSum:
    """Σ −log p of the labelled next tokens over batches of logits; `result()` → {"perplexity", "nll", "tokens"}."""

    def __init__(self):
        self.nll, self.count = 0.0, 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits = logits[:, :-1].float()
        tgt = labels[:, 1:].to(logits.device)
        self.nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100,
                                          reduction="sum"))
        self.count += int((tgt != -100).sum())

    def result(self) -> dict:
        return {"perplexity": math.exp(self.nll / self.count), "nll": self.nll / self.count, "tokens": self.count}


@torch.no_grad()
def record_perplexity(model, batches: list[dict], progress: bool = False) -> dict:
    """Perplexity of records scored one by one, on their labelled tokens only (a completion, an assistant
    turn; prompts are context). batches: collated examples. Returns {"perplexity", "nll", "tokens"}."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    nll, count = 0.0, 0
    for b in progress_bar(batches, disable=not progress, desc="perplexity", leave=False):
        loss, n = loss_terms(model, {k: v.to(device) for k, v in b.items()}, "causal-lm")
        nll, count = nll + float(loss), count + n
    model.train(was)
    if count == 0:
        raise DataError("perplexity: no scored token in these records (every label is -100)")
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count}


@torch.no_grad()
def accuracy(model, batches: list[dict]) -> dict:
    """Classification accuracy over batches with [B] integer labels."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    correct = total = 0
    for b in batches:
        logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
        correct += int((logits.argmax(-1).cpu() == b["labels"]).sum())
        total += b["labels"].numel()
    model.train(was)
    return {"accuracy": correct / max(total, 1), "examples": total}


def final_number(text: str) -> str | None:
    """The answer in GSM8K style: the number after '####', else the last number in the text."""
    tail = text.split("####", 1)[1] if "####" in text else text
    found = _NUMBER.findall(tail)
    if not found:
        return None
    value = (found[0] if "####" in text else found[-1]).replace(",", "").rstrip(".")
    try:
        number = float(value)
    except ValueError:
        return None
    return str(int(number)) if number.is_integer() else str(number)


@torch.no_grad()
def exact_match(model, tokenizer, prompts: list[str], answers: list[str], max_new_tokens: int = 256,
                batch_size: int = 8, progress: bool = False) -> dict:
    """Greedy, batched generation; score = final number of the output == final number of the reference."""
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    was = model.training
    model.eval()
    hits, outputs = 0, []
    try:
        for i in progress_bar(range(0, len(prompts), batch_size), disable=not progress, desc="generate", leave=False):
            enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for text, ref in zip(texts, answers[i : i + batch_size]):
                ok = final_number(text) is not None and final_number(text) == final_number(ref)
                hits += ok
                outputs.append({"output": text, "reference": ref, "correct": bool(ok)})
    finally:
        tokenizer.padding_side = side
        model.train(was)
    return {"exact_match": hits / max(len(prompts), 1), "examples": len(prompts), "outputs": outputs}


def encoder_batches(texts: list[str], tokenizer, seq_len: int, max_tokens: int, batch_size: int = 8) -> list[dict]:
    """Held-out documents as encoder inputs: each tokenized with its special tokens, truncated to seq_len,
    taken in order until max_tokens tokens; batched, right-padded."""
    encoded, total = [], 0
    for text in texts:
        if total >= max_tokens:
            break
        ids = tokenizer(text, truncation=True, max_length=seq_len)["input_ids"]
        encoded.append(ids)
        total += len(ids)
    if not encoded:
        raise DataError("the held-out text gave no documents to embed")
    from ..data.sources import batchify

    return [{k: b[k] for k in ("input_ids", "attention_mask")}
            for b in batchify([(ids, ids) for ids in encoded], tokenizer, batch_size)]


@torch.no_grad()
def sentence_embeddings(model, batches: list[dict]) -> torch.Tensor:
    """[n, d] float32: each sequence's mean-pooled last hidden state over its attended tokens, unit length
    (the sentence-transformers pooling of all-MiniLM-L6-v2)."""
    device = next(model.parameters()).device
    out = []
    for b in batches:
        mask = b["attention_mask"].to(device)
        h = model(input_ids=b["input_ids"].to(device), attention_mask=mask).last_hidden_state.float()
        m = mask.unsqueeze(-1).float()
        out.append(F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1), dim=-1).cpu())
    return torch.cat(out)


def embedding_cosine(model, batches: list[dict], reference: torch.Tensor) -> float:
    """Mean cosine between `model`'s sentence embeddings of `batches` and `reference` (those of the float
    model): 1 when nothing changed."""
    return float((sentence_embeddings(model, batches) * reference).sum(-1).mean())
