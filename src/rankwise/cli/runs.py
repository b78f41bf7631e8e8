"""run_train(cfg): the whole pipeline into one run directory — calibrate, plan, adapt, evaluate,
train, evaluate, export adapter (+ merged model), report."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Literal

import difflib

import torch
import yaml
from pydantic import ConfigDict, Field, model_validator

from ..atomic import write_text
from ..compress.base import BaseSection
from ..config import StrictModel
from ..data.sources import DataConfig, Dataset, batchify, load_dataset
from ..errors import ConfigError, RankwiseError
from ..train.loop import TrainConfig


class InitSection(StrictModel):
    """How the adapter starts: method, rank budget, and the calibration data it measures.

    Any other key belongs to the method and is checked against its own config (`rankwise config show
    --method NAME` lists them): `init: {method: pissa, niter: 4}`.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    method: str = "eva"
    rank: int = Field(8, ge=1)
    alpha: float | None = None  # default: rank (alpha/rank = 1), scaled with each layer's rank
    rho: float = Field(2.0, ge=1.0)  # EVA only
    whiten: bool | None = None  # EVA only; None: EVA's default (whitened)
    targets: str | list[str] = "all-linear"  # 'all-linear', 'q_proj,v_proj' (or a list), 're:<regex>'
    calib_samples: int = Field(32, ge=1)
    calib_batch_size: int = Field(4, ge=1)
    use_label_mask: bool = True

    @model_validator(mode="after")
    def _method_keys(self):
        extra = dict(self.model_extra or {})
        if not extra:
            return self
        from ..methods import get_init

        impl = get_init(self.method)
        known = [k for k in impl.config.model_fields if k not in type(self).model_fields]
        for key in extra:
            if key not in known:
                near = difflib.get_close_matches(key, known + list(type(self).model_fields), n=1)
                hint = f"did you mean {near[0]!r}?" if near else f"{self.method!r} takes: {', '.join(known) or 'no other keys'}"
                raise ValueError(f"unknown key {key!r} for method {self.method!r}; {hint}")
        impl.config.build(where=f"init (method {self.method!r})", **extra)  # types and ranges, now
        return self

    def method_options(self) -> dict:
        """The method's own keys set in this section."""
        return dict(self.model_extra or {})


class EvalSection(StrictModel):
    """Held-out evaluation before and after training."""

    window: int = Field(256, ge=8)  # perplexity window (tokens)
    stride: int = Field(128, ge=1)
    max_tokens: int = Field(4096, ge=16)  # cap on the held-out token stream for perplexity


class RunConfig(StrictModel):
    """`rankwise train`: everything one run needs. `rankwise config show` prints it with defaults."""

    model: str = "smollm2"
    task: Literal["causal-lm", "seq-cls"] = "causal-lm"
    device: str = "cpu"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # the frozen base's dtype (auto: the checkpoint's own); adapters train in float32
    out: Path = Path("runs/demo")
    merge: bool = True  # also write merged/ (base + adapter folded in, loadable without peft)
    data: DataConfig = DataConfig()
    base: BaseSection = BaseSection()  # none: train on the float model; a quantizer or SVD method: QLoRA-style
    init: InitSection = InitSection()
    train: TrainConfig = TrainConfig()
    eval: EvalSection = EvalSection()


def load_config(path: str | os.PathLike | None, overrides: dict | None = None) -> RunConfig:
    """Read a YAML config (optional), apply dotted overrides ({"train.lr": 1e-3}), validate strictly."""
    raw: dict = {}
    where = str(path) if path else "config"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist" if not p.exists() else f"{p} is not a file")
        from ..data.formats import read_text

        try:
            raw = yaml.safe_load(read_text(p)) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        except RankwiseError as e:
            raise ConfigError(str(e)) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of keys")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for i, key in enumerate(parents):
            if node.get(key) is None:  # absent, or `key: null` (= all defaults)
                node[key] = {}
            if not isinstance(node[key], dict):
                section = ".".join(parents[: i + 1])
                raise ConfigError(f"{where}: {section} must be a mapping of keys (got {node[key]!r}), "
                                  f"so {dotted} cannot be set")
            node = node[key]
        node[leaf] = value
    return RunConfig.build(where=where, **raw)


