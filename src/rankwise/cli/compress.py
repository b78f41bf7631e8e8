"""`rankwise compress`: SVD compression (svd, asvd, svd-llm), mixed precision or the joint planner;
evaluate, export, report."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..atomic import write_text
from ..config import StrictModel
from ..data.formats import Fields
from ..errors import ConfigError
from .quantize import HeldOut, held_out_rows

SVD_METHODS = ("svd", "asvd", "svd-llm")
PLANNERS = ("mixed", "joint")


class CompressJob(StrictModel):
    model: str = "smollm2"
    data: str = "pydoc"
    method: Literal["svd", "asvd", "svd-llm", "mixed", "joint"] = "svd-llm"
    ratio: float | None = None
    rank: int | None = None
    allocation: Literal["global", "uniform"] = "global"
    avg_bits: float | None = None
    budget: str | None = None
    bits: list[int] = [2, 3, 4, 8]
    ranks: list[int] | None = None
    svd: bool = False
    group_size: int | None = 64
    symmetric: bool = True
    quantizer: str = "gptq"
    targets: str = "all-linear"
    seq_len: int = Field(256, ge=2)
    n_samples: int = Field(32, ge=1)
    batch_size: int = Field(4, ge=1)
    format: Literal["safetensors", "compressed-tensors", "gguf"] = "safetensors"
    eval_data: str = "pydoc"
    eval_tokens: int = Field(2048, ge=0)
    device: str = "cpu"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # the model's compute dtype; auto: the checkpoint's own
    out: Path = Path("runs/compress")
    options: dict = {}
    fields: Fields = Fields()  # which record fields hold the calibration text
    recover_steps: int = Field(0, ge=0)  # SVD methods: PELA recovery steps after compressing (0: none)
    recover_lr: float = Field(1e-4, gt=0)
    offload_cache: Path | None = None  # hidden-state cache in files under this folder (None: in memory if it fits)

    def output_bytes(self, model) -> int:
        """About what the output takes on disk (checked before the run starts): SVD methods write the factors
        and the merged dense model; the planners one model in their format."""
        from ..memory import output_bytes

        if self.method in SVD_METHODS:
            return output_bytes(model, "factored", keep=self.ratio or 1.0) + output_bytes(model, "dense")
        if self.format == "safetensors":
            return output_bytes(model, "dense")
        return output_bytes(model, "quantized", bits=max(self.bits), group_size=self.group_size)


def _options(job: CompressJob) -> tuple[callable, dict]:
    """The library verb and its keyword arguments; ConfigError for flags that do not go with the method."""
    from ..compress import compress, compress_planned

    if job.method in SVD_METHODS:
        wrong = [f for f, v in (("--avg-bits", job.avg_bits), ("--budget", job.budget), ("--ranks", job.ranks)) if v]
        if wrong:
            raise ConfigError(f"{', '.join(wrong)}: only for --method mixed/joint, not {job.method}; "
                              "SVD compression takes --ratio or --rank")
        opts = dict(ratio=job.ratio, rank=job.rank, allocation=job.allocation, targets=job.targets) | job.options
        return compress, {"method": job.method, **{k: v for k, v in opts.items() if v is not None}}
    if job.ratio is not None or job.rank is not None:
        raise ConfigError(f"--ratio/--rank: only for the SVD methods; --method {job.method} takes "
                          + ("--avg-bits" if job.method == "mixed" else "--budget (e.g. 60MB) or --avg-bits"))
    opts = dict(bits=job.bits, group_size=job.group_size, symmetric=job.symmetric, method=job.quantizer,
                targets=job.targets, options=job.options)
    if job.method == "mixed":
        if job.budget is not None or job.ranks or job.svd:
            raise ConfigError("--method mixed chooses bits only (give --avg-bits); --budget, --ranks and --svd "
                              "belong to --method joint")
        opts |= dict(avg_bits=job.avg_bits if job.avg_bits is not None else 3.5, ranks=[0])
    else:
        from ..compress import parse_size

        if (job.budget is None) == (job.avg_bits is None):
            raise ConfigError("--method joint needs exactly one of --budget (bytes of the compressed linears, e.g. "
                              "60MB) and --avg-bits")
        opts |= dict(ranks=job.ranks or [0, 8, 16, 32], svd=job.svd)
        opts |= {"budget": parse_size(job.budget)} if job.budget is not None else {"avg_bits": job.avg_bits}
    return compress_planned, opts


def check_format(job: CompressJob, opts: dict) -> None:
    """ConfigError, before anything loads, for a --format that could not hold what the method may produce."""
    if job.format == "safetensors":
        return
    if job.method in SVD_METHODS or opts.get("svd"):
        raise ConfigError(f"--format {job.format} cannot hold SVD-compressed layers; " + (
            "the SVD methods write the factored folder and a merged dense safetensors folder" if job.method in SVD_METHODS
            else "drop --svd or use --format safetensors (dense)"))
    if job.format == "gguf":
        bad = sorted(set(opts["bits"]) - {4, 8})
        if bad or opts["group_size"] != 32 or any(opts["ranks"]):
            raise ConfigError("--format gguf holds our codes as its blocks only for 4- and 8-bit grids of group 32 "
                              "(Q4_0/Q4_1/Q8_0) and has no place for a compensation: use --bits 4,8 --group-size 32"
                              + (" --ranks 0" if job.method == "joint" else "") + ", or another format")


def run_compress(job: CompressJob, progress: bool = True, log=print) -> dict:
    """Run the job; writes job.out/{model/, merged/ (SVD), report.json, report.md, *.png}; returns the summary.

    Under torchrun the calibration batches (and recovery micro-batches) are shared out and the statistics
    summed, so every rank compresses identically; rank 0 evaluates and writes."""
    from .. import distributed as dist
    from ..compress import SVDConfig, PlanConfig
    from ..data.sources import check_source, load_data
    from .jobs import load_for_export

    from ..atomic import check_out_dir

    check_out_dir(job.out)
    if job.offload_cache is not None:
        check_out_dir(job.offload_cache, "--offload-cache")
    verb, opts = _options(job)
    # bad options fail before the model loads
    (SVDConfig if job.method in SVD_METHODS else PlanConfig).build(where=f"rankwise compress --method {job.method}",
                                                                    **opts)
    check_format(job, opts)
    if job.recover_steps and job.method not in SVD_METHODS:
        raise ConfigError(f"--recover-steps trains low-rank factors: only for the SVD methods, not {job.method}")
    check_source(job.data)
    device = dist.init_from_env(job.device)
    main = dist.is_main()
    progress, log = (progress, log) if main else (False, lambda *a, **k: None)
    t0 = time.perf_counter()
    with dist.together("loading the model and the data"):
        stream = job.method in SVD_METHODS and not job.recover_steps and not dist.active()  # (recovery trains it whole)
        model, tok, job = load_for_export(job, device, log, lazy=stream)
        batches = dist.shard(load_data(job.data, tok, seq_len=job.seq_len, n=job.n_samples, batch_size=job.batch_size,
                            fields=job.fields),
                             "calibration batches (--n-samples / --batch-size)")
        causal = getattr(model, "rankwise_task", "causal-lm") == "causal-lm"
        held_out = HeldOut(model, tok, job if main else job.model_copy(update={"eval_tokens": 0}), log)
    if getattr(model, "rankwise_lazy", None) is not None:
        return _run_streamed(model, tok, batches, held_out, job, verb, opts, progress, t0)
    t1 = time.perf_counter()
    before = held_out(model)
    t2 = time.perf_counter()
    teacher = None
    if job.recover_steps:
        if not causal:
            raise ConfigError("--recover-steps distils a causal language model; this model is not one")
        from ..compress.recover import teacher_copy

        teacher = teacher_copy(model)
    with dist.together("compressing"):
        report = verb(model, batches, progress=progress, **opts)
    t3 = time.perf_counter()
    after = held_out(model)
    with dist.together("recovering"):
        recovery = _recover(model, teacher, tok, job, held_out, progress, log) if teacher is not None else None
    t4 = time.perf_counter()
    if not main:  # rank 0 alone writes, with no collective: the others are done
        return {**report.to_dict(), "written": None}
    return _finish(model, tok, job, report, held_out.summary(before, after), recovery, (t0, t1, t2, t3, t4))


def _run_streamed(model, tok, batches, held_out: HeldOut, job: CompressJob, verb, opts: dict, progress: bool,
                  t0: float) -> dict:
    """SVD methods on a model read one block at a time (rankwise.lazy): each compressed block written to model/
    (factored) and merged/ (dense) as it is done, the held-out windows carried through the same pass."""
    from ..export.stream import StreamWriter

    t1 = time.perf_counter()
    lazy = model.rankwise_lazy
    riders, sums = held_out.riders()
    n_blocks = len(model.get_submodule(lazy.blocks))
    writers = [StreamWriter(job.out / "model", model, lazy.blocks, n_blocks, "factored", method=job.method),
               StreamWriter(job.out / "merged", model, lazy.blocks, n_blocks, "safetensors")]

    def after_block(i, block):
        for w in writers:
            w.block(i, block)

    def on_output(key, b, out):
        sums[key].add(out.logits, riders[key][1][b]["labels"])

    try:
        report = verb(model, batches, progress=progress, after_block=after_block, riders=riders, on_output=on_output,
                      **opts)
        t3 = time.perf_counter()
        written = {"model": str(writers[0].finish(model, tok)), "merged": str(writers[1].finish(model, tok))}
    except BaseException:
        for w in reversed(writers):  # the first made the output folder: it removes it last
            w.abort()
        raise
    before, after = (sums[k].result()["perplexity"] if sums else None for k in ("before", "after"))
    seconds = {"load": t1 - t0, "compress": t3 - t1, "eval": 0.0, "export": time.perf_counter() - t3}
    summary = {"kind": "svd", **report.to_dict(), "job": json.loads(job.model_dump_json()), "written": written,
               "seconds_total": seconds, "dtype": model.rankwise_dtype, "streamed": True,
               **held_out.summary(before, after)}
    write_text(job.out / "report.json", json.dumps(summary, indent=1))
    write_compress_report(job.out, summary)
    return summary


def _finish(model, tok, job: CompressJob, report, measured: dict, recovery, times) -> dict:
    """Rank 0: export the compressed model (and merged/ for SVD), report.json and report.md."""
    from ..export import export_model

    t0, t1, t2, t3, t4 = times
    written = {}
    if job.method in SVD_METHODS:
        written["model"] = str(export_model(model, job.out / "model", "factored", tokenizer=tok, method=job.method))
        written["merged"] = str(export_model(model, job.out / "merged", "safetensors", tokenizer=tok))
    else:
        path = job.out / ("model.gguf" if job.format == "gguf" else "model")
        written["model"] = str(export_model(model, path, job.format, tokenizer=tok))
    seconds = {"load": t1 - t0, "compress": t3 - t2, "eval": (t2 - t1) + (t4 - t3), "export": time.perf_counter() - t4}
    summary = {"kind": "svd" if job.method in SVD_METHODS else "plan", **report.to_dict(),
               "job": json.loads(job.model_dump_json()), "written": written, "seconds_total": seconds,
               "dtype": model.rankwise_dtype, **measured}
    if recovery is not None:
        summary["recovery"] = recovery
        summary["perplexity"]["recovered"] = recovery["perplexity"]
    write_text(job.out / "report.json", json.dumps(summary, indent=1))
    write_compress_report(job.out, summary)
    return summary


def _recover(model, teacher, tok, job: CompressJob, held_out: HeldOut, progress: bool, log) -> dict:
    """PELA recovery of the factors on the job's data (job.recover_steps steps of job.batch_size sequences)."""
    from ..compress.recover import recover
    from ..data.sources import DataConfig, load_dataset
    from ..train.loop import TrainConfig

    data, _ = load_dataset(DataConfig(train=job.data, seq_len=job.seq_len,
                                      max_train_examples=job.recover_steps * job.batch_size), tok, "causal-lm")
    t = time.perf_counter()
    cfg = TrainConfig(steps=job.recover_steps, batch_size=job.batch_size, lr=job.recover_lr,
                      warmup_steps=min(5, job.recover_steps - 1), save_every=10**9)
    r = recover(model, teacher, data, tok, cfg, progress=progress)
    ppl = held_out(model)
    log(f"recovery: distillation loss {r.before:.4g} → {r.after:.4g} in {r.steps} steps"
        + (" (it rose: the factors were put back)" if r.reverted else "")
        + (f"; held-out perplexity {ppl:.3f}" if ppl is not None else ""))
    return {"steps": r.steps, "lr": job.recover_lr, "distill_before": r.before, "distill_after": r.after,
            "reverted": r.reverted, "perplexity": ppl, "seconds": time.perf_counter() - t}


