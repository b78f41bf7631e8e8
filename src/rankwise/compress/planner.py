"""Per-layer mixed precision and the joint planner: each layer's bits, compensation rank (and optionally
SVD rank) chosen together under one memory budget, minimizing the summed predicted output error.

Pass 1 (plan), block by block on the original model, for every target W [out, in] with inputs X:
- for each candidate bit width b, the rounding error D_b = W − RTN_b(W) and, through the singular values
  of D_b·S (S·Sᵀ = XᵀX, `weighting`), the error left after an activation-weighted rank-r compensation
  (EoRA) for every r at once: e(b, r) = Σ_{j≥r} σ_j(D_b·S)² / ‖WX‖²;
- optionally (svd=True) the SVD-LLM curve e(k) = Σ_{j≥k} σ_j(W·S)² / ‖WX‖², W stored as float16 factors.
Each option costs its bytes: codes + float16 scales (+ b-bit zero points if asymmetric) + float16
compensation factors r·(in + out)·2. A multiple-choice knapsack (plan/knapsack.py) picks one option per
layer under the budget; uniform bit widths that fit are candidates too, so the plan is never worse
than them on the predicted objective. Mixed precision is the special case r = 0, no SVD, with the
budget given as average bits per weight (HAWQ-V2-style sensitivity, measured as output error instead
of a Hessian trace).

Pass 2 (apply), block-sequentially: the chosen quantizer (GPTQ by default; RTN predicts its error in
pass 1, so measured errors come out lower) with `bits_pattern`/`rank_pattern`, SVD layers factored.

The summed per-layer error is a local, additive proxy for what the model loses. Where layers' errors
are large it misjudges: on SmolLM2 at 48 MB, a plan with nine 2-bit layers had the lower summed error
(1.86 vs 1.92) and the far worse perplexity (68.5 vs 49.8). So by default the lowest candidate width
is held back until the budget cannot be met without it (`lowest_bits_last`).

Approximations, stated: the compensated and SVD predictions use the floored weighting (eigenvalues of
XᵀX below 1e-6·max raised), so where XᵀX is rank-deficient they are upper bounds; AWQ searches one
scale per shared-input group under its first member's grid, whatever bits the others got. Sizes count
float16 factors, and the factors are float16-exact (LowRankFit.balanced_factors), so a float16 copy
holds them without loss.
"""

from __future__ import annotations

import re
import time
from typing import Literal
from dataclasses import asdict, dataclass, field

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..calib.calibrate import calibrate
from ..calib.stats import Stats
from ..config import StrictModel
from ..errors import ConfigError, QuantError
from ..numerics.lowrank import lowrank_fit, tail_sums, weighted_svdvals, weighting
from ..numerics.quantize import Grid, check_grid, fake_quantize, output_error
from ..plan.knapsack import BudgetError, Option, allocate, total
from ..quant import get_quantizer
from ..quant.apply import QuantReport, check_model, quant_step
from ..quant.linear import quantized_layers
from .svd import max_useful_rank, replace_factored

SVD_RANK_STEP = 8  # SVD ranks offered to the planner: multiples of 8 (fewer options; GPU-friendly shapes)
RESERVED = {"bits", "group_size", "symmetric", "targets", "compensate", "compensate_rank", "bits_pattern", "rank_pattern"}


class PlanConfig(StrictModel):
    """Options of `rankwise compress --method mixed|joint`."""

    budget: float | None = Field(None, gt=0, description="bytes of the targeted linears after compression")
    avg_bits: float | None = Field(None, gt=0, description="average storage bits per weight (scales and "
                                                            "compensation included) instead of a byte budget")
    bits: list[int] = Field([2, 3, 4, 8], min_length=1, description="candidate bit widths per layer")
    ranks: list[int] = Field([0], min_length=1, description="candidate compensation ranks per layer (0: none; "
                                                            ">0: EoRA, float16 factors)")
    svd: bool = Field(False, description="also offer SVD-LLM factorization (float16 factors, ranks in steps of 8)")
    group_size: int | None = Field(64, description="input columns per scale (null: per output channel)")
    symmetric: bool = True
    method: str = Field("gptq", description="quantizer that applies the chosen bits (rtn, gptq, awq)")
    options: dict = Field({}, description="the quantizer's own keys")
    targets: str = "all-linear"
    floor: float = Field(1e-6, gt=0, lt=1)
    lowest_bits_last: bool = Field(
        True, description="use the lowest candidate width only if the budget cannot be met without it: the summed "
                          "error underrates how 2-bit layers' errors compound (SmolLM2 at 48 MB: perplexity 68.5 "
                          "with 2-bit layers allowed, 49.8 without)")
    objective: Literal["relative", "absolute"] = Field(
        "relative", description="summed per-layer output error the knapsack minimizes: relative "
                                "(‖ΔW·X‖²/‖W·X‖²) or absolute (‖ΔW·X‖²/n)")

    @model_validator(mode="after")
    def _one_budget(self):
        if (self.budget is None) == (self.avg_bits is None):
            raise ValueError("give exactly one of budget (bytes) and avg_bits")
        if any(r < 0 for r in self.ranks):
            raise ValueError(f"compensation ranks must be ≥ 0, not {self.ranks}")
        taken = sorted(set(self.options) & RESERVED)
        if taken:
            raise ValueError(f"options {taken} are set by the planner itself (from bits, ranks, group_size, "
                             "symmetric, targets); give them as the planner's own keys")
        return self


