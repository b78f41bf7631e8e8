"""`rankwise quantize`: load, calibrate + quantize block by block, evaluate, export, report."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..atomic import write_text
from ..config import StrictModel
from ..errors import ConfigError

FORMAT_PATHS = {"safetensors": "model", "compressed-tensors": "model", "gguf": "model.gguf"}


class QuantJob(StrictModel):
    model: str = "smollm2"
    data: str = "pydoc"
    method: str = "gptq"
    bits: int = 4
    group_size: int | None = 32
    symmetric: bool = True
    targets: str = "all-linear"
    seq_len: int = Field(256, ge=2)
    n_samples: int = Field(32, ge=1)
    batch_size: int = Field(4, ge=1)
    format: Literal["safetensors", "compressed-tensors", "gguf"] = "safetensors"
    eval_data: str = "pydoc"
    eval_tokens: int = Field(2048, ge=0)
    device: str = "cpu"
    out: Path = Path("runs/quantize")
    options: dict = {}  # the method's own keys, validated by its config


def _held_out_ppl(model, stream: list[int] | None, job: QuantJob) -> float | None:
    from ..train.evaluate import perplexity

    if not stream:
        return None
    return perplexity(model, stream, window=job.seq_len, stride=job.seq_len // 2)["perplexity"]


def run_quantize(job: QuantJob, progress: bool = True, log=print) -> dict:
    """Run the job; writes job.out/{model…, report.json, report.md, errors.png}; returns the summary.

    Under torchrun the calibration batches are shared out and each block's statistics summed before it is
    quantized, so every rank quantizes it identically; rank 0 evaluates and writes."""
    from .. import distributed as dist
    from ..data.sources import check_source, load_data, read_stream
    from ..quant import get_quantizer, quantize
    from .jobs import load_model_on

    quantizer = get_quantizer(job.method)  # unknown method / bad options fail before the model loads
    options = dict(bits=job.bits, group_size=job.group_size, symmetric=job.symmetric, targets=job.targets) | job.options
    if job.method == "awq" and job.format != "safetensors" and "explicit_scales" not in job.options:
        options["explicit_scales"] = False  # those formats cannot hold an explicit input scale
        log(f"awq: explicit_scales=false ({job.format} cannot store a per-channel input scale)")
    cfg = quantizer.config.build(where=f"rankwise quantize --method {job.method}", **options)
    if job.format == "compressed-tensors" and getattr(cfg, "explicit_scales", False):
        raise ConfigError("--format compressed-tensors cannot store AWQ's explicit input scales; "
                          "drop --opt explicit_scales=true (or export as safetensors)")
    if job.format == "gguf" and cfg.compensate != "none":
        raise ConfigError("--format gguf has no place for a low-rank compensation; use compressed-tensors (the "
                          "compensation is written beside it as a peft adapter) or safetensors (merged)")
    if quantizer.observe:
        check_source(job.data)
    device = dist.init_from_env(job.device)
    main = dist.is_main()
    progress = progress and main
    t0 = time.perf_counter()
    with dist.together("loading the model and the data"):
        model, tok = load_model_on(job.model, device)
        if job.format == "gguf":  # find out now, not after quantizing, that the file cannot be written
            from ..export.gguf import check_writable

            check_writable(model)
        batches = load_data(job.data, tok, seq_len=job.seq_len, n=job.n_samples, batch_size=job.batch_size) \
            if quantizer.observe else None
        if batches is not None:
            batches = dist.shard(batches, "calibration batches (--n-samples / --batch-size)")
        stream = read_stream(job.eval_data, tok, "eval" if job.eval_data == "pydoc" else None)[: job.eval_tokens] \
            if job.eval_tokens and main else None  # read and tokenized once, scored before and after (rank 0)
    t1 = time.perf_counter()
    before = _held_out_ppl(model, stream, job)
    t2 = time.perf_counter()
    with dist.together("quantizing"):
        report = quantize(model, batches, job.method, progress=progress, **options)
    t3 = time.perf_counter()
    if not main:  # rank 0 alone evaluates and writes, with no collective: the others are done
        return {**report.to_dict(), "written": None}
    return _finish(model, tok, stream, report, job, before, (t0, t1, t2, t3))


def _finish(model, tok, stream, report, job: QuantJob, before: float | None, times: tuple) -> dict:
    """Rank 0: held-out perplexity after quantizing, export, report.json and report.md."""
    from ..export import export_model

    t0, t1, t2, t3 = times
    after = _held_out_ppl(model, stream, job)
    t4 = time.perf_counter()
    written = export_model(model, job.out / FORMAT_PATHS[job.format], job.format, tokenizer=tok)
    seconds = {"load": t1 - t0, "quantize": t3 - t2, "eval": (t2 - t1) + (t4 - t3), "export": time.perf_counter() - t4}
    summary = {**report.to_dict(), "job": json.loads(job.model_dump_json()), "written": str(written),
               "seconds": seconds, "perplexity": {"before": before, "after": after}}
    write_text(job.out / "report.json", json.dumps(summary, indent=1))
    write_quant_report(job.out, summary)
    return summary


def _plot_errors(out: Path, layers: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(layers)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.semilogy(range(len(names)), [max(layers[n]["error"], 1e-12) for n in names], ".", ms=4)
    ax.set_xlabel("layer (model order)"), ax.set_ylabel("relative output error")
    ax.set_title("per-layer error of the quantized weights on the calibration inputs", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "errors.png", dpi=110)
    plt.close(fig)
    return "errors.png"


def write_quant_report(out: Path, s: dict) -> None:
    """report.md: what was done, held-out perplexity before/after, the worst layers, a per-layer plot."""
    job, layers, ppl = s["job"], s["layers"], s["perplexity"]
    cfg = s["config"]
    mean_bits = sum(r["bits"] for r in layers.values()) / max(len(layers), 1)
    lines = [f"# rankwise quantize: {s['method']} on {job['model']}", "",
             f"{cfg['bits']}-bit, group {cfg['group_size'] or 'per channel'}, "
             f"{'symmetric' if cfg['symmetric'] else 'asymmetric'}; {len(layers)} layers, {mean_bits:.2f} bits per "
             f"weight with scales; calibrated on {s['tokens']} tokens of `{job['data']}`; quantized in "
             f"{s['seconds']['quantize']:.1f} s. Written: `{Path(s['written']).name}` ({job['format']}).", ""]
    if ppl["before"] is not None:
        lines += ["| held-out perplexity | before | after |", "|---|---:|---:|",
                  f"| `{job['eval_data']}`, {job['eval_tokens']} tokens | {ppl['before']:.3f} | {ppl['after']:.3f} |", ""]
    worst = sorted(layers.items(), key=lambda kv: -kv[1]["error"])[:8]
    comp = cfg.get("compensate", "none") != "none"
    lines += ["| layer | error | " + (f"with {cfg['compensate']} rank {cfg['compensate_rank']} | " if comp else "")
              + "bits | seconds | note |", "|---|---:|" + ("---:|" if comp else "") + "---:|---:|---|"]
    lines += [f"| {n} | {r['error']:.3g} ({r['error_kind']}) | " + (f"{r['compensated_error']:.3g} | " if comp else "")
              + f"{r['bits']:.2f} | {r['seconds']:.2f} | {r['note']} |" for n, r in worst]
    lines += ["", f"![errors]({_plot_errors(out, layers)})", "", "All layers: `report.json`."]
    write_text(out / "report.md", "\n".join(lines) + "\n")
