"""Library side of `rankwise eval` and `rankwise export`: load base (+ adapter), run one metric."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ConfigError, DataError

METRICS = ("perplexity", "accuracy", "exact-match")


def load_with_adapter(model: str, adapter: Path | None, task: str = "auto", num_labels: int | None = None):
    """(model, tokenizer): the base model, with the peft adapter in `adapter` applied if given."""
    from .models import load_model

    base, tok = load_model(model, task=task, num_labels=num_labels)
    if adapter is None:
        return base, tok
    from peft import PeftModel

    if not (Path(adapter) / "adapter_config.json").exists():
        raise ConfigError(f"{adapter} is not a peft adapter folder (no adapter_config.json)")
    return PeftModel.from_pretrained(base, str(adapter)).eval(), tok


def run_eval(model: str, adapter: Path | None, data: str, metric: str, seq_len: int = 256, stride: int = 128,
             limit: int | None = None, prompt_field: str = "question", answer_field: str = "answer",
             text_field: str = "text", label_field: str = "label", max_new_tokens: int = 256) -> dict:
    from .data import read_examples
    from .evaluate import accuracy, exact_match, perplexity
    from .formats import Fields, label_set, read_rows

    if metric not in METRICS:
        raise ConfigError(f"metric {metric!r} is not one of {METRICS}")
    fields = Fields(text_field=text_field, label_field=label_field)
    if metric == "accuracy":
        from .data import batchify

        names = label_set(read_rows(Path(data)), label_field)
        m, tok = load_with_adapter(model, adapter, task="seq-cls", num_labels=len(names))
        ds = read_examples(data, tok, "seq-cls", seq_len, None, 0.1, fields, names)
        return {"metric": metric, **accuracy(m, batchify(ds.examples[:limit], tok, 16))}
    m, tok = load_with_adapter(model, adapter, task="causal-lm")
    if metric == "perplexity":
        ds = read_examples(data, tok, "causal-lm", 10**9 if data != "pydoc" else seq_len, "eval" if data == "pydoc" else None, 0.1, fields)
        stream = [t for ids, _ in ds.examples for t in ids][:limit]
        return {"metric": metric, **perplexity(m, stream, window=seq_len, stride=stride)}
    rows = [r for _, r in read_rows(Path(data))][:limit]
    if not rows or prompt_field not in rows[0] or answer_field not in rows[0]:
        raise DataError(f"{data}: exact-match needs '{prompt_field}' and '{answer_field}' fields")
    res = exact_match(m, tok, [str(r[prompt_field]) for r in rows], [str(r[answer_field]) for r in rows], max_new_tokens)
    res.pop("outputs")
    return {"metric": metric, **res}


def merge_adapter(adapter: Path, out: Path, model: str | None = None) -> Path:
    """Load base + adapter, fold the adapter in, save a transformers folder to `out`."""
    from .export import export_merged

    cfg_path = Path(adapter) / "adapter_config.json"
    if not cfg_path.exists():
        raise ConfigError(f"{adapter} is not a peft adapter folder (no adapter_config.json)")
    base = model or json.loads(cfg_path.read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{adapter} does not record its base model; pass --model")
    m, tok = load_with_adapter(base, Path(adapter))
    return export_merged(m, tok, out)
