"""export(model, dir): write what the ecosystem loads, atomically (temp folder, then rename)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import ConfigError
from .plan import Plan

FORMATS = ("peft",)


def replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished temp folder to `out`, replacing an older one only once the new one is complete."""
    old = None
    if out.exists():
        old = out.with_name(out.name + f".old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export(model, out_dir: str | os.PathLike, format: str = "peft", plan: Plan | None = None) -> Path:
    """Write a peft adapter folder (adapter_config.json, adapter_model.safetensors) and plan.json."""
    if format not in FORMATS:
        raise ConfigError(f"export format {format!r} is not one of {FORMATS}")
    if not hasattr(model, "peft_config"):
        raise ConfigError("format 'peft' needs a model returned by adapt_ (a PeftModel)")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        plan = plan or getattr(model, "rankwise_plan", None)
        if plan is not None:
            plan.save(tmp / "plan.json")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_merged(peft_model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Fold the adapter into a copy of the base weights and save a plain transformers folder."""
    import copy

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