def parse_size(text: str | float | int) -> float:
    """Bytes from '60MB', '1.5 GiB', '500kB', '123456' (SI: kB/MB/GB = 10³ⁿ; IEC: KiB/MiB/GiB = 2¹⁰ⁿ)."""
    if isinstance(text, (int, float)):
        return float(text)
    units = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if m is None or m.group(2).lower() not in units:
        raise ConfigError(f"cannot read the size {text!r}: give a number of bytes with an optional unit, "
                          "e.g. 60MB, 1.5GB, 512MiB (units: B, kB, MB, GB, KiB, MiB, GiB)")
    return float(m.group(1)) * units[m.group(2).lower()]


@dataclass
class LayerChoice:
    kind: str  # "quant" or "svd"
    bits: int | None
    rank: int  # compensation rank (quant) or factor rank (svd)
    bytes: float
    predicted: float  # relative output error predicted in pass 1
    numel: int = 0  # weights of the dense layer
    measured: float | None = None  # relative output error after pass 2

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / max(self.numel, 1)


@dataclass
class PlanReport:
    config: dict
    layers: dict[str, LayerChoice] = field(default_factory=dict)
    budget: float = 0.0  # bytes
    dense_bytes: float = 0.0  # the targeted linears in float16
    curve: list = field(default_factory=list)  # [(bytes, Σ predicted error)] of the planner at other budgets
    uniform: list = field(default_factory=list)  # [(bits, bytes, Σ predicted error)] uniform grids, no compensation
    seconds: dict = field(default_factory=dict)
    quant: dict = field(default_factory=dict)  # the quantizer's report

    @property
    def bytes(self) -> float:
        return sum(c.bytes for c in self.layers.values())

    def to_dict(self) -> dict:
        pred = sum(c.predicted for c in self.layers.values())
        meas = [c.measured for c in self.layers.values() if c.measured is not None]
        return {"config": self.config, "budget": self.budget, "bytes": self.bytes, "dense_bytes": self.dense_bytes,
                "predicted": pred, "measured": sum(meas) if len(meas) == len(self.layers) else None,
                "curve": self.curve, "uniform": self.uniform, "seconds": self.seconds,
                "layers": {k: asdict(v) for k, v in self.layers.items()}}


def _layer_options(w: Tensor, gram: Tensor, s: Tensor, cfg: PlanConfig) -> list[Option]:
    n_out, n_in = w.shape
    w = w.double()
    # relative: each layer's share of its own output lost; absolute: ‖ΔW·X‖²/n itself, so layers whose
    # outputs are large (what they add to the residual stream) weigh more
    norm = max(output_error(w, torch.zeros_like(w), gram), 1e-300) if cfg.objective == "relative" else 1.0
    opts = []
    ranks = sorted({r for r in cfg.ranks if r <= min(n_out, n_in)})
    for b in sorted(set(cfg.bits)):
        grid = Grid(b, cfg.group_size, cfg.symmetric)
        d = w - fake_quantize(w.float(), grid).double()
        base = w.numel() * grid.bits_per_weight(n_in) / 8
        err0 = output_error(w, w - d, gram) / norm
        tails = tail_sums(weighted_svdvals(d, s)) / norm if any(ranks) else None
        for r in ranks:
            e = err0 if r == 0 else min(float(tails[r]), err0)
            opts.append(Option(base + 2 * r * (n_in + n_out), e, ("quant", b, r)))
    if cfg.svd:
        tails = tail_sums(weighted_svdvals(w, s)) / norm
        for k in range(SVD_RANK_STEP, max_useful_rank(n_out, n_in) + 1, SVD_RANK_STEP):
            opts.append(Option(2 * k * (n_in + n_out), float(tails[k]), ("svd", None, k)))
    return opts


