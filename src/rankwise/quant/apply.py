"""quantize(model, batches, method) and quantize_(model, config): the in-place verbs.

Calibrated methods run inside one block-sequential calibration pass (calibrate's per-block step):
block i's inputs are measured, its linears quantized, and block i is re-run so that block i+1 is
calibrated on what the quantized model computes (the sequential pipeline of GPTQ / llm-compressor).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from ..calib.calibrate import calibrate
from ..calib.stats import Stats
from ..errors import QuantError
from ..experts import unfuse_experts_
from ..numerics.lowrank import balance, lowrank_fit
from ..numerics.quantize import check_grid, output_error
from ..targets import check_pattern, find_targets
from . import QuantConfig, get_quantizer
from .linear import QuantLinear, quantized_layers, set_module

# Classes other tools put in place of nn.Linear, and the tool each belongs to.
_FOREIGN = {"Linear4bit": "bitsandbytes", "Linear8bitLt": "bitsandbytes", "CompressedLinear": "compressed-tensors",
            "WQLinear_GEMM": "AutoAWQ", "WQLinear_GEMV": "AutoAWQ", "TorchQuantLinear": "GPTQModel",
            "QuantLinear": "auto-gptq / GPTQModel", "HQQLinear": "HQQ", "QLinear": "optimum-quanto"}


@dataclass
class LayerRecord:
    error: float  # relative: ‖(W − Ŵ)X‖²/‖WX‖² on the calibration inputs ("output"), or ‖W − Ŵ‖²/‖W‖² ("weight")
    error_kind: str
    bits: float  # storage per weight, scales (and a compensation term, in float16) included
    seconds: float  # since the previous record: a sweep or search shared by a group counts on its first layer
    note: str = ""
    compensated_error: float | None = None  # the same error with the low-rank compensation added


@dataclass
class QuantReport:
    method: str
    config: dict
    layers: dict[str, LayerRecord] = field(default_factory=dict)
    seconds: float = 0.0
    tokens: int = 0
    unrouted: list[str] = field(default_factory=list)  # MoE expert layers no calibration token reached: left float

    def to_dict(self) -> dict:
        return {"method": self.method, "config": self.config, "seconds": self.seconds, "tokens": self.tokens,
                "layers": {k: asdict(v) for k, v in self.layers.items()}, "unrouted": list(self.unrouted)}

    @property
    def mean_bits(self) -> float:
        return sum(r.bits for r in self.layers.values()) / max(len(self.layers), 1)


class Context:
    """What a quantizer needs about the model being quantized; it records each replaced layer."""

    def __init__(self, model: nn.Module, cfg: QuantConfig, report: QuantReport, stats: Stats | None = None):
        self.model, self.cfg, self.report, self.stats = model, cfg, report, stats
        self._t = time.perf_counter()
        self._hessians: dict[str, Tensor] = {}
        self.cache = False  # QuantLinears keep their float weight until the pass ends (quantize clears it)

    def grid(self, name: str):
        return self.cfg.grid_for(name)

    def linear(self, name: str) -> nn.Linear:
        return self.model.get_submodule(name)

    def hessian(self, name: str) -> Tensor | None:
        """XᵀX/n [in, in] float32 of the module's inputs, or None (data-free); one per shared input."""
        if self.stats is None:
            return None
        key = self.stats.aliases.get(name, name)
        if key not in self._hessians:
            st = self.stats[key]
            self._hessians[key] = (st.xtx / max(st.n, 1)).float()
        return self._hessians[key]

    def tokens(self, name: str) -> int:
        return 0 if self.stats is None else self.stats[name].n

    def replace(self, name: str, codes: Tensor, scale: Tensor, zero: Tensor, *, input_scale: Tensor | None = None,
                folded: Tensor | None = None, reference: Tensor | None = None, note: str = "") -> QuantLinear:
        """Put a QuantLinear in place of linear `name`; record its error against `reference` (default: the
        current weight) on the calibration inputs. `folded` [in]: a scale the previous op now divides
        the inputs by (AWQ), so the layer is compared as it acts on the original inputs."""
        lin = self.linear(name)
        ref = (lin.weight if reference is None else reference).detach().float()
        q = QuantLinear(codes, scale, zero, self.grid(name), lin.bias, input_scale, dtype=lin.weight.dtype)
        w_hat = q.weight.float() if folded is None else q.weight.float() / folded[None, :]
        h = self.hessian(name)
        # relative to ‖WX‖² (output) or ‖W‖² (weight), computed once for both errors
        norm = max(output_error(ref, torch.zeros_like(ref), h) if h is not None else float((ref**2).sum()), 1e-30)
        err, kind = self._error(ref, w_hat, h) / norm, ("output" if h is not None else "weight")
        after = None
        rank = self.cfg.rank_for(name)
        if rank > 0:
            correction = self._compensate(name, q, ref - w_hat, h, folded, rank)
            after = self._error(ref, w_hat + correction, h) / norm
        set_module(self.model, name, q)
        q.cache_weight_(self.cache)
        now = time.perf_counter()
        self.report.layers[name] = LayerRecord(err, kind, q.bits_per_weight, now - self._t, note, after)
        self._t = now
        return q

    @staticmethod
    def _error(ref: Tensor, w_hat: Tensor, h: Tensor | None) -> float:
        """‖(W − Ŵ)X‖² on the calibration inputs, or ‖W − Ŵ‖² without them."""
        return output_error(ref, w_hat, h) if h is not None else float(((ref - w_hat) ** 2).sum())

    def _compensate(self, q_name: str, q: QuantLinear, error: Tensor, h: Tensor | None, folded: Tensor | None, rank: int) -> Tensor:
        """Fit B·A to the rounding error W − Ŵ [out, in] (as the layer acts on the original inputs):
        weighted by XᵀX (EoRA) or not (LoRC); give it to q; return B·A in those input coordinates."""
        fit = lowrank_fit(error, h if self.cfg.compensate == "eora" else None,
                          k=min(rank, *error.shape))
        k = fit.sigma.shape[0]
        # float16-exact factors: what bits_per_weight counts (16 bits each) is what a float16 copy holds.
        # With a folded AWQ scale the layer reads x/s, so A·x = (A·diag(s))·(x/s); balanced after that
        # scaling, so that only the size of B·A bounds the factors' range.
        a, b = fit.factors(k)
        try:
            a, b = balance(a if folded is None else a * folded[None, :], b)
        except ValueError as e:
            raise QuantError(f"{q_name}: the {self.cfg.compensate} compensation cannot be stored in float16 ({e}); "
                             "lower compensate_rank or use compensate='lorc'") from None
        q.compensate_(a, b)
        return (b @ (a if folded is None else a / folded[None, :])).float()


