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
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .errors import DiskSpaceError, MemoryBudgetError

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


def check_fits(model: nn.Module, device, tokens: int, riders: int = 0, what: str = "this run",
               cache_dir: str | Path | None = None, log=None) -> dict[str, int]:
    """MemoryBudgetError when estimate() exceeds available_bytes(); returns the estimate.

    cache_dir: the hidden-state cache goes to files there (calib.blocks.offload_cache). Without it, a run that
    fits only without its cache has the cache put in the system's temporary folder, said through `log`.
    Either way the folder must have room for the cache (DiskSpaceError otherwise)."""
    from .calib.blocks import offload_cache

    parts = estimate(model, tokens, riders)
    free = available_bytes(device)
    spill = cache_dir
    if spill is None and free is not None and sum(parts.values()) > free >= sum(parts.values()) - parts["cache"]:
        spill = tempfile.gettempdir()
        if log is not None:
            log(f"the hidden-state cache ({parts['cache'] / 2**30:.2f} GiB) would not fit in memory: it goes to "
                f"files under {spill} (choose the folder with --offload-cache DIR)")
    if spill is not None:
        check_disk(spill, parts["cache"], "the hidden-state cache")
        offload_cache(model, spill)
        parts["cache"] = 0
    need = sum(parts.values())
    if free is not None and need > free:
        detail = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in parts.items())
        lazy = getattr(model, "rankwise_lazy", None) is not None
        raise MemoryBudgetError(
            f"{what} needs about {need / 2**30:.2f} GiB more ({detail} GiB) and {free / 2**30:.2f} GiB is free on "
            f"{device}; bring it down with fewer calibration tokens (--n-samples, --seq-len), --dtype bfloat16"
            + ("" if lazy else ", or a safetensors checkpoint (read one block at a time instead of whole)")
            + "; nothing was written")
    return parts


def check_disk(folder: str | Path, need: int, what: str) -> None:
    """DiskSpaceError when the file system holding `folder` (or its nearest existing parent) has less than
    `need` bytes free."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    free = shutil.disk_usage(path).free
    if need > free:
        raise DiskSpaceError(f"{what} needs about {need / 2**30:.2f} GiB on disk and {path} has "
                             f"{free / 2**30:.2f} GiB free; choose another folder; nothing was written")


def output_bytes(model: nn.Module, kind: str, bits: int = 16, group_size: int | None = None, keep: float = 1.0) -> int:
    """Bytes of the model written as `kind`: "dense" (every tensor in the model's dtype), "quantized" (the
    targeted linears at `bits` per weight plus a 16-bit scale and zero per group, the rest dense) or
    "factored" (the targeted linears at `keep` of their size). Shapes only: a lazily loaded model's
    unread tensors count."""
    from .targets import find_targets

    modules = dict(model.named_modules())
    linears = {id(modules[n].weight) for n in find_targets(model, "all-linear") if hasattr(modules[n], "weight")}
    total = 0
    for p in {id(p): p for p in list(model.parameters()) + list(model.buffers())}.values():
        elt = p.element_size()
        if id(p) not in linears or kind == "dense":
            total += p.numel() * elt
        elif kind == "quantized":
            groups = p.numel() // (group_size or p.shape[-1])
            total += p.numel() * bits // 8 + groups * 4
        else:
            total += int(p.numel() * elt * keep)
    return total