# Keys a resumed run may change: where it runs, not what it computes.
RESUMABLE = {"device"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def check_resume(cfg: RunConfig) -> None:
    """A resumed run must be the run in cfg.out: every key but RESUMABLE equal to its config.yaml."""
    saved_path = Path(cfg.out) / "config.yaml"
    if not saved_path.exists():
        raise ConfigError(f"--resume: {cfg.out} holds no run to resume (no config.yaml); start one without --resume")
    saved = _flat(json.loads(load_config(saved_path).model_dump_json()))
    now = _flat(json.loads(cfg.model_dump_json()))
    diff = [k for k in now if k not in RESUMABLE and now[k] != saved.get(k) and k != "out"]
    if diff:
        k = diff[0]
        raise ConfigError(f"--resume: {k} is {now[k]!r} here but {saved.get(k)!r} in {saved_path}; a resumed run keeps "
                          f"its config (drop the flag), or start over with --overwrite"
                          + (f" (also differs: {', '.join(diff[1:])})" if len(diff) > 1 else ""))


def _prepare_out(out: Path, resume: bool, overwrite: bool) -> None:
    from ..atomic import check_out_dir

    check_out_dir(out)
    if out.exists() and any(out.iterdir()) and not resume:
        if not (out / "config.yaml").exists():
            raise ConfigError(f"{out} exists and is not a rankwise run folder; choose another --out")
        if not overwrite:
            raise ConfigError(f"{out} already holds a run; pass --resume to continue it or --overwrite to start over")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def head_modules(model) -> list[str]:
    """Names of the task head's modules, trained whole next to the adapter (classification): the task model's
    own top-level modules (classifier, pre_classifier, pooler, …), else the leaf names of known heads."""
    from ..targets import _head_names, task_heads

    return task_heads(model) or sorted({n.split(".")[-1] for n in _head_names(model) if n})


def held_out_metrics(model, tok, ds: Dataset, cfg: RunConfig) -> dict:
    """Accuracy (classification); perplexity of the held-out text (sliding window over the packed stream),
    or of held-out records on their scored tokens only, each record alone, as training scores them."""
    from ..train.evaluate import accuracy, perplexity, record_perplexity

    if cfg.task == "seq-cls":
        return accuracy(model, batchify(ds.examples, tok, cfg.train.batch_size))
    if ds.packed:
        stream = [t for ids, _ in ds.examples for t in ids][: cfg.eval.max_tokens]
        return perplexity(model, stream, window=cfg.eval.window, stride=min(cfg.eval.stride, cfg.eval.window))
    kept, total = [], 0
    for ex in ds.examples:  # whole records up to eval.max_tokens (at least one)
        if kept and total + len(ex[0]) > cfg.eval.max_tokens:
            break
        kept.append(ex)
        total += len(ex[0])
    return record_perplexity(model, batchify(kept, tok, cfg.train.batch_size))


def run_train(cfg: RunConfig, resume: bool = False, overwrite: bool = False, progress: bool = True,
              log=print) -> dict:
    """Run the full pipeline; returns a summary dict (also written to summary.json).

    Under torchrun every rank runs it: calibration batches and training micro-batches are shared out, the
    statistics and gradients summed, the plan checked equal on every rank, and rank 0 alone evaluates and
    writes the run folder (docs/distributed.md)."""
    from .. import distributed as dist
    from ..adapt import adapt_
    from ..calib.calibrate import calibrate
    from ..methods import config_options, grads_for, keep_for
    from ..models import fit_seq_len, load_model, usable_length
    from ..plan.plan import plan
    from ..train.loop import default_lr, train

    out, t0 = Path(cfg.out), time.perf_counter()
    device = dist.init_from_env(cfg.device)
    main = dist.is_main()
    log, progress = (log, progress) if main else (_silent, False)
    with dist.together("checking the config and the run folder"):
        _check_sources(cfg)
        keep = keep_for([cfg.init.method], cfg.init.rank, cfg.init.rho)  # (an unknown method fails here, before loading)
        labels = _label_names(cfg)
        if labels:
            cfg.data.labels = labels  # recorded in config.yaml: the run's classes, in index order
        if resume and main:
            check_resume(cfg)
        if main:
            _prepare_out(out, resume, overwrite)
        if main and not resume:
            write_text(out / "config.yaml", yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))
    with dist.together("loading the model and the data"):
        torch.manual_seed(cfg.train.seed)
        model, tok = load_model(cfg.model, task=cfg.task, labels=labels, dtype=cfg.dtype)
        model.to(device)
        log(f"model: {cfg.model} in {model.rankwise_dtype}" + ("" if model.rankwise_dtype == "float32" else " (adapters and optimizer state in float32)"))
        cfg.data.seq_len = fit_seq_len(model, cfg.data.seq_len, log)
        cfg.eval.window = min(cfg.eval.window, usable_length(model) or cfg.eval.window)
        train_ds, eval_ds = load_dataset(cfg.data, tok, cfg.task)
        log(f"data: {_count(train_ds, 'train')}, {_count(eval_ds, 'eval')}; "
            f"{train_ds.truncated + eval_ds.truncated} truncated to {cfg.data.seq_len} tokens, "
            f"{train_ds.dropped + eval_ds.dropped} dropped (nothing left to score)")
        calib = dist.shard(batchify(train_ds.examples[: cfg.init.calib_samples], tok, cfg.init.calib_batch_size),
                           "calibration batches (init.calib_samples / init.calib_batch_size)")
    with dist.together("calibrating and planning"):
        originals = _compress_base(model, calib, cfg, out, progress, log)
        stats = None
        if keep is not None:  # data-free methods skip calibration entirely; on a compressed base, its own activations
            stats = calibrate(model, calib, cfg.init.targets, use_label_mask=cfg.init.use_label_mask, keep=keep,
                              progress=progress)
        if grads_for([cfg.init.method]):  # LoRA-GA, LoRA-One, LoRA-SB: the task loss's weight gradient, once
            from ..calib.gradients import calibrate_gradients

            stats = calibrate_gradients(model, calib, cfg.init.targets, stats, progress=progress)
        options = config_options(cfg.init.method, rank=cfg.init.rank, alpha=cfg.init.alpha, rho=cfg.init.rho,
                                 whiten=cfg.init.whiten, seed=cfg.train.seed, first_lr=_first_lr(cfg))
        options |= cfg.init.method_options()
        p = plan(stats, model, method=cfg.init.method, targets=cfg.init.targets, originals=originals, **options)
        del originals
    p = dist.agree(p, p.fingerprint(), "the plan", log)
    if main:
        p.save(out / "plan.json")
    extra = {"modules_to_save": head_modules(model)} if cfg.task == "seq-cls" else {}
    model = adapt_(model, p, **extra)
    with dist.together("evaluating before training"):
        before = {}
        if main:
            before = _previous(out) if resume and (out / "before.json").exists() else held_out_metrics(model, tok, eval_ds, cfg)
            write_text(out / "before.json", json.dumps(before))
    log(f"held-out before training: {_fmt(before)}")
    hint = f"rankwise train --out {out} --resume"
    if cfg.train.lr is None:
        cfg.train.lr = default_lr(model)  # the same default train() would pick, recorded for the report
    with dist.together("training"):
        result = train(model, train_ds, eval_ds, cfg.train, tok, run_dir=out, resume=resume, progress=progress,
                       resume_hint=hint)
    if not main:  # rank 0 alone evaluates and writes, with no collective: the others are done (waiting for it
        return {"steps": result.step, "history": result.history}  # could outlast the group's timeout)
    return _finish(model, tok, train_ds, eval_ds, cfg, p, result, before, t0, log)


