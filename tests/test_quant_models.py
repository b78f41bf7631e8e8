"""Tier 2: quantizers on tiny models: sequential calibration, AWQ folding, exports, bad input."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import make_batches, tiny_bert, tiny_llama

from rankwise.errors import ConfigError, QuantError
from rankwise.quant import QuantLinear, dequantize_, quantize, quantize_, quantized_layers
from rankwise.quant.fold import fold_, fold_source
from rankwise.quant.rtn import RTNConfig


def logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in batches])


def mha_llama():
    """A tiny Llama without grouped KV heads, so that v_proj → o_proj can fold too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_every_target_becomes_a_quantlinear_and_dequantize_restores_linears(method):
    model, batches = tiny_llama(), make_batches()
    report = quantize(model, batches, method, bits=4, group_size=32, progress=False)
    q = quantized_layers(model)
    assert len(q) == 14 and set(report.layers) == set(q)  # 2 blocks × 7 linears; lm_head stays float
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert all(r.error < 0.05 and r.bits == pytest.approx(4.5) for r in report.layers.values())
    before = logits(model, batches)
    dequantize_(model)
    assert not quantized_layers(model)
    assert torch.allclose(logits(model, batches), before, atol=1e-6)


def test_gptq_layers_beat_rtn_on_their_calibration_inputs():
    from rankwise.calib.calibrate import calibrate
    from rankwise.numerics.quantize import Grid, fake_quantize, output_error

    base, batches = tiny_llama(), make_batches(n_batches=4, batch=4, seq=32)
    gptq = quantize(copy.deepcopy(base), batches, "gptq", bits=3, group_size=32, progress=False)
    # Block 0 sees the same inputs either way: RTN's output error there, from the same statistics.
    stats = calibrate(base, batches, r"re:model\.layers\.0\..*", progress=False)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"):
        w, h = base.get_submodule(name).weight.detach(), stats[name].xtx.float()
        rel_rtn = output_error(w, fake_quantize(w, Grid(3, 32, True)), h) / output_error(w, 0 * w, h)
        assert gptq.layers[name].error < rel_rtn, name
    assert gptq.layers[name].error_kind == "output"


