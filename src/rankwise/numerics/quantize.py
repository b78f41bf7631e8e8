"""Integer weight grids and the math of RTN, GPTQ and AWQ (pure tensor→tensor functions).

A weight W [out, in] is split along its input axis into groups of `group_size` columns (one group =
per output channel). Each (row, group) has a scale s and an integer zero point z, and a code
q ∈ [0, 2^b − 1]; the weight it stands for is (q − z)·s:

- symmetric: s = 2·max|w| / (2^b − 1), z = 2^(b−1) (GPTQ's convention; compressed-tensors stores q − z
  as a signed integer with zero point 0, GGUF's Q4_0/Q8_0 blocks store q with d = s);
- asymmetric: s = (max(w, 0) − min(w, 0)) / (2^b − 1), z = round(−min(w, 0)/s) (GGUF's Q4_1 stores
  d = s and m = −s·z).

Scales are rounded to float16, the precision GGUF blocks keep, so that a GGUF file can hold our codes
and scales exactly. For asymmetric grids of ≤ 5 bits the scale keeps 11 − b significant bits, so that
the offset s·z of Q4_1/Q5_1 is float16-exact too (a ≤ 2^−(11−b) relative change of the step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class Grid:
    """bits b ∈ [2, 8]; group_size columns per scale (None: one scale per output row); symmetric."""

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size is None else in_features // self.group_size

    def width(self, in_features: int) -> int:
        return in_features if self.group_size is None else self.group_size

    def bits_per_weight(self, in_features: int) -> float:
        """Storage per weight: the code plus its group's float16 scale (and b-bit zero point if asymmetric)."""
        per_group = 16 + (0 if self.symmetric else self.bits)
        return self.bits + per_group * self.groups(in_features) / in_features


def check_grid(grid: Grid, in_features: int, where: str) -> None:
    """ValueError naming `where` if the grid cannot quantize a layer of this input width."""
    if not MIN_BITS <= grid.bits <= MAX_BITS:
        raise ValueError(f"bits must be between {MIN_BITS} and {MAX_BITS}, not {grid.bits}")
    g = grid.group_size
    if g is not None and (g <= 0 or in_features % g):
        ok = [c for c in (32, 64, 128, 256) if in_features % c == 0]
        raise ValueError(f"group size {g} does not divide the input width {in_features} of {where}; "
                         f"sizes that do: {ok or 'none of 32/64/128/256'} (or per-channel)")


def _round_significand(x: Tensor, bits: int) -> Tensor:
    """x rounded to `bits` significant bits (x > 0), as float32."""
    mant, exp = torch.frexp(x)
    return torch.ldexp(torch.round(mant * 2**bits) / 2**bits, exp)


def fp16_scale(s: Tensor, grid: Grid) -> Tensor:
    """Scales made exactly representable as GGUF keeps them (see the module docstring); > 0."""
    s = s.float().clamp(min=2.0**-24, max=65504.0)
    if not grid.symmetric and grid.bits <= 5:
        s = _round_significand(s, 11 - grid.bits)
    return s.half().float().clamp_min(2.0**-24)


def grid_params(w: Tensor, grid: Grid, clip: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
    """(scale, zero) [rows, groups] for W [rows, in], its range shrunk by `clip` (scalar or [rows, groups])."""
    g = w.reshape(w.shape[0], -1, grid.width(w.shape[1])).float()
    if grid.symmetric:
        amax = g.abs().amax(-1) * clip
        scale = fp16_scale(torch.where(amax > 0, 2 * amax / grid.qmax, 1.0), grid)
        zero = torch.full_like(scale, 2 ** (grid.bits - 1))
        return scale, zero
    lo, hi = g.amin(-1).clamp(max=0) * clip, g.amax(-1).clamp(min=0) * clip
    scale = fp16_scale(torch.where(hi > lo, (hi - lo) / grid.qmax, 1.0), grid)
    zero = torch.round(-lo / scale).clamp(0, grid.qmax)
    return scale, zero


def quantize(w: Tensor, scale: Tensor, zero: Tensor, grid: Grid) -> Tensor:
    """Codes q = clamp(round(w/s) + z, 0, 2^b − 1) [rows, in] uint8, for W [rows, in], s, z [rows, groups]."""
    rows, n = w.shape
    g = w.float().reshape(rows, scale.shape[1], -1)  # [rows, groups, width]: broadcast, no repeat
    return torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, grid.qmax).to(torch.uint8).reshape(rows, n)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor, dtype=torch.float32) -> Tensor:
    """W = (q − z)·s [rows, in] for codes [rows, in] and s, z [rows, groups] (exact in float32)."""
    rows, n = codes.shape
    c = codes.reshape(rows, scale.shape[1], -1).float()  # [rows, groups, width]: broadcast, no repeat
    return ((c - zero.float()[..., None]) * scale.float()[..., None]).reshape(rows, n).to(dtype)


