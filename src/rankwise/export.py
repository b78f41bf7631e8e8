"""export(model, dir): write what the ecosystem loads, atomically (temp folder, then rename)."""

from __future__ import annotations

import os
from pathlib import Path

from .atomic import staging_dir
from .errors import ConfigError
from .plan import Plan

FORMATS = ("peft",)


def export(model, out_dir: str | os.PathLike, format: str = "peft", plan: Plan | None = None) -> Path:
    """Write a peft adapter folder (adapter_config.json, adapter_model.safetensors) and plan.json."""
    if format not in FORMATS:
        raise ConfigError(f"export format {format!r} is not one of {FORMATS}")
    if not hasattr(model, "peft_config"):
        raise ConfigError("format 'peft' needs a model returned by adapt_ (a PeftModel)")
    out = Path(out_dir)
    with staging_dir(out) as tmp:
        model.save_pretrained(tmp)
        plan = plan or getattr(model, "rankwise_plan", None)
        if plan is not None:
            plan.save(tmp / "plan.json")
    return out


def export_merged(peft_model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Fold the adapter into a copy of the base weights and save a plain transformers folder."""
    import copy

    out = Path(out_dir)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    with staging_dir(out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out
