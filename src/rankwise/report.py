"""Terminal rendering of plans: a block × module-type rank grid, or a flat list."""

from __future__ import annotations

import re

from rich.console import Console
from rich.table import Table

from .plan import Plan

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