def measure_options(model: nn.Module, batches, names: list[str], cfg: PlanConfig, progress: bool = True) -> dict[str, list[Option]]:
    """Pass 1: every target's options (see the module docstring), on the original model."""
    options: dict[str, list[Option]] = {}

    def step(group: list[str], stats: Stats) -> None:
        by_input: dict[str, list[str]] = {}
        for n in group:
            by_input.setdefault(stats.aliases.get(n, n), []).append(n)
        for key, members in by_input.items():
            st = stats[key]
            gram = (st.xtx / max(st.n, 1)).double()
            s, _, _ = weighting(gram, cfg.floor)  # one eigendecomposition for the layers sharing the input
            for n in members:
                options[n] = _layer_options(model.get_submodule(n).weight.detach(), gram, s, cfg)
            if key in stats.layers:
                stats.layers[key].m2 = None

    calibrate(model, batches, names, observe=("moments",), step=step, transforms=False, progress=progress, use_label_mask=False)
    return {n: options[n] for n in names}


def _budget(cfg: PlanConfig, model: nn.Module, names: list[str]) -> float:
    if cfg.budget is not None:
        return cfg.budget
    return cfg.avg_bits * sum(model.get_submodule(n).weight.numel() for n in names) / 8


def _check_reachable(model: nn.Module, names: list[str], cfg: PlanConfig, budget: float) -> None:
    """BudgetError naming the smallest reachable size (every layer at its cheapest option)."""
    low_bits, low_rank = min(cfg.bits), min(cfg.ranks)
    low = 0.0
    for n in names:
        o, i = model.get_submodule(n).weight.shape
        cost = o * i * Grid(low_bits, cfg.group_size, cfg.symmetric).bits_per_weight(i) / 8 + 2 * low_rank * (o + i)
        if cfg.svd and max_useful_rank(o, i) >= SVD_RANK_STEP:
            cost = min(cost, 2 * SVD_RANK_STEP * (o + i))
        low += cost
    if low <= budget * (1 + 1e-12):
        return
    how = (f"every layer at {low_bits} bits" + (f" + rank {low_rank}" if low_rank else "")
           + (f" or SVD rank {SVD_RANK_STEP}" if cfg.svd else "") + ", scales included")
    if cfg.budget is not None:
        raise BudgetError(f"a budget of {budget:,.0f} bytes ({budget / 1e6:.3f} MB) cannot be met with bits "
                          f"{sorted(cfg.bits)}, group size {cfg.group_size}: the smallest reachable size is "
                          f"{low:,.0f} bytes ({low / 1e6:.3f} MB; {how})")
    numel = sum(model.get_submodule(n).weight.numel() for n in names)
    raise BudgetError(f"an average of {cfg.avg_bits:g} bits per weight cannot be met with bits {sorted(cfg.bits)} and "
                      f"group size {cfg.group_size}: the smallest reachable is {8 * low / numel:.3f} ({how})")


def _uniform(options: dict[str, list[Option]], cfg: PlanConfig) -> list[dict[str, Option]]:
    """Every layer at the same bits and the smallest candidate rank, for each candidate bit width."""
    out = []
    for b in sorted(set(cfg.bits)):
        pick = {n: next((o for o in opts if o.choice == ("quant", b, min(cfg.ranks))), None) for n, opts in options.items()}
        if all(pick.values()):
            out.append(pick)
    return out


def check_plan_config(model: nn.Module, cfg: PlanConfig) -> list[str]:
    quantizer = get_quantizer(cfg.method)
    if cfg.svd and cfg.method == "awq":
        raise ConfigError("svd=true cannot be combined with awq (its scales fold across layers that may be factored); "
                          "use gptq or rtn")
    base = quantizer.config.build(where=f"compress planner ({cfg.method})", bits=max(cfg.bits),
                                  group_size=cfg.group_size, symmetric=cfg.symmetric, targets=cfg.targets, **cfg.options)
    names = check_model(model, cfg.targets, base)
    for n in names:
        o, i = model.get_submodule(n).weight.shape
        if max(cfg.ranks) > min(o, i):
            raise ConfigError(f"compensation rank {max(cfg.ranks)} is above {n}'s width ({o}×{i}: at most {min(o, i)}); "
                              "give smaller --ranks")
        for b in cfg.bits:
            try:
                check_grid(Grid(b, cfg.group_size, cfg.symmetric), model.get_submodule(n).weight.shape[1], n)
            except ValueError as e:
                raise QuantError(str(e)) from None
    return names


def plan(model: nn.Module, batches, cfg: PlanConfig, progress: bool = True) -> PlanReport:
    """Pass 1 and the allocation: what each layer gets (nothing is changed in the model)."""
    names = check_plan_config(model, cfg)
    if not batches:
        raise ConfigError("the planner needs calibration batches (rankwise.load_data)")
    t = time.perf_counter()
    budget = _budget(cfg, model, names)
    _check_reachable(model, names, cfg, budget)  # before the calibration pass, not after
    options = measure_options(model, batches, names, cfg, progress)
    uniform = _uniform(options, cfg)
    chosen = _allocate(options, budget, uniform, cfg)
    dense = sum(2.0 * model.get_submodule(n).weight.numel() for n in names)
    report = PlanReport(cfg.model_dump(), budget=budget, dense_bytes=dense)
    for n, o in chosen.items():
        kind, b, r = o.choice
        report.layers[n] = LayerChoice(kind, b, r, o.cost, o.error, model.get_submodule(n).weight.numel())
    report.uniform = [(next(iter(u.values())).choice[1], *total(u)) for u in uniform]
    report.curve = _curve(options)
    report.seconds["plan"] = time.perf_counter() - t
    return report


