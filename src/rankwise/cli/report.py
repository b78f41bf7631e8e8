"""Reports: the terminal rank table, and a run folder's report.md with PNG plots."""

from __future__ import annotations

import re

from rich.console import Console
from rich.table import Table

from ..plan.plan import Plan

_BLOCK = re.compile(r"^(.*?)\.(\d+)\.(.+)$")


def rank_grid(p: Plan) -> tuple[list[str], list[str], dict[tuple[str, str], tuple[int, float]]] | None:
    """(block ids, module kinds, {(block, kind): (rank, explained variance)}) when names are block-shaped."""
    cells, blocks, kinds = {}, [], []
    for name, lp in p.layers.items():
        m = _BLOCK.match(name)
        if not m:
            return None
        block, kind = m.group(2), m.group(3)
        blocks += [block] if block not in blocks else []
        kinds += [kind] if kind not in kinds else []
        cells[(block, kind)] = (lp.rank, sum(lp.explained_variance))
    return blocks, kinds, cells


def print_plan(p: Plan, console: Console | None = None) -> None:
    """Print per-layer ranks (grid when possible) and totals."""
    console = console or Console()
    grid = rank_grid(p)
    if grid is None:
        t = Table(title=f"{p.method} ranks per layer")
        for col in ("module", "rank", "alpha", "expl. var."):
            t.add_column(col, justify="left" if col == "module" else "right")
        for name, lp in p.layers.items():
            t.add_row(name, str(lp.rank), f"{lp.alpha:g}", f"{sum(lp.explained_variance):.3f}")
    else:
        blocks, kinds, cells = grid
        t = Table(title=f"{p.method} rank per layer (block × module; explained variance in brackets)")
        t.add_column("block", justify="right")
        for k in kinds:
            t.add_column(k.split(".")[-1] if len({x.split('.')[-1] for x in kinds}) == len(kinds) else k, justify="right")
        for b in blocks:
            row = []
            for k in kinds:
                r, ev = cells.get((b, k), (None, 0.0))
                row.append("" if r is None else (f"{r} ({ev:.2f})" if r else "[dim]0[/dim]"))
            t.add_row(b, *row)
    console.print(t)
    total = sum(lp.rank for lp in p.layers.values())
    excluded = [n for n, lp in p.layers.items() if lp.rank == 0]
    console.print(f"rank budget {total} over {len(p.layers)} layers (base rank {p.rank}, alpha/rank {p.alpha / p.rank:g}); "
                  f"{len(excluded)} layer(s) got rank 0 and no adapter" + (f": {', '.join(excluded[:6])}…" if len(excluded) > 6 else (f": {', '.join(excluded)}" if excluded else "")))


def _plot_loss(out, history: list[dict]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], lw=1, label="train loss")
    ev = [r for r in history if "eval_loss" in r]
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval loss")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
    return "loss.png"


def _plot_grid(out, p: Plan, value, title: str, fname: str, fmt: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = rank_grid(p)
    if grid is None:
        return None
    blocks, kinds, _ = grid
    data = np.full((len(blocks), len(kinds)), np.nan)
    for name, lp in p.layers.items():
        m = _BLOCK.match(name)
        data[blocks.index(m.group(2)), kinds.index(m.group(3))] = value(lp)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(kinds), max(2.5, 1 + 0.28 * len(blocks))))
    im = ax.imshow(data, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(kinds)), [k.split(".")[-1] for k in kinds], rotation=45, ha="right")
    ax.set_yticks(range(len(blocks)), blocks)
    ax.set_ylabel("block"), ax.set_title(title)
    if len(blocks) * len(kinds) <= 400:
        for (i, j), v in np.ndenumerate(data):
            if not np.isnan(v):
                ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / fname, dpi=110)
    plt.close(fig)
    return fname


def write_report(out, cfg, p: Plan | None, summary: dict) -> None:
    """report.md with loss curves, ranks per layer and explained variance per layer (PNG plots)."""
    import json
    from pathlib import Path

    out = Path(out)
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()] \
        if (out / "metrics.jsonl").exists() else []
    plots = [_plot_loss(out, history)]
    if p is not None:
        plots.append(_plot_grid(out, p, lambda lp: lp.rank, "rank per layer", "ranks.png", ".0f"))
        if any(lp.explained_variance for lp in p.layers.values()):
            plots.append(_plot_grid(out, p, lambda lp: sum(lp.explained_variance), "explained variance of the adapter's directions", "variance.png", ".2f"))
    lines = [f"# rankwise run: {cfg.init.method} on {cfg.model}", "",
             f"Task {cfg.task}; data `{cfg.data.train}`; rank {cfg.init.rank}; {summary['steps']} steps "
             f"(batch {cfg.train.batch_size} × accumulation {cfg.train.grad_accum}, lr {cfg.train.lr:g}); "
             f"{summary['seconds']:.0f} s in all.", "", "| held-out | before | after |", "|---|---:|---:|"]
    for key, v in summary["before"].items():
        if isinstance(v, float):
            lines.append(f"| {key} | {v:.4g} | {summary['after'].get(key, float('nan')):.4g} |")
    lines += ["", f"{summary['train_examples']} training / {summary['eval_examples']} held-out examples; "
              f"{summary['truncated']} truncated.", ""]
    lines += [f"![{name}]({name})" for name in plots if name]
    lines += ["", "Files: `adapter/` (peft), " + ("`merged/` (transformers), " if cfg.merge else "") +
              "`plan.json`, `metrics.jsonl`, `config.yaml`, `checkpoints/`."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
