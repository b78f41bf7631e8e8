"""adapt_(model, plan) → PeftModel whose LoRA layers carry the plan's initial weights."""

from __future__ import annotations

import torch
from torch import nn

from .errors import PlanError
from .plan.plan import Plan


def lora_config(plan: Plan, **extra):
    """The peft LoraConfig that reproduces the plan's per-layer ranks and alphas."""
    from peft import LoraConfig

    active = plan.active()
    if not active:
        raise PlanError("the plan gives every layer rank 0; nothing to adapt")
    # Full module names as pattern keys: each key then matches exactly one module.
    return LoraConfig(
        r=plan.rank,
        lora_alpha=plan.alpha,
        target_modules=list(active),
        rank_pattern={n: lp.rank for n, lp in active.items() if lp.rank != plan.rank},
        alpha_pattern={n: lp.alpha for n, lp in active.items() if lp.alpha != plan.alpha},
        lora_dropout=0.0,
        bias="none",
        use_rslora=bool(plan.config.get("rslora", False)),
        **extra,
    )


@torch.no_grad()
def adapt_(model: nn.Module, plan: Plan, adapter_name: str = "default", **lora_kwargs):
    """Wrap `model` in peft LoRA layers as the plan says (in place) and set A, B from the plan.

    Layers with rank 0 get no adapter. A residual layer's base weight becomes W − scale·B·A with the
    scale peft applies (so the model computes what it did before); a layer whose method re-made its
    compressed base (LoftQ) gets that module first. Compressed linears (QuantLinear, LowRankLinear) are
    wrapped by peft's LoRA layer too and stay frozen. Returns the PeftModel.
    """
    from peft import get_peft_model

    missing = [n for n, lp in plan.active().items() if lp.lora_A is None]
    if missing:
        raise PlanError(f"the plan has no initial weights for {missing[:3]} (a plan loaded from JSON holds no tensors)")
    from .cores import install_core_
    from .peft_layers import register_compressed
    from .quant.linear import set_module

    for name, lp in plan.active().items():
        if lp.residual and not isinstance(model.get_submodule(name), nn.Linear):
            kind = type(model.get_submodule(name)).__name__
            raise PlanError(f"{plan.method} changes the base weight, but {name} is a {kind} (a compressed base "
                            "whose weights stay frozen); on a quantized base use loftq or compensation")
        if lp.residual and lp.core is not None:
            raise PlanError(f"{name}: a layer with a trained core cannot also change its base weight")
        if lp.new_base is not None:  # the method re-made the compressed base (LoftQ's codes)
            set_module(model, name, lp.new_base)
    config = register_compressed(lora_config(plan, **lora_kwargs), model)
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    base = peft_model.base_model.model
    for name, lp in plan.active().items():
        layer = base.get_submodule(name)
        a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        if a.shape != lp.lora_A.shape or b.shape != lp.lora_B.shape:
            raise PlanError(f"{name}: peft made A {tuple(a.shape)}, B {tuple(b.shape)}; the plan has "
                            f"{tuple(lp.lora_A.shape)}, {tuple(lp.lora_B.shape)}")
        a.copy_(lp.lora_A)
        b.copy_(lp.lora_B)
        if lp.core is not None:  # LoRA-SB, SVFit: A and B frozen, the core between them trained
            install_core_(layer, adapter_name, lp.core)
        if lp.residual and not getattr(model, "rankwise_hollow", False):  # (hollow: rankwise.lazy; export uses the plan)
            w = layer.get_base_layer().weight
            delta = layer.scaling[adapter_name] * (lp.lora_B.double() @ lp.lora_A.double())
            w.copy_((w.double() - delta.to(w.device)).to(w.dtype))
    peft_model.rankwise_plan = plan
    return peft_model
