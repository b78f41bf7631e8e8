"""Record formats → token examples: jsonl/json (text, prompt/completion, chat messages), csv/tsv (labels)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..config import StrictModel
from ..errors import DataError

IGNORE = -100
RECORD_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
TEXT_SUFFIXES = (".txt", ".text", ".md")


class Fields(StrictModel):
    """Which record fields hold what (rename to fit your files)."""

    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    label_field: str = "label"


def file_kind(path: Path) -> str:
    """'records' or 'text' by the file's suffix (any case); anything else is an error that lists the formats."""
    suffix = path.suffix.lower()
    if suffix in RECORD_SUFFIXES:
        return "records"
    if suffix in TEXT_SUFFIXES:
        return "text"
    raise DataError(f"{path}: unknown data format {path.suffix or '(no suffix)'!r}; rankwise reads "
                    f"{', '.join(RECORD_SUFFIXES)} (records) and {', '.join(TEXT_SUFFIXES)} (plain text). "
                    "Convert the file (e.g. parquet → jsonl) or rename a plain-text file to .txt")


def read_text(path: Path) -> str:
    """A UTF-8 file's text (a leading BOM, as Excel writes it, is dropped); bad bytes name the line."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}); "
                        "save the file as UTF-8") from None


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) from a .jsonl, .json, .csv or .tsv file; errors name the file and line."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix in (".csv", ".tsv"):
        return _read_table(path, "\t" if suffix == ".tsv" else ",")
    raise DataError(f"{path}: unknown record format {path.suffix!r}; use {', '.join(RECORD_SUFFIXES)} (or .txt for plain text)")


def _read_table(path: Path, delimiter: str) -> list[tuple[int, dict]]:
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""), delimiter=delimiter, quoting=quoting)
    header = reader.fieldnames or []
    rows = []
    for row in reader:
        if None in row:
            raise DataError(f"{path}:{reader.line_num}: more columns than the header ({', '.join(header)})")
        short = [k for k, v in row.items() if v is None]
        if short:
            raise DataError(f"{path}:{reader.line_num}: {len(header) - len(short)} of {len(header)} columns; "
                            f"no cell for {', '.join(short)}")
        rows.append((reader.line_num, row))
    return rows


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
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


def _read_json(path: Path) -> list[tuple[int, dict]]:
    """A .json file holding one array of objects; 'line' numbers are the records' positions (1-based)."""
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json data file must hold an array of objects (or use .jsonl, one object per line)")
    for i, row in enumerate(data, 1):
        if not isinstance(row, dict):
            raise DataError(f"{path}: record {i}: expected a JSON object, got {type(row).__name__}")
    return list(enumerate(data, 1))


def field_text(row: dict, field: str, where: str, allow_empty: bool = True) -> str:
    """The record's `field` as text; a missing field or a null value (or an empty one, unless allowed) is an
    error naming both."""
    if field not in row:
        raise DataError(f"{where}: no '{field}' field; the record has {sorted(row)}. "
                        "Map your field names in the data config (text_field, prompt_field, completion_field, …)")
    value = row[field]
    if value is None or (not allow_empty and isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}: field '{field}' is {'null' if value is None else 'empty'}")
    if isinstance(value, (dict, list)):
        raise DataError(f"{where}: field '{field}' holds a {type(value).__name__}, not text")
    return str(value)


def label_of(row: dict, field: str, where: str) -> str:
    """A record's class label as text (stripped); missing, null or empty labels are errors."""
    return field_text(row, field, where, allow_empty=False).strip()


def sort_labels(names) -> list[str]:
    """Distinct labels in a natural order: numerically when every label is a number ("2" before "10")."""
    names = set(names)
    try:
        return sorted(names, key=lambda s: (float(s), s))
    except ValueError:
        return sorted(names)


def label_set(rows: list[tuple[int, dict]], field: str, path: Path | str = "") -> list[str]:
    """The distinct labels in `field` of the records, naturally sorted (see sort_labels)."""
    return sort_labels(label_of(r, field, f"{path}:{ln}") for ln, r in rows)


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
        p = tokenizer(field_text(row, f.prompt_field, where), add_special_tokens=True)["input_ids"]
        c = tokenizer(field_text(row, f.completion_field, where), add_special_tokens=False)["input_ids"]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return p + c + eos, [IGNORE] * len(p) + c + eos
    if f.text_field in row:
        ids = tokenizer(field_text(row, f.text_field, where), add_special_tokens=True)["input_ids"]
        return ids, list(ids)
    raise DataError(f"{where}: no '{f.text_field}' field (nor '{f.prompt_field}'+'{f.completion_field}', "
                    f"nor '{f.messages_field}'); the record has {sorted(row)}. Map field names in the data config.")


def cls_example(row: dict, where: str, tokenizer, f: Fields, label_ids: dict[str, int]) -> tuple[list[int], int]:
    """(input_ids, class index) for sequence classification."""
    text = field_text(row, f.text_field, where)
    label = label_of(row, f.label_field, where)
    if label not in label_ids:
        raise DataError(f"{where}: label {label!r} is not in the label set {list(label_ids)}")
    return tokenizer(text, add_special_tokens=True)["input_ids"], label_ids[label]
