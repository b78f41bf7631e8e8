"""Pure tensor math used by calibration and the methods. Shapes in each docstring."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

try:  # BLAS syrk computes only one triangle of XᵀX: half the flops of a matmul on CPU.
    from scipy.linalg import blas as _blas
    from scipy.linalg import eigh as _scipy_eigh
except ImportError:  # pragma: no cover - scipy is a dependency; keep a pure-torch path anyway
    _blas = _scipy_eigh = None


class GramAccumulator:
    """Streaming n, Σx and XᵀX over rows x [n, d]; float32 products summed in float64.

    Each update's product is exact to fp32 rounding (relative ~1e-7·sqrt(n)); the running sum in
    float64 keeps the error from growing with the number of updates.
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self._xtx = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self._upper_only = False

    def update(self, x: Tensor) -> None:
        """Add rows x [n, d] (any float dtype)."""
        x = x.detach().to(torch.float32)
        self.n += x.shape[0]
        self.sum += x.sum(0, dtype=torch.float64)
        if x.device.type == "cpu" and _blas is not None and x.shape[0] > 0:
            a = np.ascontiguousarray(x.numpy()).T  # [d, n] Fortran-ordered view, no copy
            self._xtx += torch.from_numpy(_blas.ssyrk(1.0, a, trans=0, lower=0))
            self._upper_only = True
        else:
            self._xtx += (x.T @ x).double()

    def xtx(self) -> Tensor:
        """XᵀX [d, d] float64, symmetric."""
        if self._upper_only:
            upper = torch.triu(self._xtx)
            return upper + torch.triu(upper, 1).T
        return self._xtx


def centered_scatter(xtx: Tensor, total: Tensor, n: int) -> Tensor:
    """Σ(x-μ)(x-μ)ᵀ = XᵀX − (Σx)(Σx)ᵀ/n. xtx [d, d], total [d] → [d, d] (float64)."""
    return xtx - torch.outer(total, total) / max(n, 1)


def _fix_signs(vecs: Tensor) -> Tensor:
    """Make each row's largest-magnitude entry positive, so results are deterministic. vecs [k, d]."""
    idx = vecs.abs().argmax(dim=1)
    signs = torch.sign(vecs.gather(1, idx[:, None]))
    signs[signs == 0] = 1
    return vecs * signs


def top_eigh(c: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k eigenpairs of a symmetric matrix c [d, d] → (values [k] descending, vectors [k, d] rows).

    On CPU only the k wanted pairs are computed (LAPACK syevr), far cheaper than a full eigh.
    """
    d = c.shape[0]
    k = min(k, d)
    if k <= 0:
        return c.new_zeros(0), c.new_zeros(0, d)
    if c.device.type == "cpu" and _scipy_eigh is not None and k < d:
        w, v = _scipy_eigh(c.double().numpy(), subset_by_index=[d - k, d - 1], driver="evr")
        vals, vecs = torch.from_numpy(w.copy()), torch.from_numpy(v.copy())
    else:
        vals, vecs = torch.linalg.eigh(c.double())
        vals, vecs = vals[d - k :], vecs[:, d - k :]
    vals, vecs = vals.flip(0), vecs.flip(1).T.contiguous()
    return vals.clamp_min(0).to(c.device), _fix_signs(vecs).to(c.device)


def subspace_cos2(a: Tensor, b: Tensor) -> float:
    """Mean squared cosine of the principal angles between the row spaces of a [k1, d] and b [k2, d]."""
    if a.shape[0] == 0 or b.shape[0] == 0:
        return float("nan")
    qa = torch.linalg.qr(a.double().T).Q
    qb = torch.linalg.qr(b.double().T).Q
    s = torch.linalg.svdvals(qa.T @ qb)
    return float((s**2).sum() / min(a.shape[0], b.shape[0]))