@pytest.mark.parametrize("true_sequential", [False, True])
def test_block_after_a_quantized_block_is_calibrated_on_its_outputs(true_sequential):
    model, batches = tiny_llama(), make_batches(n_batches=2)
    fp = copy.deepcopy(model)
    seen = []
    hook = model.model.layers[1].register_forward_pre_hook(lambda m, a, kw: seen.append((a or (kw["hidden_states"],))[0].clone()),
                                                           with_kwargs=True)
    quantize(model, batches, "gptq", bits=3, group_size=32, true_sequential=true_sequential, progress=False)
    hook.remove()
    # Block 1's first call in calibration (its measuring pass, batch 0) against block 0's outputs
    # recomputed afterwards with the quantized and with the float model:
    captured = []
    for m in (model, fp):
        h = m.model.layers[1].register_forward_pre_hook(lambda mod, a, kw: captured.append((a or (kw["hidden_states"],))[0].clone()),
                                                        with_kwargs=True)
        with torch.no_grad():
            m(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"])
        h.remove()
    quantized_out, float_out = captured
    first = next(s for s in seen if s.shape == quantized_out.shape)
    assert torch.allclose(first, quantized_out, atol=1e-6)
    assert (first - float_out).abs().max() > 1e-4  # and the quantization did change them


@pytest.mark.parametrize("true_sequential", [False, True])
def test_true_sequential_measures_o_proj_after_qkv_are_quantized(true_sequential):
    model, batches = tiny_llama(), make_batches(n_batches=2)
    attn = model.model.layers[0].self_attn
    q_kind_when_o_ran = set()
    # The hook sits on the float o_proj, which runs only until it is replaced itself.
    h = attn.o_proj.register_forward_pre_hook(lambda m, a: q_kind_when_o_ran.add(type(attn.q_proj).__name__))
    quantize(model, batches, "gptq", bits=3, group_size=32, true_sequential=true_sequential, progress=False)
    h.remove()
    assert ("QuantLinear" in q_kind_when_o_ran) == true_sequential


@pytest.mark.parametrize("make", [mha_llama, tiny_llama, tiny_bert])
def test_folding_scales_leaves_the_float_model_unchanged(make):
    model = make()
    batches = make_batches(n_batches=1)
    run = (lambda m: logits(m, batches)) if hasattr(model, "lm_head") else \
        (lambda m: torch.cat([m(**{k: b[k] for k in ("input_ids", "attention_mask")}).last_hidden_state for b in batches]))
    with torch.no_grad():
        before = run(model)
    from rankwise.calib.calibrate import calibrate

    stats = calibrate(model, batches, progress=False)
    folded = 0
    for group in stats.groups().values():
        src = fold_source(model, group)
        if src is None:
            continue
        s = torch.rand(model.get_submodule(group[0]).in_features, generator=torch.Generator().manual_seed(folded)) * 4 + 0.25
        with torch.no_grad():
            fold_(model, src, s)
            for n in group:
                model.get_submodule(n).weight.mul_(s[None, :])
        folded += 1
    expected = {"mha_llama": 8, "tiny_llama": 6, "tiny_bert": 2}[make.__name__]  # GQA: no v→o; BERT: v→o only
    assert folded == expected
    with torch.no_grad():
        assert (run(model) - before).abs().max() <= 1e-5


def test_awq_folds_where_it_can_and_keeps_explicit_scales_elsewhere():
    model, batches = tiny_llama(), make_batches()
    report = quantize(model, batches, "awq", bits=3, group_size=32, progress=False)
    notes = {n.split(".", 3)[-1]: r.note for n, r in report.layers.items() if ".layers.0." in n}
    assert notes["self_attn.q_proj"].startswith("scale folded into model.layers.0.input_layernorm")
    assert notes["mlp.down_proj"].startswith("scale folded into model.layers.0.mlp.up_proj")
    assert notes["self_attn.o_proj"] == "explicit input scale"  # grouped KV heads: v_proj cannot absorb it
    assert model.model.layers[0].self_attn.o_proj.input_scale is not None
    # Block 0 sees the float model's inputs either way: AWQ's output errors there against RTN's.
    from rankwise.calib.calibrate import calibrate
    from rankwise.numerics.quantize import Grid, fake_quantize, output_error

    fp = tiny_llama()
    stats = calibrate(fp, batches, r"re:model\.layers\.0\..*", progress=False)
    rtn_err = {}
    for n in stats.order:
        w, h = fp.get_submodule(n).weight.detach(), stats[n].xtx.float()
        rtn_err[n] = output_error(w, fake_quantize(w, Grid(3, 32, True)), h) / output_error(w, 0 * w, h)
    awq_err = {n: report.layers[n].error for n in rtn_err}
    assert sum(awq_err.values()) < sum(rtn_err.values()), (awq_err, rtn_err)


def test_quantize_rejects_bad_input(tmp_path):
    model, batches = tiny_llama(), make_batches()
    with pytest.raises(ConfigError, match="bits must be between 2 and 8"):
        quantize(model, batches, "gptq", bits=9)
    with pytest.raises(ValueError, match="bits must be between 2 and 8"):  # pydantic's ValidationError
        RTNConfig(bits=1)
    with pytest.raises(QuantError, match="group size 48 does not divide the input width 64 of model.layers.0.self_attn.q_proj"):
        quantize(model, batches, "gptq", group_size=48)
    with pytest.raises(ConfigError, match="unknown quantization method 'gpt'; did you mean 'gptq'"):
        quantize(model, batches, "gpt")
    with pytest.raises(ConfigError, match="unknown key 'act_ordr'; did you mean 'act_order'"):
        quantize(model, batches, "gptq", act_ordr=True)
    with pytest.raises(QuantError, match="needs calibration batches"):
        quantize(model, [], "gptq")
    broken = tiny_llama()
    with torch.no_grad():
        broken.model.layers[1].mlp.up_proj.weight[3, 4] = float("nan")
    with pytest.raises(QuantError, match="model.layers.1.mlp.up_proj: 1 weights are NaN or inf"):
        quantize(broken, batches, "rtn")
    foreign = tiny_llama()
    foreign.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(QuantError, match="already quantized \\(gptq"):
        quantize(foreign, batches, "gptq")

    class Linear4bit(torch.nn.Linear):  # what bitsandbytes puts in place of nn.Linear
        pass

    bnb = tiny_llama()
    bnb.model.layers[0].mlp.up_proj = Linear4bit(64, 96)
    with pytest.raises(QuantError, match="already quantized by bitsandbytes"):
        quantize(bnb, batches, "gptq")
    quantize_(model, RTNConfig(bits=4))
    with pytest.raises(QuantError, match="already quantized by rankwise; call rankwise.quant.dequantize_"):
        quantize(model, batches, "gptq")


def test_few_calibration_tokens_warn_and_raise_dampening():
    model = tiny_llama()
    few = make_batches(n_batches=1, batch=1, seq=20, pad_last=False)  # 20 tokens for 64/96 input channels
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = quantize(model, few, "gptq", bits=4, group_size=32, progress=False)
    msgs = [str(w.message) for w in caught]
    assert any("20 calibration tokens for 64 input channels" in m and "at least 64 tokens are needed" in m and "from 0.01 to 0.1" in m
               and "Dampening was raised" in m for m in msgs), msgs
    assert report.layers["model.layers.0.self_attn.q_proj"].note == "20 tokens < 64 inputs: damp 0.01 → 0.1"


def test_quantize_underscore_is_rtn_in_place_and_data_free():
    model = tiny_llama()
    report = quantize_(model, RTNConfig(bits=8, group_size=None))
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in report.layers)
    with pytest.raises(QuantError, match="needs calibration data"):
        from rankwise.quant.gptq import GPTQConfig

        quantize_(tiny_llama(), GPTQConfig(), "gptq")


