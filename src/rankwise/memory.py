"""Peak memory of a run, estimated before it starts, and a refusal (one `error:` line) when it would not fit.

The check runs once the model is loaded (lazily: only the tensors outside the blocks are in memory), so what
is resident already is part of what the system no longer counts as free; the estimate is of what is still
to come: one block in the model's dtype plus its float32 working copies, the float64 statistics of its
linears, and the cached hidden states of the calibration (and held-out) batches. It is an estimate: a run
that is refused would have been killed, a run that passes may still be close.

RANKWISE_MAX_MEMORY (bytes, or with a unit: 8GB, 6GiB) caps what a run may plan for below what is free.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .errors import MemoryBudgetError

def available_bytes(device: str | torch.device = "cpu") -> int | None:
    """Free memory of the device (CUDA: free GPU memory; CPU: MemAvailable), capped by RANKWISE_MAX_MEMORY."""
    device = torch.device(device)
    free = None
    if device.type == "cuda" and torch.cuda.is_available():
        free = torch.cuda.mem_get_info(device)[0]
    elif device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration):
            free = None
    cap = os.environ.get("RANKWISE_MAX_MEMORY")
    if cap:
        from .compress import parse_size

        free = min(free, parse_size(cap)) if free is not None else parse_size(cap)
    return free


def estimate(model: nn.Module, tokens: int, riders: int = 0) -> dict[str, int]:
    """{part: bytes} still to be allocated by a block-by-block run of `model` (lazily loaded or whole) over
    `tokens` calibration tokens and `riders` held-out tokens."""
    from .calib.blocks import find_blocks
    from .targets import find_targets

    params = list(model.parameters())
    found = find_blocks(model, find_targets(model, "all-linear"))
    block = list(found[1][0].parameters()) if found else params
    linears = [m for m in (found[1][0] if found else model).modules() if isinstance(m, nn.Linear)]
    widest = max((m.in_features for m in linears), default=0)
    hidden = getattr(model.config, "hidden_size", widest)
    elt = params[0].element_size() if params else 4
    block_numel = sum(p.numel() for p in block)
    lazy = getattr(model, "rankwise_lazy", None)
    return {
        "block": (block_numel * elt if lazy is not None else 0) + block_numel * 4,  # its weights, float32 copies
        "statistics": 2 * widest * widest * 8 + sum(m.in_features ** 2 for m in linears) * 8 // 2,
        "cache": 3 * (tokens + 2 * riders) * hidden * elt,  # block inputs, outputs and call arguments
    }


def check_fits(model: nn.Module, device, tokens: int, riders: int = 0, what: str = "this run") -> dict[str, int]:
    """MemoryBudgetError when estimate() exceeds available_bytes(); returns the estimate."""
    parts = estimate(model, tokens, riders)
    need, free = sum(parts.values()), available_bytes(device)
    if free is not None and need > free:
        detail = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in parts.items())
        lazy = getattr(model, "rankwise_lazy", None) is not None
        raise MemoryBudgetError(
            f"{what} needs about {need / 2**30:.2f} GiB more ({detail} GiB) and {free / 2**30:.2f} GiB is free on "
            f"{device}; bring it down with fewer calibration tokens (--n-samples, --seq-len), --dtype bfloat16"
            + ("" if lazy else ", or a safetensors checkpoint (read one block at a time instead of whole)")
            + "; nothing was written")
    return parts
