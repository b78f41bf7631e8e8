"""Low-rank factorizations: LoRA factors from an SVD of W, and the output-weighted rank-k fit.

Every SVD-based init here writes W ≈ U_r S_r V_rᵀ as B·A with the singular values split evenly and the
adapter's scale s divided out (so that s·B·A is the chosen part of W): A = diag(√(S_r/s)) V_rᵀ [r, in],
B = U_r diag(√(S_r/s)) [out, r] (PiSSA, Meng et al. 2024, Sec. 3; peft's pissa_init does the same).
`lowrank_fit` is the rank-k approximation that is optimal for the layer's outputs on calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class LowRankFit:
    """The S-weighted truncated SVD of one weight: W·S = U·diag(σ)·Vᵀ, W_k = U_k·diag(σ_k)·V_kᵀ·S⁻¹.

    `errors[k]` = Σ_{j≥k} σ_j² = ‖(W − W_k)·S‖²_F, the output error of the rank-k fit summed over the
    calibration rows (S·Sᵀ = XᵀX), for every k from 0 (errors[0] = ‖W·S‖²) to r (0); `factors(k)`
    gives B [out, k], A [k, in] with B·A = W_k.
    """

    u: Tensor  # [out, r]
    sigma: Tensor  # [r], descending
    vt_sinv: Tensor  # [r, in]: V_rᵀ·S⁻¹
    errors: Tensor  # [r + 1]
    floor: float  # eigenvalues of XᵀX below floor·max were raised to it (0 when unweighted)

    def factors(self, k: int) -> tuple[Tensor, Tensor]:
        """(A [k, in], B [out, k]) with B·A the optimal rank-k fit; the singular values go to B."""
        if not 0 <= k <= self.sigma.shape[0]:
            raise ValueError(f"rank {k} is outside 0…{self.sigma.shape[0]} for this {tuple(self.u.shape[:1])}×"
                             f"{self.vt_sinv.shape[1]} weight")
        return self.vt_sinv[:k], self.u[:, :k] * self.sigma[:k]

    def weight(self, k: int) -> Tensor:
        a, b = self.factors(k)
        return b @ a

    def balanced_factors(self, k: int, dtype: torch.dtype = torch.float16) -> tuple[Tensor, Tensor]:
        """(A [k, in], B [out, k]) float32 with B·A ≈ W_k, each component's scale split evenly between its
        row of A and column of B (`balance`), rounded to values `dtype` holds exactly: a float16 copy of
        the factors is then lossless, and their storage is 2 bytes per entry."""
        return balance(*self.factors(k), dtype)

    def output_errors(self, gram: Tensor) -> Tensor:
        """[r + 1]: tr((W − W_k)·G·(W − W_k)ᵀ) for every k, under any PSD G [in, in] (e.g. the true XᵀX/n
        when this fit was weighted by something else, as plain SVD or ASVD are). Exact when the fit is
        full-rank (k=None): W − W_k = Σ_{j≥k} u_j σ_j v_jᵀS⁻¹ with orthonormal u_j, so the error is
        Σ_{j≥k} σ_j² · (v_jᵀS⁻¹ G S⁻ᵀv_j), a cumulative sum."""
        if self.sigma.shape[0] < min(self.u.shape[0], self.vt_sinv.shape[1]):
            raise ValueError("output_errors needs the full fit (lowrank_fit with k=None): a truncated one lacks the tail")
        v = self.vt_sinv.to(gram.device, torch.float64)
        m = ((v @ gram.double()) * v).sum(1)  # [r]: v_jᵀS⁻¹ G S⁻ᵀ v_j
        return tail_sums(self.sigma.double() * m.clamp_min(0).sqrt())


def balance(a: Tensor, b: Tensor, dtype: torch.dtype = torch.float16) -> tuple[Tensor, Tensor]:
    """(A′ [k, in], B′ [out, k]) float32 with B′·A′ = B·A and ‖A′ᵢ‖ = ‖B′ᵢ‖ = √(‖Aᵢ‖·‖Bᵢ‖) for each
    component i, rounded to values `dtype` holds exactly. Only the product's size bounds the factors'
    range: a whitened fit (A = VᵀS⁻¹, huge where the inputs are small) no longer overflows float16.
    ValueError when even balanced factors do not fit `dtype`."""
    na, nb = a.float().norm(dim=1), b.float().norm(dim=0)
    c = (nb / na).sqrt()
    c = torch.where(torch.isfinite(c) & (c > 0), c, torch.ones_like(c))  # a zero component: leave it as it is
    a2, b2 = (a.float() * c[:, None]).to(dtype).float(), (b.float() / c[None, :]).to(dtype).float()
    if not (torch.isfinite(a2).all() and torch.isfinite(b2).all()):
        big = float(torch.maximum(na, nb).max())
        raise ValueError(f"low-rank factors of size {big:.3g} do not fit {dtype} even balanced")
    return a2, b2


def weighting(gram: Tensor, floor: float = 1e-6) -> tuple[Tensor, Tensor, int]:
    """(S, S⁻¹, number of floored eigenvalues) with S·Sᵀ = XᵀX, from an eigendecomposition (float64).

    Why an eigendecomposition and not Cholesky: XᵀX is singular whenever a layer saw fewer calibration
    tokens than it has inputs, or has dead channels, and Cholesky then fails. With XᵀX = QΛQᵀ,
    S = Q·Λ^½ and S⁻¹ = Λ^-½·Qᵀ; eigenvalues below floor·max(Λ) are raised to that floor, so S⁻¹
    amplifies by at most floor^-½ (1e3 at the default) and the directions the data never visits keep
    a small weight instead of an infinite back-map.
    """
    lam, q = torch.linalg.eigh(gram.double())
    top = float(lam.max().clamp_min(1e-300))
    low = lam < floor * top
    lam = lam.clamp_min(floor * top)
    root = lam.sqrt()
    return q * root[None, :], (q / root[None, :]).T, int(low.sum())


def weighted_svdvals(w: Tensor, s: Tensor | None) -> Tensor:
    """σ of W·S [min(out, in)], descending (S from `weighting`; None: of W): the singular values alone,
    for error curves, Σ_{j≥k} σ_j² being the rank-k fit's error (far cheaper than the full SVD)."""
    return torch.linalg.svdvals(w.double() if s is None else w.double() @ s)


