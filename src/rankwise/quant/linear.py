"""QuantLinear: a linear layer held as integer codes, scales and zero points, dequantized on the fly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..numerics.quantize import Grid, dequantize


class _FrozenLinear(torch.autograd.Function):
    """y = x·Wᵀ + b for a frozen weight computed by `module.weight`, saving nothing for backward but the
    module: the backward pass dequantizes again (as QLoRA does) instead of keeping every layer's float
    weight alive between forward and backward."""

    @staticmethod
    def forward(ctx, x: Tensor, module: nn.Module) -> Tensor:
        ctx.module = module
        bias = None if module.bias is None else module.bias.to(x.dtype)
        return F.linear(x, module.weight.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad @ ctx.module.weight.to(grad.dtype), None


class QuantLinear(nn.Module):
    """y = x·Wᵀ + b with W = (q − z)·s (per row and group) · diag(1/input_scale) [+ B·A, a compensation].

    Buffers: `codes` [out, in] uint8, `scale` [out, groups] float32 (float16-exact), `zero`
    [out, groups] uint8, `input_scale` [in] float32 or None (AWQ's per-channel scale when no earlier
    op could absorb it: the stored grid holds W·diag(input_scale)). `bias` stays a frozen parameter.
    `weight` is the effective float weight, computed on access, so code that reads `.weight` works.
    Nothing in it is trained: an adapter on top learns, the codes stay as they are (QLoRA).
    """

    rankwise_linear = True  # a linear layer to targets.find_targets, one that peft wraps through peft_layers

    def __init__(self, codes: Tensor, scale: Tensor, zero: Tensor, grid: Grid, bias: Tensor | None = None,
                 input_scale: Tensor | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.grid, self.compute_dtype = grid, dtype
        self.register_buffer("codes", codes.to(torch.uint8).contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("zero", zero.to(torch.uint8).contiguous())
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.register_buffer("lora_a", None)  # [k, in]: optional low-rank compensation B·A of the rounding error
        self.register_buffer("lora_b", None)  # [out, k]
        self._cached: Tensor | None = None  # see cache_weight_

    def compensate_(self, a: Tensor, b: Tensor) -> None:
        """Add B [out, k] · A [k, in] to the effective weight (LoRC / EoRA); the grid is left as it is."""
        self.lora_a, self.lora_b = a.float().contiguous(), b.float().contiguous()
        self._cached = None

    def cache_weight_(self, on: bool = True) -> None:
        """Keep the dequantized weight between calls (while calibration re-runs the block batch after
        batch: the float weight was in memory until now anyway), or drop it."""
        self._cached = None
        if on:
            self._cached = self.weight

    def grid_weight(self) -> Tensor:
        """(q − z)·s [out, in] float32: the weight exactly as the grid holds it (before input_scale)."""
        return dequantize(self.codes, self.scale, self.zero)

    @property
    def weight(self) -> Tensor:
        if self._cached is not None:
            return self._cached
        w = self.grid_weight()
        if self.input_scale is not None:
            w = w / self.input_scale[None, :]
        if self.lora_a is not None:
            w = w + self.lora_b @ self.lora_a
        return w.to(self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad and self._cached is None:
            return _FrozenLinear.apply(x, self)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)

    @property
    def bits_per_weight(self) -> float:
        """Storage per weight: the code plus its group's float16 scale (and zero point if asymmetric)."""
        low_rank = 0 if self.lora_a is None else 16 * self.lora_a.shape[0] * (self.in_features + self.out_features)
        return self.grid.bits_per_weight(self.in_features) + low_rank / self.codes.numel()

    def extra_repr(self) -> str:
        g = self.grid
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={g.bits}, "
                f"group_size={g.group_size}, symmetric={g.symmetric}, input_scale={self.input_scale is not None}")


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def plain_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An nn.Linear holding `weight` [out, in] (its dtype and device) and `bias`."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def replace_by_linear(model: nn.Module, name: str, weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """Put a plain nn.Linear holding `weight` [out, in] (its dtype and device) and `bias` in place of `name`."""
    lin = plain_linear(weight, bias)
    set_module(model, name, lin)
    return lin


def dequantize_(model: nn.Module) -> nn.Module:
    """Replace every QuantLinear by an nn.Linear holding its effective float weight (in place)."""
    for name, q in quantized_layers(model).items():
        replace_by_linear(model, name, q.weight, q.bias)
    return model
