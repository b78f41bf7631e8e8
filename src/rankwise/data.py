"""Data sources → token batches: the embedded pydoc corpus, plain text, jsonl."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .errors import DataError

SPLITS = ("train", "eval")
IGNORE = -100


def pydoc_texts(split: str = "train") -> list[str]:
    """Python's own documentation topics (shipped with CPython), split ~90/10 by a hash of the topic name."""
    if split not in SPLITS:
        raise DataError(f"split {split!r} is not one of {SPLITS}")
    from pydoc_data.topics import topics

    def held_out(key: str) -> bool:
        return int(hashlib.sha1(key.encode()).hexdigest(), 16) % 10 == 0

    keys = sorted(k for k in topics if held_out(k) == (split == "eval"))
    return [topics[k] for k in keys]


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
    return rows


def _jsonl_examples(path: Path, tokenizer, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per record: `text` (all tokens scored) or `prompt`+`completion` (prompt masked)."""
    out = []
    for lineno, row in _read_jsonl(path):
        if "text" in row:
            ids = tokenizer(str(row["text"]), add_special_tokens=True)["input_ids"]
            labels = list(ids)
        elif "prompt" in row and "completion" in row:
            p = tokenizer(str(row["prompt"]), add_special_tokens=True)["input_ids"]
            c = tokenizer(str(row["completion"]), add_special_tokens=False)["input_ids"]
            ids, labels = p + c, [IGNORE] * len(p) + c
        else:
            raise DataError(
                f"{path}:{lineno}: no 'text' field (nor 'prompt' and 'completion'); keys are {sorted(row)}"
            )
        out.append((ids[:seq_len], labels[:seq_len]))
    return out


def _pack(texts: list[str], tokenizer, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """Concatenate texts (EOS between) and cut into full blocks of seq_len tokens."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    blocks = [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
    return [(b, list(b)) for b in blocks]


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of (ids, labels) into input_ids, attention_mask, labels tensors."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def load_data(
    source: str | Path,
    tokenizer,
    seq_len: int = 256,
    n: int | None = 32,
    batch_size: int = 4,
    split: str = "train",
) -> list[dict[str, torch.Tensor]]:
    """Token batches from `source`: "pydoc" (embedded corpus), a .txt file (packed) or a .jsonl file.

    Returns a list of dicts with input_ids, attention_mask and labels ([batch, seq] long tensors);
    labels are -100 on padding and prompt tokens. `n` caps the number of sequences (None: all).
    """
    if seq_len < 2 or batch_size < 1:
        raise DataError(f"seq_len must be ≥ 2 and batch_size ≥ 1 (got {seq_len}, {batch_size})")
    if str(source) == "pydoc":
        examples = _pack(pydoc_texts(split), tokenizer, seq_len)
    else:
        path = Path(source)
        if not path.exists():
            raise DataError(f"data file {path} does not exist (or use the embedded corpus: 'pydoc')")
        if path.suffix == ".jsonl":
            examples = _jsonl_examples(path, tokenizer, seq_len)
        else:
            examples = _pack([path.read_text(encoding="utf-8")], tokenizer, seq_len)
    examples = [e for e in examples if e[0]]
    if n is not None:
        examples = examples[:n]
    if not examples:
        raise DataError(f"data source {str(source)!r} gave no sequences of tokens (is it empty or shorter than seq_len={seq_len}?)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return [collate(examples[i : i + batch_size], pad) for i in range(0, len(examples), batch_size)]
