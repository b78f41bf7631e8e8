"""Results that used to be wrong without an error: merged models of compressed bases, adapters naming the
wrong base, AWQ+EoRA overflow, names that match nothing, encoders in `quantize`/`compress`, asymmetric
compressed-tensors, progress bars in logs, the calibration token mask."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import make_batches, tiny_llama
from test_cli import run

import rankwise as rw
from rankwise.errors import ConfigError, TargetError


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def _trained(run_dir):
    from rankwise.cli.evaluate import load_with_adapter

    return load_with_adapter(None, run_dir / "adapter")


def _rtn(**kw):
    from rankwise.quant import get_quantizer

    return get_quantizer("rtn").config(**kw)


# fp32 logits of the same weights summed in another order: ~1e-7 each, far below 1e-5
TOL = 1e-5


@pytest.fixture(scope="module")
def qlora_runs(tiny_model_dir, tmp_path_factory):
    """`rankwise train` on an RTN and an SVD-LLM base, the adapter on q_proj,v_proj only (the others stay
    compressed and carry no LoRA layer)."""
    runs = {}
    for base in ("rtn", "svd-llm"):
        out = tmp_path_factory.mktemp(f"run-{base}")
        r = run("train", "--model", tiny_model_dir, "--base", base, "--targets", "q_proj,v_proj", "--method", "lora",
                "--steps", "4", "--lr", "1e-2", "--seq-len", "48", "--out", out, "--overwrite")
        assert r.returncode == 0, r.stderr[-3000:]
        runs[base] = (out, r)
    return runs


@pytest.mark.parametrize("base", ["rtn", "svd-llm"])
def test_merged_folder_of_a_compressed_base_reloads_the_trained_model(qlora_runs, base):
    from transformers import AutoModelForCausalLM

    out, _ = qlora_runs[base]
    trained, tok = _trained(out)
    merged, info = AutoModelForCausalLM.from_pretrained(out / "merged", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    b = tok(["def f(x): return x", "the quick brown fox"], return_tensors="pt", padding=True)
    ref = _logits(trained, b)
    assert (_logits(merged, b) - ref).abs().max() <= TOL
    float_model, _ = rw.load_model(str(json.loads((out / "adapter" / "rankwise.json").read_text())["original_base"]))
    assert (_logits(float_model, b) - ref).abs().max() > 1e-3  # the base really was compressed


def test_adapter_names_the_compressed_base_for_peft(qlora_runs):
    """AutoPeftModelForCausalLM reads base_model_name_or_path: base/, never the float model (which would count a
    LoftQ/compensation correction twice). With compressed-tensors' dequantizing load it is the trained model."""
    from peft import AutoPeftModelForCausalLM
    from transformers import CompressedTensorsConfig

    out, _ = qlora_runs["rtn"]
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((out / "base").resolve())
    trained, tok = _trained(out)
    b = tok(["def f(x): return x"], return_tensors="pt")
    peft_model = AutoPeftModelForCausalLM.from_pretrained(out / "adapter",
                                                          quantization_config=CompressedTensorsConfig(dequantize=True))
    assert (_logits(peft_model, b) - _logits(trained, b)).abs().max() <= TOL


def test_factored_base_refuses_plain_transformers(qlora_runs):
    """A factored folder must not load in plain transformers with its factored layers at random."""
    from transformers import AutoModelForCausalLM

    out, _ = qlora_runs["svd-llm"]
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str((out / "base").resolve())
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(out / "base")
    from rankwise.compress.linear import lowrank_layers

    model, _ = rw.load_model(out / "base")  # rankwise reads it
    assert lowrank_layers(model)


def test_export_refuses_a_model_its_loader_would_fill_at_random(tmp_path):
    from rankwise.export.check import check_reloadable
    from rankwise.quant.linear import dequantize_

    model = tiny_llama()
    check_reloadable(model, "plain")  # the architecture's own state: fine
    rw.quantize_(model, _rtn(bits=4, targets="k_proj"), "rtn")
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.self_attn\.k_proj.*QuantLinear"):
        check_reloadable(model, "test")
    check_reloadable(dequantize_(model), "dequantized")


@pytest.mark.parametrize("layers", [1, 2])
def test_awq_with_eora_on_small_activations_stays_finite(layers):
    """Whitened EoRA factors (A = VᵀS⁻¹·diag(s)) are huge when the inputs are small; balanced, only the size of
    B·A bounds them, so float16 holds them."""
    from rankwise.quant import quantized_layers

    model = tiny_llama(layers=layers)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "layernorm" in n:
                p.mul_(0.01)
    batches = make_batches(4, 4, 16)
    report = rw.quantize(model, batches, "awq", compensate="eora", compensate_rank=16, progress=False)
    comp = [q for q in quantized_layers(model).values() if q.lora_a is not None]
    assert comp and all(torch.isfinite(q.lora_a).all() and torch.isfinite(q.lora_b).all() for q in comp)
    for q in comp:  # what a float16 copy holds is what was counted
        assert torch.equal(q.lora_a.half().float(), q.lora_a) and torch.equal(q.lora_b.half().float(), q.lora_b)
    for name, rec in report.layers.items():
        assert rec.compensated_error is not None and rec.compensated_error <= rec.error, name
    assert torch.isfinite(_logits(model, batches[0])).all()


