"""Library side of `rankwise eval` and `rankwise export`: load base (+ adapter), run one metric."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import ConfigError, DataError
from ..data.formats import Fields

METRICS = ("perplexity", "accuracy", "exact-match")


def _adapter_config(adapter: Path) -> dict:
    path = Path(adapter) / "adapter_config.json"
    if not path.exists():
        raise ConfigError(f"{adapter} is not a peft adapter folder (no adapter_config.json)")
    return json.loads(path.read_text())


def adapter_base(adapter: Path) -> str:
    """The base model an adapter folder was made on: rankwise.json's name, else peft's record."""
    from ..export.peft import read_adapter_meta

    base = read_adapter_meta(adapter).get("base_model") or _adapter_config(adapter).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{adapter} does not record its base model; pass --model")
    return base


def load_with_adapter(model: str | None, adapter: Path | None, task: str = "auto", labels: list[str] | None = None,
                      dtype: str = "auto"):
    """(model, tokenizer): the base model, with the peft adapter in `adapter` applied if given.

    With an adapter, its rankwise.json decides the task and class names (a classification adapter
    needs its head); every tensor of the adapter file must land in the model, else it is an error.
    """
    from ..export.peft import read_adapter_meta
    from ..models import load_model

    if adapter is None:
        return load_model(model, task=task, labels=labels, dtype=dtype)
    _adapter_config(adapter)
    meta = read_adapter_meta(adapter)
    task = meta.get("task", task)
    labels = meta.get("labels") or labels
    base, tok = load_model(model or adapter_base(adapter), task=task, labels=labels if task == "seq-cls" else None,
                           dtype=dtype)
    from peft import PeftConfig, PeftModel

    from ..peft_layers import register_compressed

    try:  # a factored base (`rankwise compress`, or base/ of a run on an SVD base) needs its LoRA layer class
        config = register_compressed(PeftConfig.from_pretrained(str(adapter)), base)
        if getattr(config, "target_parameters", None):  # LoRA on fused MoE experts: give peft the fused module
            from ..experts import fuse_experts_

            fuse_experts_(base)
        if getattr(base, "rankwise_conv1d", None):
            config.fan_in_fan_out = False  # written for GPT-2's Conv1D; rankwise's base has them as nn.Linear
        loaded = PeftModel.from_pretrained(base, str(adapter), config=config).eval()
    except Exception as e:  # peft raises ValueError/KeyError/RuntimeError for adapters that do not fit
        raise ConfigError(f"{adapter} does not fit base model {model or adapter_base(adapter)!r} ({task}): "
                          f"{type(e).__name__}: {e}") from None
    _check_loaded(loaded, Path(adapter), task)
    return loaded, tok


def _check_loaded(model, adapter: Path, task: str) -> None:
    """Every tensor saved in the adapter is in the model, with the saved values (peft only warns)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    files = list(adapter.glob("adapter_model*.safetensors"))
    if not files:
        return
    saved = load_file(str(files[0]))
    have = get_peft_model_state_dict(model, save_embedding_layers=False)  # "auto" would look the base up on the hub
    missing = [k for k in saved if k not in have or have[k].shape != saved[k].shape or not have[k].cpu().equal(saved[k])]
    if missing:
        raise ConfigError(f"{adapter}: {len(missing)} of {len(saved)} adapter tensors did not load onto the base model "
                          f"({task}), e.g. {missing[0]}; is --model the base this adapter was trained on?")


def eval_labels(model: str | None, adapter: Path | None, data: str, label_field: str) -> list[str]:
    """Class names for accuracy: the adapter's, else the model config's id2label, else the data's own."""
    from ..export.peft import class_names, read_adapter_meta
    from ..data.formats import label_set, read_rows

    if adapter is not None and (names := read_adapter_meta(adapter).get("labels")):
        return list(names)
    if model is not None and (Path(model) / "config.json").exists():
        from transformers import AutoConfig

        names = class_names(AutoConfig.from_pretrained(model))
        if names:
            return names
    return label_set(read_rows(Path(data)), label_field, data)


def run_eval(model: str | None, adapter: Path | None, data: str, metric: str, seq_len: int = 256, stride: int = 128,
             limit: int | None = None, fields: Fields | None = None, max_new_tokens: int = 256,
             dtype: str = "auto") -> dict:
    """One metric of model (+ adapter) on `data`; returns {"metric", ...its values}."""
    from ..data.sources import batchify, check_source, is_plain_text, read_examples, read_stream
    from ..models import fit_seq_len
    from ..train.evaluate import accuracy, perplexity, record_perplexity

    fields = fields or Fields()
    if metric not in METRICS:
        raise ConfigError(f"metric {metric!r} is not one of {METRICS}")
    if model is None and adapter is None:
        raise ConfigError("give --model, --adapter, or both")
    check_source(data)
    if is_plain_text(data) and metric != "perplexity":  # (unknown file types fail here too, before any loading)
        raise DataError(f"{data}: {metric} needs records (.jsonl/.json/.csv/.tsv), not plain text")
    if metric == "accuracy":
        names = eval_labels(model, adapter, data, fields.label_field)
        m, tok = load_with_adapter(model, adapter, task="seq-cls", labels=names, dtype=dtype)
        seq_len = fit_seq_len(m, seq_len, log=lambda s: print(s, file=sys.stderr))
        ds = read_examples(data, tok, "seq-cls", seq_len, None, 0.1, fields, names)
        return {"metric": metric, **accuracy(m, batchify(ds.examples[:limit], tok, 16)), "labels": names}
    m, tok = load_with_adapter(model, adapter, task="causal-lm", dtype=dtype)
    seq_len = fit_seq_len(m, seq_len, log=lambda s: print(s, file=sys.stderr))  # stdout holds the one JSON line
    stride = min(stride, seq_len)
    if metric == "perplexity":
        if is_plain_text(data):
            stream = read_stream(data, tok, "eval" if data == "pydoc" else None)[:limit]
            return {"metric": metric, **perplexity(m, stream, window=seq_len, stride=stride)}
        ds = read_examples(data, tok, "causal-lm", seq_len, None, 0.1, fields)
        return {"metric": metric, **record_perplexity(m, batchify(ds.examples[:limit], tok, 8)), "truncated": ds.truncated}
    return {"metric": metric, **_exact_match(m, tok, data, limit, fields, max_new_tokens)}


def _exact_match(model, tok, data: str, limit: int | None, fields: Fields, max_new_tokens: int) -> dict:
    from ..train.evaluate import exact_match
    from ..data.formats import field_text, read_rows

    rows = read_rows(Path(data))[:limit]
    if not rows:
        raise DataError(f"{data}: no records")
    prompts = [field_text(r, fields.prompt_field, f"{data}:{ln}") for ln, r in rows]
    refs = [field_text(r, fields.completion_field, f"{data}:{ln}") for ln, r in rows]
    res = exact_match(model, tok, prompts, refs, max_new_tokens)
    res.pop("outputs")
    return res


def merge_adapter(adapter: Path, out: Path, model: str | None = None) -> Path:
    """Load base + adapter (with its task and class names), fold the adapter in, save a transformers folder."""
    from ..export.peft import export_merged

    m, tok = load_with_adapter(model, Path(adapter))
    return export_merged(m, tok, out)
