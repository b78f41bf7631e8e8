"""The `rankwise` command. Each subcommand parses options and calls one library function."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ..errors import RankwiseError

app = typer.Typer(
    help="rankwise: adapt and compress pretrained transformers from what they compute on your data.\n\n"
    "Start with `rankwise init --help`. Models: 'smollm2', 'minilm', a local HF folder or a .gguf file; "
    "data: 'pydoc' (embedded corpus), a .txt or a .jsonl file. Nothing is downloaded.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# soft_wrap: long lines are not cut at the terminal width, so messages piped to a file stay whole.
console = Console(stderr=False, soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


@app.callback()
def _root(
    nproc: int = typer.Option(1, "--nproc", min=1, help="Run the command in N processes on this machine (torchrun "
                              "--standalone): data shared out, statistics summed, rank 0 writes. Across machines, "
                              "launch `python -m rankwise.cli.main` with torchrun yourself (docs/distributed.md)."),
) -> None:
    """rankwise: adapt and compress pretrained transformers from what they compute on your data."""
    import os

    if _other_rank():
        console.quiet = True  # under torchrun, rank 0 speaks for the run (errors still come from every rank)
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        from ..distributed import launch

        sys.exit(launch(nproc, sys.argv[1:]))


_DTYPE_HELP = ("Compute dtype of the model: auto (the checkpoint's own, e.g. bfloat16 for most hub models, float32 for "
               "the embedded ones), bfloat16, float16 or float32. Statistics and each layer's solver stay float32/64.")
_DTYPE = typer.Option("auto", "--dtype", help=_DTYPE_HELP)
_OFFLOAD = typer.Option(None, "--offload-cache", help="Keep the cached hidden states of the calibration batches in files under this folder instead of memory (default: in memory, or the system's temporary folder, said in the log, when they would not fit).")

_FIELD_HELP = {
    "text": "Field/column holding plain text in .jsonl/.json/.csv/.tsv records (default 'text').",
    "prompt": "Field holding the prompt (context only; not scored), e.g. 'question' for GSM8K (default 'prompt').",
    "completion": "Field holding the completion (scored; for exact-match the reference), e.g. 'answer' (default 'completion').",
    "messages": "Field holding chat messages [{role, content}, …] (default 'messages'); assistant turns are scored.",
    "label": "Field/column holding the class label for classification (default 'label').",
}


@app.command()
def init(
    model: str = typer.Option("smollm2", help="Embedded name ('smollm2', 'minilm'), local HF model folder, or .gguf file."),
    data: str = typer.Option("pydoc", help="'pydoc' (Python docs shipped with CPython), .txt (packed), .jsonl/.json (text | prompt+completion | messages), .csv/.tsv."),
    method: str = typer.Option("eva", help="Adapter init method (default eva); `rankwise methods` lists them all."),
    rank: int = typer.Option(8, help="Base LoRA rank r; the budget is r × number of layers."),
    alpha: Optional[float] = typer.Option(None, help="LoRA alpha for rank r (default: r, i.e. scaling 1); scaled with each layer's rank."),
    rho: float = typer.Option(2.0, help="EVA: each layer may take up to round(r·rho) ranks (1 = no redistribution)."),
    whiten: Optional[bool] = typer.Option(None, "--whiten/--no-whiten", help="EVA: divide A's rows by √(singular value), as peft's whiten (default on; --no-whiten: the paper's and peft's plain EVA)."),
    targets: str = typer.Option("all-linear", help="'all-linear', comma-separated names ('q_proj,v_proj'), or 're:<regex>' on full names (same syntax as in YAML)."),
    seq_len: int = typer.Option(256, help="Tokens per calibration sequence."),
    n_samples: int = typer.Option(32, help="Number of calibration sequences."),
    batch_size: int = typer.Option(4, help="Sequences per forward pass."),
    use_label_mask: bool = typer.Option(True, help="Skip tokens whose label is -100 (prompts) in the statistics."),
    device: str = typer.Option("cpu", help="Torch device, e.g. 'cpu' or 'cuda'."),
    dtype: str = _DTYPE,
    offload_cache: Optional[Path] = _OFFLOAD,
    out: Path = typer.Option(Path("runs/init"), help="Output folder: peft adapter + plan.json (replaced atomically)."),
    save_stats: bool = typer.Option(False, help="Also write the full calibration statistics (stats.safetensors)."),
    init_opt: Optional[list[str]] = typer.Option(None, help="A method's own option as KEY=VALUE (repeatable), e.g. --init-opt niter=4; `rankwise config show --method NAME` lists them."),
    quiet: bool = typer.Option(False, help="No progress bars."),
):
    """Calibrate on data (if the method needs it), initialize a LoRA adapter (EVA by default), print the per-layer ranks, export it."""
    from .jobs import InitJob, run_init
    from .report import print_plan

    job = InitJob.build(where="rankwise init", model=model, data=data, method=method, rank=rank, alpha=alpha, rho=rho,
                        whiten=whiten, targets=targets, seq_len=seq_len, n_samples=n_samples, batch_size=batch_size,
                        use_label_mask=use_label_mask, device=device, dtype=dtype, offload_cache=offload_cache, out=out,
                        save_stats=save_stats, options=_init_opts(init_opt))
    result = run_init(job, progress=not quiet)
    if not _is_main():
        return
    print_plan(result["plan"], console)
    s = result["seconds"]
    head = f"calibrated on {result['tokens']} tokens" if result["tokens"] else "no calibration (the method needs no data)"
    console.print(f"{head}: load {s['load']:.1f}s, calibrate {s['calibrate']:.1f}s, "
                  f"plan+adapt {s['plan_adapt']:.1f}s, export {s['export']:.1f}s")
    console.print(f"adapter written to [bold]{result['out']}[/bold] (load with peft.PeftModel.from_pretrained(base, '{result['out']}'))")


@app.command()
def quantize(
    model: str = typer.Option("smollm2", help="Embedded name ('smollm2', 'minilm'), local HF model folder, or .gguf file."),
    data: str = typer.Option("pydoc", help="Calibration data: 'pydoc', .txt, .jsonl/.json, .csv/.tsv (rtn needs none)."),
    method: str = typer.Option("gptq", help="rtn (data-free), gptq or awq; `rankwise quantizers` lists them."),
    bits: int = typer.Option(4, help="Bits per weight code, 2–8."),
    group_size: Optional[int] = typer.Option(32, help="Input columns per scale; 0 = one scale per output channel. Must divide every layer's input width."),
    symmetric: bool = typer.Option(True, "--symmetric/--asymmetric", help="Symmetric grid, or asymmetric with a zero point per group."),
    targets: str = typer.Option("all-linear", help="'all-linear' (not the output head), comma-separated names, or 're:<regex>'."),
    seq_len: int = typer.Option(256, help="Tokens per calibration sequence (and perplexity window)."),
    n_samples: int = typer.Option(32, help="Number of calibration sequences."),
    batch_size: int = typer.Option(4, help="Sequences per forward pass."),
    format: str = typer.Option("safetensors", help="Output: 'safetensors' (dequantized transformers folder), 'compressed-tensors' (packed ints, int8 per code when --asymmetric; transformers loads it) or 'gguf' (llama.cpp; Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, Granite, OLMo 2, Mixtral, Qwen3-MoE)."),
    eval_data: str = typer.Option("pydoc", help="Plain text held out: perplexity before/after (causal LMs), or an encoder's embedding cosine to the float model ('pydoc': its held-out paragraphs)."),
    eval_tokens: int = typer.Option(2048, help="Held-out tokens to measure (0: skip)."),
    device: str = typer.Option("cpu", help="Torch device."),
    dtype: str = _DTYPE,
    offload_cache: Optional[Path] = _OFFLOAD,
    out: Path = typer.Option(Path("runs/quantize"), help="Output folder: model (or model.gguf), report.md, report.json, errors.png."),
    opt: Optional[list[str]] = typer.Option(None, help="A method's own option as KEY=VALUE (repeatable), e.g. --opt act_order=true; `rankwise quantizers` lists them."),
    text_field: Optional[str] = typer.Option(None, help=_FIELD_HELP["text"]),
    prompt_field: Optional[str] = typer.Option(None, help=_FIELD_HELP["prompt"] + " Calibration measures prompts too."),
    completion_field: Optional[str] = typer.Option(None, help=_FIELD_HELP["completion"]),
    messages_field: Optional[str] = typer.Option(None, help=_FIELD_HELP["messages"]),
    quiet: bool = typer.Option(False, help="No progress bars."),
):
    """Quantize a model's linear layers from one block-by-block calibration pass, export, report.

    Each block is calibrated on what the already-quantized blocks before it compute (GPTQ's sequential pipeline). Example: rankwise quantize --method gptq --bits 4 --format gguf --out runs/q4"""
    from .quantize import QuantJob, run_quantize

    job = QuantJob.build(where="rankwise quantize", model=model, data=data, method=method, bits=bits,
                         group_size=group_size or None, symmetric=symmetric, targets=targets, seq_len=seq_len,
                         n_samples=n_samples, batch_size=batch_size, format=format, eval_data=eval_data,
                         eval_tokens=eval_tokens, device=device, dtype=dtype, offload_cache=offload_cache, out=out,
                         options=_init_opts(opt, "--opt"),
                         fields=_fields(text_field, prompt_field, completion_field, messages_field))
    s = run_quantize(job, progress=not quiet, log=console.print)
    if not _is_main():
        return
    _print_held_out(s, eval_tokens)
    console.print(f"{len(s['layers'])} layers quantized in {s['seconds']['quantize']:.1f} s on {s['tokens']} tokens; "
                  f"written to [bold]{s['written']}[/bold]; report: {out / 'report.md'}")


def _fields(text: str | None, prompt: str | None, completion: str | None, messages: str | None) -> dict:
    """The record fields given on the command line (the others keep their defaults)."""
    given = dict(text_field=text, prompt_field=prompt, completion_field=completion, messages_field=messages)
    return {k: v for k, v in given.items() if v is not None}


def _print_held_out(s: dict, eval_tokens: int) -> None:
    ppl, cos = s["perplexity"], s.get("cosine")
    if cos is not None:
        console.print(f"held-out embedding cosine to the float model: {cos['after']:.4f}")
    elif ppl["before"] is not None:
        console.print(f"held-out perplexity {ppl['before']:.3f} → {ppl['after']:.3f}"
                      + (f" → {ppl['recovered']:.3f} after recovery" if ppl.get("recovered") is not None else "")
                      + f" ({eval_tokens} tokens)")


def _int_list(text: str | None, flag: str) -> list[int] | None:
    from ..errors import ConfigError

    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated integers, e.g. {flag} 2,3,4,8") from None


@app.command()
def compress(
    model: str = typer.Option("smollm2", help="Embedded name ('smollm2', 'minilm'), local HF model folder, or .gguf file."),
    data: str = typer.Option("pydoc", help="Calibration data: 'pydoc', .txt, .jsonl/.json, .csv/.tsv."),
    method: str = typer.Option("svd-llm", help="svd | asvd | svd-llm (low-rank factors), mixed (per-layer bits under --avg-bits) or joint (bits + EoRA ranks [+ SVD] under --budget)."),
    ratio: Optional[float] = typer.Option(None, help="SVD methods: fraction of the targeted linears' parameters kept (default 0.8); ranks per layer from the measured error curves."),
    rank: Optional[int] = typer.Option(None, help="SVD methods: one fixed rank for every layer instead of --ratio."),
    allocation: str = typer.Option("global", help="SVD methods: 'global' (ranks under one budget from the error curves) or 'uniform' (the same fraction per layer)."),
    avg_bits: Optional[float] = typer.Option(None, help="mixed/joint: average storage bits per weight, scales and compensation included (mixed default 3.5)."),
    budget: Optional[str] = typer.Option(None, help="joint: size of the compressed linears, e.g. 60MB, 1.2GB, 64MiB (embeddings and norms are not counted)."),
    bits: str = typer.Option("2,3,4,8", help="mixed/joint: candidate bit widths, comma-separated."),
    ranks: Optional[str] = typer.Option(None, help="joint: candidate EoRA compensation ranks, comma-separated (default 0,8,16,32)."),
    svd: bool = typer.Option(False, "--svd/--no-svd", help="joint: also offer SVD-LLM factors (float16) per layer."),
    group_size: Optional[int] = typer.Option(64, help="mixed/joint: input columns per scale; 0 = per output channel."),
    symmetric: bool = typer.Option(True, "--symmetric/--asymmetric", help="mixed/joint: symmetric or asymmetric grids."),
    quantizer: str = typer.Option("gptq", help="mixed/joint: quantizer that applies the chosen bits (rtn, gptq, awq)."),
    targets: str = typer.Option("all-linear", help="'all-linear' (not the output head), comma-separated names, or 're:<regex>'."),
    seq_len: int = typer.Option(256, help="Tokens per calibration sequence (and perplexity window)."),
    n_samples: int = typer.Option(32, help="Number of calibration sequences."),
    batch_size: int = typer.Option(4, help="Sequences per forward pass."),
    format: str = typer.Option("safetensors", help="mixed/joint output: 'safetensors' (dense), 'compressed-tensors' or 'gguf'. SVD methods always write model/ (factored) and merged/ (dense)."),
    eval_data: str = typer.Option("pydoc", help="Plain text held out: perplexity before/after (causal LMs), or an encoder's embedding cosine to the float model."),
    eval_tokens: int = typer.Option(2048, help="Held-out tokens to measure (0: skip)."),
    device: str = typer.Option("cpu", help="Torch device."),
    dtype: str = _DTYPE,
    offload_cache: Optional[Path] = _OFFLOAD,
    out: Path = typer.Option(Path("runs/compress"), help="Output folder: model/ (+ merged/), report.md, report.json, plots."),
    opt: Optional[list[str]] = typer.Option(None, help="An option of the method (SVD: alpha, min_rank, floor) or of the quantizer (mixed/joint: damp, act_order, …) as KEY=VALUE."),
    recover_steps: int = typer.Option(0, help="SVD methods: then train the factors this many steps on --data (PELA: distil the original model's hidden states and logits, weights regularized toward the originals); 0: no recovery."),
    recover_lr: float = typer.Option(1e-4, help="Learning rate of the recovery."),
    text_field: Optional[str] = typer.Option(None, help=_FIELD_HELP["text"]),
    prompt_field: Optional[str] = typer.Option(None, help=_FIELD_HELP["prompt"] + " Calibration measures prompts too."),
    completion_field: Optional[str] = typer.Option(None, help=_FIELD_HELP["completion"]),
    messages_field: Optional[str] = typer.Option(None, help=_FIELD_HELP["messages"]),
    quiet: bool = typer.Option(False, help="No progress bars."),
):
    """Compress a model from one calibration pass: low-rank factors (SVD, ASVD, SVD-LLM) under a parameter ratio, per-layer mixed precision under an average-bits budget, or bits and compensation ranks planned together under a memory budget.

    Every method measures per-layer error curves on the original model, chooses per-layer ranks/bits with a knapsack, then applies block by block (later blocks see the compressed ones). Examples: rankwise compress --method svd-llm --ratio 0.8 --out runs/svd80; rankwise compress --method joint --budget 60MB --out runs/j60"""
    from .compress import CompressJob, run_compress

    job = CompressJob.build(where="rankwise compress", model=model, data=data, method=method, ratio=ratio, rank=rank,
                            allocation=allocation, avg_bits=avg_bits, budget=budget, bits=_int_list(bits, "--bits"),
                            ranks=_int_list(ranks, "--ranks"), svd=svd, group_size=group_size or None,
                            symmetric=symmetric, quantizer=quantizer, targets=targets, seq_len=seq_len,
                            n_samples=n_samples, batch_size=batch_size, format=format, eval_data=eval_data,
                            eval_tokens=eval_tokens, device=device, dtype=dtype, offload_cache=offload_cache, out=out,
                            options=_init_opts(opt, "--opt"), recover_steps=recover_steps, recover_lr=recover_lr,
                            fields=_fields(text_field, prompt_field, completion_field, messages_field))
    s = run_compress(job, progress=not quiet, log=console.print)
    if not _is_main():
        return
    _print_held_out(s, eval_tokens)
    if s["kind"] == "svd":
        p = s["params"]
        size = f"{p['after']:,} of {p['before']:,} parameters ({p['ratio']:.1%})"
    else:
        size = f"{s['bytes'] / 1e6:.2f} MB (budget {s['budget'] / 1e6:.2f} MB)"
    console.print(f"{len(s['layers'])} layers compressed to {size}; written to [bold]{s['written']['model']}[/bold]; "
                  f"report: {out / 'report.md'}")


@app.command("quantizers")
def quantizers_cmd():
    """List the quantization methods, what each observes, and their own options (for --opt)."""
    from rich.table import Table

    from ..quant import QuantConfig, all_quantizers

    t = Table(title="quantizers (`rankwise quantize --method NAME`; own options: --opt KEY=VALUE)")
    for col in ("method", "observes", "own options (default)", "what it computes"):
        t.add_column(col, overflow="fold")
    shared = set(QuantConfig.model_fields)
    for name, q in all_quantizers().items():
        own = [f"{k}={f.default!r}: {f.description}" for k, f in q.config.model_fields.items() if k not in shared]
        t.add_row(name, ", ".join(q.observe) or "nothing (data-free)", "\n".join(own) or "-", q.summary)
    console.print(t)


config_app = typer.Typer(help="Show run configurations.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(
    config: Optional[Path] = typer.Option(None, help="Resolve this YAML file instead of the defaults."),
    method: Optional[str] = typer.Option(None, help="Show this init method's own keys too (see `rankwise methods`)."),
):
    """Print a complete run config (defaults, or a file resolved against them) as commented YAML.

    `rankwise config show > run.yaml`, edit, then `rankwise train --config run.yaml`."""
    from .configdoc import commented_yaml, with_method
    from .runs import RunConfig, load_config

    cfg = load_config(config) if config else RunConfig()
    if method:
        cfg = with_method(cfg, method)
    # Plain stdout, not rich: YAML must come out byte for byte, whatever the terminal width.
    sys.stdout.write(commented_yaml(cfg))


@app.command("methods")
def methods_cmd():
    """List the init methods: what each computes, what it must observe, whether it changes the base weight."""
    from rich.table import Table

    from ..methods import all_methods

    t = Table(title="init methods (`--method NAME`; their own keys: `rankwise config show --method NAME`)")
    for col in ("method", "observes", "base weight", "default lr", "what it computes"):
        t.add_column(col, overflow="fold")
    observes = {"none": "nothing (no calibration)", "spectrum": "top-k input spectrum", "moments": "input XᵀX (full)"}
    for name, impl in all_methods().items():
        seen = observes[impl.needs]
        if getattr(impl, "needs_grad", False):  # the task loss's weight gradient (one backward per batch)
            seen = "weight gradient of the task loss" if impl.needs == "none" else f"{seen} + weight gradient"
        t.add_row(name, seen, getattr(impl, "base_change", "W ← W − s·B·A") if impl.changes_base else "unchanged",
                  f"{impl.default_lr:g}", impl.summary)
    console.print(t)


def _init_opts(pairs: list[str] | None, flag: str = "--init-opt") -> dict:
    """--init-opt key=value (repeatable) → {key: value}, values read as YAML scalars (4, true, null, ipm)."""
    import yaml

    from ..errors import ConfigError

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} {pair!r}: expected KEY=VALUE, e.g. {flag} niter=4")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


