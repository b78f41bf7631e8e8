"""Tier 4: `rankwise quantize` / `rankwise quantizers` as a user runs them (subprocess, tiny model)."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import run


def test_quantize_writes_model_report_and_reloadable_checkpoint(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    r = run("quantize", "--model", tiny_model_dir, "--method", "gptq", "--bits", "4", "--group-size", "32",
            "--n-samples", "8", "--seq-len", "64", "--eval-tokens", "256", "--format", "compressed-tensors",
            "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "held-out perplexity" in r.stdout and "14 layers quantized" in r.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "gptq" and len(report["layers"]) == 14
    assert all(0 < v["error"] < 0.1 and v["bits"] == pytest.approx(4.5) for v in report["layers"].values())
    assert report["perplexity"]["after"] > 0 and (out / "errors.png").stat().st_size > 0
    assert "| layer | error | bits | seconds | note |" in (out / "report.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()  # compressed-tensors, decompressed on load
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_quantize_to_gguf_with_awq_drops_explicit_scales(tmp_path, tiny_model_dir):
    out = tmp_path / "g"
    r = run("quantize", "--model", tiny_model_dir, "--method", "awq", "--n-samples", "8", "--seq-len", "64",
            "--eval-tokens", "0", "--format", "gguf", "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "explicit_scales=false" in r.stdout
    assert (out / "model.gguf").stat().st_size > 0
    report = json.loads((out / "report.json").read_text())
    assert report["perplexity"] == {"before": None, "after": None}
    assert report["config"]["explicit_scales"] is False


@pytest.mark.parametrize("args, message", [
    (["--bits", "9"], "bits must be between 2 and 8, not 9"),
    (["--group-size", "48"], "group size 48 does not divide the input width 64 of model.layers.0.self_attn.q_proj"),
    (["--method", "gpqt"], "unknown quantization method 'gpqt'; did you mean 'gptq'"),
    (["--opt", "dampp=0.1"], "unknown key 'dampp'; did you mean 'damp'"),
    (["--opt", "damp"], "--opt 'damp': expected KEY=VALUE"),
    (["--format", "onnx"], "format"),
    (["--data", "missing.txt"], "missing.txt"),
])
def test_quantize_bad_input_exits_2_with_a_message(tmp_path, tiny_model_dir, args, message):
    r = run("quantize", "--model", tiny_model_dir, "--n-samples", "2", "--seq-len", "32", "--eval-tokens", "0",
            "--out", tmp_path / "bad", "--quiet", *args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "bad" / "model").exists()


def test_quantizers_lists_methods_and_their_options():
    r = run("quantizers")
    assert r.returncode == 0, r.stderr
    for word in ("rtn", "gptq", "awq", "act_order", "true_sequential", "duo_scaling", "data-free"):
        assert word in r.stdout, word


def test_gguf_of_a_bert_fails_before_any_quantizing(tmp_path, tiny_bert_dir):
    r = run("quantize", "--model", tiny_bert_dir, "--method", "gptq", "--n-samples", "2", "--seq-len", "32",
            "--eval-tokens", "0", "--format", "gguf", "--out", tmp_path / "b", "--quiet")
    assert r.returncode == 2 and "GGUF export cannot write model_type" in r.stderr, r.stderr
    assert "calibrate" not in r.stderr  # no progress bar: it stopped before calibrating


def test_quantize_with_eora_writes_the_adapter_and_reports_both_errors(tmp_path, tiny_model_dir):
    out = tmp_path / "e"
    r = run("quantize", "--model", tiny_model_dir, "--method", "gptq", "--bits", "3", "--n-samples", "8",
            "--seq-len", "64", "--eval-tokens", "0", "--opt", "compensate=eora", "--opt", "compensate_rank=4",
            "--format", "compressed-tensors", "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert (out / "model" / "compensation" / "adapter_model.safetensors").exists()
    assert "| with eora rank 4 |" in (out / "report.md").read_text()
    layers = json.loads((out / "report.json").read_text())["layers"]
    assert all(v["compensated_error"] <= v["error"] * (1 + 1e-6) for v in layers.values())
    bad = run("quantize", "--model", tiny_model_dir, "--opt", "compensate=eora", "--format", "gguf",
              "--out", tmp_path / "x", "--quiet")
    assert bad.returncode == 2 and "--format gguf has no place for a low-rank compensation" in bad.stderr
