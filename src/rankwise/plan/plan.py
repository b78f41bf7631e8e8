"""plan(stats, model, method=...) → Plan: per layer rank, alpha, scores and initial weights."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path


import torch
from torch import Tensor, nn

from ..atomic import write_text
from .budget import ALLOCATIONS, allocate_by_score, allocate_uniform
from ..errors import ConfigError, PlanError
from ..methods import get_init, scaling
from ..calib.stats import Stats
from ..targets import find_targets


TENSORS = {"lora_A", "lora_B", "new_base", "core"}  # a LayerPlan's fields that plan.json does not hold


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
    new_base: nn.Module | None = field(default=None, repr=False)  # a re-made compressed base (LoftQ's codes)
    core: Tensor | None = field(default=None, repr=False)  # a trained core between frozen A and B (LoRA-SB, SVFit)

    def summary(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in TENSORS}
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

    def fingerprint(self) -> str:
        """SHA-256 of the decisions and of every initial tensor, bit for bit: two ranks' plans are equal iff
        their fingerprints are (a distributed run checks this instead of sending the plan around)."""
        h = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode())
        for lp in self.layers.values():
            tensors = [lp.lora_A, lp.lora_B, lp.core]
            if lp.new_base is not None:
                tensors += list(lp.new_base.state_dict().values())
            for t in tensors:
                if t is not None:
                    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def save(self, path: str | os.PathLike) -> None:
        """Write plan.json (human-readable) atomically; tensors are not part of it."""
        write_text(Path(path), json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        raw = json.loads(Path(path).read_text())
        keep = set(LayerPlan.__dataclass_fields__) - TENSORS
        layers = {n: LayerPlan(**{k: v for k, v in d.items() if k in keep}) for n, d in raw["layers"].items()}
        return cls(raw["method"], raw["config"], layers)


def plan(stats: Stats | None, model: nn.Module, method: str = "eva", targets="all-linear",
         originals: dict[str, Tensor] | None = None, **options) -> Plan:
    """Decide rank, alpha and initial weights for every module in `stats` (model is read, not changed).

    options: the method's config keys (rank, alpha, rho, whiten, …); an unknown key is an error.
    Methods that need no data (e.g. "lora") take stats=None and use `targets` instead.
    originals: the float weights a compressed base was made from (`rankwise.compress.base.compress_base` returns
    them), for the methods that start from the compression error (loftq, compensation).
    """
    impl = get_init(method)
    cfg = impl.config.build(where=f"method {method!r}", **options)
    if getattr(impl, "needs_original", False) and not originals:
        raise PlanError(f"method {method!r} starts from the compression error W − Q, so it needs the original float "
                        "weights: compress the base in the same run (a `base:` section; rankwise.compress.base.compress_base; "
                        "not with awq, whose folded scales change the float weights as well)")
    if getattr(impl, "needs_grad", False) and (stats is None or not stats.grads):
        raise PlanError(f"method {method!r} starts from the weight gradient of the task loss: calibrate with "
                        "gradients (rankwise.calib.gradients.calibrate_gradients on labelled batches) and pass its Stats")
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
    unrouted = [n for n in stats.order if n in stats.unrouted]  # MoE experts no calibration token reached
    names = [n for n in stats.order if n not in stats.unrouted]
    # a compressed layer's .weight is computed on access (dequantized, or B·A): read per layer, never all kept
    shapes = {n: (modules[n].out_features, modules[n].in_features) for n in names}
    too_small = [(n, min(shape)) for n, shape in shapes.items() if min(shape) < cfg.rank]
    if too_small:
        n, width = too_small[0]
        raise PlanError(f"rank {cfg.rank} is larger than layer {n} (smallest side {width}); "
                        f"use --rank ≤ {width} or leave that layer out of the targets")
    cap_mult = getattr(cfg, "rho", 1.0)
    caps = {n: min(round(cfg.rank * cap_mult), *shapes[n]) for n in names}
    layer_stats = stats.__getitem__ if stats.layers else (lambda n: None)  # data-free methods get None
    lazy = getattr(model, "rankwise_lazy", None)

    def weight(n: str) -> Tensor:  # a block not in memory (rankwise.lazy): this one weight read from the checkpoint
        w = modules[n].weight.detach()
        if w.is_meta and lazy is not None and getattr(impl, "reads_weight", True):
            w = lazy.read(f"{n}.weight")
        return _full(w)

    if cfg.allocation == "uniform":
        ranks = allocate_uniform(caps, cfg.rank)
        scores = {n: impl.candidates(layer_stats(n), weight(n), cfg, caps[n]) for n in names}
    else:
        scores = _group_scores(impl, stats, weight, cfg, caps)
        ranks = allocate_by_score(scores, budget=cfg.rank * len(names))
    if getattr(impl, "needs_original", False) and (missing := [n for n in names if n not in originals]):
        raise PlanError(f"method {method!r}: no original weight for {missing[0]} ({len(missing)} layers in all); "
                        "originals must hold every targeted layer's float weight")
    layers = {}
    for n in names:
        r = ranks[n]
        a = alpha * r / cfg.rank if getattr(cfg, "adjust_scaling", True) else alpha
        lp = LayerPlan(r, float(a), shapes[n][1], shapes[n][0], [float(v) for v in scores[n][:r]])
        if r > 0:
            extra = {"original": originals[n], "module": modules[n]} if getattr(impl, "needs_original", False) else {}
            if getattr(impl, "needs_grad", False):
                extra["grad"] = stats.gradient(n)
            li = impl.init(layer_stats(n), weight(n), r, cfg, name=n, scale=scaling(a, r, cfg.rslora), **extra)
            lp.lora_A, lp.lora_B = li.A.detach().cpu(), li.B.detach().cpu()
            lp.residual, lp.note, lp.new_base = li.residual, li.note, li.base
            lp.core = None if li.core is None else li.core.detach().cpu()
        layers[n] = lp
    for n in unrouted:  # nothing measured there: no adapter, said in the plan
        layers[n] = LayerPlan(0, 0.0, modules[n].in_features, modules[n].out_features, [],
                              note="MoE expert that no calibration token was routed to")
    resolved = cfg.model_dump() | {"alpha": alpha}
    return Plan(method, resolved, layers)


def _full(w: Tensor) -> Tensor:
    """The whole weight of an FSDP2-sharded layer (all-gathered: every rank plans the same layers in the same
    order), the weight itself otherwise; in float32 when the model is bfloat16/float16, so that every init
    computes, and returns its factors, in float32 (the adapter's own dtype) whatever the base's dtype."""
    w = w.full_tensor() if hasattr(w, "full_tensor") else w
    return w.float() if w.dtype in (torch.bfloat16, torch.float16) else w


def _group_scores(impl, stats: Stats, weight, cfg, caps) -> dict[str, Tensor]:
    """Candidate scores per module; modules sharing an input share one spectrum (computed once)."""
    scores: dict[str, Tensor] = {}
    for canonical, members in stats.groups().items():
        cap = max(caps[m] for m in members)
        s = impl.candidates(stats[canonical], weight(canonical), cfg, cap)
        for m in members:
            scores[m] = s[: caps[m]]
    return scores


def table(p: Plan) -> list[tuple[str, int, float, float]]:
    """Rows (module, rank, alpha, explained variance of its components) for printing."""
    return [(n, lp.rank, lp.alpha, sum(lp.explained_variance)) for n, lp in p.layers.items()]


