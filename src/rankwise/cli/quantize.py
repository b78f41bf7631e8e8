"""`rankwise quantize`: load, calibrate + quantize block by block, evaluate, export, report."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..atomic import write_text
from ..config import StrictModel
from ..data.formats import Fields
from ..errors import ConfigError

FORMAT_PATHS = {"safetensors": "model", "compressed-tensors": "model", "gguf": "model.gguf"}
STREAM_FORMATS = ("safetensors", "compressed-tensors")  # written block by block (export/stream.py)


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
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # the model's compute dtype; auto: the checkpoint's own
    out: Path = Path("runs/quantize")
    options: dict = {}  # the method's own keys, validated by its config
    fields: Fields = Fields()  # which record fields hold the calibration text
    offload_cache: Path | None = None  # hidden-state cache in files under this folder (None: in memory if it fits)

    def output_bytes(self, model) -> int:
        """About what the output takes on disk (checked before the run starts)."""
        from ..memory import output_bytes

        if self.format == "safetensors":
            return output_bytes(model, "dense")
        return output_bytes(model, "quantized", bits=8 if self.format == "compressed-tensors" and not self.symmetric
                            else self.bits, group_size=self.group_size)


def _held_out_ppl(model, stream: list[int] | None, job) -> float | None:
    from ..train.evaluate import perplexity

    if not stream:
        return None
    return perplexity(model, stream, window=job.seq_len, stride=job.seq_len // 2)["perplexity"]


class HeldOut:
    """The report's held-out measure of what compression changed: a causal LM's perplexity on the
    eval_data stream; for an encoder (no LM head), the mean cosine of its sentence embeddings (mean
    pooling) to those of the float model it was made from, on the same held-out text."""

    def __init__(self, model, tok, job, log=print):
        from ..data.sources import read_stream, read_texts

        self.job, self.metric, self.stream, self.batches, self.reference = job, None, None, None, None
        if not job.eval_tokens:
            return
        split = "eval" if job.eval_data == "pydoc" else None
        if getattr(model, "rankwise_task", "causal-lm") == "causal-lm":
            self.metric, self.stream = "perplexity", read_stream(job.eval_data, tok, split)[: job.eval_tokens]
        else:
            from ..train.evaluate import encoder_batches, sentence_embeddings

            self.metric = "cosine"
            self.batches = encoder_batches(read_texts(job.eval_data, split), tok, job.seq_len, job.eval_tokens)
            self.reference = sentence_embeddings(model, self.batches)  # the float model, before compression
            log(f"held-out measure: embedding cosine to the float model ({len(self.reference)} texts of "
                f"`{job.eval_data}`; the model has no language-model head)")

    def riders(self) -> tuple[dict, dict]:
        """For a model read block by block (one pass, never whole): the held-out windows as calibrate's riders,
        "before" and "after" each block's step, and their NllSums (filled by on_output)."""
        from ..train.evaluate import NllSum, window_batches

        if self.metric != "perplexity":
            return {}, {}
        batches = window_batches(self.stream, self.job.seq_len, self.job.seq_len // 2, 4)
        return {k: (k, batches) for k in ("before", "after")}, {"before": NllSum(), "after": NllSum()}

    def __call__(self, model) -> float | None:
        if self.metric == "perplexity":
            return _held_out_ppl(model, self.stream, self.job)
        if self.metric == "cosine":
            from ..train.evaluate import embedding_cosine

            return embedding_cosine(model, self.batches, self.reference)
        return None

    def summary(self, before: float | None, after: float | None) -> dict:
        """{"perplexity": {before, after}} (None for an encoder) and, for an encoder, {"cosine": …} too."""
        out = {"perplexity": {"before": before, "after": after} if self.metric == "perplexity" else
               {"before": None, "after": None}}
        if self.metric == "cosine":
            out["cosine"] = {"before": before, "after": after}
        return out


def held_out_rows(s: dict, job: dict, extra: tuple = ()) -> list[str]:
    """report.md's table of the held-out measure before/after (empty when none was taken); `extra`: a
    (column title, value) pair for recovery."""
    ppl, cos = s["perplexity"], s.get("cosine")
    if cos is not None:
        title, values = f"held-out embedding cosine to the float model (`{job['eval_data']}`)", cos
    elif ppl["before"] is not None:
        title, values = f"held-out perplexity (`{job['eval_data']}`, {job['eval_tokens']} tokens)", ppl
    else:
        return []
    head = "| measure | before | after |" + "".join(f" {t} |" for t, _ in extra)
    row = f"| {title} | {values['before']:.4g} | {values['after']:.4g} |" + "".join(f" {v:.4g} |" for _, v in extra)
    return [head, "|---|---:|---:|" + "---:|" * len(extra), row, ""]


def run_quantize(job: QuantJob, progress: bool = True, log=print) -> dict:
    """Run the job; writes job.out/{model…, report.json, report.md, errors.png}; returns the summary.

    Under torchrun the calibration batches are shared out and each block's statistics summed before it is
    quantized, so every rank quantizes it identically; rank 0 evaluates and writes."""
    from .. import distributed as dist
    from ..data.sources import check_source, load_data
    from ..quant import get_quantizer, quantize
    from .jobs import load_for_export

    from ..atomic import check_out_dir

    check_out_dir(job.out)
    if job.offload_cache is not None:
        check_out_dir(job.offload_cache, "--offload-cache")
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
        model, tok, job = load_for_export(job, device, log, lazy=job.format in STREAM_FORMATS and not dist.active())
        batches = load_data(job.data, tok, seq_len=job.seq_len, n=job.n_samples, batch_size=job.batch_size,
                            fields=job.fields) \
            if quantizer.observe else None
        if batches is not None:
            batches = dist.shard(batches, "calibration batches (--n-samples / --batch-size)")
        held_out = HeldOut(model, tok, job if main else job.model_copy(update={"eval_tokens": 0}), log)
    if getattr(model, "rankwise_lazy", None) is not None:
        return _run_streamed(model, tok, batches, held_out, job, options, progress, log, t0)
    t1 = time.perf_counter()  # the held-out text is read and tokenized once, scored before and after (rank 0)
    before = held_out(model)
    t2 = time.perf_counter()
    with dist.together("quantizing"):
        report = quantize(model, batches, job.method, progress=progress, **options)
    t3 = time.perf_counter()
    if report.unrouted:
        log(f"note: {len(report.unrouted)} MoE expert layer(s) received no calibration token and stay float (e.g. "
            f"{report.unrouted[0]}); more calibration data (--n-samples) reaches more experts")
    if not main:  # rank 0 alone evaluates and writes, with no collective: the others are done
        return {**report.to_dict(), "written": None}
    return _finish(model, tok, held_out, report, job, before, (t0, t1, t2, t3))


def _run_streamed(model, tok, batches, held_out: HeldOut, job: QuantJob, options: dict, progress: bool, log,
                  t0: float) -> dict:
    """The model read and written one block at a time (rankwise.lazy, export/stream.py): each block quantized
    and written as it is done; the held-out windows ride through the same pass, before and after each block's
    step, so the model is never whole in memory."""
    from ..export.stream import StreamWriter
    from ..quant import quantize

    t1 = time.perf_counter()
    lazy = model.rankwise_lazy
    riders, sums = held_out.riders()

    def on_output(key, b, out):
        sums[key].add(out.logits, riders[key][1][b]["labels"])

    written_to = job.out / FORMAT_PATHS[job.format]
    writer = StreamWriter(written_to, model, lazy.blocks, len(model.get_submodule(lazy.blocks)), job.format)
    try:
        report = quantize(model, batches, job.method, progress=progress, after_block=writer.block, riders=riders,
                          on_output=on_output, **options)
        t3 = time.perf_counter()
        written = writer.finish(model, tok)
    except BaseException:
        writer.abort()
        raise
    before, after = (sums[k].result()["perplexity"] if sums else None for k in ("before", "after"))
    seconds = {"load": t1 - t0, "quantize": t3 - t1, "eval": 0.0, "export": time.perf_counter() - t3}
    summary = {**report.to_dict(), "job": json.loads(job.model_dump_json()), "written": str(written),
               "dtype": model.rankwise_dtype, "streamed": True, "seconds": seconds, **held_out.summary(before, after)}
    write_text(job.out / "report.json", json.dumps(summary, indent=1))
    write_quant_report(job.out, summary)
    return summary


def _finish(model, tok, held_out: HeldOut, report, job: QuantJob, before: float | None, times: tuple) -> dict:
    """Rank 0: the held-out measure after quantizing, export, report.json and report.md."""
    from ..export import export_model

    t0, t1, t2, t3 = times
    after = held_out(model)
    t4 = time.perf_counter()
    written = export_model(model, job.out / FORMAT_PATHS[job.format], job.format, tokenizer=tok)
    seconds = {"load": t1 - t0, "quantize": t3 - t2, "eval": (t2 - t1) + (t4 - t3), "export": time.perf_counter() - t4}
    summary = {**report.to_dict(), "job": json.loads(job.model_dump_json()), "written": str(written),
               "dtype": model.rankwise_dtype,
               "seconds": seconds, **held_out.summary(before, after)}
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
    """report.md: what was done, the held-out measure before/after, the worst layers, a per-layer plot."""
    job, layers = s["job"], s["layers"]
    cfg = s["config"]
    mean_bits = sum(r["bits"] for r in layers.values()) / max(len(layers), 1)
    lines = [f"# rankwise quantize: {s['method']} on {job['model']}", "",
             f"{cfg['bits']}-bit, group {cfg['group_size'] or 'per channel'}, "
             f"{'symmetric' if cfg['symmetric'] else 'asymmetric'}; {len(layers)} layers, {mean_bits:.2f} bits per "
             f"weight with scales; model computed in {s.get('dtype', 'float32')}; calibrated on {s['tokens']} tokens of `{job['data']}`; quantized in "
             f"{s['seconds']['quantize']:.1f} s. Written: `{Path(s['written']).name}` ({job['format']}).", ""]
    if s.get("unrouted"):
        lines += [f"{len(s['unrouted'])} MoE expert layer(s) received no calibration token and stay float: "
                  f"{', '.join(s['unrouted'][:6])}{', …' if len(s['unrouted']) > 6 else ''}.", ""]
    lines += held_out_rows(s, job)
    worst = sorted(layers.items(), key=lambda kv: -kv[1]["error"])[:8]
    comp = cfg.get("compensate", "none") != "none"
    lines += ["| layer | error | " + (f"with {cfg['compensate']} rank {cfg['compensate_rank']} | " if comp else "")
              + "bits | seconds | note |", "|---|---:|" + ("---:|" if comp else "") + "---:|---:|---|"]
    lines += [f"| {n} | {r['error']:.3g} ({r['error_kind']}) | " + (f"{r['compensated_error']:.3g} | " if comp else "")
              + f"{r['bits']:.2f} | {r['seconds']:.2f} | {r['note']} |" for n, r in worst]
    lines += ["", f"![errors]({_plot_errors(out, layers)})", "", "All layers: `report.json`."]
    write_text(out / "report.md", "\n".join(lines) + "\n")
