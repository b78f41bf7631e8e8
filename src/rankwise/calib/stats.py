"""Stats: per-module streaming input statistics (n and moments about a shift, or top eigenpairs)."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..errors import CalibrationError
from ..numerics.linalg import centered_scatter, raw_moments, reshift, top_eigh


def _spectrum_of(scatter: Tensor, k: int) -> tuple[Tensor, Tensor, float]:
    """(top-k eigenvalues, eigenvectors [k, d], trace) of a centred scatter matrix."""
    vals, vecs = top_eigh(scatter, k)
    return vals, vecs, float(torch.diagonal(scatter).sum())


@dataclass
class LayerStats:
    """Statistics of one module's inputs x [n, d], as moments about a shift c (float64):
    n, shift c [d], sum_shifted s = Σ(x−c) [d], m2 M = Σ(x−c)(x−c)ᵀ [d, d].

    With c near the mean, the centred scatter M − s sᵀ/n does not cancel (raw XᵀX − (Σx)(Σx)ᵀ/n
    loses everything in fp32 once a channel's mean/std passes ~1e3; see GramAccumulator). The raw
    moments stay available as computed views: `sum` (Σx) and `xtx` (XᵀX, a new [d, d] per access).
    `from_raw(n, sum, xtx)` builds statistics from raw moments (shift 0).

    After `summarize_(k)` only the top-k eigenpairs of the centred scatter and its trace remain
    (m2 is None): enough for EVA and a fraction of the memory, but no longer mergeable.
    """

    n: int
    shift: Tensor  # c [d] float64
    sum_shifted: Tensor  # Σ(x−c) [d] float64
    m2: Tensor | None = None  # Σ(x−c)(x−c)ᵀ [d, d] float64
    eigvals: Tensor | None = None  # [k] descending, of Σ(x-μ)(x-μ)ᵀ
    eigvecs: Tensor | None = None  # [k, d]
    trace: float | None = None  # trace of Σ(x-μ)(x-μ)ᵀ
    abs_sum: Tensor | None = None  # Σ|x| [d] float64, kept when calibration observes "abs" (AWQ)
    _spectrum: tuple | None = field(default=None, repr=False, compare=False)  # largest top-k computed so far

    @classmethod
    def from_raw(cls, n: int, sum: Tensor, xtx: Tensor | None = None, **kw) -> LayerStats:
        """From raw Σx [d] and XᵀX [d, d] (shift 0; the centred scatter then cancels for large means)."""
        sum = sum.double()
        return cls(n, torch.zeros_like(sum), sum, None if xtx is None else xtx.double(), **kw)

    @property
    def dim(self) -> int:
        return self.shift.shape[0]

    @property
    def sum(self) -> Tensor:
        """Raw Σx [d] float64 (computed)."""
        return self.sum_shifted + self.n * self.shift

    @property
    def xtx(self) -> Tensor | None:
        """Raw XᵀX [d, d] float64 (computed: a new tensor per access), or None once summarized."""
        if self.m2 is None:
            return None
        return raw_moments(self.n, self.sum_shifted, self.m2, self.shift)[1]

    @property
    def abs_mean(self) -> Tensor:
        """mean |x| per channel [d] float64 (AWQ's activation magnitude)."""
        if self.abs_sum is None:
            raise CalibrationError("these statistics hold no per-channel |x| (calibrate with observe=('moments', 'abs'))")
        return self.abs_sum / max(self.n, 1)

    @property
    def mean(self) -> Tensor:
        return self.shift + self.sum_shifted / max(self.n, 1)

    def scatter(self) -> Tensor:
        """Centred scatter Σ(x−μ)(x−μ)ᵀ [d, d] float64 (a new tensor)."""
        if self.m2 is None:
            raise CalibrationError("these statistics were summarized; the full XᵀX is gone (calibrate with keep='full')")
        return centered_scatter(self.m2, self.sum_shifted, self.n)

    def spectrum(self, k: int) -> tuple[Tensor, Tensor, float]:
        """(eigenvalues [k'], eigenvectors [k', d], total variance) of the centred scatter, k' = min(k, d)."""
        if self.m2 is None:
            if self.eigvals is None or self.eigvals.shape[0] < min(k, self.dim):
                have = 0 if self.eigvals is None else self.eigvals.shape[0]
                raise CalibrationError(f"statistics keep {have} components but {k} were asked for; calibrate with a larger keep")
            return self.eigvals[:k], self.eigvecs[:k], float(self.trace)
        k = min(k, self.dim)
        if self._spectrum is None or self._spectrum[0].shape[0] < k:
            self._spectrum = _spectrum_of(self.scatter(), k)
        vals, vecs, trace = self._spectrum
        return vals[:k], vecs[:k], trace

    def summarize_(self, k: int) -> None:
        """Replace M by the top-k eigenpairs and trace of the centred scatter (M is centred in place, then dropped)."""
        if self.m2 is None:
            return
        s = self.sum_shifted
        centred = self.m2.addr_(s, s, alpha=-1.0 / max(self.n, 1))  # scatter(), in place
        self.eigvals, self.eigvecs, self.trace = _spectrum_of(centred, k)
        self.m2, self._spectrum = None, None

    def reshift_(self, shift: Tensor) -> None:
        """Re-express the moments about another shift [d], in place (see linalg.reshift)."""
        shift = shift.to(self.shift)
        if self.m2 is None:
            raise CalibrationError("summarized statistics cannot be re-expressed; only the eigenpairs are left")
        if not torch.equal(shift, self.shift):
            self.sum_shifted, self.m2 = reshift(self.n, self.sum_shifted, self.m2, self.shift, shift, inplace=True)
            self.shift = shift

    def __add__(self, other: LayerStats) -> LayerStats:
        """Statistics of the union of both row sets, about self's shift (other's where self has no rows)."""
        if self.m2 is None or other.m2 is None:
            raise CalibrationError("summarized statistics cannot be merged; merge before summarizing")
        if self.n == 0 and other.n > 0:
            return other + self
        if torch.equal(other.shift, self.shift):
            s, m = other.sum_shifted, other.m2.clone()
        else:
            s, m = reshift(other.n, other.sum_shifted, other.m2, other.shift, self.shift)
        abs_sum = None if self.abs_sum is None or other.abs_sum is None else self.abs_sum + other.abs_sum
        return LayerStats(self.n + other.n, self.shift.clone(), self.sum_shifted + s, m.add_(self.m2), abs_sum=abs_sum)


@dataclass
class Stats:
    """Statistics for every target module. Modules that read the same tensor share one entry."""

    layers: dict[str, LayerStats] = field(default_factory=dict)  # canonical name -> stats
    aliases: dict[str, str] = field(default_factory=dict)  # module name -> canonical name
    order: list[str] = field(default_factory=list)  # every target module, in model order
    # Σ ∂(summed task loss)/∂W [out, in] float32 per module (every module: weights differ where inputs are
    # shared) and the scored tokens it sums over (calibrate_gradients); merged by sum like the moments.
    grads: dict[str, Tensor] = field(default_factory=dict)
    grad_count: int = 0
    unrouted: list[str] = field(default_factory=list)  # MoE expert layers no calibration token was routed to

    def gradient(self, name: str) -> Tensor:
        """The mean-loss weight gradient G = Σ∂L/∂W / tokens [out, in] of module `name`."""
        if name not in self.grads:
            raise CalibrationError(f"no gradient statistics for {name}: calibrate with gradients "
                                   "(rankwise.calib.gradients.calibrate_gradients, or a method that declares them)")
        return self.grads[name] / max(self.grad_count, 1)

    def __getitem__(self, name: str) -> LayerStats:
        return self.layers[self.aliases.get(name, name)]

    def __contains__(self, name: str) -> bool:
        return name in self.order

    def groups(self) -> dict[str, list[str]]:
        """canonical name -> all modules that share its input (canonical first); unrouted experts left out."""
        out: dict[str, list[str]] = {}
        for name in self.order:
            if name in self.unrouted:
                continue
            out.setdefault(self.aliases.get(name, name), []).append(name)
        return out

    def __add__(self, other: Stats) -> Stats:
        if self.order != other.order or self.aliases != other.aliases:
            raise CalibrationError("cannot merge statistics of different target sets")
        if set(self.grads) != set(other.grads):
            raise CalibrationError("cannot merge statistics with gradients of different modules")
        return Stats({k: v + other.layers[k] for k, v in self.layers.items()}, dict(self.aliases), list(self.order),
                     {k: g + other.grads[k] for k, g in self.grads.items()}, self.grad_count + other.grad_count)

    def all_reduce_(self, names: list[str] | None = None) -> None:
        """Sum n, Σ(x−c) and M across torch.distributed ranks (no raw activations leave a rank).

        The ranks' shifts differ, so every rank first re-expresses its moments about a common one:
        the n-weighted mean of the ranks' shifts (close to the global mean; a rank with no rows
        does not pull it), broadcast from rank 0 so that it is bit-identical everywhere.
        """
        from .. import distributed as dist

        if not dist.active():
            return
        for key in names if names is not None else list(self.layers):
            st = self.layers[key]
            if st.m2 is None:
                raise CalibrationError("summarized statistics cannot be merged across ranks; all_reduce_ before summarize_")
            head = torch.cat([st.shift.new_tensor([float(st.n)]), st.shift * st.n])  # [1 + d]: n, n·c
            dist.all_reduce_sum_(head)
            total = float(head[0])
            common = head[1:] / total if total > 0 else st.shift.clone()
            dist.broadcast_(common, src=0)
            st.reshift_(common)
            for t in (st.sum_shifted, st.m2, st.abs_sum):
                if t is not None:
                    dist.all_reduce_sum_(t)
            st.n, st._spectrum = int(total), None
        if self.grads and names is None:  # per block (names given) only the moments: gradients come whole
            self.all_reduce_grads_()

    def all_reduce_grads_(self) -> None:
        """Sum the gradient statistics and their token count across ranks."""
        from .. import distributed as dist

        if not dist.active():
            return
        for g in self.grads.values():
            dist.all_reduce_sum_(g)
        count = torch.tensor([float(self.grad_count)], dtype=torch.float64)
        dist.all_reduce_sum_(count)
        self.grad_count = int(count.item())

    def save(self, path: str | os.PathLike) -> None:
        """Write to a safetensors file (atomically: temp name, then rename)."""
        tensors = {}
        for name, st in self.layers.items():
            for key in ("shift", "sum_shifted", "m2", "eigvals", "eigvecs", "abs_sum"):
                if getattr(st, key) is not None:
                    tensors[f"{name}::{key}"] = getattr(st, key).contiguous()
        for name, g in self.grads.items():
            tensors[f"{name}::grad"] = g.contiguous()
        meta = {
            "format": 2,  # 2: moments about a shift (shift, sum_shifted, m2); 1: raw (sum, xtx)
            "order": self.order,
            "aliases": self.aliases,
            "n": {k: v.n for k, v in self.layers.items()},
            "trace": {k: v.trace for k, v in self.layers.items()},
            "grad_count": self.grad_count,
            "unrouted": self.unrouted,
        }
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent or ".")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"rankwise_stats": json.dumps(meta)})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> Stats:
        """Read a file written by `save` (also the older raw format: sum and xtx, read with shift 0)."""
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("rankwise_stats", "null") or "null")
        if meta is None:
            raise CalibrationError(f"{path} is a safetensors file but holds no rankwise statistics")
        tensors = load_file(str(path))
        layers = {}
        for name, n in meta["n"].items():
            kw = dict(eigvals=tensors.get(f"{name}::eigvals"), eigvecs=tensors.get(f"{name}::eigvecs"), trace=meta["trace"][name],
                      abs_sum=tensors.get(f"{name}::abs_sum"))
            if f"{name}::shift" in tensors:
                layers[name] = LayerStats(n, tensors[f"{name}::shift"], tensors[f"{name}::sum_shifted"], tensors.get(f"{name}::m2"), **kw)
            else:
                layers[name] = LayerStats.from_raw(n, tensors[f"{name}::sum"], tensors.get(f"{name}::xtx"), **kw)
        grads = {k.removesuffix("::grad"): t for k, t in tensors.items() if k.endswith("::grad")}
        return cls(layers, meta["aliases"], meta["order"], grads, int(meta.get("grad_count", 0)),
                   list(meta.get("unrouted", [])))
