"""Tier 2: EVA plans and adapters on tiny Llama and BERT models."""

import pytest
import torch

import rankwise as rw
from rankwise.errors import ConfigError, PlanError
from rankwise.numerics.linalg import subspace_cos2

from conftest import make_batches, tiny_bert, tiny_llama


def _forward(model, batch):
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert])
@pytest.mark.parametrize("rank,rho", [(4, 2.0), (8, 1.0), (2, 3.0)])
def test_eva_invariants(make, rank, rho):
    model, batches = make(), make_batches(n_batches=4, batch=4, seq=16)
    before = _forward(model, batches[0])
    stats = rw.calibrate(model, batches, progress=False)
    p = rw.plan(stats, model, method="eva", rank=rank, rho=rho)
    assert sum(lp.rank for lp in p.layers.values()) == rank * len(stats.order)  # the whole budget is spent
    for name, lp in p.layers.items():
        assert lp.rank <= min(round(rank * rho), lp.in_features, lp.out_features)
        assert lp.alpha == pytest.approx(rank * lp.rank / rank)  # alpha/rank kept at the configured 1
        if lp.rank:
            a = lp.lora_A.double()
            g = a @ a.T  # orthogonal rows (whitening, on by default, only scales each row)
            assert torch.allclose(g, torch.diag(torch.diagonal(g)), atol=1e-5 * float(torch.diagonal(g).max()))
            assert torch.count_nonzero(lp.lora_B) == 0
    if rho == 1.0:
        assert all(lp.rank == rank for lp in p.layers.values())  # no redistribution possible
    pm = rw.adapt_(model, p)
    assert torch.allclose(_forward(pm, batches[0]), before, atol=1e-6, rtol=0)  # B = 0: outputs unchanged
    lora_layers = {n for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert lora_layers == set(p.active())


def test_eva_components_are_top_principal_directions(llama):
    batches = make_batches(n_batches=4, batch=4, seq=16, labels=True)
    stats = rw.calibrate(llama, batches, progress=False)
    p = rw.plan(stats, llama, method="eva", rank=4, rho=1.0)
    name = "model.layers.1.mlp.down_proj"
    x = _inputs_of(llama, name, batches)
    xc = x - x.mean(0)
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    assert subspace_cos2(p.layers[name].lora_A, vh[:4]) >= 1 - 1e-6
    ratio = (s**2 / (s**2).sum())[:4]
    assert torch.allclose(torch.tensor(p.layers[name].explained_variance, dtype=torch.float64), ratio, rtol=1e-5)


def test_whiten_scales_rows_like_peft(llama, batches):
    stats = rw.calibrate(llama, batches, progress=False)
    plain = rw.plan(stats, llama, rank=4, rho=1.0, whiten=False)
    white = rw.plan(stats, llama, rank=4, rho=1.0)  # whitened by default
    assert torch.allclose(plain.layers["model.layers.0.self_attn.o_proj"].lora_A.double().norm(dim=1),
                          torch.ones(4, dtype=torch.float64), atol=1e-5)  # plain EVA: unit rows
    name = "model.layers.0.self_attn.o_proj"
    vals, _, _ = stats[name].spectrum(4)
    norms = white.layers[name].lora_A.double().norm(dim=1)
    assert torch.allclose(norms, vals.pow(-0.25), rtol=1e-5)
    assert subspace_cos2(plain.layers[name].lora_A, white.layers[name].lora_A) == pytest.approx(1.0, abs=1e-6)


def test_whitened_rows_stay_bounded_where_the_inputs_have_fewer_directions_than_the_rank():
    """Inputs of q/k/v confined to 8 directions, rank 12: the last 4 components carry (numerically) no variance;
    dividing by their √(singular value) alone would make rows ~1e3× the top one. The floor (1e-8 of the top
    eigenvalue, i.e. ≤ 100× the top row's norm) keeps them bounded."""
    model = tiny_llama(layers=2)
    batches = make_batches(n_batches=3, batch=4, seq=16)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight.copy_(torch.tensor([1.0] * 8 + [0.0] * 56))
    stats = rw.calibrate(model, batches, targets=["q_proj"], progress=False)
    p = rw.plan(stats, model, targets=["q_proj"], rank=12, rho=1.0)
    for lp in p.layers.values():
        norms = lp.lora_A.double().norm(dim=1)
        assert torch.isfinite(norms).all()
        assert float(norms[8:].min()) > 10 * float(norms[:8].max())  # the empty directions do hit the floor…
        assert float(norms.max()) <= 100 * float(norms[0]) * (1 + 1e-4)  # …and stop there


def test_plan_is_deterministic(llama, batches):
    a = rw.plan(rw.calibrate(llama, batches, progress=False), llama, rank=4)
    b = rw.plan(rw.calibrate(llama, batches, progress=False), llama, rank=4)
    assert a.to_dict() == b.to_dict()
    for n in a.active():
        assert torch.equal(a.layers[n].lora_A, b.layers[n].lora_A)


def test_rank_zero_layers_get_no_adapter():
    model = tiny_llama(layers=3)
    batches = make_batches(n_batches=3, batch=4, seq=16)
    with torch.no_grad():  # q/k/v inputs confined to 8 strong directions: they claim most of the budget
        for layer in model.model.layers:
            layer.input_layernorm.weight.copy_(torch.tensor([10.0] * 8 + [0.01] * 56))
    stats = rw.calibrate(model, batches, progress=False)
    p = rw.plan(stats, model, rank=1, rho=8.0)  # budget 1 per layer, up to 8 each: concentrated layers win
    zero = [n for n, lp in p.layers.items() if lp.rank == 0]
    assert zero, "this setting is chosen so that some layers get nothing"
    pm = rw.adapt_(model, p)
    assert not any(n in pm.peft_config["default"].target_modules for n in zero)
    assert p.to_dict()["excluded"] == zero


def test_agreement_with_peft_eva():
    from peft import EvaConfig, LoraConfig, get_peft_model
    from peft.tuners.lora import initialize_lora_eva_weights

    batches = make_batches(n_batches=8, batch=4, seq=32, seed=3)
    ours_model, peft_base = tiny_llama(seed=1), tiny_llama(seed=1)
    # Real activations are anisotropic; a random tiny model's are nearly white, and there peft's
    # randomized incremental PCA (stopped at cos ≥ tau = 0.99 between steps) is itself imprecise.
    for m in (ours_model, peft_base):
        with torch.no_grad():
            for layer in m.model.layers:
                for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                    norm.weight.copy_(torch.logspace(0.5, -1, 64))
    p = rw.plan(rw.calibrate(ours_model, batches, progress=False), ours_model, rank=4, rho=2.0, whiten=False)  # as peft's default
    cfg = LoraConfig(r=4, lora_alpha=4, target_modules="all-linear", init_lora_weights="eva", eva_config=EvaConfig(rho=2.0))
    pm = get_peft_model(peft_base, cfg)
    initialize_lora_eva_weights(pm, dataloader=batches, show_progress_bar=False)
    cos2, within = [], 0
    for name, lp in p.layers.items():
        layer = pm.base_model.model.get_submodule(name)
        theirs = layer.lora_A["default"].weight.detach() if hasattr(layer, "lora_A") else None
        r_peft = 0 if theirs is None else theirs.shape[0]
        within += abs(r_peft - lp.rank) <= 1
        if lp.rank and r_peft:
            cos2.append(subspace_cos2(lp.lora_A, theirs))
    assert sum(cos2) / len(cos2) >= 0.95
    assert within == len(p.layers)


def _inputs_of(model, name, batches):
    """Float64 inputs of module `name` over the batches, selected like calibration: [n, d]."""
    rows = []
    h = model.get_submodule(name).register_forward_pre_hook(lambda m, a: rows.append(a[0].detach().double()))
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    h.remove()
    return torch.cat([r if r.ndim == 2 else r[rw.token_mask(b)] for r, b in zip(rows, batches)])


def test_bert_pooler_dense_is_supported():
    """peft 0.21's EVA fails on a target without a sequence axis; ours measures one row per sequence."""
    model = tiny_bert()
    batches = make_batches(n_batches=4, batch=6, seq=16)
    stats = rw.calibrate(model, batches, targets=["dense"], progress=False)
    assert "pooler.dense" in stats.order and stats["pooler.dense"].n == 24  # one row per sequence
    p = rw.plan(stats, model, rank=2, rho=1.0)  # rho 1: every layer keeps rank 2, the pooler included
    pm = rw.adapt_(model, p)
    a = pm.base_model.model.pooler.dense.lora_A["default"].weight.detach()
    x = _inputs_of(tiny_bert(), "pooler.dense", batches)
    vh = torch.linalg.svd(x - x.mean(0), full_matrices=False).Vh
    assert a.shape == (2, 64) and subspace_cos2(a, vh[:2]) >= 1 - 1e-6


def test_errors_rank_too_large_and_unknown_option(llama, batches):
    stats = rw.calibrate(llama, batches, progress=False)
    with pytest.raises(PlanError, match="larger than layer"):
        rw.plan(stats, llama, rank=65)
    with pytest.raises(ConfigError, match="did you mean 'rho'"):
        rw.plan(stats, llama, rank=4, rhoo=2.0)
    with pytest.raises(ConfigError, match="unknown method"):
        rw.plan(stats, llama, method="evaa", rank=4)


def test_random_lora_method_needs_no_data(llama, batches):
    p = rw.plan(None, llama, method="lora", rank=4, targets=["q_proj", "v_proj"])
    assert set(p.layers) == {f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")}
    a = p.layers["model.layers.0.self_attn.q_proj"].lora_A
    assert a.shape == (4, 64) and float(a.abs().max()) <= 1 / 64**0.5 and float(a.std()) > 0.05
    assert not torch.equal(a, p.layers["model.layers.1.self_attn.q_proj"].lora_A)  # layers differ
    again = rw.plan(None, llama, method="lora", rank=4, targets=["q_proj", "v_proj"])
    assert torch.equal(a, again.layers["model.layers.0.self_attn.q_proj"].lora_A)  # and are reproducible
    before = _forward(llama, batches[0])
    assert torch.allclose(_forward(rw.adapt_(llama, p), batches[0]), before, atol=1e-6)
    with pytest.raises(PlanError, match="run calibrate"):
        rw.plan(None, tiny_llama(), method="eva", rank=4)