def tail_sums(sigma: Tensor) -> Tensor:
    """[r + 1]: Σ_{j≥k} σ_j² for k = 0…r."""
    tail = torch.flip(torch.cumsum(torch.flip(sigma.double() ** 2, [0]), 0), [0])
    return torch.cat([tail, tail.new_zeros(1)])


def lowrank_fit(w: Tensor, gram: Tensor | None = None, k: int | None = None, floor: float = 1e-6) -> LowRankFit:
    """The best rank-k approximation of W [out, in] under the output error on calibration inputs X
    (Eckart–Young on W·S, S·Sᵀ = XᵀX = `gram` [in, in]; plain SVD when gram is None), for every k ≤ `k`
    (default: all) at once. The identity behind ASVD, SVD-LLM (Wang et al. 2024: S from XᵀX) and
    activation-aware error compensation (EoRA). Computed in float64.
    """
    w = w.double()
    if gram is None:
        s = s_inv = None
        ws = w
    else:
        s, s_inv, _ = weighting(gram, floor)
        ws = w @ s
    u, sigma, vh = torch.linalg.svd(ws, full_matrices=False)
    r = sigma.shape[0] if k is None else min(k, sigma.shape[0])
    errors = tail_sums(sigma)[: r + 1]
    vt = vh[:r] if s_inv is None else vh[:r] @ s_inv
    return LowRankFit(u[:, :r], sigma[:r], vt, errors, 0.0 if gram is None else floor)
