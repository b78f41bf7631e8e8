"""Fine-tuning on a compressed base: frozen codes, LoftQ's descent, exact resume, the adapter on the
compressed-tensors checkpoint, PELA recovery."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_batches, tiny_llama
from rankwise.adapt import adapt_
from rankwise.calib.calibrate import calibrate
from rankwise.compress.base import BaseSection, compress_base
from rankwise.errors import ConfigError, PlanError
from rankwise.numerics.loftq import loftq
from rankwise.numerics.lowrank import weighting
from rankwise.numerics.quantize import Grid, dequantize, quantize, rtn
from rankwise.plan.plan import plan
from rankwise.quant import quantized_layers
from rankwise.quant.linear import QuantLinear


def _logits(model, b):
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def _quantized(bits=3, method="gptq"):
    batches = make_batches(4, 4, 16)
    model = tiny_llama()
    _, originals = compress_base(model, batches, method, progress=False, bits=bits, group_size=32)
    return model, originals, batches


def _requant(w_ref, grid):
    """Candidates as the loftq method builds them: re-rounded on the first Q's scales, and RTN afresh."""
    _, sc, z = rtn(w_ref, grid)

    def requant(target):
        c = quantize(target.float(), sc, z, grid)
        c2, sc2, z2 = rtn(target.float(), grid)
        return [(dequantize(c, sc, z), None), (dequantize(c2, sc2, z2), None)]

    return requant, dequantize(*rtn(w_ref, grid))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.sampled_from([2, 3, 4]), weighted=st.booleans())
def test_loftq_alternation_decreases_the_error_monotonically(seed, bits, weighted):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 32, generator=g) * torch.rand(1, 32, generator=g) * 3  # uneven column ranges
    grid = Grid(bits, 16, True)
    requant, q0 = _requant(w, grid)
    s = s_inv = None
    if weighted:
        x = torch.randn(200, 32, generator=g) * torch.rand(32, generator=g)
        s, s_inv, _ = weighting((x.T @ x).double())
    res = loftq(w, q0, 4, requant, s, s_inv, iters=6)
    errs = torch.tensor(res.errors)
    assert (errs[1:] < errs[:-1]).all(), res.errors  # strictly lower at every accepted round
    assert len(res.errors) == res.accepted + 1
    # each recorded error is the true objective of the returned Q and B·A (not a bookkeeping value)
    e = w.double() - res.q - res.b @ res.a
    true = float(((e if s is None else e @ s) ** 2).sum())
    assert true == pytest.approx(res.errors[-1], rel=1e-9)


