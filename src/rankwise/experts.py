"""MoE experts as one linear layer per expert and projection.

transformers 5 stores a block's experts fused: gate_up_proj [E, 2I, H] (gate rows first) and down_proj
[E, H, I], one module computing every expert in a loop. `unfuse_experts_` puts an `ExpertLinears` in its place
that computes exactly the same thing through nn.Linear layers `<experts>.<e>.w_gate / w_up / w_down` (not
gate_proj/up_proj/down_proj: peft would take those for transformers 4 MoE names and retarget them),
so that each expert is an ordinary layer to calibrate (on the tokens routed to it), quantize and export;
`fuse_experts_` puts the fused module back (float weights) for a checkpoint transformers reloads. The router
is a module of its own and stays as it is.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .arch import arch_of, block_of
from .quant.linear import plain_linear, set_module


class Expert(nn.Module):
    """One expert: down(act(gate(x)) · up(x))."""

    def __init__(self, gate: Tensor, up: Tensor, down: Tensor):
        super().__init__()
        self.w_gate, self.w_up, self.w_down = (plain_linear(w.detach(), None) for w in (gate, up, down))


class ExpertLinears(nn.ModuleList):
    """The experts of one MoE block as a list of `Expert`s, called like transformers' fused experts module:
    (hidden_states [tokens, H], top_k_index [tokens, k], top_k_weights [tokens, k]) → [tokens, H].

    The input rows of each expert's projections carry `rankwise_rows` (their token positions in the flattened
    batch), so calibration can leave padding out of each expert's statistics."""

    rankwise_experts = True

    def __init__(self, fused: nn.Module):
        gate, up = fused.gate_up_proj.chunk(2, dim=1)
        super().__init__(Expert(g, u, d) for g, u, d in zip(gate, up, fused.down_proj))
        self.__dict__["act_fn"] = fused.act_fn  # not a child: the list holds experts only
        self.__dict__["fused"] = fused  # its class and config, to fuse back into; its weights are released
        fused.gate_up_proj = nn.Parameter(torch.empty(0), requires_grad=False)
        fused.down_proj = nn.Parameter(torch.empty(0), requires_grad=False)
        # float experts keep the fused names in the state dict: save_pretrained writes what transformers loads
        self._register_state_dict_hook(_fused_state)
        self._register_load_state_dict_pre_hook(_unfused_state, with_module=True)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)
        hit = torch.zeros(len(self), dtype=torch.bool, device=top_k_index.device)
        hit[top_k_index.reshape(-1)] = True
        for e in hit.nonzero()[:, 0].tolist():
            token, slot = torch.where(top_k_index == e)
            x = hidden_states[token]
            x.rankwise_rows = token
            expert = self[e]
            h = self.act_fn(expert.w_gate(x)) * expert.w_up(x)
            h.rankwise_rows = token  # w_down's input rows are the same tokens
            y = expert.w_down(h)
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out

    @torch.no_grad()
    def fused_module(self) -> nn.Module:
        """The transformers module this replaced, holding every expert's current (float) weights."""
        fused = self.__dict__["fused"]
        gate_up = torch.stack([torch.cat([e.w_gate.weight, e.w_up.weight]) for e in self])
        fused.gate_up_proj = nn.Parameter(gate_up.detach().clone(), requires_grad=False)
        fused.down_proj = nn.Parameter(torch.stack([e.w_down.weight for e in self]).detach().clone(),
                                       requires_grad=False)
        return fused


def _keys(prefix: str, n: int) -> list[tuple[str, str, str]]:
    return [tuple(f"{prefix}{e}.{p}.weight" for p in ("w_gate", "w_up", "w_down")) for e in range(n)]


def _fused_state(module: ExpertLinears, state: dict, prefix: str, _meta) -> None:
    """state_dict hook: plain float experts written as transformers' gate_up_proj / down_proj (an adapter or a
    quantized expert keeps its own keys)."""
    keys = _keys(prefix, len(module))
    if not all(k in state for trio in keys for k in trio):
        return
    state[f"{prefix}gate_up_proj"] = torch.stack([torch.cat([state[g], state[u]]) for g, u, _ in keys])
    state[f"{prefix}down_proj"] = torch.stack([state[d] for _, _, d in keys])
    for k in (k for trio in keys for k in trio):
        del state[k]


def _unfused_state(module: ExpertLinears, state: dict, prefix: str, *_args) -> None:
    """load_state_dict pre-hook: transformers' fused expert tensors split into the per-expert weights."""
    if f"{prefix}gate_up_proj" not in state:
        return
    gate_up, down = state.pop(f"{prefix}gate_up_proj"), state.pop(f"{prefix}down_proj")
    for e, (g, u, d) in enumerate(_keys(prefix, len(module))):
        state[g], state[u] = gate_up[e].chunk(2)
        state[d] = down[e]


def _expert_modules(model: nn.Module, cls) -> dict[str, nn.Module]:
    family = arch_of(model)
    if family is None or family.experts is None:
        return {}
    return {n: m for n, m in model.named_modules()
            if isinstance(m, cls) and (w := block_of(family, n)) is not None and w[1] == family.experts}


def unfuse_experts_(model: nn.Module) -> list[str]:
    """Replace every fused experts module the family's table entry names by ExpertLinears (in place); return
    their names."""
    fused = {n: m for n, m in _expert_modules(model, nn.Module).items()
             if isinstance(getattr(m, "gate_up_proj", None), Tensor) and m.gate_up_proj.ndim == 3}
    for name, module in fused.items():
        set_module(model, name, ExpertLinears(module))
    return list(fused)


def fuse_experts_(model: nn.Module) -> nn.Module:
    """Put transformers' fused experts back in place of every ExpertLinears (float weights: quantized experts
    must be dequantized first). Returns the model."""
    for name, module in _expert_modules(model, ExpertLinears).items():
        set_module(model, name, module.fused_module())
    return model
