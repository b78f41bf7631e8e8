"""compress_base: make the frozen base of a QLoRA-style run — quantized (rtn, gptq, awq) or SVD-factored
(svd, asvd, svd-llm) — and keep the float weights it was made from, for the inits that start from the
compression error (loftq, compensation)."""

from __future__ import annotations

import difflib

from pydantic import ConfigDict, model_validator
from torch import Tensor, nn

from ..config import StrictModel
from ..errors import ConfigError
from ..targets import find_targets
from .svd import METHODS as SVD_METHODS


def base_methods() -> tuple[str, ...]:
    from ..quant import all_quantizers

    return ("none", *all_quantizers(), *SVD_METHODS)


def _options_config(method: str):
    """The pydantic config that the options of base method `method` must fit."""
    if method in SVD_METHODS:
        from .svd import SVDConfig

        return SVDConfig
    from ..quant import get_quantizer

    return get_quantizer(method).config


class BaseSection(StrictModel):
    """The frozen base the adapter trains on: `base: {method: gptq, bits: 3, group_size: 64}` or
    `base: {method: svd-llm, ratio: 0.8}`; `none` (default): the float model. Other keys are the
    method's own (`rankwise quantizers`; SVDConfig for the SVD methods)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    method: str = "none"

    @model_validator(mode="after")
    def _check(self):
        methods = base_methods()
        if self.method not in methods:
            near = difflib.get_close_matches(self.method, methods, n=1)
            raise ValueError(f"base method {self.method!r} is not one of {', '.join(methods)}"
                             + (f"; did you mean {near[0]!r}?" if near else ""))
        extra = dict(self.model_extra or {})
        if self.method == "none":
            if extra:
                raise ValueError(f"base method 'none' takes no options (got {', '.join(extra)})")
            return self
        cfg = _options_config(self.method)
        unknown = [k for k in extra if k not in cfg.model_fields or k == "method"]
        if unknown:
            near = difflib.get_close_matches(unknown[0], list(cfg.model_fields), n=1)
            raise ValueError(f"unknown key {unknown[0]!r} for base method {self.method!r}"
                             + (f"; did you mean {near[0]!r}?" if near else f"; it takes: {', '.join(cfg.model_fields)}"))
        if extra.get("compensate", "none") != "none":
            raise ValueError("base.compensate: the adapter is the compensation here; use init method 'compensation'")
        cfg.build(where=f"base (method {self.method!r})", **self._kwargs())
        return self

    def _kwargs(self) -> dict:
        extra = dict(self.model_extra or {})
        return extra | ({"method": self.method} if self.method in SVD_METHODS else {})

    def options(self) -> dict:
        return dict(self.model_extra or {})


def compress_base(model: nn.Module, batches, method: str, progress: bool = True, **options) -> tuple[object, dict[str, Tensor]]:
    """Compress `model`'s targeted linears in place with `method` (a quantizer or an SVD method) and return
    (its report, {name: the float weight [out, in] before}, on the CPU)."""
    BaseSection.build(where="compress_base", method=method, **options)  # the same checks as YAML
    if method == "none":
        raise ConfigError("compress_base: method 'none' leaves the base as it is")
    targets = options.get("targets", "all-linear")
    # AWQ folds its scales into earlier ops, so the float weights change too: W − Q would mix two spaces.
    originals = {} if method == "awq" else {
        n: model.get_submodule(n).weight.detach().float().cpu().clone() for n in find_targets(model, targets)}
    if method == "awq":
        options = {"explicit_scales": False} | options  # an input scale left on a layer has no place in compressed-tensors
    if method in SVD_METHODS:
        from .svd import compress

        report = compress(model, batches, method, progress=progress, **options)
    else:
        from ..quant import quantize

        report = quantize(model, batches, method, progress=progress, **options)
    for p in model.parameters():
        p.requires_grad_(False)
    return report, originals
