"""Pure tensor math used by calibration and the methods. Shapes in each docstring."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

try:  # Only the top eigenpairs are wanted; torch.linalg.eigh always computes all of them.
    from scipy.linalg import eigh as _scipy_eigh
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh
except ImportError:  # pragma: no cover - scipy is a dependency; keep a pure-torch path anyway
    _scipy_eigh = eigsh = None


class GramAccumulator:
    """Streaming n, Σ(x−c) and Σ(x−c)(x−c)ᵀ over rows x [n, d], about a shift c [d].

    Why a shift: the centred scatter from raw moments, XᵀX − (Σx)(Σx)ᵀ/n, cancels catastrophically
    when a channel's mean μ is large against its spread σ (fp32 products lose ~(μ/σ)²·1e-7 relative;
    measured for d = 64, 2048 rows: 0.8 % at μ/σ = 100, 70 % at 1e3, 8000 % at 1e4, with negative
    eigenvalues). About c ≈ μ the moments hold only the spread, and the centred scatter
    M − s sᵀ/n (`scatter()`) has nothing left to cancel: ~1e-7 at any μ/σ.

    c is the mean of the first non-empty batch, rounded to float32 (and kept as float64). Being
    float32-representable, x − c in float32 is correctly rounded, i.e. bit-equal to
    fl32(x.double() − c), at a fifth of the cost (0.07 vs 0.42 ms for [1024, 576]): only O(n·d)
    extra work per batch. The rounding of c itself is no error: c is simply the shift recorded.

    M is symmetric, so only its lower triangle is computed, as column panels of width ≤ 256:
    panel i gets Yᵀ[a:] Y[:, a:a+w] (Y = X − c), about (nb+1)/(2nb) of a full gemm's flops (measured
    0.65–0.7× the time of x.T @ x for d = 576 and 1536). Products accumulate in float32 in place
    (addmm_) and are flushed into float64 every `flush_every` updates, so rounding error stays
    ~1e-7 relative to Σ|x−c|² (fp32 over one flush window) instead of growing with the batches.

    Raw moments, when wanted, are the computed views `sum` (Σx) and `xtx` (XᵀX); see `raw_moments`.
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu", panel: int = 256, flush_every: int = 8):
        self.n, self.flush_every, self._pending = 0, flush_every, 0
        self.shift = torch.zeros(dim, dtype=torch.float64, device=device)  # c, float32-representable
        self._shift32 = torch.zeros(dim, dtype=torch.float32, device=device)
        self.sum_shifted = torch.zeros(dim, dtype=torch.float64, device=device)  # s = Σ(x−c)
        self._starts, widths = _panels(dim, panel)
        self._panels = [torch.zeros(dim - a, w, device=device) for a, w in zip(self._starts, widths)]
        self._lower = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, x: Tensor) -> Tensor:
        """Add rows x [n, d] (any float dtype); returns this update's Σ(x−c) [d] (float64)."""
        x = x.detach()
        if self.n == 0 and x.shape[0] > 0:  # M and s are still zero: any shift is consistent
            self._shift32 = (x.sum(0, dtype=torch.float64) / x.shape[0]).to(torch.float32)
            self.shift = self._shift32.double()
        # Correctly rounded x − c in float32 (see the class docstring).
        if x.dtype == torch.float32:
            y = x - self._shift32
        elif x.dtype == torch.float64:  # subtract before rounding: float64 inputs may carry more digits
            y = (x - self.shift).to(torch.float32)
        else:  # fp16/bf16 are exact in float32; subtracting in place on the copy beats a mixed-dtype x − c
            y = x.to(torch.float32).sub_(self._shift32)
        batch_sum = y.sum(0).double()  # fp32 sum of one batch: ~1e-7 relative, and 3× faster
        self.n += x.shape[0]
        self.sum_shifted += batch_sum
        for a, p in zip(self._starts, self._panels):
            p.addmm_(y[:, a:].T, y[:, a : a + p.shape[1]])
        self._pending += 1
        if self._pending >= self.flush_every:
            self._flush()
        return batch_sum

    def _flush(self) -> None:
        for a, p in zip(self._starts, self._panels):
            self._lower[a:, a : a + p.shape[1]] += p.double()
            p.zero_()
        self._pending = 0

    @property
    def m2(self) -> Tensor:
        """M = Σ(x−c)(x−c)ᵀ [d, d] float64, exactly symmetric. The accumulator's own buffer, mirrored
        from its lower triangle in place, one panel at a time, so no extra d×d temporaries are made
        (three of them were 57 MB for d = 1536)."""
        self._flush()
        return _mirror_lower_(self._lower, self._starts)

    def scatter(self) -> Tensor:
        """Centred scatter Σ(x−μ)(x−μ)ᵀ [d, d] float64 (a new tensor)."""
        return centered_scatter(self.m2, self.sum_shifted, self.n)

    @property
    def sum(self) -> Tensor:
        """Raw Σx [d] float64 (computed)."""
        return self.sum_shifted + self.n * self.shift

    @property
    def xtx(self) -> Tensor:
        """Raw XᵀX [d, d] float64 (computed, a new tensor; see `raw_moments`)."""
        return raw_moments(self.n, self.sum_shifted, self.m2, self.shift)[1]


