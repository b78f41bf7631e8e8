"""Record formats → token examples: jsonl (text, prompt/completion, chat messages), csv/tsv (labels)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .config import StrictModel
from .errors import DataError

IGNORE = -100


class Fields(StrictModel):
    """Which record fields hold what (rename to fit your files)."""

    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    label_field: str = "label"


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) from a .jsonl, .csv or .tsv file; errors name the file and line."""
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",", quoting=csv.QUOTE_NONE if path.suffix == ".tsv" else csv.QUOTE_MINIMAL)
            rows = []
            for row in reader:
                if None in row:
                    raise DataError(f"{path}:{reader.line_num}: more columns than the header ({', '.join(reader.fieldnames or [])})")
                rows.append((reader.line_num, row))
            return rows
    raise DataError(f"{path}: unknown record format {path.suffix!r}; use .jsonl, .csv, .tsv (or .txt for plain text)")


def label_set(rows: list[tuple[int, dict]], field: str) -> list[str]:
    """The sorted distinct non-empty labels in `field` of the records."""
    return sorted({str(r.get(field, "")).strip() for _, r in rows} - {""})


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


def _missing(path: Path, lineno: int, row: dict, wanted: str) -> DataError:
    return DataError(f"{path}:{lineno}: no {wanted} field; the record has {sorted(row)}. "
                     "Map your field names in the data config (text_field, prompt_field, completion_field, …)")


def chat_example(messages: list[dict], tokenizer, where: str) -> tuple[list[int], list[int]]:
    """Render messages with the tokenizer's chat template; labels only on assistant turns.

    Each assistant turn's characters are those between the prompt rendered up to it (with the
    generation header) and the conversation rendered through it; tokens whose start falls there are scored.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: 'messages' need a tokenizer with a chat template; this one has none")
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise DataError(f"{where}: 'messages' must be a list of {{role, content}} objects")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
            end = len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))
            spans.append((start, end))
    if not spans:
        raise DataError(f"{where}: the conversation has no assistant turn to learn from")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [t if any(s <= off[0] < e for s, e in spans) else IGNORE for t, off in zip(ids, enc["offset_mapping"])]
    return ids, labels


def lm_example(row: dict, where: str, tokenizer, f: Fields) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for causal LM: chat, prompt+completion (prompt masked), or plain text."""
    if f.messages_field in row:
        return chat_example(row[f.messages_field], tokenizer, where)
    if f.prompt_field in row and f.completion_field in row:
        p = tokenizer(str(row[f.prompt_field]), add_special_tokens=True)["input_ids"]
        c = tokenizer(str(row[f.completion_field]), add_special_tokens=False)["input_ids"]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return p + c + eos, [IGNORE] * len(p) + c + eos
    if f.text_field in row:
        ids = tokenizer(str(row[f.text_field]), add_special_tokens=True)["input_ids"]
        return ids, list(ids)
    raise DataError(f"{where}: no '{f.text_field}' field (nor '{f.prompt_field}'+'{f.completion_field}', "
                    f"nor '{f.messages_field}'); the record has {sorted(row)}. Map field names in the data config.")


def cls_example(row: dict, where: str, tokenizer, f: Fields, label_ids: dict[str, int]) -> tuple[list[int], int]:
    """(input_ids, class index) for sequence classification."""
    if f.text_field not in row:
        raise DataError(f"{where}: no '{f.text_field}' field; the record has {sorted(row)} (set text_field)")
    if f.label_field not in row:
        raise DataError(f"{where}: no '{f.label_field}' field; the record has {sorted(row)} (set label_field)")
    label = str(row[f.label_field]).strip()
    if label not in label_ids:
        raise DataError(f"{where}: label {label!r} is not in the label set {sorted(label_ids)}")
    return tokenizer(str(row[f.text_field]), add_special_tokens=True)["input_ids"], label_ids[label]
