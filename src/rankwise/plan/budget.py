"""Rank budgets across layers: uniform, or EVA's redistribution by explained variance."""

from __future__ import annotations

from torch import Tensor


def allocate_uniform(caps: dict[str, int], rank: int) -> dict[str, int]:
    """Every layer gets `rank` (its cap if smaller)."""
    return {name: min(rank, cap) for name, cap in caps.items()}


def allocate_by_score(scores: dict[str, Tensor], budget: int) -> dict[str, int]:
    """Give `budget` components to the highest scores across all layers (EVA, paper Sec. 3.3).

    scores: layer -> [m] descending candidate scores (explained-variance ratios). A layer's rank is
    how many of its candidates make the global top-`budget`. Ties go to the earlier layer, then the
    earlier component, so the result is deterministic.
    """
    ranked = sorted(
        ((float(v), li, ci, name) for li, (name, s) in enumerate(scores.items()) for ci, v in enumerate(s.tolist())),
        key=lambda t: (-t[0], t[1], t[2]),
    )
    counts = dict.fromkeys(scores, 0)
    for _, _, _, name in ranked[:budget]:
        counts[name] += 1
    return counts


ALLOCATIONS = ("uniform", "explained-variance")