def _panels(dim: int, panel: int = 256) -> tuple[list[int], list[int]]:
    """Starts and widths of ⌈dim/panel⌉ column panels of near-equal width covering [0, dim)."""
    nb = max(-(-dim // panel), 1)
    width = max(-(-dim // nb), 1)
    starts = list(range(0, dim, width))
    return starts, [min(width, dim - a) for a in starts]


def _mirror_lower_(full: Tensor, starts: list[int] | None = None) -> Tensor:
    """Copy the lower triangle of full [d, d] onto its upper one, in place, panel by panel (temporaries
    of at most one diagonal block). Returns full, now exactly symmetric."""
    d = full.shape[0]
    if starts is None:
        starts = _panels(d)[0]
    for a, b in zip(starts, starts[1:] + [d]):
        diag = full[a:b, a:b]
        diag.copy_(torch.tril(diag) + torch.tril(diag, -1).T)
        full[a:b, b:] = full[b:, a:b].T
    return full


def reshift(n: int, s: Tensor, m2: Tensor, c_old: Tensor, c_new: Tensor, *, inplace: bool = False) -> tuple[Tensor, Tensor]:
    """Moments about c_old re-expressed about c_new: (Σ(x−c'), Σ(x−c')(x−c')ᵀ), with δ = c − c',

        Σ(x−c')         = s + nδ
        Σ(x−c')(x−c')ᵀ  = M + δsᵀ + sδᵀ + nδδᵀ  (= M + uδᵀ + δuᵀ, u = s + nδ/2).

    n rows; s [d], m2 [d, d] (M), c_old, c_new [d], all float64. Exact in exact arithmetic. In float64
    the added terms are of size n|δ|², so a new shift far from the mean (|μ − c'| ≫ σ) brings back
    cancellation, but at float64 precision: ~1e-16·(|μ − c'|/σ)² relative on the centred scatter.
    The result is exactly symmetric (the rank-2 update is mirrored from the lower triangle).
    inplace=True updates m2 (and returns it) instead of allocating a new [d, d]; s is never modified.
    """
    delta = c_old - c_new
    u = s + (0.5 * n) * delta
    m = m2 if inplace else m2.clone()
    m.addr_(u, delta).addr_(delta, u)
    return s + n * delta, _mirror_lower_(m)


def raw_moments(n: int, s: Tensor, m2: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    """(Σx [d], XᵀX [d, d]) from moments about `shift`: `reshift` to 0. New tensors, float64."""
    return reshift(n, s, m2, shift, torch.zeros_like(shift))


def centered_scatter(m2: Tensor, s: Tensor, n: int) -> Tensor:
    """Σ(x−μ)(x−μ)ᵀ = M − s sᵀ/n for moments about any shift c: M = Σ(x−c)(x−c)ᵀ [d, d], s = Σ(x−c)
    [d] (c = 0 gives the raw XᵀX − (Σx)(Σx)ᵀ/n, which cancels when |μ| ≫ σ; see GramAccumulator)."""
    return torch.addr(m2, s, s, alpha=-1.0 / max(n, 1))


def _fix_signs(vecs: Tensor) -> Tensor:
    """Make each row's largest-magnitude entry positive, so results are deterministic. vecs [k, d]."""
    idx = vecs.abs().argmax(dim=1)
    signs = torch.sign(vecs.gather(1, idx[:, None]))
    signs[signs == 0] = 1
    return vecs * signs


def _top_basis_cpu(c32: Tensor, m: int) -> np.ndarray:
    """Approximate top-m eigenvectors [d, m] of a float32 symmetric matrix: Lanczos (ARPACK), else syevr.

    Measured here for d = 1536, m = 20: full float64 eigh 630 ms, syevr subset 81 ms, Lanczos 17 ms.
    The matrix-vector products run in torch; scipy's OpenBLAS is held to one thread meanwhile,
    because its spinning threads and torch's OpenMP threads slowed each other ~3× on 2 cores.
    """
    from scipy.sparse.linalg import LinearOperator
    from threadpoolctl import threadpool_limits

    d = c32.shape[0]
    v0 = np.random.default_rng(0).standard_normal(d).astype(np.float32)  # fixed start: deterministic
    op = LinearOperator((d, d), matvec=lambda v: (c32 @ torch.from_numpy(np.ascontiguousarray(v, np.float32).reshape(-1))).numpy(), dtype=np.float32)
    with threadpool_limits(1, user_api="blas"):
        try:
            return eigsh(op, k=m, which="LA", v0=v0, tol=0)[1]
        except ArpackNoConvergence:
            return _scipy_eigh(c32.numpy(), subset_by_index=[d - m, d - 1], driver="evr")[1]


def top_eigh(c: Tensor, k: int, oversample: int = 4) -> tuple[Tensor, Tensor]:
    """Top-k eigenpairs of a symmetric matrix c [d, d] → (values [k] descending, vectors [k, d] rows).

    Small matrices: one float64 eigh. Large ones on CPU: a float32 basis of the top k+oversample
    pairs, then one float64 subspace-iteration step and Rayleigh–Ritz on it, which brings the
    top k to float64 accuracy (checked against torch.linalg.eigh in the tests).
    """
    d = c.shape[0]
    k = min(k, d)
    if k <= 0:
        return c.new_zeros(0, dtype=torch.float64), c.new_zeros(0, d, dtype=torch.float64)
    c64 = c.double()
    m = min(k + oversample, d)
    if c.device.type == "cpu" and eigsh is not None and d > 256 and m < d // 4:
        v = torch.from_numpy(_top_basis_cpu(c64.float(), m)).double()
        basis = torch.linalg.qr(c64 @ v).Q  # one float64 power step, [d, m]
        vals, small = torch.linalg.eigh(basis.T @ c64 @ basis)
        vals, vecs = vals[m - k :], basis @ small[:, m - k :]
    else:
        vals, vecs = torch.linalg.eigh(c64)
        vals, vecs = vals[d - k :], vecs[:, d - k :]
    vals, vecs = vals.flip(0), vecs.flip(1).T.contiguous()
    return vals.clamp_min(0), _fix_signs(vecs)


def subspace_cos2(a: Tensor, b: Tensor) -> float:
    """Mean squared cosine of the principal angles between the row spaces of a [k1, d] and b [k2, d]."""
    if a.shape[0] == 0 or b.shape[0] == 0:
        return float("nan")
    qa = torch.linalg.qr(a.double().T).Q
    qb = torch.linalg.qr(b.double().T).Q
    s = torch.linalg.svdvals(qa.T @ qb)
    return float((s**2).sum() / min(a.shape[0], b.shape[0]))