@pytest.mark.parametrize("symmetric", [True, False])
def test_compressed_tensors_export_reloads_with_identical_logits(tmp_path, symmetric):
    from transformers import AutoModelForCausalLM

    from rankwise.export import export_model

    model, batches = tiny_llama(), make_batches()
    quantize(model, batches, "gptq", bits=4, group_size=32, symmetric=symmetric, progress=False)
    out = export_model(model, tmp_path / "ct", "compressed-tensors")
    import json

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["format"] == ("pack-quantized" if symmetric else "int-quantized")
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    # The library re-derives our integers from the exact weights and our scales: equal up to the
    # float32 order of operations of its dequantization (≤ 1e-4 is the acceptance bound).
    assert (logits(back, batches) - logits(model, batches)).abs().max() <= 1e-4
    dense = export_model(model, tmp_path / "dense", "safetensors")
    assert (logits(AutoModelForCausalLM.from_pretrained(dense).eval(), batches) - logits(model, batches)).abs().max() <= 1e-5


def test_explicit_awq_scales_cannot_go_to_compressed_tensors(tmp_path):
    from rankwise.export import export_model

    model = tiny_llama()
    quantize(model, make_batches(), "awq", bits=4, group_size=32, progress=False)
    with pytest.raises(QuantError, match="o_proj.*explicit AWQ input scale.*explicit_scales=false"):
        export_model(model, tmp_path / "ct", "compressed-tensors")
    assert not (tmp_path / "ct").exists()
    ok = tiny_llama()
    quantize(ok, make_batches(), "awq", bits=4, group_size=32, explicit_scales=False, progress=False)
    assert export_model(ok, tmp_path / "ct2", "compressed-tensors").exists()


def test_abs_statistics_merge_and_save(tmp_path):
    from rankwise.calib.calibrate import calibrate
    from rankwise.calib.stats import Stats

    model, batches = tiny_llama(), make_batches(n_batches=4)
    whole = calibrate(model, batches, observe=("moments", "abs"), progress=False)
    halves = calibrate(model, batches[:2], observe=("moments", "abs"), progress=False) + \
        calibrate(model, batches[2:], observe=("moments", "abs"), progress=False)
    name = "model.layers.1.mlp.down_proj"
    assert torch.allclose(whole[name].abs_sum, halves[name].abs_sum, rtol=1e-10)
    x_abs = whole[name].abs_mean
    assert bool((x_abs > 0).all())
    whole.save(tmp_path / "s.safetensors")
    assert torch.equal(Stats.load(tmp_path / "s.safetensors")[name].abs_sum, whole[name].abs_sum)