def _allocate(options: dict[str, list[Option]], budget: float, uniform: list, cfg: PlanConfig) -> dict[str, Option]:
    """allocate(), with the lowest candidate width held back while the budget can be met without it."""
    low = min(cfg.bits)
    if cfg.lowest_bits_last and len(set(cfg.bits)) > 1:
        rest = {n: [o for o in opts if not (o.choice[0] == "quant" and o.choice[1] == low)] for n, opts in options.items()}
        if all(rest.values()) and sum(min(o.cost for o in v) for v in rest.values()) <= budget:
            keep = [u for u in uniform if next(iter(u.values())).choice[1] != low]
            return allocate(rest, budget, candidates=keep, unit=" bytes")
    return allocate(options, budget, candidates=uniform, unit=" bytes")


def _curve(options: dict[str, list[Option]], points: int = 12) -> list[tuple[float, float]]:
    """The planner's predicted (bytes, Σ error) at budgets from the smallest reachable to the largest useful."""
    lo = sum(min(o.cost for o in opts) for opts in options.values())
    hi = sum(max(o.cost for o in opts) for opts in options.values())
    out = []
    for i in range(points):
        b = lo * (hi / lo) ** (i / (points - 1))
        out.append(total(allocate(options, b)))
    return out


def apply_plan(model: nn.Module, batches, report: PlanReport, cfg: PlanConfig, progress: bool = True) -> PlanReport:
    """Pass 2: quantize (and factor) block-sequentially as `report` says; fills the measured errors."""
    t = time.perf_counter()
    quantizer = get_quantizer(cfg.method)
    quant = {n: c for n, c in report.layers.items() if c.kind == "quant"}
    factored = {n: c for n, c in report.layers.items() if c.kind == "svd"}
    any_rank = any(c.rank for c in quant.values())
    qcfg = quantizer.config.build(
        where=f"compress planner ({cfg.method})", bits=max(cfg.bits), group_size=cfg.group_size,
        symmetric=cfg.symmetric, targets=cfg.targets, compensate="eora" if any_rank else "none",
        compensate_rank=max([c.rank for c in quant.values()] + [1]),
        bits_pattern={n: c.bits for n, c in quant.items()}, rank_pattern={n: c.rank for n, c in quant.items()},
        **cfg.options)
    qreport = QuantReport(cfg.method, qcfg.model_dump())
    qstep = quant_step(model, quantizer, qcfg, qreport)

    def step(group: list[str], stats: Stats) -> None:
        for n in group:
            if n in factored:
                factored[n].measured = _factor(model, n, stats, factored[n].rank, cfg.floor)
        rest = [n for n in group if n in quant]
        if rest:
            qstep(rest, stats)
        for n in group:
            key = stats.aliases.get(n, n)
            if key in stats.layers:
                stats.layers[key].m2 = None

    observe = tuple(dict.fromkeys(("moments", *quantizer.observe)))
    try:
        calibrate(model, batches, list(report.layers), observe=observe, step=step, progress=progress,
                  true_sequential=getattr(qcfg, "true_sequential", False), use_label_mask=False)
    finally:
        for q in quantized_layers(model).values():
            q.cache_weight_(False)
    for n, c in quant.items():
        rec = qreport.layers[n]
        c.measured = rec.compensated_error if rec.compensated_error is not None else rec.error
        c.bytes = rec.bits * c.numel / 8
    report.quant = qreport.to_dict()
    report.seconds["apply"] = time.perf_counter() - t
    return report


def _factor(model: nn.Module, name: str, stats: Stats, k: int, floor: float) -> float:
    """Replace `name` by its SVD-LLM rank-k factors; its relative output error on these inputs."""
    st = stats[stats.aliases.get(name, name)]
    gram = (st.xtx / max(st.n, 1)).double()
    return replace_factored(model, name, lowrank_fit(model.get_submodule(name).weight.detach(), gram, k=k, floor=floor),
                            k, gram)


def compress_planned(model: nn.Module, batches, progress: bool = True, **options) -> PlanReport:
    """Plan and apply in place: `compress_planned(model, batches, budget=60e6, ranks=[0, 16, 32])`, or mixed
    precision with `avg_bits=3.5` (options: PlanConfig's keys)."""
    cfg = PlanConfig.build(where="compress planner", **options)
    report = plan(model, batches, cfg, progress)
    return apply_plan(model, batches, report, cfg, progress)