def test_loftq_plain_improves_on_the_first_quantization():
    """On a random weight, the alternation finds a better Q than RTN's (the paper's point): at least one round
    is taken and the final error is below the error of Q₀ with its own best fit."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g)
    requant, q0 = _requant(w, Grid(2, 32, True))
    res = loftq(w, q0, 8, requant, iters=5)
    assert res.accepted >= 1 and res.errors[-1] < res.errors[0]


@pytest.mark.parametrize("method", ["loftq", "loftq-aw"])
def test_loftq_on_a_layer_with_an_input_scale(method):
    """An AWQ layer whose grid holds W·diag(c) (explicit input scale): the method's candidates live in grid
    space, yet the error it reports and lowers is that of the effective weight Q/c + s·B·A against W."""
    from rankwise.calib.stats import LayerStats
    from rankwise.methods import get_init

    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 64, generator=g)
    c = torch.rand(64, generator=g) * 3 + 0.2
    grid = Grid(3, 32, True)
    q = QuantLinear(*rtn(w * c[None, :], grid), grid, None, c)
    x = torch.randn(300, 64, generator=g) * c  # larger inputs where the scale is large, as AWQ picks it
    stats = LayerStats.from_raw(300, x.sum(0).double(), (x.T @ x).double())
    init = get_init(method)
    cfg = init.config(iters=3)
    out = init.init(stats if method == "loftq-aw" else None, q.weight, 4, cfg, name="l", scale=2.0, original=w, module=q)
    assert torch.equal(out.base.input_scale, c) and out.base.codes.dtype == torch.uint8
    assert out.A.dtype == out.B.dtype == q.weight.dtype
    start = w - q.weight
    end = w - out.base.weight - 2.0 * out.B @ out.A
    if method == "loftq-aw":
        start, end = start @ x.T, end @ x.T
    assert end.norm() < 0.8 * start.norm()  # rank 4 of 24 takes up a fifth or more of the error (measured 0.63, 0.66)
    before, after = (float(v) for v in out.note.split(": ")[1].split(" (")[0].split(" → "))
    assert after < before and after == pytest.approx(float(end.norm() / (w if method == "loftq" else w @ x.T).norm()), rel=1e-3)


def test_codes_bit_identical_after_training(tiny_model_dir):
    from rankwise.data.sources import DataConfig, load_dataset
    from rankwise.models import load_model
    from rankwise.train.loop import TrainConfig, train

    model, tok = load_model(str(tiny_model_dir))
    tr, ev = load_dataset(DataConfig(seq_len=32, max_train_examples=24, max_eval_examples=4), tok, "causal-lm")
    from rankwise.data.sources import batchify

    calib = batchify(tr.examples[:8], tok, 4)
    _, originals = compress_base(model, calib, "gptq", progress=False, bits=3, group_size=32)
    stats = calibrate(model, calib, "all-linear", keep="full", progress=False)
    p = plan(stats, model, method="loftq-aw", originals=originals, rank=2, iters=2)
    pm = adapt_(model, p)
    before = {n: (q.codes.clone(), q.scale.clone(), q.zero.clone()) for n, q in quantized_layers(pm).items()}
    lora_before = {n: t.detach().clone() for n, t in pm.named_parameters() if t.requires_grad}
    assert before and all("lora_" in n for n in lora_before)  # only the adapter trains
    train(pm, tr, ev, TrainConfig(steps=4, lr=5e-3, eval_every=100, save_every=100), tok, progress=False)
    after = quantized_layers(pm)
    assert set(after) == set(before)
    for n, (c, s, z) in before.items():
        assert torch.equal(after[n].codes, c) and torch.equal(after[n].scale, s) and torch.equal(after[n].zero, z)
    moved = [n for n, t in pm.named_parameters() if t.requires_grad and not torch.equal(t, lora_before[n])]
    assert moved  # and training did happen


def test_quantlinear_backward_equals_plain_linear():
    """The memory-saving backward (dequantize again instead of keeping W) gives autograd's input gradient."""
    torch.manual_seed(0)
    w = torch.randn(12, 32)
    codes, sc, z = rtn(w, Grid(4, 16, True))
    q = QuantLinear(codes, sc, z, Grid(4, 16, True), bias=torch.randn(12))
    lin = torch.nn.Linear(32, 12)
    with torch.no_grad():
        lin.weight.copy_(q.weight)
        lin.bias.copy_(q.bias)
    x1 = torch.randn(5, 32, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    g = torch.randn(5, 12)
    (q(x1) * g).sum().backward()
    (lin(x2) * g).sum().backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-6)  # float32 matmuls in different order: ~1e-7
    assert q.codes.grad is None and not q.bias.requires_grad


def test_adapter_on_compressed_tensors_checkpoint_matches(tmp_path):
    from peft import PeftModel

    from rankwise.export.compressed_tensors import load_compensated
    from rankwise.export.peft import export
    from rankwise.export.qlora import export_base

    model, originals, batches = _quantized()
    stats = calibrate(model, batches, "all-linear", keep="full", progress=False)
    pm = adapt_(model, plan(stats, model, method="compensation", originals=originals, rank=4))
    with torch.no_grad():  # move the adapter off its init, as training would
        for n, t in pm.named_parameters():
            if "lora_B" in n:
                t.add_(0.02 * torch.randn_like(t))
    export(pm, tmp_path / "adapter")
    export_base(pm, tmp_path / "base")
    from transformers import LlamaForCausalLM

    loaded = PeftModel.from_pretrained(load_compensated(tmp_path / "base", LlamaForCausalLM), tmp_path / "adapter")
    b = batches[0]
    ours, theirs = _logits(pm, b), _logits(loaded, b)
    assert (ours - theirs).abs().max() <= 1e-4  # float32 (measured ~1e-6)
    assert (ours - _logits(tiny_llama(), b)).abs().max() > 1e-3  # the base really is quantized


@pytest.mark.parametrize("method", ["rtn", "svd"])
def test_rankwise_eval_adapter_loads_the_compressed_base_it_was_trained_on(tiny_model_dir, tmp_path, method):
    """The run's adapter names base/ in rankwise.json, so `rankwise eval --adapter` (load_with_adapter) rebuilds
    the trained model, on a quantized (compressed-tensors) or a factored base alike, not the float one."""
    from rankwise.cli.evaluate import load_with_adapter
    from rankwise.cli.runs import name_base
    from rankwise.export.peft import export
    from rankwise.export.qlora import export_base
    from rankwise.models import load_model

    model, tok = load_model(tiny_model_dir)
    batches = make_batches(4, 4, 16, vocab=model.config.vocab_size)
    opts = dict(bits=3, group_size=32) if method == "rtn" else dict(ratio=0.6)
    compress_base(model, batches, method, progress=False, **opts)
    pm = adapt_(model, plan(None, model, method="lora", rank=4))
    with torch.no_grad():
        for n, t in pm.named_parameters():
            if "lora_B" in n:
                t.add_(0.02 * torch.randn_like(t))
    export(pm, tmp_path / "adapter")
    export_base(pm, tmp_path / "base", tok)
    name_base(tmp_path / "adapter", tmp_path / "base", method)
    loaded, _ = load_with_adapter(None, tmp_path / "adapter")
    b = batches[0]
    ours, theirs = _logits(pm, b), _logits(loaded, b)
    assert (ours - theirs).abs().max() <= 1e-4  # float32 (the same weights, summed in another order)
    float_base, _ = load_with_adapter(str(tiny_model_dir), tmp_path / "adapter")  # what the old meta loaded
    assert (ours - _logits(float_base, b)).abs().max() > 1e-3


