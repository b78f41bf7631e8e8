"""Tier 1: lowrank_fit, the output-weighted rank-k fit, against brute force (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from rankwise.numerics.lowrank import lowrank_fit, weighting


def anisotropic_gram(n=400, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.logspace(0, 2, d, dtype=torch.float64)
    x = x @ torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]  # rotate: not axis-aligned
    return x.T @ x


def weighted_error(w, w_hat, h):
    d = w - w_hat
    return float(torch.trace(d @ h @ d.T))


@pytest.mark.parametrize("k", [1, 4, 10])
def test_equals_the_brute_force_optimum(k):
    h = anisotropic_gram()
    w = torch.randn(16, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fit = lowrank_fit(w, h)
    # Brute force, independently: the symmetric square root of XᵀX (scipy), SVD of W·H^½, Eckart–Young.
    root = torch.from_numpy(np.real(scipy.linalg.sqrtm(h.numpy())))
    sigma = torch.linalg.svdvals(w @ root)
    best = float((sigma[k:] ** 2).sum())
    assert float(fit.errors[k]) == pytest.approx(best, rel=1e-8)
    assert weighted_error(w, fit.weight(k), h) == pytest.approx(best, rel=1e-8)  # the factors achieve it
    a, b = fit.factors(k)
    assert a.shape == (k, 24) and b.shape == (16, k)
    g = torch.Generator().manual_seed(2)
    for _ in range(20):  # no nearby rank-k matrix does better
        a2 = a + 1e-3 * torch.randn(a.shape, generator=g, dtype=torch.float64)
        b2 = b + 1e-3 * torch.randn(b.shape, generator=g, dtype=torch.float64)
        assert weighted_error(w, b2 @ a2, h) >= best * (1 - 1e-12)


def test_beats_plain_svd_on_the_weighted_objective():
    h = anisotropic_gram(seed=3)
    w = torch.randn(20, 24, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    fit, plain = lowrank_fit(w, h), lowrank_fit(w)
    for k in (2, 6, 12):
        ours, theirs = weighted_error(w, fit.weight(k), h), weighted_error(w, plain.weight(k), h)
        assert ours < 0.9 * theirs, (k, ours, theirs)  # X is far from isotropic: a clear gap
    # unweighted, the plain SVD's errors are the squared Frobenius tails
    assert float(plain.errors[3]) == pytest.approx(float(((w - plain.weight(3)) ** 2).sum()), rel=1e-10)


def test_error_curve_is_the_whole_tail_for_every_rank():
    h = anisotropic_gram(seed=5)
    w = torch.randn(10, 24, dtype=torch.float64)
    fit = lowrank_fit(w, h)
    assert fit.errors.shape == (11,) and float(fit.errors[-1]) == 0.0
    assert float(fit.errors[0]) == pytest.approx(float(torch.trace(w @ h @ w.T)), rel=1e-10)
    assert bool((fit.errors[1:] <= fit.errors[:-1]).all())
    capped = lowrank_fit(w, h, k=4)
    assert torch.allclose(capped.errors, fit.errors[:5]) and capped.sigma.shape == (4,)
    with pytest.raises(ValueError, match="rank 5 is outside 0…4"):
        capped.factors(5)


def test_singular_gram_is_floored_not_fatal():
    x = torch.randn(8, 24, dtype=torch.float64)  # 8 tokens for 24 inputs: XᵀX has rank 8
    h = x.T @ x
    s, s_inv, floored = weighting(h)
    assert floored == 16 and torch.allclose(s_inv @ s, torch.eye(24, dtype=torch.float64), atol=1e-8)
    w = torch.randn(12, 24, dtype=torch.float64)
    fit = lowrank_fit(w, h)
    assert torch.isfinite(fit.weight(4)).all()
    # on the true (singular) XᵀX it still beats the unweighted SVD
    assert weighted_error(w, fit.weight(4), h) <= weighted_error(w, lowrank_fit(w).weight(4), h)
    assert weighted_error(w, fit.weight(8), h) < 1e-6 * float(torch.trace(w @ h @ w.T))  # rank 8 = the data's rank