def rtn(w: Tensor, grid: Grid, clip: Tensor | float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest: (codes, scale, zero) for W [rows, in]."""
    scale, zero = grid_params(w, grid, clip)
    return quantize(w, scale, zero, grid), scale, zero


def fake_quantize(w: Tensor, grid: Grid, clip: Tensor | float = 1.0) -> Tensor:
    """W quantized and dequantized with RTN, same shape and dtype."""
    return dequantize(*rtn(w, grid, clip), dtype=w.dtype)


def output_error(w: Tensor, w_hat: Tensor, h: Tensor) -> float:
    """Σ over calibration rows of ‖(W − Ŵ)x‖² = tr(D H Dᵀ), D = W − Ŵ [out, in], H = XᵀX [in, in]."""
    d = (w - w_hat).to(h.dtype)
    return float(((d @ h) * d).sum())


# --- GPTQ (Frantar et al. 2022, Algorithm 1) -------------------------------------------------------


def _inverse_cholesky(h: Tensor, damp: float) -> tuple[Tensor, float]:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = damp·mean(diag H); damp ×10 until H + λI factors."""
    mean_diag = float(torch.diagonal(h).mean())
    first = damp
    for _ in range(6):
        hd = h + damp * mean_diag * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            u, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return u, damp
        damp *= 10
    raise ValueError(f"the Hessian H = XᵀX does not factor even with H + λI, λ up to {first * 1e5:g}·mean(diag H): "
                     "its inputs are degenerate (NaN, or all zero)")


@dataclass
class GPTQResult:
    codes: Tensor  # [out, in] uint8, in the original column order
    scale: Tensor  # [out, groups]
    zero: Tensor  # [out, groups]
    damp: float  # the dampening used (raised if H + λI did not factor)


def gptq(w: Tensor, h: Tensor, grid: Grid, *, damp: float = 0.01, block_size: int = 128,
         act_order: bool = False) -> GPTQResult:
    """GPTQ's column sweep on W [out, in] with H = XᵀX [in, in] (any positive multiple of it).

    Columns are quantized one at a time; each one's rounding error e is spread onto the columns not
    yet quantized through the upper Cholesky factor U of H⁻¹ (W[:, j:] −= e/U_jj · U_j,j:), lazily per
    block of columns (Sec. 4, "lazy batch updates"). Group scales are fitted when the sweep reaches a
    group, on the already-updated columns. act_order sweeps columns by descending H_jj (Sec. 5 of the
    paper's code release); its groups stay the contiguous column ranges of the original order, their
    scales fitted on W before the sweep ("static groups"), so the result needs no group index and
    exports as any grouped weight. Computed in h's dtype (float64 for the exact tests).
    """
    dtype = h.dtype
    w = w.to(dtype).clone()
    h = h.to(dtype).clone()
    n_out, n_in = w.shape
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    width = grid.width(n_in)
    static = act_order or grid.group_size is None
    if static:
        scale, zero = grid_params(w, grid)
    else:
        scale = torch.empty(n_out, grid.groups(n_in), device=w.device)
        zero = torch.empty_like(scale)
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    u, used_damp = _inverse_cholesky(h, damp)
    if grid.group_size is not None and not static:
        block_size = width * max(1, round(block_size / width))  # a block holds whole groups
    group_of = (perm if perm is not None else torch.arange(n_in)).div(width, rounding_mode="floor").tolist()
    # The sweep runs on Wᵀ: a column of W is then a contiguous row, which the per-column steps read
    # and write many times (3× faster than strided columns for a [3072, 576] weight).
    wt = w.t().contiguous()
    codes_t = torch.empty(n_in, n_out, dtype=torch.uint8, device=w.device)
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        err = _sweep_block(wt, u, i1, i2, group_of, scale, zero, grid, static, codes_t)
        wt[i2:].addmm_(u[i1:i2, i2:].t(), err, alpha=-1)  # the block's errors onto the columns after it
    codes = codes_t.t().contiguous()
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return GPTQResult(codes, scale, zero, used_damp)


def _sweep_block(wt: Tensor, u: Tensor, i1: int, i2: int, group_of: list[int], scale: Tensor, zero: Tensor,
                 grid: Grid, static: bool, codes_t: Tensor) -> Tensor:
    """Quantize columns i1..i2 of W (rows of wt) one by one, each error spread onto the block's later
    columns; writes codes_t[i1:i2] (and lazy group scales); returns the scaled errors [i2 − i1, out]."""
    dtype, width = wt.dtype, wt.shape[0] // scale.shape[1]  # columns per group (all of them: per channel)
    w1, u1 = wt[i1:i2].clone(), u[i1:i2, i1:i2]
    err, q1 = torch.empty_like(w1), torch.empty_like(w1)
    inv_diag = 1.0 / torch.diagonal(u1)
    current = None
    for i in range(i2 - i1):
        g = group_of[i1 + i]
        if not static and (i1 + i) % width == 0:  # a group starts: fit it on its columns as updated so far
            sg, zg = grid_params(w1[i:i + width].t(), Grid(grid.bits, None, grid.symmetric))
            scale[:, g], zero[:, g] = sg[:, 0], zg[:, 0]
        if g != current:
            current = g
            s_g, z_g = scale[:, g].to(dtype), zero[:, g].to(dtype)
            neg_zs = -z_g * s_g
        q = q1[i]
        torch.div(w1[i], s_g, out=q).round_().add_(z_g).clamp_(0, grid.qmax)
        e = err[i]
        torch.sub(w1[i], torch.addcmul(neg_zs, q, s_g), out=e).mul_(inv_diag[i])
        w1[i + 1:].addr_(u1[i, i + 1:], e, alpha=-1)
    codes_t[i1:i2] = q1.to(torch.uint8)
    return err


# --- AWQ (Lin et al. 2024) --------------------------------------------------------------------------


def awq_scales(act_mean: Tensor, alpha: float, weight_mean: Tensor | None = None) -> Tensor:
    """Per-input-channel scales s = mean|x|^α (AWQ Sec. 3.2), or with `weight_mean` mean|x|^α / mean|ŵ|^(1−α)
    ("duo scaling" of AutoAWQ / llm-compressor), normalised so that max(s)·min(s) = 1."""
    s = act_mean.float().clamp_min(1e-4).pow(alpha)
    if weight_mean is not None:
        s = (s / (weight_mean.float().pow(1 - alpha) + 1e-4)).clamp_min(1e-4)
    return s / (s.max() * s.min()).sqrt()


def weight_magnitude(weights: list[Tensor], grid: Grid) -> Tensor:
    """mean over rows of |w| / max|w| of its group [in], for linears sharing an input (duo scaling)."""
    w = torch.cat([x.float() for x in weights])
    g = w.abs().reshape(w.shape[0], -1, grid.width(w.shape[1]))
    return (g / g.amax(-1, keepdim=True).clamp_min(1e-12)).reshape(w.shape).mean(0)


def awq_search(weights: list[Tensor], act_mean: Tensor, h: Tensor, grid: Grid, n_grid: int = 20,
               duo_scaling: bool = False) -> tuple[Tensor, list[float]]:
    """(best s [in], errors) for linears sharing one input: s = 1, then α over {0, 1/n, …, (n−1)/n}.

    The objective is the summed output error tr(D H Dᵀ) of the linears on the calibration inputs with
    W·diag(s) quantized and divided by s again. s = 1 (no scaling, errors[0]) is a candidate, so the
    result is never worse than no scaling on this objective.
    """
    h32 = h.float()
    w_mean = weight_magnitude(weights, grid) if duo_scaling else None
    candidates = [torch.ones_like(act_mean, dtype=torch.float32)]
    candidates += [awq_scales(act_mean, k / n_grid, w_mean) for k in range(n_grid)]
    errors = [sum(output_error(w.float(), fake_quantize(w.float() * s, grid) / s, h32) for w in weights)
              for s in candidates]
    best = min(range(len(errors)), key=errors.__getitem__)
    return candidates[best], errors


def clip_search(w: Tensor, h: Tensor, grid: Grid, n_grid: int = 20, max_shrink: float = 0.5) -> Tensor:
    """Per (row, group) range shrink c ∈ {1, 1 − 1/n, …, 1 − max_shrink} minimising that group's output error.

    A group's error is δᵀ H_gg δ with H_gg its diagonal block of H (AWQ's clipping search, Sec. 3.3),
    which ignores the coupling between groups, as AWQ does. Returns c [rows, groups].
    """
    rows, n_in = w.shape
    width = grid.width(n_in)
    n_g = n_in // width
    wg = w.float().reshape(rows, n_g, width)
    hb = torch.stack([h[i * width:(i + 1) * width, i * width:(i + 1) * width] for i in range(n_g)]).float()
    best_err = torch.full((rows, n_g), math.inf, device=w.device)
    best_c = torch.ones(rows, n_g, device=w.device)
    for k in range(int(n_grid * max_shrink) + 1):
        c = 1 - k / n_grid
        d = wg - fake_quantize(w.float(), grid, c).reshape(rows, n_g, width)
        err = torch.einsum("rgi,gij,rgj->rg", d, hb, d)
        better = err < best_err
        best_err, best_c = torch.where(better, err, best_err), torch.where(better, c, best_c)
    return best_c