_TRAIN_FLAGS = {"model": "model", "task": "task", "data": "data.train", "eval_data": "data.eval", "method": "init.method",
                "rank": "init.rank", "alpha": "init.alpha", "rho": "init.rho", "targets": "init.targets",
                "steps": "train.steps", "lr": "train.lr", "batch_size": "train.batch_size", "grad_accum": "train.grad_accum",
                "seq_len": "data.seq_len", "seed": "train.seed", "text_field": "data.text_field", "label_field": "data.label_field",
                "prompt_field": "data.prompt_field", "completion_field": "data.completion_field",
                "messages_field": "data.messages_field", "max_eval_examples": "data.max_eval_examples",
                "eval_every": "train.eval_every", "out": "out", "device": "device", "dtype": "dtype", "merge": "merge", "base": "base.method",
                "gradient_checkpointing": "train.gradient_checkpointing"}


@app.command()
def train(
    config: Optional[Path] = typer.Option(None, help="YAML run config (see `rankwise config show`); flags below override it."),
    model: Optional[str] = typer.Option(None, help="Model: 'smollm2', 'minilm', a local HF folder or a .gguf file."),
    task: Optional[str] = typer.Option(None, help="'causal-lm' or 'seq-cls' (classification head trained with the adapter)."),
    data: Optional[str] = typer.Option(None, help="Training data: 'pydoc', .txt, .jsonl (text | prompt+completion | messages), .csv/.tsv."),
    eval_data: Optional[str] = typer.Option(None, help="Held-out data (default: a deterministic 10% of the training data)."),
    method: Optional[str] = typer.Option(None, help="Adapter init method (default eva); `rankwise methods` lists them all."),
    rank: Optional[int] = typer.Option(None, help="LoRA rank r."),
    alpha: Optional[float] = typer.Option(None, help="LoRA alpha at rank r (default r)."),
    rho: Optional[float] = typer.Option(None, help="EVA: max rank per layer = round(r·rho)."),
    targets: Optional[str] = typer.Option(None, help="'all-linear', comma-separated names, or 're:<regex>'."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (linear warmup, cosine decay)."),
    batch_size: Optional[int] = typer.Option(None, help="Sequences per micro-batch."),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches per optimizer step."),
    seq_len: Optional[int] = typer.Option(None, help="Maximum tokens per sequence (longer ones are truncated and counted)."),
    text_field: Optional[str] = typer.Option(None, help=_FIELD_HELP["text"]),
    prompt_field: Optional[str] = typer.Option(None, help=_FIELD_HELP["prompt"]),
    completion_field: Optional[str] = typer.Option(None, help=_FIELD_HELP["completion"]),
    messages_field: Optional[str] = typer.Option(None, help=_FIELD_HELP["messages"]),
    label_field: Optional[str] = typer.Option(None, help=_FIELD_HELP["label"]),
    max_eval_examples: Optional[int] = typer.Option(None, help="Score at most this many held-out examples during training (default: all)."),
    eval_every: Optional[int] = typer.Option(None, help="Held-out loss every N steps."),
    seed: Optional[int] = typer.Option(None, help="Seed for data order and init."),
    out: Optional[Path] = typer.Option(None, help="Run folder (config.yaml, metrics.jsonl, plan.json, adapter/, merged/, report.md)."),
    device: Optional[str] = typer.Option(None, help="Torch device."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=_DTYPE_HELP + " Adapters and optimizer state are float32 whatever the base."),
    merge: Optional[bool] = typer.Option(None, "--merge/--no-merge", help="Also write merged/ (adapter folded into the weights)."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute each block's activations in the backward pass instead of keeping them (much less memory on a large base, about a third more time per step)."),
    init_opt: Optional[list[str]] = typer.Option(None, help="A method's own option as KEY=VALUE (repeatable), e.g. --init-opt niter=4 (sets init.KEY)."),
    base: Optional[str] = typer.Option(None, help="Compress the frozen base first (QLoRA-style): a quantizer (rtn, gptq, awq) or an SVD method (svd, asvd, svd-llm); default none. Inits loftq, loftq-aw and compensation start from its error."),
    base_opt: Optional[list[str]] = typer.Option(None, help="An option of --base as KEY=VALUE (repeatable), e.g. --base-opt bits=3 --base-opt group_size=64, or --base-opt ratio=0.8."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last checkpoint, with the config saved there (other flags must agree with it)."),
    overwrite: bool = typer.Option(False, help="Replace an existing run in --out."),
    quiet: bool = typer.Option(False, help="No progress bars."),
):
    """Fine-tune with an adapter: calibrate, initialize (EVA by default), train, evaluate, export, report.

    Resume an interrupted run with `rankwise train --out DIR --resume`: it reads DIR/config.yaml."""
    from ..errors import ConfigError
    from .runs import load_config, run_train

    given = {k: v for k, v in locals().items() if k in _TRAIN_FLAGS and v is not None}
    overrides = {_TRAIN_FLAGS[k]: v for k, v in given.items()}
    if "out" in overrides:
        overrides["out"] = str(overrides["out"])
    overrides |= {f"init.{k}": v for k, v in _init_opts(init_opt).items()}
    overrides |= {f"base.{k}": v for k, v in _init_opts(base_opt, "--base-opt").items()}
    if resume and config is None:
        if out is None:
            raise ConfigError("--resume needs --out DIR, the run folder to continue")
        config = out / "config.yaml"
        if not config.exists():
            raise ConfigError(f"--resume: {out} holds no run to resume (no config.yaml); start one without --resume")
    cfg = load_config(config, overrides)
    summary = run_train(cfg, resume=resume, overwrite=overwrite, progress=not quiet, log=console.print)
    if not _is_main():
        return
    base = summary.get("base", {})
    console.print(f"run folder: [bold]{cfg.out}[/bold] — report.md, adapter/ (peft)" + (", merged/" if cfg.merge else "") +
                  (", base/ (the compressed base)" if base.get("folder") else "") + (", requantized/" if "requantized" in base else "") +
                  f", metrics.jsonl ({summary['steps']} steps, {summary['seconds']:.0f} s)")


@app.command("eval")
def eval_cmd(
    model: Optional[str] = typer.Option(None, help="Base model (name, folder or .gguf) or a merged/ folder; default with --adapter: its base."),
    adapter: Optional[Path] = typer.Option(None, help="A peft adapter folder to apply on the base model (its task and classes come with it)."),
    data: str = typer.Option("pydoc", help="Data: 'pydoc' (its held-out paragraphs), .txt, .jsonl/.json, .csv/.tsv."),
    metric: str = typer.Option("perplexity", help="'perplexity' (plain text: sliding window; records: their scored tokens), 'accuracy' (classification) or 'exact-match' (final number after '####')."),
    seq_len: int = typer.Option(256, help="Perplexity window / max tokens per example."),
    stride: Optional[int] = typer.Option(None, help="Perplexity stride (default: half the window)."),
    limit: Optional[int] = typer.Option(None, help="At most this many examples (tokens for plain-text perplexity)."),
    text_field: str = typer.Option("text", help=_FIELD_HELP["text"]),
    prompt_field: str = typer.Option("prompt", help=_FIELD_HELP["prompt"]),
    completion_field: str = typer.Option("completion", help=_FIELD_HELP["completion"]),
    messages_field: str = typer.Option("messages", help=_FIELD_HELP["messages"]),
    label_field: str = typer.Option("label", help=_FIELD_HELP["label"]),
    max_new_tokens: int = typer.Option(256, help="exact-match: generation length."),
    dtype: str = _DTYPE,
):
    """Evaluate a model or base+adapter on a dataset; prints one JSON line of metrics."""
    import json

    from .evaluate import run_eval
    from ..data.formats import Fields

    fields = Fields.build(where="rankwise eval", text_field=text_field, prompt_field=prompt_field,
                          completion_field=completion_field, messages_field=messages_field, label_field=label_field)
    if _other_rank():
        return
    result = run_eval(model, adapter, data, metric, seq_len=seq_len, stride=stride or max(1, seq_len // 2), limit=limit,
                      fields=fields, max_new_tokens=max_new_tokens, dtype=dtype)
    sys.stdout.write(json.dumps(result) + "\n")


@app.command("export")
def export_cmd(
    adapter: Path = typer.Argument(..., help="A peft adapter folder (e.g. runs/demo/adapter)."),
    out: Path = typer.Option(..., help="Where to write the merged model (transformers folder)."),
    model: Optional[str] = typer.Option(None, help="Base model (default: the one recorded in the adapter's rankwise.json)."),
):
    """Merge an adapter into its base model and save a folder `AutoModel*.from_pretrained` loads.

    A classification adapter is merged with its trained head and class names (config id2label)."""
    from ..atomic import check_out_dir
    from .evaluate import merge_adapter

    if _other_rank():
        return
    check_out_dir(out)
    console.print(f"merged model written to [bold]{merge_adapter(adapter, out, model)}[/bold]")


def _other_rank() -> bool:
    """Under torchrun (from its environment, before any process group exists), a rank other than 0: it stays
    quiet, and eval and export, which have nothing to share out, run on rank 0 alone."""
    import os

    return int(os.environ.get("RANK", "0")) > 0


def _is_main() -> bool:
    from ..distributed import is_main

    return is_main()


def main() -> None:
    from ..progress import quiet_libraries
    from ..train.loop import TrainingInterrupted

    quiet_libraries()  # in a log, one line per stage rather than redrawn bars
    try:
        app()
    except TrainingInterrupted as e:
        err.print(f"[bold yellow]{e}[/bold yellow]", highlight=False)
        sys.exit(130)
    except RankwiseError as e:
        import os

        where = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        err.print(f"[bold red]error{where}:[/bold red] {e}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    finally:
        from ..distributed import shutdown

        shutdown()


if __name__ == "__main__":
    main()
