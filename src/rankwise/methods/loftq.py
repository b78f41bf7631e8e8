"""LoftQ (Li et al. 2023, arXiv:2310.08659): start the adapter at the quantization error, re-quantizing
the base as it goes, so that Q + s·B·A is as close to the original W as rank r allows."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from ..errors import PlanError
from ..numerics.loftq import loftq
from ..numerics.lowrank import weighting
from ..numerics.quantize import dequantize, gptq, quantize, rtn
from ..quant.linear import QuantLinear
from . import InitConfig, LayerInit, register_init


class LoftQConfig(InitConfig):
    iters: int = Field(5, ge=0, description="alternation rounds T (0: only fit B·A to W − Q, the base kept as it is)")


def bare_copy(q: QuantLinear, codes: Tensor | None = None, scale: Tensor | None = None, zero: Tensor | None = None) -> QuantLinear:
    """A QuantLinear like q (grid, input scale, bias, dtype) holding the given codes (default: q's own), without
    q's low-rank compensation: the adapter now plays that part."""
    return QuantLinear(q.codes if codes is None else codes, q.scale if scale is None else scale,
                       q.zero if zero is None else zero, q.grid, q.bias, q.input_scale, q.compute_dtype)


def as_quantized(module, name: str, method: str) -> QuantLinear:
    if not isinstance(module, QuantLinear):
        raise PlanError(f"{method} starts from a quantized base, but {name} is a {type(module).__name__}; "
                        "quantize the base first (a `base:` section with a quantizer: rtn, gptq, awq)")
    return module


def effective(q: QuantLinear) -> Tensor:
    """Q [out, in] float64: the grid's weight with the input scale undone, compensation left out."""
    w = q.grid_weight().double()
    return w if q.input_scale is None else w / q.input_scale.double()[None, :]


def adapter_factors(a: Tensor, b: Tensor, scale: float, dtype) -> tuple[Tensor, Tensor]:
    """(A, B) with scale·B·A = b·a, the column norms of b (σ of the fit) split evenly between them."""
    root = b.norm(dim=0).sqrt()
    root = torch.where(root > 0, root, torch.ones_like(root))
    return (a * root[:, None]).to(dtype), (b / root[None, :] / scale).to(dtype)


class _Requant:
    """Candidate Q's for a target weight on q's grid: re-rounded on the scales of q, the base as it was
    quantized first (so that a new Q can stay on the checkpoint's scales), RTN afresh (new scales), and,
    with a Hessian, GPTQ afresh. With an input scale c the candidates are made in grid space (W·diag(c))
    and returned as effective weights (÷ c)."""

    def __init__(self, q: QuantLinear, h: Tensor | None = None):
        self.q = q
        self.col = None if q.input_scale is None else q.input_scale.double()
        # grid space: y = (W·diag(c))·(x/c), so the grid's Hessian is diag(1/c)·H·diag(1/c)
        self.h = None if h is None else (h if self.col is None else h / self.col[:, None] / self.col[None, :])

    def _eff(self, codes, scale, zero) -> Tensor:
        w = dequantize(codes, scale, zero).double()
        return w if self.col is None else w / self.col[None, :]

    def __call__(self, target: Tensor) -> list[tuple[Tensor, tuple]]:
        q, g = self.q, self.q.grid
        tg = (target if self.col is None else target * self.col[None, :]).float()
        out = []
        codes = quantize(tg, q.scale, q.zero, g)
        out.append((self._eff(codes, q.scale, q.zero), (codes, q.scale, q.zero)))
        codes, sc, z = rtn(tg, g)
        out.append((self._eff(codes, sc, z), (codes, sc, z)))
        if self.h is not None:
            res = gptq(tg, self.h.float(), g)
            out.append((self._eff(res.codes, res.scale, res.zero), (res.codes, res.scale, res.zero)))
        return out


@register_init("loftq")
class LoftQ:
    """Q₀ = the base's codes; T rounds of B·A ← best rank-r fit of W − Q, Q ← quantize(W − B·A) (Alg. 1), a new
    Q taken only when it lowers ‖W − Q − B·A‖_F; then s·B·A is the final fit of W − Q."""

    config = LoftQConfig
    needs = "none"
    needs_original = True
    weighted = False
    summary = "LoftQ (Li et al. 2023): alternate Q ← quant(W − B·A), B·A ← rank-r SVD of W − Q; adapter = the error"
    changes_base = True
    base_change = "codes ← quant(W − s·B·A)"
    default_lr = 5e-4

    def candidates(self, stats, weight: Tensor, cfg: LoftQConfig, cap: int) -> Tensor:
        return torch.zeros(0)

    def _weighting(self, stats):
        return None, None, None

    def init(self, stats, weight: Tensor, rank: int, cfg: LoftQConfig, name: str = "", scale: float = 1.0,
             original: Tensor | None = None, module=None) -> LayerInit:
        q = as_quantized(module, name, "loftq")
        s, s_inv, h = self._weighting(stats)
        original = original.to(q.codes.device)
        res = loftq(original, effective(q), rank, _Requant(q, h), s, s_inv, iters=cfg.iters)
        a, b = adapter_factors(res.a, res.b, scale, weight.dtype)
        base = bare_copy(q, *res.state) if res.state is not None else bare_copy(q)
        e0, e1 = res.errors[0], res.errors[-1]
        ref = float(((original.double() if s is None else original.double() @ s) ** 2).sum())
        note = (f"relative error ‖W − Q − B·A‖{'·S' if s is not None else ''}: {(e0 / ref) ** 0.5:.4g} → "
                f"{(e1 / ref) ** 0.5:.4g} ({res.accepted} of {cfg.iters} rounds took a new Q)")
        return LayerInit(a, b, base=base, note=note)


@register_init("loftq-aw")
class LoftQWeighted(LoftQ):
    """LoftQ under the output error ‖(W − Q − B·A)·S‖_F, S·Sᵀ = XᵀX/n of the layer's calibration inputs (the fit
    through lowrank_fit's weighting; GPTQ among the re-quantization candidates)."""

    needs = "moments"
    weighted = True
    summary = "LoftQ, activation-weighted: the same alternation under the output error on calibration inputs"
    _last = None

    def _weighting(self, stats):
        if stats is None or stats.xtx is None:
            raise PlanError("loftq-aw weights by the inputs' XᵀX: calibrate with keep='full'")
        if self._last is None or self._last[0] is not stats:  # q/k/v share one input: one eigendecomposition
            h = stats.xtx / max(stats.n, 1)
            s, s_inv, _ = weighting(h)
            self._last = (stats, s, s_inv, h)
        return self._last[1:]
