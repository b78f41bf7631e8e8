"""export(model, dir): write what the ecosystem loads, atomically (temp folder, then rename)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..atomic import staging_dir
from ..errors import ConfigError
from ..plan.plan import Plan

FORMATS = ("peft",)
META = "rankwise.json"  # beside adapter_config.json: base model, task, class names


def base_task(model) -> str:
    """'seq-cls', 'causal-lm' or 'encoder' for a (peft-wrapped) transformers model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    task = getattr(inner, "rankwise_task", None)
    if task in ("seq-cls", "causal-lm", "encoder"):
        return task
    name = type(inner).__name__
    return "seq-cls" if name.endswith("ForSequenceClassification") else "causal-lm" if name.endswith("ForCausalLM") else "encoder"


def class_names(config) -> list[str] | None:
    """The config's id2label as a list, or None when it holds only transformers' placeholder names."""
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label[i]) for i in sorted(id2label, key=int)]
    return None if not names or names == [f"LABEL_{i}" for i in range(len(names))] else names


def adapter_meta(model) -> dict:
    """What a reader of the adapter folder needs to rebuild its base: model, task, class names."""
    from ..models import describe_base

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    source = getattr(inner, "rankwise_source", None) or getattr(inner.config, "_name_or_path", "")
    task = base_task(model)
    meta = {**describe_base(str(source)), "task": task}
    if task == "seq-cls":
        meta["labels"] = class_names(inner.config) or [str(i) for i in range(inner.config.num_labels)]
    return meta


def read_adapter_meta(adapter_dir: str | os.PathLike) -> dict:
    """rankwise.json of an adapter folder ({} for adapters rankwise did not write)."""
    path = Path(adapter_dir) / META
    return json.loads(path.read_text()) if path.exists() else {}


def export(model, out_dir: str | os.PathLike, format: str = "peft", plan: Plan | None = None) -> Path:
    """Write a peft adapter folder (adapter_config.json, adapter_model.safetensors), rankwise.json and plan.json.

    adapter_config.json names the base by its hub id (embedded models) or absolute path, never a cache path.
    """
    if format not in FORMATS:
        raise ConfigError(f"export format {format!r} is not one of {FORMATS}")
    if not hasattr(model, "peft_config"):
        raise ConfigError("format 'peft' needs a model returned by adapt_ (a PeftModel)")
    from ..cores import fold_cores_, has_cores
    from .peft_experts import to_fused_experts

    out = Path(out_dir)
    meta = adapter_meta(model)
    if has_cores(model):  # LoRA-SB, SVFit: written as the plain LoRA B·(R·A) they compute
        import copy

        model = copy.deepcopy(model)
        fold_cores_(model)
    with staging_dir(out) as tmp:
        model.save_pretrained(tmp)
        cfg_path = tmp / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = meta["base_model_id"]
        if getattr(model.get_base_model(), "rankwise_conv1d", None):
            cfg["fan_in_fan_out"] = True  # the base it loads on has GPT-2's Conv1D layers (rankwise: linearized)
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        plan = plan or getattr(model, "rankwise_plan", None)
        if plan is not None and any(lp.residual for lp in plan.active().values()):
            meta["converted"] = to_original_base(tmp, plan)
        experts = to_fused_experts(tmp, model.get_base_model())
        if experts:
            meta["experts"] = experts
        (tmp / META).write_text(json.dumps(meta, indent=2))
        if plan is not None:
            plan.save(tmp / "plan.json")
    return out


def to_original_base(folder: Path, plan: Plan) -> str:
    """Rewrite a saved adapter whose base was replaced by W_res = W − s·B₀A₀ as a plain LoRA on W itself.

    W_res + s·B·A − W = s·(B·A − B₀·A₀) = s·[B, −B₀]·[A; A₀]: rank 2r, with alpha doubled (α/r kept) or
    ×√2 under rsLoRA (α/√r kept), as peft's path_initial_model_for_weight_conversion does.
    """
    from safetensors.torch import load_file, save_file

    weights_path = folder / "adapter_model.safetensors"
    cfg_path = folder / "adapter_config.json"
    tensors, cfg = load_file(str(weights_path)), json.loads(cfg_path.read_text())
    factor = 2**0.5 if cfg.get("use_rslora") else 2.0
    ranks, alphas = dict(cfg.get("rank_pattern") or {}), dict(cfg.get("alpha_pattern") or {})
    for name, lp in plan.active().items():
        if not lp.residual:
            continue
        key = f"base_model.model.{name}"
        a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
        tensors[f"{key}.lora_A.weight"] = torch.cat([a, lp.lora_A.to(a.dtype)], 0).contiguous()
        tensors[f"{key}.lora_B.weight"] = torch.cat([b, -lp.lora_B.to(b.dtype)], 1).contiguous()
        ranks[name] = 2 * lp.rank
        alphas[name] = factor * lp.alpha
    cfg["rank_pattern"], cfg["alpha_pattern"] = ranks, alphas
    save_file(tensors, str(weights_path), metadata={"format": "pt"})
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return (f"{plan.method} replaced base weights by residuals; this adapter is the rank-2r LoRA that gives the "
            "same model on the original, unmodified base")


def export_merged(peft_model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Fold the adapter into a copy of the base weights and save a plain transformers folder (dense float:
    a compressed base is folded in as its effective weight)."""
    from ..compress.linear import merge_lowrank_
    from ..conv1d import restore_conv1d_
    from ..experts import fuse_experts_
    from ..peft_layers import merged_copy
    from ..quant.linear import dequantize_
    from .check import check_reloadable

    out = Path(out_dir)
    # Layers under a LoRA layer were merged into their effective float weight; the compressed layers the
    # adapter does not touch (other targets, EVA's rank-0 layers) are made dense here.
    merged = restore_conv1d_(fuse_experts_(merge_lowrank_(dequantize_(merged_copy(peft_model)))))
    check_reloadable(merged, f"merged model for {out}")
    with staging_dir(out) as tmp:
        merged.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out
