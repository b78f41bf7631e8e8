"""SVD compression: each targeted W [out, in] becomes B·A of rank k (two smaller linears) where that saves
parameters, with per-layer ranks chosen under one global parameter budget.

The three methods are `lowrank_fit` with a different weighting S (S·Sᵀ = G):
- `svd`: plain truncated SVD of W (G = I);
- `asvd` (Yuan et al. 2023, ASVD, Eq. 4): S = diag(mean|x|^α), α = 0.5, from the inputs' channel magnitudes;
- `svd-llm` (Wang et al. 2024, SVD-LLM, Sec. 3.1: truncation-aware data whitening): G = XᵀX, so that
  truncating σ_j costs exactly σ_j² of output error.

Two passes over the calibration data. (1) Plan: one block-by-block pass on the original model measures
each layer's output-error curve e_ℓ(k) = ‖(W − W_k)X‖²/‖WX‖² for every rank (exact for all three
methods, see LowRankFit.output_errors), and a knapsack over (k·(in+out) parameters, e_ℓ(k)) picks the
ranks that minimize Σ_ℓ e_ℓ under the budget (keeping a layer dense is one of its options).
(2) Apply, block-sequentially like GPTQ: block i is factored from its inputs as the already compressed
blocks compute them, then re-run to feed block i+1.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..calib.calibrate import calibrate
from ..calib.stats import Stats
from ..config import StrictModel
from ..errors import ConfigError
from ..numerics.lowrank import LowRankFit, lowrank_fit
from ..plan.knapsack import BudgetError, Option, allocate
from ..quant.linear import set_module
from ..targets import find_targets
from .linear import LowRankLinear

METHODS = ("svd", "asvd", "svd-llm")


class SVDConfig(StrictModel):
    """Options of `rankwise compress --method svd|asvd|svd-llm`."""

    method: Literal["svd", "asvd", "svd-llm"] = Field("svd-llm", description="weighting of the truncation: none (svd), "
                                                      "channel magnitudes (asvd) or whitened XᵀX (svd-llm)")
    ratio: float | None = Field(None, gt=0, le=1, description="fraction of the targeted linears' parameters kept "
                                                             "(default 0.8 unless a rank is given)")
    rank: int | None = Field(None, ge=1, description="one fixed rank for every layer instead of a ratio")
    allocation: Literal["global", "uniform"] = Field(
        "global", description="global: ranks from the layers' measured error curves under one budget; "
                              "uniform: every layer keeps the same fraction of its parameters (SVD-LLM's setting)")
    alpha: float = Field(0.5, ge=0, description="asvd: exponent of mean|x| in the channel scaling")
    min_rank: int = Field(1, ge=1, description="smallest rank a factored layer may get")
    floor: float = Field(1e-6, gt=0, lt=1, description="eigenvalues of XᵀX below floor·max are raised to it")
    targets: str = Field("all-linear", description="layers to compress: all-linear (not the output head), names, or re:<regex>")

    @model_validator(mode="after")
    def _ratio_or_rank(self):
        if self.ratio is not None and self.rank is not None:
            raise ValueError(f"give a ratio ({self.ratio}) or a rank ({self.rank}), not both")
        if self.ratio is None and self.rank is None:
            self.ratio = 0.8
        return self


@dataclass
class LayerResult:
    rank: int | None  # None: kept dense
    params: int
    dense_params: int
    predicted: float | None  # relative output error planned from the original model's inputs (None: not planned)
    error: float  # relative output error measured on the inputs the compressed earlier blocks produce
    seconds: float = 0.0


@dataclass
class CompressReport:
    method: str
    config: dict
    layers: dict[str, LayerResult] = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    tokens: int = 0

    @property
    def params(self) -> tuple[int, int]:
        """(parameters of the targeted linears after, before)."""
        return sum(r.params for r in self.layers.values()), sum(r.dense_params for r in self.layers.values())

    def to_dict(self) -> dict:
        after, before = self.params
        return {"method": self.method, "config": self.config, "seconds": self.seconds, "tokens": self.tokens,
                "params": {"after": after, "before": before, "ratio": after / max(before, 1)},
                "layers": {k: asdict(v) for k, v in self.layers.items()}}


def _gram(stats: Stats, name: str) -> Tensor:
    st = stats[stats.aliases.get(name, name)]
    return (st.xtx / max(st.n, 1)).double()


def weighting_gram(stats: Stats, name: str, cfg: SVDConfig) -> Tensor | None:
    """G with S·Sᵀ = G for this method (None: unweighted)."""
    if cfg.method == "svd":
        return None
    if cfg.method == "asvd":
        st = stats[stats.aliases.get(name, name)]
        return torch.diag(st.abs_mean.double().clamp_min(0) ** (2 * cfg.alpha))
    return _gram(stats, name)


def fit_layer(w: Tensor, stats: Stats, name: str, cfg: SVDConfig, k: int | None = None) -> LowRankFit:
    return lowrank_fit(w, weighting_gram(stats, name, cfg), k=k, floor=cfg.floor)


def max_useful_rank(n_out: int, n_in: int) -> int:
    """The largest k with k·(in + out) < in·out: above it the factors are no smaller than W."""
    return max((n_in * n_out - 1) // (n_in + n_out), 0)


def layer_options(curve: Tensor, n_out: int, n_in: int, min_rank: int) -> list[Option]:
    """("rank", k) for every useful k ≥ min_rank, and ("dense", None) at zero error."""
    top = min(max_useful_rank(n_out, n_in), curve.shape[0] - 1)
    opts = [Option(k * (n_in + n_out), float(curve[k]), ("rank", k)) for k in range(min(min_rank, top + 1), top + 1)]
    return opts + [Option(n_in * n_out, 0.0, ("dense", None))]


def uniform_ranks(shapes: dict[str, tuple[int, int]], ratio: float, min_rank: int) -> dict[str, int | None]:
    """Every layer keeps `ratio` of its parameters (dense when that would not save any)."""
    out = {}
    for n, (o, i) in shapes.items():
        k = max(int(ratio * o * i / (o + i)), min_rank)
        out[n] = k if k <= max_useful_rank(o, i) else None
    return out


def _relative(fit: LowRankFit, gram: Tensor) -> Tensor:
    errs = fit.output_errors(gram)
    return errs / errs[0].clamp_min(1e-300)


def measure_curves(model: nn.Module, batches, cfg: SVDConfig, progress: bool = True) -> dict[str, Tensor]:
    """Pass 1: each target's relative output-error curve [min(in, out) + 1] on the original model."""
    names = find_targets(model, cfg.targets)
    curves: dict[str, Tensor] = {}

    def step(group: list[str], stats: Stats) -> None:
        for n in group:
            w = model.get_submodule(n).weight.detach()
            curves[n] = _relative(fit_layer(w, stats, n, cfg), _gram(stats, n)).float()
        for n in group:
            if n in stats.layers:
                stats.layers[n].m2 = None  # bounded memory: this block's XᵀX is spent

    calibrate(model, batches, names, observe=observe(cfg), step=step, transforms=False, progress=progress, use_label_mask=False)
    return curves


