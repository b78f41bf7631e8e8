"""LoftQ's alternation (Li et al. 2023, arXiv:2310.08659, Alg. 1): find a quantized Q and a rank-r B·A
with W ≈ Q + B·A, by turns: B·A ← the best rank-r fit of W − Q; Q ← quantize(W − B·A).

The objective is ‖(W − Q − B·A)·S‖²_F: S = I is LoftQ's own; S·Sᵀ = XᵀX (`weighting` of the inputs'
second moment) is its activation-weighted variant, the error on the layer's outputs over calibration
data. The fit step is exact for either (Eckart–Young on R·S). The quantize step is not (rounding W − B·A
afresh brings back a full quantization noise, of which the next fit removes only the top r directions),
so here a round's new Q is taken only when, with its own fit, it lowers the objective: the error
recorded after every round decreases strictly (the paper's T rounds can otherwise oscillate), and the
alternation stops at the first round that finds no better Q.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor


@dataclass
class LoftQResult:
    q: Tensor  # [out, in] the chosen quantized weight (effective, float64)
    state: Any  # what `requant` returned with it (codes, scales …); None: the starting Q was kept
    a: Tensor  # [r, in] float64, B·A the best rank-r fit of W − Q
    b: Tensor  # [out, r]
    errors: list[float] = field(default_factory=list)  # objective after each round (round 0: the start's fit)
    accepted: int = 0  # rounds whose new Q was taken


def _fit(resid: Tensor, s: Tensor | None, s_inv: Tensor | None, rank: int) -> tuple[Tensor, Tensor, float]:
    """(A [r, in], B [out, r], ‖(R − B·A)·S‖²) for the best rank-r fit of R [out, in] under S."""
    rs = resid if s is None else resid @ s
    u, sigma, vh = torch.linalg.svd(rs, full_matrices=False)
    a = vh[:rank] if s_inv is None else vh[:rank] @ s_inv
    return a, u[:, :rank] * sigma[:rank], float((sigma[rank:] ** 2).sum())


def loftq(w: Tensor, q0: Tensor, rank: int, requant: Callable[[Tensor], list[tuple[Tensor, Any]]],
          s: Tensor | None = None, s_inv: Tensor | None = None, iters: int = 5) -> LoftQResult:
    """Alternate up to `iters` rounds from the quantized weight q0 [out, in] of W [out, in].

    requant(target [out, in]) → candidates [(Q [out, in], state)], each Q on the layer's grid near target
    (e.g. re-rounded on the current scales, or quantized afresh). S, S⁻¹ [in, in]: the weighting (None:
    plain Frobenius). Stops early when no candidate lowers the objective. Float64 throughout.
    """
    w, q = w.double(), q0.double()
    s = None if s is None else s.double()
    s_inv = None if s_inv is None else s_inv.double()
    a, b, err = _fit(w - q, s, s_inv, rank)
    result = LoftQResult(q, None, a, b, [err])
    for _ in range(iters):
        best = None
        for cand, state in requant(w - b @ a):
            cand = cand.double()
            fit = _fit(w - cand, s, s_inv, rank)
            if fit[2] < err and (best is None or fit[2] < best[1][2]):
                best = (cand, fit, state)
        if best is None:
            break
        result.q, (a, b, err), result.state = best
        result.a, result.b = a, b
        result.errors.append(err)
        result.accepted += 1
    return result
