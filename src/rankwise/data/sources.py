"""Data sources → examples → batches: the embedded pydoc corpus, .txt, .jsonl, .csv/.tsv."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import Field

from ..errors import DataError
from .formats import IGNORE, Fields, cls_example, file_kind, label_set, lm_example, read_rows, read_text

SPLITS = ("train", "eval")
TASKS = ("causal-lm", "seq-cls")


class DataConfig(Fields):
    """Where the data is and how to read it. Without `eval`, a deterministic slice of `train` is held out."""

    train: str = "pydoc"
    eval: str | None = None
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    labels: list[str] | None = None  # classification label set (default: the labels seen in train, sorted)
    seq_len: int = Field(256, ge=8)
    max_train_examples: int | None = Field(None, ge=1)
    max_eval_examples: int | None = Field(None, ge=1)  # None: every held-out example


@dataclass
class Dataset:
    """Tokenized examples: (ids, labels list) for causal LM, (ids, class index) for classification."""

    examples: list
    task: str
    source: str
    truncated: int = 0
    dropped: int = 0
    label_names: list[str] | None = None
    tokens: int = field(default=0)
    packed: bool = False  # plain text cut into consecutive blocks of one token stream
    available: int = 0  # examples before max_*_examples was applied


def pydoc_texts(split: str = "train") -> list[str]:
    """Python's own documentation (shipped with CPython): its paragraphs, split ~90/10 by a hash of
    (topic, paragraph index). There are only 79 topics, so splitting by topic left a thin held-out set."""
    if split not in SPLITS:
        raise DataError(f"split {split!r} is not one of {SPLITS}")
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        paragraphs = [p for p in topics[key].split("\n\n") if p.strip()]
        out += [p for i, p in enumerate(paragraphs) if _held_out(f"{key}:{i}", 0.1) == (split == "eval")]
    return out


def _held_out(key: str, fraction: float) -> bool:
    return int(hashlib.sha1(key.encode()).hexdigest(), 16) % 10_000 < fraction * 10_000


def token_stream(texts: list[str], tokenizer) -> list[int]:
    """The texts tokenized and concatenated, EOS (or SEP) after each."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    return stream


