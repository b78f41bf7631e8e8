"""Low-rank factorizations of a weight W [out, in] into LoRA factors (pure tensor math).

Every SVD-based init here writes W ≈ U_r S_r V_rᵀ as B·A with the singular values split evenly and the
adapter's scale s divided out (so that s·B·A is the chosen part of W): A = diag(√(S_r/s)) V_rᵀ [r, in],
B = U_r diag(√(S_r/s)) [out, r] (PiSSA, Meng et al. 2024, Sec. 3; peft's pissa_init does the same).
"""

from __future__ import annotations

import torch
from torch import Tensor


def split_factors(u: Tensor, s: Tensor, vh: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(A [r, in], B [out, r]) with scale·B·A = u·diag(s)·vh; u [out, r], s [r], vh [r, in]."""
    root = (s / scale).clamp_min(0).sqrt()
    return root[:, None] * vh, u * root[None, :]


def svd_part(w: Tensor, rank: int, which: str = "top", niter: int | None = None, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(U_r [out, r], S_r [r], V_rᵀ [r, in]) of W's `top` (largest) or `bottom` (smallest) r singular triplets.

    Exact SVD in float32 (as peft; float64 took 1.4× as long on SmolLM2 for no gain an fp32 model can
    hold: the factors reproduce W to ~1e-6 relative); with `niter`, torch.svd_lowrank (Halko et al. 2011,
    q = r, `niter` power iterations, as peft's pissa_niter_N) under a fixed seed, so it is reproducible.
    """
    if niter is not None:
        if which != "top":
            raise ValueError("randomized SVD finds the top components only")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(w.float(), q=rank, niter=niter)
        return u.double(), s.double(), v.T.double()
    u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
    u, s, vh = u.double(), s.double(), vh.double()
    sl = slice(0, rank) if which == "top" else slice(s.shape[0] - rank, s.shape[0])
    return u[:, sl], s[sl], vh[sl]


def dampened_inverse(c: Tensor, start: float = 0.01, tol: float = 0.05, max_doublings: int = 20) -> tuple[Tensor, Tensor, float]:
    """(C + λI, (C + λI)⁻¹, λ/mean(diag C)) for a symmetric PSD C [d, d] (float64).

    λ starts at `start`·mean(diag C) and doubles until ‖(C+λI)(C+λI)⁻¹ − I‖_F < tol: CorDA's rule
    (Yang et al. 2024; peft's collect_eigens_for_layer), which keeps the inverse usable when C is
    rank-deficient (fewer calibration tokens than channels, dead channels).
    """
    c = c.double()
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    ref = float(torch.diagonal(c).mean()) or 1.0
    damp = start
    for _ in range(max_doublings):
        fixed = c + eye * ref * damp
        inv = torch.linalg.inv(fixed)
        if float(torch.dist(fixed @ inv, eye)) < tol:
            return fixed, inv, damp
        damp *= 2
    raise ValueError(f"covariance could not be inverted even with {damp:g}× its mean diagonal added")