def observe(cfg: SVDConfig) -> tuple[str, ...]:
    return ("moments", "abs") if cfg.method == "asvd" else ("moments",)


def _shapes(model: nn.Module, names: list[str]) -> dict[str, tuple[int, int]]:
    return {n: tuple(model.get_submodule(n).weight.shape) for n in names}


def check_config(model: nn.Module, cfg: SVDConfig) -> list[str]:
    names = find_targets(model, cfg.targets)
    done = [n for n in names if getattr(model.get_submodule(n), "rankwise_linear", False)]
    if done:
        kind = type(model.get_submodule(done[0])).__name__
        raise ConfigError(f"{len(done)} of the {len(names)} target layers are compressed already (e.g. {done[0]}, a "
                          f"{kind}); SVD compression starts from float weights: load the uncompressed model")
    if cfg.rank is not None:
        for n, (o, i) in _shapes(model, names).items():
            if cfg.rank > min(o, i):
                raise ConfigError(f"rank {cfg.rank} is above {n}'s width ({o}×{i}: at most {min(o, i)}); "
                                  f"give a rank ≤ {min(min(s) for s in _shapes(model, names).values())} or a --ratio")
    return names


def check_reachable(shapes: dict[str, tuple[int, int]], cfg: SVDConfig) -> None:
    """BudgetError when `ratio` is below what every layer at min_rank (or dense, where that is smaller) keeps."""
    dense = sum(o * i for o, i in shapes.values())
    floor = sum(cfg.min_rank * (o + i) if cfg.min_rank <= max_useful_rank(o, i) else o * i for o, i in shapes.values())
    if floor > cfg.ratio * dense:
        raise BudgetError(f"a ratio of {cfg.ratio:g} ({cfg.ratio * dense:,.0f} of {dense:,} parameters) cannot be met: "
                          f"the smallest reachable is {floor / dense:.4f} ({floor:,} parameters: every layer at rank "
                          f"{cfg.min_rank})")