def _pack(texts: list[str], tokenizer, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """Concatenate texts (EOS between) and cut into full blocks of seq_len tokens."""
    stream = token_stream(texts, tokenizer)
    blocks = [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
    return [(b, list(b)) for b in blocks]


def is_plain_text(source: str) -> bool:
    """True for the embedded corpus and plain-text files; False for record files (errors on unknown types)."""
    return source == "pydoc" or file_kind(Path(source)) == "text"


def check_source(source: str) -> Path:
    path = Path(source)
    if source != "pydoc" and not path.exists():
        raise DataError(f"data file {path} does not exist (or use the embedded corpus: 'pydoc')")
    if path.is_dir():
        raise DataError(f"{path} is a folder; give a data file (.jsonl, .json, .csv, .tsv, .txt) or 'pydoc'")
    return path


def _text_split(source: str, split: str | None, fraction: float) -> list[str]:
    """Documents of a plain-text source (paragraphs of a .txt file); split=None: all of them."""
    if source == "pydoc":
        return pydoc_texts(split or "train")  # the embedded corpus keeps its held-out paragraphs apart
    docs = [d for d in read_text(Path(source)).split("\n\n") if d.strip()]
    if split is None:
        return docs
    return [d for i, d in enumerate(docs) if _held_out(str(i), fraction) == (split == "eval")]


def read_stream(source: str, tokenizer, split: str | None = None, fraction: float = 0.1) -> list[int]:
    """One token stream of a plain-text source (for perplexity): its documents, EOS after each."""
    check_source(source)
    if not is_plain_text(source):
        raise DataError(f"{source}: a token stream needs plain text ('pydoc', .txt); records are scored one by one")
    return token_stream(_text_split(source, split, fraction), tokenizer)


def read_texts(source: str, split: str | None = None, fraction: float = 0.1) -> list[str]:
    """The documents of a plain-text source (its held-out paragraphs with split="eval"), untokenized."""
    check_source(source)
    if not is_plain_text(source):
        raise DataError(f"{source}: held-out documents need plain text ('pydoc', .txt)")
    return _text_split(source, split, fraction)


def read_examples(source: str, tokenizer, task: str, seq_len: int, split: str | None, fraction: float,
                  fields: Fields, label_names: list[str] | None = None) -> Dataset:
    """Tokenize one source; split=None takes it whole, else keeps the train or eval slice."""
    if task not in TASKS:
        raise DataError(f"task {task!r} is not one of {TASKS}")
    path = check_source(source)
    if is_plain_text(source):
        if task != "causal-lm":
            raise DataError(f"{source}: classification needs a .jsonl/.json/.csv/.tsv file with text and label fields")
        return Dataset(_pack(_text_split(source, split, fraction), tokenizer, seq_len), task, source, packed=True)
    rows = read_rows(path)
    if split is not None:
        rows = [r for i, r in enumerate(rows) if _held_out(str(i), fraction) == (split == "eval")]
    if task == "seq-cls":
        names = label_names or label_set(rows, fields.label_field, path)
        ids = {n: i for i, n in enumerate(names)}
        examples = [cls_example(r, f"{path}:{ln}", tokenizer, fields, ids) for ln, r in rows]
        ds = Dataset(examples, task, source, label_names=names)
    else:
        ds = Dataset([lm_example(r, f"{path}:{ln}", tokenizer, fields) for ln, r in rows], task, source)
    return _truncate(ds, seq_len)


def _truncate(ds: Dataset, seq_len: int) -> Dataset:
    kept = []
    for ex in ds.examples:
        ids, lab = ex
        if len(ids) > seq_len:
            ds.truncated += 1
            ids, lab = ids[:seq_len], (lab[:seq_len] if isinstance(lab, list) else lab)
        if isinstance(lab, list) and all(t == IGNORE for t in lab):
            ds.dropped += 1  # nothing left to learn from (e.g. the prompt filled the whole window)
            continue
        kept.append((ids, lab))
    ds.examples = kept
    return ds


def load_dataset(cfg: DataConfig, tokenizer, task: str = "causal-lm") -> tuple[Dataset, Dataset]:
    """(train, eval) datasets; eval comes from cfg.eval, or from a deterministic slice of cfg.train."""
    split = None if cfg.eval else "train"
    train = read_examples(cfg.train, tokenizer, task, cfg.seq_len, split, cfg.eval_fraction, cfg, cfg.labels)
    if cfg.eval:
        ev = read_examples(cfg.eval, tokenizer, task, cfg.seq_len, None, cfg.eval_fraction, cfg, train.label_names)
    else:
        ev = read_examples(cfg.train, tokenizer, task, cfg.seq_len, "eval", cfg.eval_fraction, cfg, train.label_names)
    for ds, cap, name in ((train, cfg.max_train_examples, "train"), (ev, cfg.max_eval_examples, "eval")):
        ds.available = len(ds.examples)
        if cap is not None:
            ds.examples = ds.examples[:cap]
        if not ds.examples:
            raise DataError(f"{name} data from {ds.source!r} is empty after splitting, truncation to seq_len={cfg.seq_len} "
                            f"and filtering ({ds.dropped} example(s) had no scored token left)")
        ds.tokens = sum(len(ids) for ids, _ in ds.examples)
    return train, ev


def collate(examples: list, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples into input_ids, attention_mask, labels ([B, T], or [B] class indices)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    classify = not isinstance(examples[0][1], list)
    labels = torch.tensor([lab for _, lab in examples]) if classify else torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        if not classify:
            labels[i, : len(lab)] = torch.tensor(lab)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def batchify(examples: list, tokenizer, batch_size: int) -> list[dict[str, torch.Tensor]]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return [collate(examples[i : i + batch_size], pad) for i in range(0, len(examples), batch_size)]


def load_data(source: str | Path, tokenizer, seq_len: int = 256, n: int | None = 32, batch_size: int = 4,
              split: str = "train", task: str = "causal-lm", fields: Fields | None = None) -> list[dict[str, torch.Tensor]]:
    """Token batches from `source`: "pydoc" (embedded corpus), .txt (packed), .jsonl, .csv or .tsv.

    Returns dicts with input_ids, attention_mask and labels (-100 on padding and prompt tokens).
    Files are read whole (on pydoc, split picks its training or held-out paragraphs). `n` caps the sequences.
    """
    if seq_len < 2 or batch_size < 1:
        raise DataError(f"seq_len must be ≥ 2 and batch_size ≥ 1 (got {seq_len}, {batch_size})")
    split_arg = split if str(source) == "pydoc" else None
    ds = read_examples(str(source), tokenizer, task, seq_len, split_arg, 0.1, fields or Fields())
    examples = ds.examples[:n] if n is not None else ds.examples
    if not examples:
        raise DataError(f"data source {str(source)!r} gave no sequences of tokens (is it empty or shorter than seq_len={seq_len}?)")
    return batchify(examples, tokenizer, batch_size)