def test_balance_keeps_the_product_and_equalizes_norms():
    from rankwise.numerics.lowrank import balance

    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 30, generator=g, dtype=torch.float64) * torch.tensor([1e6, 1e-3, 1.0, 1e4], dtype=torch.float64)[:, None]
    b = torch.randn(20, 4, generator=g, dtype=torch.float64) / torch.tensor([1e6, 1e-3, 1.0, 1e4], dtype=torch.float64)
    a2, b2 = balance(a, b, torch.float32)  # float32 factors: each entry rounded once (relative 2⁻²⁴)
    a2, b2 = a2.double(), b2.double()
    bound = 4 * 2.0**-24 * (b2.abs() @ a2.abs())  # two roundings per term, plus slack: elementwise
    assert ((b2 @ a2 - b @ a).abs() <= bound).all()
    assert torch.allclose(a2.norm(dim=1), b2.norm(dim=0), rtol=1e-6)
    with pytest.raises(ValueError, match="float16"):
        balance(torch.full((1, 4), 1e6), torch.full((4, 1), 1e6))  # a product of 4e12 fits no float16 factors


def test_a_target_name_that_matches_nothing_is_an_error():
    model = tiny_llama()
    with pytest.raises(TargetError, match=r"'v_porj'.*closest: v_proj"):
        rw.find_targets(model, "q_proj,v_porj")
    assert len(rw.find_targets(model, "q_proj,v_proj")) == 4


def test_bits_pattern_takes_suffixes_and_refuses_typos():
    from rankwise.quant import quantized_layers

    cfg = _rtn
    model = tiny_llama()
    rw.quantize_(model, cfg(bits=4, bits_pattern={"down_proj": 8, "model.layers.0.mlp.down_proj": 6}), "rtn")
    bits = {n: q.grid.bits for n, q in quantized_layers(model).items()}
    assert bits["model.layers.0.mlp.down_proj"] == 6  # the longer (more specific) key wins
    assert bits["model.layers.1.mlp.down_proj"] == 8
    assert bits["model.layers.1.mlp.up_proj"] == 4
    for key, near in (("model.layers.0.mlp.dwn_proj", "model.layers.0.mlp.down_proj"), ("dwn_proj", "down_proj")):
        with pytest.raises(TargetError, match=rf"bits_pattern key '{key}'.*closest: .*{near}"):
            rw.quantize_(tiny_llama(), cfg(bits=4, bits_pattern={key: 8}), "rtn")
    with pytest.raises(TargetError, match="rank_pattern key 'o_prj'"):
        rw.quantize_(tiny_llama(), cfg(bits=4, compensate="lorc", rank_pattern={"o_prj": 0}), "rtn")


def test_cli_typo_in_targets_is_one_error_line(tiny_model_dir, tmp_path):
    r = run("quantize", "--model", tiny_model_dir, "--method", "rtn", "--targets", "q_proj,v_porj",
            "--eval-tokens", "0", "--out", tmp_path / "q")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error:") and "'v_porj'" in r.stderr and "v_proj" in r.stderr
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("verb", [
    ["quantize", "--method", "gptq"],
    ["quantize", "--method", "awq", "--format", "compressed-tensors"],
    ["compress", "--method", "svd-llm", "--ratio", "0.8"],
    ["compress", "--method", "mixed", "--avg-bits", "3.5"],
])
def test_encoder_verbs_report_embedding_cosine(tiny_bert_dir, tmp_path, verb):
    """A BERT has no LM head: the report measures the embedding cosine to the float model on held-out text;
    table data calibrates through --text-field."""
    data = tmp_path / "rows.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"row {i} says the film was {'good' if i % 2 else 'bad'} and long\t{i % 2}\n"
                                                 for i in range(40)))
    out = tmp_path / "out"
    r = run(*verb, "--model", tiny_bert_dir, "--data", data, "--text-field", "sentence", "--seq-len", "32",
            "--n-samples", "16", "--group-size", "32", "--eval-tokens", "512", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "report.json").read_text())
    assert 0.0 < s["cosine"]["after"] < 1.0 and s["cosine"]["before"] == pytest.approx(1.0, abs=1e-6)
    assert "embedding cosine" in (out / "report.md").read_text()


def test_encoder_as_causal_lm_is_refused_not_given_a_random_head(tiny_bert_dir, tmp_path):
    r = run("train", "--model", tiny_bert_dir, "--steps", "2", "--out", tmp_path / "t")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "error:" in r.stderr and "--task seq-cls" in r.stderr


