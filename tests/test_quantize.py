"""Tier 1: quantization math (grids, GPTQ's sweep, AWQ's searches) against brute force and properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankwise.numerics.quantize import (Grid, awq_scales, awq_search, clip_search, dequantize, fake_quantize, gptq,
                                        grid_params, output_error, quantize, rtn)


def correlated_inputs(n=512, d=64, seed=0):
    """Rows with a few large, correlated channels, as transformer activations have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    x = torch.randn(n, d, generator=g) @ mix
    x[:, :4] *= 10
    return x.double()


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), group=st.sampled_from([None, 8, 16, 32]), sym=st.booleans(),
       rows=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_round_trip_within_the_grid_bound(bits, group, sym, rows, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, 32, generator=g) * torch.rand(rows, 1, generator=g) * 3
    grid = Grid(bits, group, sym)
    codes, scale, zero = rtn(w, grid)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= grid.qmax
    err = (dequantize(codes, scale, zero) - w).abs()
    step = scale.repeat_interleave(32 // scale.shape[1], dim=1)
    # Symmetric: every weight lies in [−z·s, (qmax − z)·s + s/2] by construction, so rounding costs ≤ s/2;
    # the float16 rounding of s moves the grid's edge by ≤ 2^-11·qmax·s ≤ 0.13 s at 8 bits.
    # Asymmetric: the rounded zero point shifts the grid by ≤ s/2 more, and a ≤ 5-bit scale keeps
    # 11 − b significant bits (edge moved by ≤ 2^-(11−b)·qmax·s < s/16).
    bound = (0.5 + 0.13) if sym else (1.0 + 0.13)
    assert bool((err <= bound * step + 1e-7).all()), float((err / step).max())


def test_scales_and_offsets_are_float16_exact():
    w = torch.randn(16, 64) * 0.07
    for sym in (True, False):
        for bits in (4, 5, 8):
            grid = Grid(bits, 32, sym)
            scale, zero = grid_params(w, grid)
            assert torch.equal(scale.half().float(), scale)
            if not sym and bits <= 5:  # GGUF's Q4_1/Q5_1 store m = −s·z in float16
                m = scale * zero
                assert torch.equal(m.half().float(), m)
            deq = dequantize(quantize(w, scale, zero, grid), scale, zero)
            assert torch.equal(deq.double(), dequantize(quantize(w, scale, zero, grid), scale, zero, torch.float64))


def test_bad_grids_name_the_layer():
    from rankwise.numerics.quantize import check_grid

    with pytest.raises(ValueError, match="does not divide the input width 576 of model.layers.0.q_proj.*64"):
        check_grid(Grid(4, 128), 576, "model.layers.0.q_proj")
    with pytest.raises(ValueError, match="between 2 and 8"):
        check_grid(Grid(9, 32), 64, "x")


def reference_gptq(w, h, grid, damp):
    """GPTQ in its first form (Frantar et al. 2022, Eq. 2–3): one column at a time, H⁻¹ updated by
    Gaussian elimination of the quantized column; a per-channel grid fitted once on W, or each group's
    fitted when the sweep reaches it, on the columns as updated so far."""
    w, n = w.clone(), w.shape[1]
    hinv = torch.linalg.inv(h + damp * torch.diagonal(h).mean() * torch.eye(n, dtype=h.dtype))
    per_channel = Grid(grid.bits, None, grid.symmetric)
    scale, zero = grid_params(w, per_channel)
    out = torch.empty_like(w)
    for j in range(n):
        if grid.group_size is not None and j % grid.group_size == 0:
            scale, zero = grid_params(w[:, j:j + grid.group_size], per_channel)
        q = dequantize(quantize(w[:, j:j + 1], scale, zero, per_channel), scale, zero, w.dtype)[:, 0]
        out[:, j] = q
        e = (w[:, j] - q) / hinv[j, j]
        w[:, j + 1:] -= e[:, None] * hinv[j, j + 1:][None, :]
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return out


@pytest.mark.parametrize("grid", [Grid(3, None, True), Grid(4, 16, False), Grid(3, 8, True)])
def test_gptq_equals_the_reference_column_by_column_algorithm(grid):
    x = correlated_inputs(n=256, d=48)
    h = x.T @ x
    w = torch.randn(20, 48, dtype=torch.float64) * 0.1
    # lazy blocks of 16 < 48 columns: the batched updates (and groups across block edges) are exercised
    res = gptq(w, h, grid, damp=0.01, block_size=16)
    ours = dequantize(res.codes, res.scale, res.zero, torch.float64)
    ref = reference_gptq(w, h, grid, 0.01)
    # Same arithmetic in a different order (Cholesky vs elimination): float64 rounding only, far
    # below one grid step (~0.02), so codes agree except where a weight sits on a rounding edge.
    assert (ours - ref).abs().max() < 1e-9


@pytest.mark.parametrize("grid", [Grid(4, 16, True), Grid(3, None, False), Grid(2, 16, False)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_at_most_rtn(grid, act_order):
    x = correlated_inputs(seed=1)
    h = x.T @ x
    for seed in range(3):
        w = torch.randn(32, 64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.05
        res = gptq(w, h, grid, act_order=act_order)
        e_gptq = output_error(w, dequantize(res.codes, res.scale, res.zero, torch.float64), h)
        e_rtn = output_error(w, fake_quantize(w.float(), grid).double(), h)
        assert e_gptq <= e_rtn, (seed, e_gptq, e_rtn)


def test_gptq_act_order_keeps_contiguous_groups():
    x = correlated_inputs(seed=2)
    h = x.T @ x
    w = torch.randn(8, 64, dtype=torch.float64)
    res = gptq(w, h, Grid(4, 16, True), act_order=True)
    # static groups: scales come from W's own contiguous column groups, so no group index is needed
    scale, _ = grid_params(w, Grid(4, 16, True))
    assert torch.equal(res.scale, scale) and res.scale.shape == (8, 4)


def test_gptq_raises_dampening_for_a_singular_hessian():
    x = torch.randn(4, 32, dtype=torch.float64)
    h = x.T @ x  # rank 4 of 32
    h[0, 0] = -1.0  # and not even positive semidefinite: H + 0.01·mean(diag)·I does not factor
    res = gptq(torch.randn(8, 32, dtype=torch.float64), h, Grid(4, None), damp=0.01)
    assert res.damp > 0.01


def test_awq_search_never_worse_than_no_scaling():
    x = correlated_inputs(seed=3)
    h = (x.T @ x).float()
    act = x.abs().mean(0).float()
    weights = [torch.randn(24, 64) * 0.05, torch.randn(40, 64) * 0.05]
    grid = Grid(3, 16, True)
    unscaled = sum(output_error(w, fake_quantize(w, grid), h) for w in weights)
    for duo in (False, True):
        s, errors = awq_search(weights, act, h, grid, duo_scaling=duo)
        best = sum(output_error(w, fake_quantize(w * s, grid) / s, h) for w in weights)
        assert errors[0] == pytest.approx(unscaled, rel=1e-6)  # the first candidate is no scaling
        assert best <= unscaled and best == pytest.approx(min(errors), rel=1e-6)
        assert min(errors) < unscaled  # with a few dominant channels, scaling helps
    s1 = awq_scales(act, 0.5)
    assert float(s1.max() * s1.min()) == pytest.approx(1.0, rel=1e-5)


def test_clip_search_never_worse_per_group():
    x = correlated_inputs(seed=4)
    x[:, 20] *= 1e-3  # a channel that hardly ever carries signal…
    h = (x.T @ x).float()
    w = torch.randn(16, 64) * 0.05
    w[:, 20] = 1.0  # …with an outlier weight: clipping it costs little and refines its group's grid
    grid = Grid(3, 16, False)
    c = clip_search(w, h, grid)
    assert c.shape == (16, 4) and bool((c <= 1).all()) and bool((c >= 0.5).all())

    def group_errors(clip):
        d = (w - fake_quantize(w, grid, clip)).reshape(16, 4, 16)
        hb = torch.stack([h[i * 16:(i + 1) * 16, i * 16:(i + 1) * 16] for i in range(4)])
        return torch.einsum("rgi,gij,rgj->rg", d, hb, d)

    assert bool((group_errors(c) <= group_errors(1.0) * (1 + 1e-5)).all())
    # The outlier's group (columns 16–31): every row clips it, and gains strictly.
    assert bool((c[:, 1] < 1).all()) and bool((group_errors(c)[:, 1] < group_errors(1.0)[:, 1]).all())
