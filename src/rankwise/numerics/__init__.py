"""Pure tensor math: streaming moments, centred scatter, top eigenpairs (no modules, no models)."""

from .linalg import GramAccumulator, centered_scatter, reshift, subspace_cos2, top_eigh

__all__ = ["GramAccumulator", "centered_scatter", "reshift", "subspace_cos2", "top_eigh"]