def plan_ranks(model: nn.Module, batches, cfg: SVDConfig, progress: bool = True) -> tuple[dict[str, int | None], dict[str, float]]:
    """The rank of each target (None: kept dense) and its predicted relative output error."""
    names = check_config(model, cfg)
    shapes = _shapes(model, names)
    if cfg.rank is not None:  # dense where the factors would be no smaller
        return {n: cfg.rank if cfg.rank <= max_useful_rank(*shapes[n]) else None for n in names}, {}
    uniform = uniform_ranks(shapes, cfg.ratio, cfg.min_rank)
    if cfg.allocation == "uniform":
        kept = sum(o * i if uniform[n] is None else uniform[n] * (o + i) for n, (o, i) in shapes.items())
        dense = sum(o * i for o, i in shapes.values())
        if kept > cfg.ratio * dense:
            raise BudgetError(f"a uniform ratio of {cfg.ratio:g} cannot be met at min_rank {cfg.min_rank}: it keeps "
                              f"{kept / dense:.4f} of the parameters; use allocation=global or a larger ratio")
        return uniform, {}
    dense = sum(o * i for o, i in shapes.values())
    check_reachable(shapes, cfg)  # before the calibration pass, not after
    curves = measure_curves(model, batches, cfg, progress)
    options = {n: layer_options(curves[n], *shapes[n], cfg.min_rank) for n in names}
    by_choice = {n: {o.choice: o for o in opts} for n, opts in options.items()}
    seed = {n: by_choice[n][("dense", None) if k is None else ("rank", k)] for n, k in uniform.items()
            if (("dense", None) if k is None else ("rank", k)) in by_choice[n]}
    chosen = allocate(options, cfg.ratio * dense, candidates=[seed] if len(seed) == len(names) else [],
                      unit=" parameters")
    ranks = {n: o.choice[1] for n, o in chosen.items()}
    return ranks, {n: o.error for n, o in chosen.items()}


def compress(model: nn.Module, batches, method: str = "svd-llm", *, progress: bool = True, after_block=None,
             riders: dict | None = None, on_output=None, **options) -> CompressReport:
    """Compress `model` in place: targeted linears become LowRankLinear (see the module docstring).

    options: SVDConfig's keys (ratio=0.8, rank=…, allocation=…). Returns the per-layer ranks and errors.
    after_block, riders, on_output: calibrate's, for the pass that applies the ranks (a lazily loaded model
    written block by block, held-out batches carried through it).
    """
    cfg = SVDConfig.build(where=f"compress {method}", method=method, **options)
    if not batches:
        raise ConfigError(f"{method} compression needs calibration batches (rankwise.load_data)")
    report = CompressReport(method, cfg.model_dump())
    t0 = time.perf_counter()
    ranks, predicted = plan_ranks(model, batches, cfg, progress)
    t1 = time.perf_counter()
    clock = [t1]

    def step(group: list[str], stats: Stats) -> None:
        for n in group:
            lin = model.get_submodule(n)
            o, i = lin.weight.shape
            k = ranks[n]
            if k is None:
                report.layers[n] = LayerResult(None, o * i, o * i, 0.0, 0.0)
                continue
            fit = fit_layer(lin.weight.detach(), stats, n, cfg, k=k)
            err = replace_factored(model, n, fit, k, _gram(stats, n))
            now = time.perf_counter()
            report.layers[n] = LayerResult(k, k * (o + i), o * i, predicted.get(n), err, now - clock[0])
            clock[0] = now
        for n in group:
            if n in stats.layers:
                stats.layers[n].m2 = None

    stats = calibrate(model, batches, list(ranks), observe=observe(cfg), step=step, progress=progress, use_label_mask=False,
                      after_block=after_block, riders=riders, on_output=on_output)
    report.seconds = {"plan": t1 - t0, "apply": time.perf_counter() - t1}
    report.tokens = max(st.n for st in stats.layers.values())
    return report


def replace_factored(model: nn.Module, name: str, fit: LowRankFit, k: int, gram: Tensor) -> float:
    """Put the rank-k factors of `fit` in place of linear `name` (LowRankFit.balanced_factors); returns the
    relative output error ‖(W − W_k)X‖²/‖WX‖² of the stored factors, gram = XᵀX/n."""
    lin = model.get_submodule(name)
    ref = lin.weight.detach().double()
    a, b = fit.balanced_factors(k)  # float16-exact, as the byte counts assume
    a, b = a.to(lin.weight.dtype), b.to(lin.weight.dtype)
    set_module(model, name, LowRankLinear(a, b, None if lin.bias is None else lin.bias.detach()))
    d = ref - b.double() @ a.double()  # the factors as stored, not the float64 fit
    return float(((d @ gram) * d).sum() / ((ref @ gram) * ref).sum().clamp_min(1e-300))