def _block_module(name: str) -> tuple[int | None, str]:
    m = re.search(r"\.(\d+)\.(.+)$", name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def _heatmap(out: Path, values: dict[str, float], title: str, label: str, fname: str) -> str:
    """A block × module image of one number per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = {_block_module(n): v for n, v in values.items()}
    blocks = sorted({b for b, _ in cells if b is not None})
    mods = list(dict.fromkeys(m for b, m in cells if b is not None))
    grid = np.full((len(mods), max(len(blocks), 1)), np.nan)
    for (b, m), v in cells.items():
        if b is not None:
            grid[mods.index(m), blocks.index(b)] = v
    fig, ax = plt.subplots(figsize=(max(4, 0.28 * len(blocks) + 2.5), 0.32 * len(mods) + 1.4))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(mods)), [m.split(".")[-1] for m in mods], fontsize=7)
    ax.set_xticks(range(len(blocks)), blocks, fontsize=6)
    ax.set_xlabel("block"), ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    fig.savefig(out / fname, dpi=110)
    plt.close(fig)
    return fname


def _size_plot(out: Path, s: dict) -> str:
    """Predicted Σ error vs bytes (the planner's curve, uniform grids) with the chosen point, predicted and measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    if s["curve"]:
        xs, ys = zip(*s["curve"])
        ax.loglog([x / 1e6 for x in xs], ys, "-", color="C0", label="planner, predicted")
    for j, (bits, b, e) in enumerate(s["uniform"]):
        ax.loglog(b / 1e6, e, "s", color="C2", ms=5, label="uniform grids, predicted" if j == 0 else None)
        ax.annotate(f"W{bits}", (b / 1e6, e), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.loglog(s["bytes"] / 1e6, s["predicted"], "o", color="C0", label="chosen, predicted")
    if s["measured"] is not None:
        ax.loglog(s["bytes"] / 1e6, s["measured"], "*", color="C3", ms=10, label="chosen, measured")
    ax.set_xlabel("MB of the compressed linears"), ax.set_ylabel("Σ relative output error")
    ax.grid(alpha=0.3, which="both"), ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "size.png", dpi=110)
    plt.close(fig)
    return "size.png"


def write_compress_report(out: Path, s: dict) -> None:
    job, layers = s["job"], s["layers"]
    lines = [f"# rankwise compress: {job['method']} on {job['model']}", "",
             f"Model computed in {s.get('dtype', 'float32')}.", ""]
    if s["kind"] == "svd":
        p = s["params"]
        lines += [f"{len(layers)} linears: {p['after']:,} of {p['before']:,} parameters kept ({p['ratio']:.1%}); "
                  f"calibrated on {s['tokens']} tokens of `{job['data']}`; planned in {s['seconds']['plan']:.1f} s, "
                  f"applied in {s['seconds']['apply']:.1f} s. Written: `model/` (factored: `rankwise.load_model`) "
                  "and `merged/` (dense, any tool).", ""]
    else:
        lines += [f"{len(layers)} linears: {s['bytes'] / 1e6:.3f} MB (budget {s['budget'] / 1e6:.3f} MB; float16 "
                  f"{s['dense_bytes'] / 1e6:.3f} MB); Σ relative output error predicted {s['predicted']:.4g}, "
                  f"measured {s['measured']:.4g}. Written: `{Path(s['written']['model']).name}` ({job['format']}).", ""]
    rec = s["perplexity"].get("recovered")
    lines += held_out_rows(s, job, (("after recovery", rec),) if rec is not None else ())
    if s["kind"] == "svd":
        kept = {n: r["params"] / r["dense_params"] for n, r in layers.items()}
        lines += [f"![kept]({_heatmap(out, kept, 'fraction of parameters kept per layer', 'kept', 'ranks.png')})", ""]
        worst = sorted(layers.items(), key=lambda kv: -kv[1]["error"])[:8]
        lines += ["| layer | rank | kept | error predicted | error measured |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {n} | {r['rank'] if r['rank'] is not None else 'dense'} | {kept[n]:.2f} | "
                  f"{'-' if r['predicted'] is None else format(r['predicted'], '.3g')} | {r['error']:.3g} |" for n, r in worst]
    else:
        bits = {n: c["bytes"] * 8 / max(c["numel"], 1) for n, c in layers.items()}
        lines += [f"![bits]({_heatmap(out, bits, 'storage bits per weight (scales, compensation included)', 'bits', 'bits.png')})",
                  "", f"![size]({_size_plot(out, s)})", ""]
        worst = sorted(layers.items(), key=lambda kv: -(kv[1]["measured"] or 0))[:8]
        lines += ["| layer | choice | bits/weight | error predicted | error measured |", "|---|---|---:|---:|---:|"]
        lines += [f"| {n} | {_choice(c)} | {bits[n]:.2f} | {c['predicted']:.3g} | {c['measured']:.3g} |" for n, c in worst]
    lines += ["", "All layers: `report.json`."]
    write_text(out / "report.md", "\n".join(lines) + "\n")


def _choice(c: dict) -> str:
    if c["kind"] == "svd":
        return f"SVD rank {c['rank']}"
    return f"W{c['bits']}" + (f" + EoRA r{c['rank']}" if c["rank"] else "")