def test_requantize_rounds_merged_layers_again_and_leaves_the_others_alone():
    from rankwise.export.qlora import requantize

    model, _, _ = _quantized(bits=3)
    before = {n: q.codes.clone() for n, q in quantized_layers(model).items()}
    pm = adapt_(model, plan(None, model, method="lora", rank=4, targets="q_proj"))
    with torch.no_grad():
        for n, t in pm.named_parameters():
            if "lora_B" in n:
                t.add_(0.05 * torch.randn_like(t))
    merged, errors = requantize(pm)
    assert set(errors) == set(before)
    for name, codes in before.items():
        q = merged.get_submodule(name)
        assert isinstance(q, QuantLinear)
        if name.endswith("q_proj"):  # merged, then rounded afresh: RTN of the merged weight on the same grid
            w = pm.get_base_model().get_submodule(name)
            w = w.base_layer.weight + w.get_delta_weight("default")
            assert torch.equal(q.weight, dequantize(*rtn(w.detach(), q.grid)))
            assert 0 < errors[name] < 0.5
        else:  # untouched: the GPTQ codes as they were, not re-rounded by RTN
            assert torch.equal(q.codes, codes) and errors[name] == 0.0


def test_compensation_and_loftq_start_nearer_the_float_model():
    model, originals, batches = _quantized(bits=2)
    ref = _logits(tiny_llama(), batches[0])
    q_err = (_logits(model, batches[0]) - ref).pow(2).mean()
    stats = calibrate(model, batches, "all-linear", keep="full", progress=False)
    for method in ("compensation", "loftq", "loftq-aw"):
        m = copy.deepcopy(model)
        pm = adapt_(m, plan(stats, m, method=method, originals=originals, rank=8))
        err = (_logits(pm, batches[0]) - ref).pow(2).mean()
        assert err < q_err, method


def test_methods_that_cannot_run_on_a_compressed_base_say_why():
    model, originals, batches = _quantized()
    with pytest.raises(PlanError, match="original float"):
        plan(None, model, method="loftq", rank=2)
    with pytest.raises(PlanError, match="compressed base"):
        adapt_(model, plan(None, model, method="pissa", rank=2))
    with pytest.raises(PlanError, match="quantized base"):
        fp = tiny_llama()
        plan(None, fp, method="loftq", rank=2, originals={n: m.weight for n, m in fp.named_modules()
                                                         if isinstance(m, torch.nn.Linear)})


def test_base_section_rejects_bad_keys():
    with pytest.raises(ConfigError, match="did you mean 'bits'"):
        BaseSection.build(method="gptq", bitz=3)
    with pytest.raises(ConfigError, match="not one of"):
        BaseSection.build(method="gptqq")
    with pytest.raises(ConfigError, match="compensation"):
        BaseSection.build(method="gptq", compensate="eora")
    assert BaseSection.build(method="svd-llm", ratio=0.6).options() == {"ratio": 0.6}


def test_cli_resume_on_a_quantized_base_is_exact(tiny_model_dir, tmp_path):
    """8 steps straight vs. the same run cut back to its step-4 checkpoint and `rankwise train --out DIR --resume`."""
    from safetensors.torch import load_file

    from test_cli import run

    out = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\nout: {out}\nmerge: false\nbase: {{method: rtn, bits: 3, group_size: 32}}\n"
                   "init: {method: loftq, rank: 2, iters: 2}\ndata: {seq_len: 32, max_train_examples: 40}\n"
                   "train: {steps: 8, save_every: 4, eval_every: 4, lr: 0.005}\n")
    r = run("train", "--config", cfg, "--quiet")
    assert r.returncode == 0, r.stderr
    straight = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert "requantized" in summary["base"] and (out / "base" / "config.json").exists()
    shutil.rmtree(out / "checkpoints" / "step-000008")
    r = run("train", "--out", out, "--resume", "--quiet")
    assert r.returncode == 0, r.stderr
    resumed = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    again = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert set(resumed) == set(straight)
    assert max(float((resumed[k] - straight[k]).abs().max()) for k in straight) <= 1e-6
    assert again == pytest.approx(losses, abs=1e-6)