def check_model(model: nn.Module, targets: str, cfg: QuantConfig) -> list[str]:
    """The target names; QuantError for a model already quantized (by us or another tool), a grid that
    does not fit a layer, or non-finite weights."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is not None:
        tool = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", type(qc).__name__)
        raise QuantError(f"this model is already quantized ({tool}, per config.quantization_config); "
                         "load the original floating-point model to quantize it with rankwise")
    for mname, m in model.named_modules():
        if isinstance(m, QuantLinear):
            raise QuantError(f"{mname} is already quantized by rankwise; call rankwise.quant.dequantize_(model) first")
        if getattr(m, "rankwise_linear", False):
            raise QuantError(f"{mname} is a {type(m).__name__} (low-rank factors); quantize the original model, "
                             "or compress with `rankwise compress --method joint`, which plans bits and ranks together")
        tool = _FOREIGN.get(type(m).__name__)
        if tool is not None:
            raise QuantError(f"{mname} is a {type(m).__name__}: this model is already quantized by {tool}; "
                             "load the original floating-point model instead")
    names = find_targets(model, targets)
    check_pattern(cfg.bits_pattern, names, "bits_pattern")
    check_pattern(cfg.rank_pattern, names, "rank_pattern")
    for n in names:
        w = model.get_submodule(n).weight
        try:
            check_grid(cfg.grid_for(n), w.shape[1], n)
        except ValueError as e:
            raise QuantError(str(e)) from None
        if not w.is_meta:  # a block not read yet (rankwise.lazy) is checked when it is read
            check_finite(n, w)
    return names


def check_finite(name: str, w: Tensor) -> None:
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise QuantError(f"{name}: {bad} weights are NaN or inf; a quantization grid cannot hold them (check the checkpoint)")


def _groups(names: Sequence[str], aliases: dict[str, str]) -> list[list[str]]:
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(aliases.get(n, n), []).append(n)
    return list(out.values())


def quantize_(model: nn.Module, config: QuantConfig, method: str = "rtn", after_block=None, riders: dict | None = None,
              on_output=None) -> QuantReport:
    """Data-free quantization in place (torchao style): `quantize_(model, RTNConfig(bits=4))`.

    A lazily loaded model (rankwise.lazy) is quantized one block at a time, each block read, quantized,
    handed to `after_block(i, block)` and freed; with `riders` (calibrate's), the blocks are run over them
    too, in one block-sequential pass that measures nothing the quantizer uses."""
    quantizer = get_quantizer(method)
    if not isinstance(config, quantizer.config):
        raise QuantError(f"{method} takes a {quantizer.config.__name__}, not a {type(config).__name__}")
    if quantizer.observe:
        raise QuantError(f"{method} needs calibration data: use rankwise.quantize(model, batches, method={method!r})")
    if config.compensate == "eora":
        raise QuantError("compensate='eora' weights the error by the inputs' XᵀX, which needs calibration data: "
                         "use rankwise.quantize(model, batches, ...) with a calibrated method, or compensate='lorc'")
    unfuse_experts_(model)
    names = check_model(model, config.targets, config)
    report = QuantReport(method, config.model_dump())
    t = time.perf_counter()
    with torch.no_grad():
        if riders:
            def step(group: list[str], stats: Stats) -> None:  # data-free: the pass only carries the riders
                quantizer.quantize_groups(Context(model, config, report), [[n] for n in group], config)
                for n in group:  # what the pass measured is not used: bound memory to one block's statistics
                    if n in stats.layers:
                        stats.layers[n].m2 = None

            first = next(iter(riders.values()))[1][:1]  # the pass needs batches of its own; they measure nothing used
            calibrate(model, first, config.targets, progress=False, use_label_mask=False, step=step,
                      after_block=after_block, riders=riders, on_output=on_output)
        elif getattr(model, "rankwise_lazy", None) is None and after_block is None:
            quantizer.quantize_groups(Context(model, config, report), [[n] for n in names], config)
        else:
            _quantize_blocks(model, names, quantizer, config, report, after_block)
    report.seconds = time.perf_counter() - t
    return report


def _quantize_blocks(model: nn.Module, names: list[str], quantizer, config: QuantConfig, report: QuantReport,
                     after_block) -> None:
    """quantize_ one block at a time: read it (lazy), check and quantize its targets, after_block, free it."""
    from ..calib.blocks import find_blocks

    found = find_blocks(model, names)
    if found is None:
        raise QuantError("quantizing block by block needs a stack of blocks holding the targets")
    prefix, blocks = found
    lazy = getattr(model, "rankwise_lazy", None)
    inside = [[n for n in names if n.startswith(f"{prefix}.{i}.")] for i in range(len(blocks))]
    outside = [n for n in names if not any(n in group for group in inside)]
    ctx = Context(model, config, report)
    quantizer.quantize_groups(ctx, [[n] for n in outside], config)
    for i, group in enumerate(inside):
        if lazy is not None:
            lazy.load(f"{prefix}.{i}")
        for n in group:
            check_finite(n, model.get_submodule(n).weight)
        quantizer.quantize_groups(ctx, [[n] for n in group], config)
        if after_block is not None:
            after_block(i, blocks[i])
        if lazy is not None:
            lazy.free(f"{prefix}.{i}")


def quantize(model: nn.Module, batches: Sequence[dict] | None, method: str = "gptq", *, progress: bool = True,
             after_block=None, riders: dict | None = None, on_output=None, **options) -> QuantReport:
    """Quantize `model` in place with `method` (rtn, gptq, awq, …); options are the method's config keys.

    Calibrated methods run block-sequentially over `batches` (see the module docstring). Returns a
    report of each layer's error, storage bits and time. after_block, riders, on_output: calibrate's (a
    lazily loaded model written block by block, held-out batches carried through the same pass).
    """
    quantizer = get_quantizer(method)
    cfg = quantizer.config.build(where=f"quantize {method}", **options)
    if not quantizer.observe:
        return quantize_(model, cfg, method, after_block=after_block, riders=riders, on_output=on_output)
    if not batches:
        raise QuantError(f"{method} needs calibration batches (rankwise.load_data); only rtn is data-free")
    unfuse_experts_(model)
    check_model(model, cfg.targets, cfg)
    report = QuantReport(method, cfg.model_dump())
    t = time.perf_counter()
    try:
        stats = calibrate(model, batches, cfg.targets, observe=quantizer.observe, progress=progress,
                          use_label_mask=False,  # every token the model reads matters, prompts included
                          step=quant_step(model, quantizer, cfg, report),
                          true_sequential=getattr(cfg, "true_sequential", False),
                          after_block=after_block, riders=riders, on_output=on_output)
    finally:
        for q in quantized_layers(model).values():
            q.cache_weight_(False)
    report.seconds = time.perf_counter() - t
    report.tokens = max(st.n for st in stats.layers.values())
    return report


def quant_step(model: nn.Module, quantizer, cfg: QuantConfig, report: QuantReport):
    """calibrate's per-block step that quantizes the given targets (spending their XᵀX); after the pass,
    call `q.cache_weight_(False)` on every quantized layer (as quantize does)."""

    def step(group_names: list[str], stats: Stats) -> None:
        reached = [n for n in group_names if (n in stats.layers or n in stats.aliases) and stats[n].n > 0]
        report.unrouted += [n for n in group_names if n not in reached]  # an expert no token chose: left float
        group_names = reached
        for n in group_names:
            if not isinstance(model.get_submodule(n), QuantLinear):
                check_finite(n, model.get_submodule(n).weight)
        for q in quantized_layers(model).values():  # earlier blocks have fed theirs: drop their float copies
            q.cache_weight_(False)
        ctx = Context(model, cfg, report, stats)
        ctx.cache = True
        quantizer.quantize_groups(ctx, _groups(group_names, stats.aliases), cfg)
        for n in group_names:  # the Hessians are spent: bound memory to one block's statistics
            if n in stats.layers:
                stats.layers[n].m2 = None

    return step
