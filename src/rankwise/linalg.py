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
    """Streaming n, Σx and XᵀX over rows x [n, d].

    XᵀX is symmetric, so only its lower triangle is computed, as column panels of width ≤ 256:
    panel i gets X[:, a:]ᵀ X[:, a:a+w], about (nb+1)/(2nb) of a full gemm's flops (measured 0.65–0.7×
    the time of x.T @ x for d = 576 and 1536). Products accumulate in float32 in place (addmm_) and
    are flushed into float64 every `flush_every` updates, so rounding error stays ~1e-7 relative
    (fp32 over one flush window) instead of growing with the number of batches.
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu", panel: int = 256, flush_every: int = 8):
        self.n, self.flush_every, self._pending = 0, flush_every, 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        nb = -(-dim // panel)
        width = -(-dim // nb)  # nb panels of near-equal width
        self._starts = list(range(0, dim, width))
        self._panels = [torch.zeros(dim - a, min(width, dim - a), device=device) for a in self._starts]
        self._lower = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, x: Tensor) -> Tensor:
        """Add rows x [n, d] (any float dtype); returns this update's Σx [d] (float64)."""
        x = x.detach().to(torch.float32)
        batch_sum = x.sum(0).double()  # fp32 sum of one batch: ~1e-7 relative, and 3× faster
        self.n += x.shape[0]
        self.sum += batch_sum
        for a, p in zip(self._starts, self._panels):
            p.addmm_(x[:, a:].T, x[:, a : a + p.shape[1]])
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
    def xtx(self) -> Tensor:
        """XᵀX [d, d] float64, symmetric. Mirrors the lower triangle in place, one panel at a time,
        so no extra d×d temporaries are made (three of them were 57 MB for d = 1536)."""
        self._flush()
        full = self._lower
        for a, p in zip(self._starts, self._panels):
            b = a + p.shape[1]
            diag = full[a:b, a:b]
            diag.copy_(torch.tril(diag) + torch.tril(diag, -1).T)
            full[a:b, b:] = full[b:, a:b].T
        return full


def centered_scatter(xtx: Tensor, total: Tensor, n: int) -> Tensor:
    """Σ(x-μ)(x-μ)ᵀ = XᵀX − (Σx)(Σx)ᵀ/n. xtx [d, d], total [d] → [d, d] (float64)."""
    return torch.addr(xtx, total, total, alpha=-1.0 / max(n, 1))


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
