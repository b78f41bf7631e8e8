"""plan(stats, model, method=...) → Plan: per layer rank, alpha, scores and initial weights."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path


from torch import Tensor, nn

from ..atomic import write_text
from .budget import ALLOCATIONS, allocate_by_score, allocate_uniform
from ..errors import ConfigError, PlanError
from ..methods import get_init, scaling
from ..calib.stats import Stats
from ..targets import find_targets


@dataclass
class LayerPlan:
    """One layer's decision. explained_variance: the scores of the components it was given."""

    rank: int
    alpha: float
    in_features: int
    out_features: int
    explained_variance: list[float] = field(default_factory=list)
    residual: bool = False  # the base weight becomes W − scale·B·A (PiSSA, OLoRA, MiLoRA, CorDA)
    note: str = ""
    lora_A: Tensor | None = field(default=None, repr=False)
    lora_B: Tensor | None = field(default=None, repr=False)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("lora_A"), d.pop("lora_B")
        d["explained_variance_total"] = float(sum(self.explained_variance))
        return d


@dataclass
class Plan:
    """Plain data: method, its resolved config, and a LayerPlan per targeted module."""

    method: str
    config: dict
    layers: dict[str, LayerPlan]

    @property
    def rank(self) -> int:
        return int(self.config["rank"])

    @property
    def alpha(self) -> float:
        return float(self.config["alpha"])

    def active(self) -> dict[str, LayerPlan]:
        """Layers that get an adapter (rank > 0)."""
        return {n: lp for n, lp in self.layers.items() if lp.rank > 0}

    def to_dict(self) -> dict:
        return {"method": self.method, "config": self.config, "layers": {n: lp.summary() for n, lp in self.layers.items()},
                "excluded": [n for n, lp in self.layers.items() if lp.rank == 0],
                "rank_total": sum(lp.rank for lp in self.layers.values())}

    def save(self, path: str | os.PathLike) -> None:
        """Write plan.json (human-readable) atomically; tensors are not part of it."""
        write_text(Path(path), json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        raw = json.loads(Path(path).read_text())
        keep = set(LayerPlan.__dataclass_fields__) - {"lora_A", "lora_B"}
        layers = {n: LayerPlan(**{k: v for k, v in d.items() if k in keep}) for n, d in raw["layers"].items()}
        return cls(raw["method"], raw["config"], layers)


def plan(stats: Stats | None, model: nn.Module, method: str = "eva", targets="all-linear", **options) -> Plan:
    """Decide rank, alpha and initial weights for every module in `stats` (model is read, not changed).

    options: the method's config keys (rank, alpha, rho, whiten, …); an unknown key is an error.
    Methods that need no data (e.g. "lora") take stats=None and use `targets` instead.
    """
    impl = get_init(method)
    cfg = impl.config.build(where=f"method {method!r}", **options)
    if stats is None:
        if impl.needs != "none":
            raise PlanError(f"method {method!r} initializes from data: run calibrate() first and pass its Stats")
        stats = Stats(order=find_targets(model, targets))
    elif impl.needs == "moments" and any(stats.layers[k].m2 is None for k in stats.layers):
        raise PlanError(f"method {method!r} needs the full input moments: calibrate with keep='full' "
                        "(rankwise.methods.keep_for([...]) says what a set of methods needs)")
    if cfg.allocation not in ALLOCATIONS:
        raise ConfigError(f"allocation {cfg.allocation!r} is not one of {ALLOCATIONS}")
    if cfg.rank < 1:
        raise PlanError(f"rank must be ≥ 1 (got {cfg.rank})")
    alpha = float(cfg.alpha if cfg.alpha is not None else cfg.rank)
    modules = dict(model.named_modules())
    names = list(stats.order)
    weights = {n: modules[n].weight for n in names}
    too_small = [(n, min(w.shape)) for n, w in weights.items() if min(w.shape) < cfg.rank]
    if too_small:
        n, width = too_small[0]
        raise PlanError(f"rank {cfg.rank} is larger than layer {n} (smallest side {width}); "
                        f"use --rank ≤ {width} or leave that layer out of the targets")
    cap_mult = getattr(cfg, "rho", 1.0)
    caps = {n: min(round(cfg.rank * cap_mult), *weights[n].shape) for n in names}
    layer_stats = stats.__getitem__ if stats.layers else (lambda n: None)  # data-free methods get None
    if cfg.allocation == "uniform":
        ranks = allocate_uniform(caps, cfg.rank)
        scores = {n: impl.candidates(layer_stats(n), weights[n], cfg, caps[n]) for n in names}
    else:
        scores = _group_scores(impl, stats, weights, cfg, caps)
        ranks = allocate_by_score(scores, budget=cfg.rank * len(names))
    layers = {}
    for n in names:
        r = ranks[n]
        a = alpha * r / cfg.rank if getattr(cfg, "adjust_scaling", True) else alpha
        lp = LayerPlan(r, float(a), weights[n].shape[1], weights[n].shape[0], [float(v) for v in scores[n][:r]])
        if r > 0:
            li = impl.init(layer_stats(n), weights[n].detach(), r, cfg, name=n, scale=scaling(a, r, cfg.rslora))
            lp.lora_A, lp.lora_B = li.A.detach().cpu(), li.B.detach().cpu()
            lp.residual, lp.note = li.residual, li.note
        layers[n] = lp
    resolved = cfg.model_dump() | {"alpha": alpha}
    return Plan(method, resolved, layers)


def _group_scores(impl, stats: Stats, weights, cfg, caps) -> dict[str, Tensor]:
    """Candidate scores per module; modules sharing an input share one spectrum (computed once)."""
    scores: dict[str, Tensor] = {}
    for canonical, members in stats.groups().items():
        cap = max(caps[m] for m in members)
        s = impl.candidates(stats[canonical], weights[canonical], cfg, cap)
        for m in members:
            scores[m] = s[: caps[m]]
    return scores


def table(p: Plan) -> list[tuple[str, int, float, float]]:
    """Rows (module, rank, alpha, explained variance of its components) for printing."""
    return [(n, lp.rank, lp.alpha, sum(lp.explained_variance)) for n, lp in p.layers.items()]