def _recovery_setup(tiny_model_dir):
    from rankwise.compress.recover import teacher_copy
    from rankwise.compress.svd import compress
    from rankwise.data.sources import DataConfig, batchify, load_dataset
    from rankwise.models import load_model

    model, tok = load_model(str(tiny_model_dir))
    tr, _ = load_dataset(DataConfig(seq_len=32, max_train_examples=32), tok, "causal-lm")
    teacher = teacher_copy(model)
    compress(model, batchify(tr.examples[:16], tok, 4), "svd-llm", progress=False, ratio=0.5)
    return model, teacher, tr, tok


def test_recovery_lowers_the_distillation_loss_and_never_raises_it(tiny_model_dir):
    from rankwise.compress.linear import lowrank_layers
    from rankwise.compress.recover import RecoverConfig, recover
    from rankwise.train.loop import TrainConfig

    model, teacher, tr, tok = _recovery_setup(tiny_model_dir)
    res = recover(model, teacher, tr, tok, TrainConfig(steps=10, lr=5e-4, batch_size=4, save_every=100), progress=False)
    # measured 0.03341 → 0.03275: the tiny model's factors are near their teacher already; any drop counts
    assert not res.reverted and res.after < res.before, (res.before, res.after)
    assert not any(p.requires_grad for p in model.parameters())

    model, teacher, tr, tok = _recovery_setup(tiny_model_dir)
    start = {n: m.weight.detach().clone() for n, m in lowrank_layers(model).items()}
    bad = recover(model, teacher, tr, tok, TrainConfig(steps=3, lr=3.0, warmup_steps=0, batch_size=4, save_every=100,
                                                       max_grad_norm=1e3), RecoverConfig(reg=0.0), progress=False)
    assert bad.reverted and bad.after == bad.before  # a learning rate that blows it up: the factors are put back
    assert all(torch.equal(m.weight, start[n]) for n, m in lowrank_layers(model).items())


def test_recovery_regularizer_equals_the_direct_norm_and_its_gradient(tiny_model_dir):
    """The trace form of ‖B·A − W₀‖²/‖W₀‖² against the product built outright, value and gradient (float32:
    the trace form subtracts terms of size ‖W₀‖², so agreement to 1e-4 relative is what float32 allows)."""
    from rankwise.compress.linear import lowrank_layers
    from rankwise.compress.recover import Distillation, RecoverConfig

    model, teacher, _, _ = _recovery_setup(tiny_model_dir)
    loss = Distillation(teacher, model, RecoverConfig())
    layers = lowrank_layers(model)
    with torch.no_grad():  # off the SVD point, so that the gap is not only the truncation
        for m in layers.values():
            m.up.weight.add_(0.01 * torch.randn_like(m.up.weight))
    params = [p for m in layers.values() for p in (m.down.weight, m.up.weight)]
    for p in params:
        p.requires_grad_(True)
    ours = loss.regularizer(model)
    g_ours = torch.autograd.grad(ours, params)
    direct = sum((layers[n].weight - w).pow(2).sum() / w.pow(2).sum() for n, w in loss.refs.items()) / len(layers)
    g_direct = torch.autograd.grad(direct, params)
    ours, direct = float(ours.detach()), float(direct.detach())
    assert direct > 1e-3 and abs(ours - direct) <= 1e-4 * direct
    assert max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(g_ours, g_direct)) <= 1e-4


def test_compressed_layers_are_neither_compressed_again_nor_fold_sources():
    from rankwise.compress.linear import LowRankLinear
    from rankwise.compress.svd import compress
    from rankwise.quant.fold import fold_source

    model, _, batches = _quantized(bits=4, method="rtn")
    with pytest.raises(ConfigError, match="compressed already .*QuantLinear"):
        compress(model, batches, "svd", progress=False, ratio=0.8)
    model = tiny_llama()
    assert fold_source(model, ["model.layers.0.mlp.down_proj"])[:2] == ("rows", "model.layers.0.mlp.up_proj")
    compress(model, batches, "svd", progress=False, ratio=0.6, targets="up_proj")
    assert isinstance(model.get_submodule("model.layers.0.mlp.up_proj"), LowRankLinear)
    assert fold_source(model, ["model.layers.0.mlp.down_proj"]) is None  # B·A has no rows of its own to scale
    with pytest.raises(ConfigError, match="compressed already .*LowRankLinear"):
        compress(model, batches, "svd", progress=False, ratio=0.8)