def _finish(model, tok, train_ds, eval_ds, cfg: RunConfig, p, result, before: dict, t0: float, log) -> dict:
    """Rank 0: evaluate after training, export the adapter (and merged model, compressed base), report."""
    from ..export.peft import export, export_merged
    from ..plan.plan import Plan
    from .report import write_report

    out = Path(cfg.out)
    after = held_out_metrics(model, tok, eval_ds, cfg)
    log(f"held-out after {result.step} steps: {_fmt(after)}")
    export(model, out / "adapter", plan=p)
    tok.save_pretrained(out / "adapter")
    if cfg.merge:
        export_merged(model, tok, out / "merged")
    summary = {"before": before, "after": after, "steps": result.step, "seconds": time.perf_counter() - t0,
               "train_examples": len(train_ds.examples), "eval_examples": len(eval_ds.examples),
               "truncated": train_ds.truncated + eval_ds.truncated,
               "labels": cfg.data.labels if cfg.task == "seq-cls" else None}
    if cfg.base.method != "none":
        summary["base"] = _export_compressed(model, tok, eval_ds, cfg, out, log)
    write_text(out / "summary.json", json.dumps(summary, indent=2))
    write_report(out, cfg, p if isinstance(p, Plan) else None, summary)
    return summary


def _silent(*args, **kwargs) -> None:
    """The log of ranks other than 0: one process speaks for the run."""


def _first_lr(cfg: RunConfig) -> float:
    """The learning rate of the run's first optimizer step (LoRA-SB simulates that step)."""
    from ..methods import get_init
    from ..train.loop import lr_factor

    lr = cfg.train.lr if cfg.train.lr is not None else float(getattr(get_init(cfg.init.method), "default_lr", 5e-4))
    return lr * lr_factor(0, cfg.train.warmup_steps, cfg.train.steps, cfg.train.min_lr_ratio)


