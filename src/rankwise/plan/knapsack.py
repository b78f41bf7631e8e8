"""Choose one option per layer (a rank, a bit width, bits + a compensation rank) under a global budget.

A multiple-choice knapsack: layer ℓ offers options (cost c, predicted error e); pick one per layer so
that Σ c ≤ budget and Σ e is small. Solved greedily on each layer's lower convex hull of (c, e): the
hull segments of all layers are taken in order of error removed per unit of cost, steepest first (the
exact optimum of the relaxation in which a layer may sit between two hull points; Sinha & Zoltners
1979), then leftover budget is spent on the single upgrade that removes the most error, repeatedly.
Any allocation passed as `candidates` (uniform, say) that fits and is better is returned instead, so
the result is never worse than those on its own objective.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class Option:
    cost: float  # parameters or bytes
    error: float  # predicted error (the objective sums it over layers)
    choice: Hashable  # what the caller applies, e.g. ("svd", 64) or (4, 16)


class BudgetError(ConfigError):
    """The budget is below the smallest reachable size."""


def _hull(options: Sequence[Option]) -> list[int]:
    """Indices (into options sorted by cost) of the lower convex hull, cheapest first, error decreasing."""
    order = sorted(range(len(options)), key=lambda i: (options[i].cost, options[i].error))
    pareto: list[int] = []
    for i in order:  # keep an option only if it has less error than every cheaper one
        if not pareto or options[i].error < options[pareto[-1]].error:
            if pareto and options[i].cost == options[pareto[-1]].cost:
                pareto.pop()
            pareto.append(i)
    hull: list[int] = []
    for i in pareto:
        while len(hull) >= 2:
            a, b, c = options[hull[-2]], options[hull[-1]], options[i]
            # b lies on or above the chord a–c: not on the lower hull
            if (b.error - a.error) * (c.cost - a.cost) >= (c.error - a.error) * (b.cost - a.cost):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def total(choice: dict[str, Option]) -> tuple[float, float]:
    """(Σ cost, Σ error) of an allocation."""
    return sum(o.cost for o in choice.values()), sum(o.error for o in choice.values())


def smallest(options: dict[str, Sequence[Option]]) -> float:
    return sum(min(o.cost for o in opts) for opts in options.values())


def allocate(options: dict[str, Sequence[Option]], budget: float, candidates: Sequence[dict[str, Option]] = (),
             unit: str = "") -> dict[str, Option]:
    """One option per layer with Σ cost ≤ budget, minimizing Σ error (see the module docstring).

    BudgetError when even the cheapest option of every layer exceeds the budget (its message gives
    that smallest size). Deterministic: ties go to the earlier layer.
    """
    floor = smallest(options)
    if floor > budget * (1 + 1e-12):
        raise BudgetError(f"a budget of {budget:,.0f}{unit} cannot be met: the smallest reachable size is "
                          f"{floor:,.0f}{unit} (every layer at its cheapest option)")
    hulls = {n: [opts[i] for i in _hull(opts)] for n, opts in options.items()}
    at = dict.fromkeys(options, 0)
    left = budget - floor
    steps = []
    for li, (n, h) in enumerate(hulls.items()):
        for j in range(1, len(h)):
            dc, de = h[j].cost - h[j - 1].cost, h[j].error - h[j - 1].error
            steps.append((de / dc, li, j, n, dc))
    frozen: set[str] = set()
    for _, _, j, n, dc in sorted(steps):
        if n in frozen or at[n] != j - 1:
            continue
        if dc <= left + 1e-9:
            at[n], left = j, left - dc
        else:
            frozen.add(n)  # later hull segments of this layer are flatter: leave them to the fill below
    chosen = {n: hulls[n][at[n]] for n in options}
    chosen = _fill(options, chosen, budget)
    best = chosen
    for cand in candidates:
        if set(cand) == set(options) and total(cand)[0] <= budget * (1 + 1e-12) and total(cand)[1] < total(best)[1]:
            best = dict(cand)
    return best


def _fill(options: dict[str, Sequence[Option]], chosen: dict[str, Option], budget: float) -> dict[str, Option]:
    """Spend what the greedy left on the upgrade that removes the most error, until none fits."""
    chosen = dict(chosen)
    left = budget - total(chosen)[0]
    while True:
        best = None
        for n, opts in options.items():
            cur = chosen[n]
            for o in opts:
                gain = cur.error - o.error
                if gain > 0 and o.cost - cur.cost <= left + 1e-9 and (best is None or gain > best[0]):
                    best = (gain, n, o)
        if best is None:
            return chosen
        _, n, o = best
        left -= o.cost - chosen[n].cost
        chosen[n] = o
