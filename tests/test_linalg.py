"""Tier 1: the math against brute force (float64) and its properties."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankwise.plan.budget import allocate_by_score
from rankwise.numerics.linalg import GramAccumulator, centered_scatter, raw_moments, reshift, subspace_cos2, top_eigh
from rankwise.calib.stats import LayerStats


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _brute_scatter(xs):
    """Float64 brute force from the SAME float32 inputs: centre in float64, then (x−μ)ᵀ(x−μ)."""
    full = torch.cat(xs).double()
    xc = full - full.mean(0)
    return xc.T @ xc


def _accumulate(xs, d, **kw):
    acc = GramAccumulator(d, **kw)
    for x in xs:
        acc.update(x)
    return acc


# Tolerances. Products run in fp32 and are flushed into float64 every few updates, so each flush
# window adds ~1e-7 relative to Σ|x−c|² (c the shift); about a shift near the mean that is the
# scatter itself, so the centred scatter is good to ~1e-7 whatever the mean: 1e-6 leaves 10× room
# (it must not depend on mean/std; raw-moment centring gave ~1e-7·(mean/std)² instead). Raw XᵀX
# and Σx are rebuilt from the shifted moments in float64 and keep their old 1e-5 / 1e-6 bounds.
SCATTER_RTOL = 1e-6


@settings(max_examples=25, deadline=None)
@given(n_updates=st.integers(1, 20), rows=st.integers(1, 40), d=st.integers(1, 70), panel=st.integers(1, 80),
       offset=st.one_of(st.floats(0, 50), st.floats(-3e4, 3e4)), seed=st.integers(0, 10_000))
def test_gram_matches_float64(n_updates, rows, d, panel, offset, seed):
    g = torch.Generator().manual_seed(seed)
    per_channel = offset * torch.rand(d, generator=g)  # mean/std from 0 up to 1e4 across channels
    xs = [torch.randn(rows, d, generator=g) * 3 + per_channel for _ in range(n_updates)]
    acc = _accumulate(xs, d, panel=panel, flush_every=4)
    full = torch.cat(xs).double()
    assert acc.n == full.shape[0]
    # fp32 products with float64 sums: 1e-5 relative is the accuracy the issue asks for.
    assert _rel(acc.xtx, full.T @ full) <= 1e-5
    # Σx in fp32 is good to ~1e-7 of Σ|x| per channel (relative to Σx itself only when it does not cancel)
    assert bool(((acc.sum - full.sum(0)).abs() <= 1e-6 * full.abs().sum(0)).all())
    assert torch.equal(acc.m2, acc.m2.T) and torch.equal(acc.xtx, acc.xtx.T)
    ref = _brute_scatter(xs)
    err = float((acc.scatter() - ref).norm())
    assert err <= SCATTER_RTOL * float(ref.norm()) or err <= 1e-9 * float(full.square().sum())  # 1 row: ref = 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_scatter_stable_at_large_mean(dtype):
    """mean/std 1e4 on most channels, 1e2 and 1e3 on some: raw moments give > 100 % error here."""
    g = torch.Generator().manual_seed(3)
    d = 50
    ratio = torch.full((d,), 1e4)
    ratio[:5], ratio[5:10], ratio[10:15] = 1e2, 1e3, 0.0
    std = torch.rand(d, generator=g) + 0.5
    mean = ratio * std * torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0)
    xs = [(torch.randn(rows, d, generator=g) * std + mean).to(dtype) for rows in (64, 100, 37, 80, 120)]  # 401 rows
    acc = _accumulate(xs, d, panel=16, flush_every=2)
    ref = _brute_scatter(xs)
    assert _rel(acc.scatter(), ref) <= SCATTER_RTOL
    ev = torch.linalg.eigvalsh(acc.scatter())  # PSD up to rounding: nothing for top_eigh to clamp
    assert float(ev.min()) >= -SCATTER_RTOL * float(ev.max())  # (bf16 at mean/std 1e4 has zero-spread channels)
    full = torch.cat(xs).double()
    assert _rel(acc.sum, full.sum(0)) <= 1e-12 and _rel(acc.xtx, full.T @ full) <= 1e-10


def test_reshift_matches_moments_about_the_new_shift():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(200, 9, generator=g, dtype=torch.float64) * 2 + 1e3
    c_old, c_new = x[0].clone(), torch.randn(9, generator=g, dtype=torch.float64) * 5 + 1e3
    s, m = (x - c_old).sum(0), (x - c_old).T @ (x - c_old)
    s2, m2 = reshift(200, s, m, c_old, c_new)
    assert _rel(s2, (x - c_new).sum(0)) <= 1e-12 and _rel(m2, (x - c_new).T @ (x - c_new)) <= 1e-12
    assert torch.equal(m2, m2.T) and not torch.equal(m2, m)  # a new tensor; m untouched
    assert _rel(centered_scatter(m2, s2, 200), centered_scatter(m, s, 200)) <= 1e-12  # scatter is shift-free
    s3, m3 = reshift(200, s2, m2.clone(), c_new, c_old, inplace=True)
    assert _rel(s3, s) <= 1e-12 and _rel(m3, m) <= 1e-12
    sum_raw, xtx_raw = raw_moments(200, s, m, c_old)
    assert _rel(sum_raw, x.sum(0)) <= 1e-14 and _rel(xtx_raw, x.T @ x) <= 1e-14


@settings(max_examples=25, deadline=None)
@given(rows=st.lists(st.integers(0, 60), min_size=2, max_size=8), split=st.integers(0, 8), d=st.integers(1, 40),
       offset=st.floats(-3e4, 3e4), drift=st.floats(0, 50), seed=st.integers(0, 10_000))
def test_merge_equals_one_accumulation(rows, split, d, offset, drift, seed):
    """Two accumulations (different shifts: the parts' means differ by `drift` std) merged with `+`
    equal one accumulation over all rows, and the float64 brute force."""
    g = torch.Generator().manual_seed(seed)
    mean = offset * torch.rand(d, generator=g)
    xs = [torch.randn(r, d, generator=g) + mean + (drift if i >= split else 0.0) for i, r in enumerate(rows)]
    split = min(split, len(xs))

    def stats(part):
        acc = _accumulate(part, d, panel=8, flush_every=3)
        return LayerStats(acc.n, acc.shift, acc.sum_shifted, acc.m2)

    merged, single = stats(xs[:split]) + stats(xs[split:]), stats(xs)
    assert merged.n == single.n == sum(rows)
    if merged.n < 2:
        return
    ref = _brute_scatter(xs)
    # A shift c at distance Δ = |c − μ|/σ from the data's mean leaves fp32 cancellation of order ε·(1 + Δ²):
    # the single pass shifts by its first batch's mean, which can be one row of the un-drifted part
    # (Δ up to `drift`); a calibration set's first batch sits within ~1/√rows of μ, so Δ² ≪ 1 there.
    full = torch.cat(xs).double()
    spread = full.var(0, unbiased=False).clamp_min(1e-30)
    tol = SCATTER_RTOL * (1 + max(float(((st.shift - full.mean(0)) ** 2 / spread).max()) for st in (merged, single)))
    for got in (merged.scatter(), single.scatter()):
        err = float((got - ref).norm())
        assert err <= tol * float(ref.norm()) or err <= 1e-9 * float(full.square().sum())
    assert _rel(merged.scatter(), single.scatter()) <= 2 * tol or float(ref.norm()) == 0
    assert torch.equal(merged.m2, merged.m2.T)
    full = torch.cat(xs).double()
    assert bool(((merged.sum - full.sum(0)).abs() <= 1e-6 * full.abs().sum(0)).all())
    assert torch.allclose(merged.mean, full.mean(0), rtol=1e-6, atol=1e-6)


def test_centered_scatter_is_covariance_times_n_minus_1():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(500, 7))
    xt = torch.from_numpy(x)
    c = centered_scatter(xt.T @ xt, xt.sum(0), 500)
    np.testing.assert_allclose(c.numpy(), np.cov(x, rowvar=False) * 499, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("d,k", [(5, 5), (64, 8), (300, 16), (700, 20)])
def test_top_eigh_matches_full_eigh(d, k):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(2 * d, d, generator=g, dtype=torch.float64) * torch.logspace(1, -2, d, dtype=torch.float64)
    c = x.T @ x
    vals, vecs = top_eigh(c, k)
    w, v = torch.linalg.eigh(c)
    w, v = w.flip(0)[:k], v.flip(1)[:, :k].T
    assert torch.allclose(vals, w, rtol=1e-9, atol=1e-9 * float(w[0]))
    # eigenvectors up to sign: |cos| ≈ 1 for each (the spectrum here has no repeated values)
    cos = (vecs * v).sum(1).abs()
    assert float(cos.min()) >= 1 - 1e-8
    assert torch.allclose(vecs @ vecs.T, torch.eye(k, dtype=torch.float64), atol=1e-10)


def test_top_eigh_deterministic_signs():
    c = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    _, v1 = top_eigh(c, 2)
    _, v2 = top_eigh(c.clone(), 2)
    assert torch.equal(v1, v2)
    assert bool((v1.gather(1, v1.abs().argmax(1, keepdim=True)) > 0).all())


def test_subspace_cos2_properties():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 20, generator=g)
    rot = torch.linalg.qr(torch.randn(4, 4, generator=g)).Q
    assert subspace_cos2(a, rot @ a) == pytest.approx(1.0, abs=1e-10)  # same row space, other basis
    e = torch.eye(20)
    assert subspace_cos2(e[:3], e[3:6]) == pytest.approx(0.0, abs=1e-12)
    assert subspace_cos2(e[:2], e[[0, 5]]) == pytest.approx(0.5, abs=1e-12)


def _allocate_naive(scores, budget):
    flat = [(v, name) for name, s in scores.items() for v in s.tolist()]
    flat.sort(key=lambda t: -t[0])
    counts = dict.fromkeys(scores, 0)
    for _, name in flat[:budget]:
        counts[name] += 1
    return counts


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.floats(0, 1, allow_nan=False), min_size=0, max_size=6), min_size=1, max_size=6),
       st.integers(0, 40))
def test_allocate_by_score_takes_global_top(layers, budget):
    scores = {f"l{i}": torch.tensor(sorted(s, reverse=True)) for i, s in enumerate(layers)}
    got = allocate_by_score(scores, budget)
    assert sum(got.values()) == min(budget, sum(len(s) for s in layers))
    assert all(got[k] <= len(scores[k]) for k in got)
    # the multiset of selected scores equals the naive global top-budget (ties may pick other layers)
    picked = sorted((v for k, s in scores.items() for v in s.tolist()[: got[k]]), reverse=True)
    naive = _allocate_naive(scores, budget)
    expected = sorted((v for k, s in scores.items() for v in s.tolist()[: naive[k]]), reverse=True)
    assert picked == pytest.approx(expected)