def _compress_base(model, calib, cfg: RunConfig, out: Path, progress: bool, log) -> dict | None:
    """Compress the base in place as `base:` says (None when it says none); the float weights it was made from."""
    if cfg.base.method == "none":
        return None
    from ..compress.base import compress_base
    from ..compress.svd import METHODS as SVD_METHODS

    if cfg.base.method not in SVD_METHODS:  # base/ will be compressed-tensors: refuse now, not after training
        from ..export.compressed_tensors import check_model_type

        check_model_type(model)
    t = time.perf_counter()
    report, originals = compress_base(model, calib, cfg.base.method, progress=progress, **cfg.base.options())
    from .. import distributed as dist

    if dist.is_main():
        write_text(out / "base.json", json.dumps(report.to_dict(), indent=2, default=str))
    log(f"base: {cfg.base.method} on {len(originals)} layers in {time.perf_counter() - t:.1f}s (frozen; report base.json)")
    return originals


def _export_compressed(model, tok, eval_ds: Dataset, cfg: RunConfig, out: Path, log) -> dict:
    """The frozen base (compressed-tensors or factored) in base/, and for a quantized base the merged model
    quantized again on its grids in requantized/, with its held-out metrics and weight errors."""
    from ..export.qlora import export_base, export_requantized
    from ..quant.linear import quantized_layers

    from ..models import load_model

    info = {"method": cfg.base.method, "folder": str(export_base(model, out / "base", tok))}
    name_base(out / "adapter", out / "base", cfg.base.method)
    if quantized_layers(model.get_base_model()):
        folder, errors = export_requantized(model, out / "requantized", tok)
        labels = list(model.config.id2label.values()) if cfg.task == "seq-cls" else None
        again = held_out_metrics(load_model(folder, task=cfg.task, labels=labels, dtype=cfg.dtype)[0], tok, eval_ds, cfg)
        info["requantized"] = {"folder": str(folder), "after": again,
                               "weight_error_mean": sum(errors.values()) / len(errors),
                               "weight_error_max": max(errors.values())}
        log(f"merged and quantized again on the base's grids (requantized/): {_fmt(again)}; relative weight error "
            f"mean {info['requantized']['weight_error_mean']:.4f}, max {info['requantized']['weight_error_max']:.4f}")
    return info


def name_base(adapter: Path, base: Path, method: str) -> None:
    """Point the adapter at the compressed base it was trained on: rankwise.json (`rankwise eval --adapter`
    then loads that, not the float model; the float model's name kept as `original_base`) and
    adapter_config.json's base_model_name_or_path, which peft's AutoPeftModel* loads."""
    from ..compress.folder import FIELD
    from ..export.peft import META, read_adapter_meta
    from ..models import describe_base

    meta = read_adapter_meta(adapter)
    base = str(base.resolve())
    factored = FIELD in json.loads((Path(base) / "config.json").read_text())
    how = (f"only rankwise reads the factored folder: rankwise.load_model({base!r})" if factored else
           f"rankwise.load_model({base!r}) decompresses it; with peft alone: AutoPeftModelForCausalLM.from_pretrained("
           f"adapter, quantization_config=CompressedTensorsConfig(dequantize=True))")
    meta = {**meta, **describe_base(base), "original_base": meta.get("base_model"),
            "note": f"trained on the {method} base in {base}; {how} (see README: fine-tuning on a compressed base)"}
    write_text(adapter / META, json.dumps(meta, indent=2))
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base  # the float model under this adapter would count a correction twice
    write_text(cfg_path, json.dumps(cfg, indent=2, sort_keys=True))


def _check_sources(cfg: RunConfig) -> None:
    """Missing files and unknown formats fail before the model is loaded."""
    from ..data.sources import check_source, is_plain_text

    for source in filter(None, (cfg.data.train, cfg.data.eval)):
        check_source(source)
        is_plain_text(source)


def _label_names(cfg: RunConfig) -> list[str] | None:
    if cfg.task != "seq-cls":
        return None
    if cfg.data.labels:
        return list(cfg.data.labels)
    from ..data.formats import label_set, read_rows

    from ..data.sources import check_source

    check_source(cfg.data.train)
    names = label_set(read_rows(Path(cfg.data.train)), cfg.data.label_field, cfg.data.train)
    if not names:
        raise ConfigError(f"{cfg.data.train}: no values in label field '{cfg.data.label_field}'")
    return names


def _count(ds: Dataset, name: str) -> str:
    capped = f" (of {ds.available}; data.max_{name}_examples)" if ds.available > len(ds.examples) else ""
    return f"{len(ds.examples)} {name} examples{capped}"


def _previous(out: Path) -> dict:
    return json.loads((out / "before.json").read_text())


def _fmt(m: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in m.items() if isinstance(v, float))
