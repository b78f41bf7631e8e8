"""A run config as YAML with a comment on every key (for `rankwise config show`)."""

from __future__ import annotations

import json

import yaml
from pydantic import BaseModel

COMMENTS = {
    "model": "'smollm2' (SmolLM2-135M-Instruct), 'minilm' (all-MiniLM-L6-v2), a local HF folder or a .gguf file",
    "task": "causal-lm (next-token SFT) or seq-cls (classification; a fresh head trains with the adapter)",
    "device": "torch device: cpu, cuda, cuda:1, …",
    "out": "run folder: config.yaml, metrics.jsonl, plan.json, adapter/, merged/, report.md, checkpoints/",
    "merge": "also save merged/: the adapter folded into the weights, loadable without peft",
    "data": "where the data is and how to read it",
    "data.train": "'pydoc' (embedded Python docs), .txt (packed), .jsonl/.json (text | prompt+completion | messages), .csv/.tsv",
    "data.eval": "held-out file; null = a deterministic slice (eval_fraction) of train",
    "data.eval_fraction": "share of train held out when eval is null",
    "data.labels": "classification classes in index order; null = the labels found in train (numbers sort as numbers)",
    "data.seq_len": "max tokens per example (longer ones are truncated and counted); block size for plain text",
    "data.max_train_examples": "cap on training examples (null = all)",
    "data.max_eval_examples": "cap on held-out examples scored during training (null = all)",
    "data.text_field": "field names in your records: plain text", "data.prompt_field": "context, not scored (GSM8K: question)",
    "data.completion_field": "scored continuation (GSM8K: answer)", "data.messages_field": "chat [{role, content}, …]; assistant turns scored",
    "data.label_field": "class label (seq-cls)",
    "init": "how the adapter starts",
    "init.method": "eva (data-driven, Paischer et al. 2024); `rankwise methods` lists every method, `rankwise config show --method NAME` its own keys",
    "init.rank": "LoRA rank r; the budget is r × number of target layers",
    "init.alpha": "LoRA alpha at rank r (null = r); scaled with each layer's rank so alpha/rank stays fixed",
    "init.rho": "EVA: a layer may take up to round(r·rho) ranks (1 = uniform)",
    "init.whiten": "EVA: whiten A's rows as peft does (null = EVA's default, on; false = plain EVA)",
    "init.targets": "'all-linear', names/suffixes ('q_proj,v_proj' or a list), or 're:<regex>' on full module names",
    "init.calib_samples": "training examples measured for a data-driven init (eva, corda); data-free methods skip calibration",
    "init.calib_batch_size": "examples per calibration forward pass",
    "init.use_label_mask": "leave prompt tokens (label -100) out of the statistics",
    "train": "one loop for every method",
    "train.steps": "optimizer steps", "train.batch_size": "examples per micro-batch",
    "train.grad_accum": "micro-batches per optimizer step", "train.lr": "peak learning rate of the adapter; null = the init method's default (`rankwise methods` lists them)",
    "train.head_lr": "peak learning rate of a classification head trained with the adapter (null = lr)",
    "train.weight_decay": "AdamW weight decay", "train.warmup_steps": "linear warmup steps",
    "train.min_lr_ratio": "cosine decay ends at lr × this", "train.max_grad_norm": "gradient clipping",
    "train.eval_every": "held-out loss every N steps", "train.save_every": "checkpoint every N steps",
    "train.keep_checkpoints": "how many checkpoints to keep", "train.seed": "data order and init seed",
    "eval": "held-out evaluation before and after training",
    "eval.window": "perplexity window (tokens)", "eval.stride": "perplexity stride (tokens)",
    "eval.max_tokens": "cap on held-out tokens scored for perplexity (whole records for jsonl data)",
}


def method_keys(method: str) -> dict[str, tuple[object, str]]:
    """{key: (default, description)} of a method's own options (those not already in the init section)."""
    from ..methods import get_init
    from .runs import InitSection

    fields = get_init(method).config.model_fields
    return {k: (f.default, f.description or "") for k, f in fields.items() if k not in InitSection.model_fields}


def with_method(cfg, method: str):
    """cfg with init.method = method and every key of that method shown (its default unless cfg sets it)."""
    keys = method_keys(method)
    init = {k: default for k, (default, _) in keys.items()} | cfg.init.model_dump() | {"method": method}
    allowed = set(type(cfg.init).model_fields) | set(keys)
    return cfg.model_copy(update={"init": type(cfg.init)(**{k: v for k, v in init.items() if k in allowed})})


def commented_yaml(cfg: BaseModel) -> str:
    """YAML of cfg with `# comment` lines above each key (a method's own keys: their descriptions)."""
    data = json.loads(cfg.model_dump_json())
    comments = dict(COMMENTS)
    method = data.get("init", {}).get("method")
    if method:
        comments |= {f"init.{k}": f"{method}: {d}" for k, (_, d) in method_keys(method).items() if d}
    lines: list[str] = ["# rankwise run config: `rankwise train --config this.yaml` (flags override keys)"]
    _emit(data, "", 0, lines, comments)
    return "\n".join(lines) + "\n"


def _emit(data: dict, prefix: str, indent: int, lines: list[str], comments: dict) -> None:
    pad = "  " * indent
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if comments.get(dotted):
            lines.append(f"{pad}# {comments[dotted]}")
        if isinstance(value, dict):
            lines.append(f"{pad}{key}:")
            _emit(value, dotted + ".", indent + 1, lines, comments)
        else:
            dumped = yaml.safe_dump({key: value}, default_flow_style=True, sort_keys=False).strip()
            lines.append(pad + dumped.removeprefix("{").removesuffix("}"))