def test_asymmetric_compressed_tensors_says_why_it_is_not_packed(tmp_path):
    from transformers import AutoModelForCausalLM

    from rankwise.export.compressed_tensors import export_compressed_tensors

    model = tiny_llama()
    rw.quantize_(model, _rtn(bits=4, symmetric=False), "rtn")
    with pytest.warns(UserWarning, match="int-quantized.*transformers 5.23 refuses"):
        export_compressed_tensors(model, tmp_path / "ct")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")  # what is written loads
    loaded.hf_quantizer.compressor.decompress_model(loaded)
    b = make_batches(1, 2, 10)[0]
    assert (_logits(loaded, b) - _logits(model, b)).abs().max() <= 1e-4
    sym = tiny_llama()
    rw.quantize_(sym, _rtn(bits=4), "rtn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_compressed_tensors(sym, tmp_path / "ct-sym")


def test_logs_get_lines_not_redrawn_bars(qlora_runs):
    """stderr to a file (as `make demo > log`): no carriage returns, no line longer than a sentence."""
    _, r = qlora_runs["rtn"]
    log = r.stdout + r.stderr
    assert "\r" not in log
    assert max(len(line) for line in log.splitlines()) < 400
    assert any(line.startswith("train: 4/4 step (loss=") for line in r.stderr.splitlines())


def test_line_progress_writes_one_line_per_stage_and_about_ten_per_stage():
    import io

    from rankwise.progress import LineProgress

    buf = io.StringIO()
    bar = LineProgress(total=100, desc="train", unit="step", stream=buf)
    for _ in range(100):
        bar.set_postfix(loss="1.0")
        bar.update(1)
    bar.close()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("train: 100/100 step (loss=1.0)")
    buf = io.StringIO()
    bar = LineProgress(total=6, unit="batch", stream=buf)
    for i in range(3):
        bar.set_description(f"calibrate block {i + 1}/3")
        bar.update(2)
    bar.close()
    stages = [ln.split(":")[0] for ln in buf.getvalue().splitlines()]
    assert stages == ["calibrate block 1/3", "calibrate block 2/3", "calibrate block 3/3", "calibrate block 3/3"]
    assert buf.getvalue().splitlines()[-1].startswith("calibrate block 3/3: 6/6 batch")  # the close: where it ended


def test_token_mask_keeps_the_positions_the_loss_scores():
    """The loss scores the prediction made at t against labels[t + 1]; that prediction reads the input at t."""
    ids = torch.arange(10).reshape(1, 10) + 5
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt of 4 tokens
    mask = torch.ones_like(ids)
    mask[:, 8:] = 0  # padding
    labels[mask == 0] = -100
    got = rw.token_mask({"input_ids": ids, "attention_mask": mask, "labels": labels})
    # predictions at t = 3..6 are scored (targets 4..7): the last prompt token in, the last answer token (7) out
    assert got[0].nonzero().flatten().tolist() == [3, 4, 5, 6]
    scored = labels[:, 1:] != -100  # what transformers' shifted causal-LM loss scores, position by position
    assert torch.equal(scored[0], got[0, :-1]) and not got[0, -1]


@pytest.mark.slow
def test_every_verb_on_the_embedded_minilm(tmp_path):
    """The embedded encoder through the CLI: init, quantize, compress, train (classification), eval, export."""
    rows = tmp_path / "rows.tsv"
    rows.write_text("sentence\tlabel\n" + "".join(f"the film number {i} was {'good' if i % 2 else 'bad'}\t{i % 2}\n"
                                                 for i in range(48)))
    small = ["--seq-len", "64", "--n-samples", "8"]
    steps = {
        "init": ["init", "--model", "minilm", *small, "--out", tmp_path / "init"],
        "quantize": ["quantize", "--model", "minilm", *small, "--eval-tokens", "1024", "--out", tmp_path / "q"],
        "compress": ["compress", "--model", "minilm", "--method", "svd-llm", "--ratio", "0.8", *small,
                     "--eval-tokens", "1024", "--out", tmp_path / "c"],
        "train": ["train", "--model", "minilm", "--task", "seq-cls", "--data", rows, "--text-field", "sentence",
                  "--steps", "2", "--seq-len", "32", "--out", tmp_path / "t"],
        "eval": ["eval", "--adapter", tmp_path / "t" / "adapter", "--data", rows, "--text-field", "sentence",
                 "--metric", "accuracy"],
        "export": ["export", tmp_path / "t" / "adapter", "--out", tmp_path / "merged"],
    }
    for name, args in steps.items():
        r = run(*args)
        assert r.returncode == 0, (name, r.stderr[-3000:])
    for report in ("q", "c", "t"):
        assert (tmp_path / report / "report.md").exists()
    assert 0.9 < json.loads((tmp_path / "q" / "report.json").read_text())["cosine"]["after"] < 1.0
