"""The `rankwise` command. Each subcommand parses options and calls one library function."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .errors import RankwiseError

app = typer.Typer(
    help="rankwise: adapt and compress pretrained transformers from what they compute on your data.\n\n"
    "Start with `rankwise init --help`. Models: 'smollm2', 'minilm', a local HF folder or a .gguf file; "
    "data: 'pydoc' (embedded corpus), a .txt or a .jsonl file. Nothing is downloaded.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=False)
err = Console(stderr=True)


@app.callback()
def _root() -> None:
    """rankwise: adapt and compress pretrained transformers from what they compute on your data."""


@app.command()
def init(
    model: str = typer.Option("smollm2", help="Embedded name ('smollm2', 'minilm'), local HF model folder, or .gguf file."),
    data: str = typer.Option("pydoc", help="'pydoc' (Python docs shipped with CPython), a .txt file (packed) or .jsonl (text, or prompt+completion)."),
    method: str = typer.Option("eva", help="Adapter initialization method."),
    rank: int = typer.Option(8, help="Base LoRA rank r; the budget is r × number of layers."),
    alpha: Optional[float] = typer.Option(None, help="LoRA alpha for rank r (default: r, i.e. scaling 1); scaled with each layer's rank."),
    rho: float = typer.Option(2.0, help="EVA: each layer may take up to round(r·rho) ranks (1 = no redistribution)."),
    whiten: bool = typer.Option(False, help="EVA: whiten A's rows (peft's semantics)."),
    targets: str = typer.Option("all-linear", help="'all-linear', comma-separated names ('q_proj,v_proj'), or 're:<regex>' on full names."),
    seq_len: int = typer.Option(256, help="Tokens per calibration sequence."),
    n_samples: int = typer.Option(32, help="Number of calibration sequences."),
    batch_size: int = typer.Option(4, help="Sequences per forward pass."),
    use_label_mask: bool = typer.Option(True, help="Skip tokens whose label is -100 (prompts) in the statistics."),
    device: str = typer.Option("cpu", help="Torch device, e.g. 'cpu' or 'cuda'."),
    out: Path = typer.Option(Path("runs/init"), help="Output folder: peft adapter + plan.json (replaced atomically)."),
    save_stats: bool = typer.Option(False, help="Also write the full calibration statistics (stats.safetensors)."),
    quiet: bool = typer.Option(False, help="No progress bars."),
):
    """Calibrate on data, initialize a LoRA adapter (EVA by default), print the per-layer ranks, export it."""
    from .jobs import InitJob, run_init
    from .report import print_plan

    target_spec = targets[3:] if targets.startswith("re:") else (targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()])
    job = InitJob.build(where="rankwise init", model=model, data=data, method=method, rank=rank, alpha=alpha, rho=rho,
                        whiten=whiten, targets=target_spec, seq_len=seq_len, n_samples=n_samples, batch_size=batch_size,
                        use_label_mask=use_label_mask, device=device, out=out, save_stats=save_stats)
    result = run_init(job, progress=not quiet)
    print_plan(result["plan"], console)
    s = result["seconds"]
    console.print(f"calibrated on {result['tokens']} tokens: load {s['load']:.1f}s, calibrate {s['calibrate']:.1f}s, "
                  f"plan+adapt {s['plan_adapt']:.1f}s, export {s['export']:.1f}s")
    console.print(f"adapter written to [bold]{result['out']}[/bold] (load with peft.PeftModel.from_pretrained(base, '{result['out']}'))")


def main() -> None:
    try:
        app()
    except RankwiseError as e:
        err.print(f"[bold red]error:[/bold red] {e}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
