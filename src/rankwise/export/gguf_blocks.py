"""ggml block types that hold a QuantLinear's own codes and scales bit for bit (ggml-common.h layouts)."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ..quant.linear import QuantLinear

# (bits, symmetric) of a group-32 grid → the ggml block type that holds its codes and scales as they are
BLOCKS = {(4, True): T.Q4_0, (4, False): T.Q4_1, (8, True): T.Q8_0}
BLOCK = 32


def block_type(layer: QuantLinear) -> tuple[T | None, str]:
    """The ggml block type that holds this layer's grid exactly, or (None, why not)."""
    g = layer.grid
    btype = BLOCKS.get((g.bits, g.symmetric)) if g.group_size == BLOCK else None
    if btype is None:
        return None, f"its grid ({g.bits} bits, group {g.group_size}, symmetric={g.symmetric}) is no GGUF block type"
    if layer.input_scale is not None:
        return None, "it has a per-channel input_scale that GGUF blocks cannot hold"
    s, z = layer.scale.float(), layer.zero.float()
    if not torch.equal(s.half().float(), s):
        return None, "its scales are not float16-exact"
    if g.symmetric and not bool((z == 2 ** (g.bits - 1)).all()):
        return None, "its zero points are not the symmetric 2^(b-1)"
    if not g.symmetric and not torch.equal((s * z).half().float(), s * z):
        return None, "its offsets s·z are not float16-exact"
    return btype, ""


def pack_blocks(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, btype: T) -> np.ndarray:
    """Raw ggml blocks [rows, blocks·bytes] uint8 from codes [rows, in], s, z [rows, in/32] (ggml-common.h).

    Q4_0: fp16 d, 16 bytes of nibbles (byte j: element j low, j + 16 high). Q4_1: fp16 d, fp16 m, nibbles.
    Q8_0: fp16 d, 32 int8 values.
    """
    rows, n_in = codes.shape
    c = codes.cpu().numpy().reshape(rows, n_in // BLOCK, BLOCK)
    s = scale.float().cpu().numpy()
    parts = [s.astype(np.float16).view(np.uint8).reshape(rows, -1, 2)]
    if btype == T.Q8_0:
        parts.append((c.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
    else:
        if btype == T.Q4_1:
            m = -(s * zero.float().cpu().numpy())
            parts.append(m.astype(np.float16).view(np.uint8).reshape(rows, -1, 2))
        parts.append(c[..., : BLOCK // 2] | (c[..., BLOCK // 2:] << 4))
    return np.ascontiguousarray(np.concatenate(parts, axis=-1).reshape(rows, -1))
