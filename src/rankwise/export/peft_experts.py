"""An adapter trained on unfused MoE experts (experts.py: one linear per expert) as peft's LoRA on transformers'
fused expert parameters (`target_parameters`), the form that loads on the original checkpoint.

Per expert e, gate and up read one input: their two LoRAs are one of rank r_g + r_u on gate_up_proj,
A = [A_g; A_u], B = [s_g·B_g, 0; 0, s_u·B_u] (each layer's scale s folded into B, so the written scale is 1).
peft's ParamWrapper holds the experts of one parameter as lora_A [R·E, in] (expert-major rows) and lora_B
[out, R·E] (column j·E + e is expert e's j-th), one rank R for all: smaller ranks are padded with zeros,
which changes no product.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from ..experts import ExpertLinears

_KEY = re.compile(r"^base_model\.model\.(.+)\.(\d+)\.(w_gate|w_up|w_down)\.lora_([AB])\.weight$")


def to_fused_experts(folder: Path, model: nn.Module) -> str | None:
    """Rewrite the saved adapter in `folder` (from a PeftModel over `model`, experts unfused) so its expert LoRAs
    sit on the fused parameters; return a note for rankwise.json, or None when it has no expert LoRA."""
    from safetensors.torch import load_file, save_file

    experts = {n: m for n, m in model.named_modules() if isinstance(m, ExpertLinears)}
    weights_path, cfg_path = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    tensors, cfg = load_file(str(weights_path)), json.loads(cfg_path.read_text())
    found = {k: m for k in tensors if (m := _KEY.match(k)) and m.group(1) in experts}
    if not found:
        return None
    factors = {}  # (experts module, parameter, expert) → (A, B·s)
    for name, module in experts.items():
        for e in range(len(module)):
            ex = module[e]
            parts = [_scaled(tensors, cfg, f"{name}.{e}.{p}") for p in ("w_gate", "w_up")]
            factors[name, "gate_up_proj", e] = _block_diag(parts, ex.w_gate.out_features, ex.w_up.out_features,
                                                           ex.w_gate.in_features)
            factors[name, "down_proj", e] = _block_diag([_scaled(tensors, cfg, f"{name}.{e}.w_down")],
                                                        ex.w_down.out_features, None, ex.w_down.in_features)
    rank = max(1, max(a.shape[0] for a, _ in factors.values()))
    for k in found:
        del tensors[k]
    # the other adapted layers by full name (peft's saved target_modules may be shortened to leaf names), each
    # with its own rank and alpha now that r and lora_alpha are the experts'
    keep = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and not any(n.startswith(f"{x}.") for x in experts)]
    params = [f"{name}.{p}" for name in experts for p in ("gate_up_proj", "down_proj")]
    new = dict(cfg, r=rank, lora_alpha=math.sqrt(rank) if cfg.get("use_rslora") else rank, target_modules=keep,
               target_parameters=params,
               rank_pattern={n: (cfg.get("rank_pattern") or {}).get(n, cfg["r"]) for n in keep},
               alpha_pattern={n: (cfg.get("alpha_pattern") or {}).get(n, cfg["lora_alpha"]) for n in keep})
    for wrapper, (name, param) in _wrappers(model, new).items():
        a, b = _stack([factors[name, param, e] for e in range(len(experts[name]))], rank)
        tensors[f"{wrapper}.lora_A.weight"], tensors[f"{wrapper}.lora_B.weight"] = a, b
    save_file(tensors, str(weights_path), metadata={"format": "pt"})
    cfg_path.write_text(json.dumps(new, indent=2, sort_keys=True))
    return (f"the experts' LoRAs (one per expert and projection) are written as peft's LoRA on the fused expert "
            f"parameters ({len(params)} target_parameters, rank {rank} per expert)")


def _scaled(tensors: dict, cfg: dict, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, s·B) of one layer's LoRA, or None when the layer has none."""
    key = f"base_model.model.{name}"
    if f"{key}.lora_A.weight" not in tensors:
        return None
    r = (cfg.get("rank_pattern") or {}).get(name, cfg["r"])
    alpha = (cfg.get("alpha_pattern") or {}).get(name, cfg["lora_alpha"])
    s = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return tensors[f"{key}.lora_A.weight"].float(), s * tensors[f"{key}.lora_B.weight"].float()


def _block_diag(parts, out_first: int, out_second: int | None, n_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r₁ + r₂, in] and B [out₁ (+ out₂), r₁ + r₂] of the LoRAs stacked on one input (absent ones rank 0)."""
    outs = [out_first] + ([out_second] if out_second is not None else [])
    parts = [p if p is not None else (torch.zeros(0, n_in), torch.zeros(o, 0)) for p, o in zip(parts, outs)]
    a = torch.cat([p[0] for p in parts])
    b = torch.block_diag(*[p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return a, b


def _stack(per_expert: list[tuple[torch.Tensor, torch.Tensor]], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's ParamWrapper layout: A [R·E, in] expert-major, B [out, R·E] with column j·E + e; zero-padded to R."""
    n = len(per_expert)
    a_all = torch.zeros(n, rank, per_expert[0][0].shape[1])
    b_all = torch.zeros(per_expert[0][1].shape[0], rank, n)
    for e, (a, b) in enumerate(per_expert):
        a_all[e, : a.shape[0]] = a
        b_all[:, : b.shape[1], e] = b
    return a_all.reshape(n * rank, -1).contiguous(), b_all.reshape(b_all.shape[0], -1).contiguous()


def _wrappers(model: nn.Module, cfg: dict) -> dict[str, tuple[str, str]]:
    """{adapter key prefix of a ParamWrapper: (experts module, parameter)}, found by letting peft wrap the fused
    architecture on the meta device (its nesting order is peft's business, not ours)."""
    from peft import LoraConfig, get_peft_model

    keys = {k for k in LoraConfig.__dataclass_fields__}
    config = LoraConfig(**{k: v for k, v in cfg.items() if k in keys and k not in ("peft_type", "base_model_name_or_path",
                                                                                 "revision", "task_type")})
    with torch.device("meta"):
        fresh = type(model)(model.config)
    peft_model = get_peft_model(fresh, config)
    found = {}
    for name, module in peft_model.named_modules():
        if type(module).__name__ == "ParamWrapper":
            owner = name.removeprefix("base_model.model.")
            while owner.endswith(".base_layer"):
                owner = owner.removesuffix(".base_layer")
            found[name] = (owner, module.parameter_name)
    return found
