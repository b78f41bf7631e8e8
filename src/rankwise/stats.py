"""Stats: per-module streaming input statistics (n, Σx, XᵀX or its top eigenpairs)."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .errors import CalibrationError
from .linalg import centered_scatter, top_eigh


def _spectrum_of(scatter: Tensor, k: int) -> tuple[Tensor, Tensor, float]:
    """(top-k eigenvalues, eigenvectors [k, d], trace) of a centred scatter matrix."""
    vals, vecs = top_eigh(scatter, k)
    return vals, vecs, float(torch.diagonal(scatter).sum())


@dataclass
class LayerStats:
    """Statistics of one module's inputs: token count n, sum [d], XᵀX [d, d] (float64).

    After `summarize_(k)` only the top-k eigenpairs of the centred scatter and its trace remain:
    enough for EVA and a fraction of the memory, but no longer mergeable.
    """

    n: int
    sum: Tensor
    xtx: Tensor | None = None
    eigvals: Tensor | None = None  # [k] descending, of Σ(x-μ)(x-μ)ᵀ
    eigvecs: Tensor | None = None  # [k, d]
    trace: float | None = None  # trace of Σ(x-μ)(x-μ)ᵀ
    _spectrum: tuple | None = field(default=None, repr=False, compare=False)  # largest top-k computed so far

    @property
    def dim(self) -> int:
        return self.sum.shape[0]

    @property
    def mean(self) -> Tensor:
        return self.sum / max(self.n, 1)

    def scatter(self) -> Tensor:
        if self.xtx is None:
            raise CalibrationError("these statistics were summarized; the full XᵀX is gone (calibrate with keep='full')")
        return centered_scatter(self.xtx, self.sum, self.n)

    def spectrum(self, k: int) -> tuple[Tensor, Tensor, float]:
        """(eigenvalues [k'], eigenvectors [k', d], total variance) of the centred scatter, k' = min(k, d)."""
        if self.xtx is None:
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
        """Replace XᵀX by its top-k centred eigenpairs and trace (XᵀX is centred in place, then dropped)."""
        if self.xtx is None:
            return
        centred = self.xtx.addr_(self.sum, self.sum, alpha=-1.0 / max(self.n, 1))  # scatter(), in place
        self.eigvals, self.eigvecs, self.trace = _spectrum_of(centred, k)
        self.xtx = None

    def __add__(self, other: LayerStats) -> LayerStats:
        if self.xtx is None or other.xtx is None:
            raise CalibrationError("summarized statistics cannot be merged; merge before summarizing")
        return LayerStats(self.n + other.n, self.sum + other.sum, self.xtx + other.xtx)


@dataclass
class Stats:
    """Statistics for every target module. Modules that read the same tensor share one entry."""

    layers: dict[str, LayerStats] = field(default_factory=dict)  # canonical name -> stats
    aliases: dict[str, str] = field(default_factory=dict)  # module name -> canonical name
    order: list[str] = field(default_factory=list)  # every target module, in model order

    def __getitem__(self, name: str) -> LayerStats:
        return self.layers[self.aliases.get(name, name)]

    def __contains__(self, name: str) -> bool:
        return name in self.order

    def groups(self) -> dict[str, list[str]]:
        """canonical name -> all modules that share its input (canonical first)."""
        out: dict[str, list[str]] = {}
        for name in self.order:
            out.setdefault(self.aliases.get(name, name), []).append(name)
        return out

    def __add__(self, other: Stats) -> Stats:
        if self.order != other.order or self.aliases != other.aliases:
            raise CalibrationError("cannot merge statistics of different target sets")
        return Stats({k: v + other.layers[k] for k, v in self.layers.items()}, dict(self.aliases), list(self.order))

    def all_reduce_(self, names: list[str] | None = None) -> None:
        """Sum n, Σx and XᵀX across torch.distributed ranks (no raw activations leave a rank)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        for key in names if names is not None else list(self.layers):
            st = self.layers[key]
            n = torch.tensor([float(st.n)], dtype=torch.float64, device=st.sum.device)
            for t in (n, st.sum, st.xtx):
                dist.all_reduce(t)
            st.n = int(n.item())

    def save(self, path: str | os.PathLike) -> None:
        """Write to a safetensors file (atomically: temp name, then rename)."""
        tensors = {}
        for name, st in self.layers.items():
            tensors[f"{name}::sum"] = st.sum.contiguous()
            for key in ("xtx", "eigvals", "eigvecs"):
                if getattr(st, key) is not None:
                    tensors[f"{name}::{key}"] = getattr(st, key).contiguous()
        meta = {
            "order": self.order,
            "aliases": self.aliases,
            "n": {k: v.n for k, v in self.layers.items()},
            "trace": {k: v.trace for k, v in self.layers.items()},
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
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("rankwise_stats", "null") or "null")
        if meta is None:
            raise CalibrationError(f"{path} is a safetensors file but holds no rankwise statistics")
        tensors = load_file(str(path))
        layers = {
            name: LayerStats(
                n=n,
                sum=tensors[f"{name}::sum"],
                xtx=tensors.get(f"{name}::xtx"),
                eigvals=tensors.get(f"{name}::eigvals"),
                eigvecs=tensors.get(f"{name}::eigvecs"),
                trace=meta["trace"][name],
            )
            for name, n in meta["n"].items()
        }
        return cls(layers, meta["aliases"], meta["order"])
