"""Tier 4: `rankwise compress` as a user runs it (subprocess, tiny model): files, reload, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import run

SMALL = ("--n-samples", "4", "--seq-len", "32", "--quiet")


def test_svd_llm_writes_a_factored_folder_that_rankwise_reloads_and_a_merged_one(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from rankwise.compress import lowrank_layers
    from rankwise.models import load_model

    out = tmp_path / "c"
    r = run("compress", "--model", tiny_model_dir, "--method", "svd-llm", "--ratio", "0.7", "--eval-tokens", "128",
            "--out", out, *SMALL)
    assert r.returncode == 0, r.stderr
    assert "held-out perplexity" in r.stdout and "14 layers compressed to" in r.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["params"]["ratio"] <= 0.7 and len(report["layers"]) == 14
    assert (out / "ranks.png").stat().st_size > 0 and "| layer | rank |" in (out / "report.md").read_text()
    factored, _ = load_model(out / "model")  # the path every rankwise command's --model takes
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()  # any tool
    assert len(lowrank_layers(factored)) == sum(v["rank"] is not None for v in report["layers"].values()) > 0
    ids = torch.tensor([[5, 9, 11, 3, 7, 21]])
    with torch.no_grad():
        assert (factored(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max() <= 1e-4
    # and `rankwise eval` reads the factored folder like any model
    ev = run("eval", "--model", out / "model", "--data", "pydoc", "--seq-len", "32", "--limit", "2")
    assert ev.returncode == 0, ev.stderr


def test_joint_planner_writes_compressed_tensors_a_heatmap_and_the_size_plot(tmp_path, tiny_model_dir):
    out = tmp_path / "j"
    r = run("compress", "--model", tiny_model_dir, "--method", "joint", "--budget", "40kB", "--ranks", "0,4",
            "--group-size", "32", "--format", "compressed-tensors", "--eval-tokens", "0", "--out", out, *SMALL)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["bytes"] <= 40_000 and report["measured"] is not None
    assert (out / "bits.png").stat().st_size > 0 and (out / "size.png").stat().st_size > 0
    assert json.loads((out / "model" / "config.json").read_text())["quantization_config"]["quant_method"] == \
        "compressed-tensors"


def test_mixed_precision_meets_the_average(tmp_path, tiny_model_dir):
    out = tmp_path / "m"
    r = run("compress", "--model", tiny_model_dir, "--method", "mixed", "--avg-bits", "3.2", "--group-size", "32",
            "--eval-tokens", "0", "--out", out, *SMALL)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    numel = sum(v["numel"] for v in report["layers"].values())
    assert report["bytes"] * 8 / numel <= 3.2 + 1e-9
    assert {v["bits"] for v in report["layers"].values()} <= {2, 3, 4, 8}


@pytest.mark.parametrize("args,message", [
    (("--method", "svd-llm", "--ratio", "0.001"), "smallest reachable is"),
    (("--method", "svd", "--rank", "100"), "above model.layers.0.self_attn.q_proj's width"),
    (("--method", "joint", "--budget", "60MBx"), "cannot read the size '60MBx'"),
    (("--method", "joint", "--budget", "1kB", "--group-size", "32"), "smallest reachable size is 19,200 bytes"),
    (("--method", "mixed", "--avg-bits", "1.5", "--group-size", "32"), "smallest reachable is 2.500"),
    (("--method", "svd", "--budget", "1MB"), "only for --method mixed/joint"),
    (("--method", "svd-llm", "--format", "gguf"), "cannot hold SVD-compressed layers"),
    (("--method", "joint", "--budget", "1MB", "--svd", "--format", "compressed-tensors"), "drop --svd"),
    (("--method", "joint", "--budget", "1MB", "--format", "gguf"), "--ranks 0"),
    (("--method", "mixed", "--format", "gguf"), "4- and 8-bit grids of group 32"),
    (("--method", "joint", "--budget", "1MB", "--opt", "group_size=32"), "set by the planner itself"),
    (("--method", "nope"), "method"),
    (("--method", "mixed", "--recover-steps", "5"), "only for the SVD methods"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, tiny_model_dir, args, message):
    out = tmp_path / "bad"
    r = run("compress", "--model", tiny_model_dir, *args, "--eval-tokens", "0", "--out", out, *SMALL)
    assert r.returncode != 0
    assert message in r.stdout + r.stderr, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_help_explains_the_methods():
    r = run("compress", "--help")
    assert r.returncode == 0
    for word in ("svd-llm", "--ratio", "--budget", "--avg-bits", "knapsack"):
        assert word in r.stdout, word


def test_recovery_after_svd_lowers_the_distillation_loss_and_is_reported(tmp_path, tiny_model_dir):
    from rankwise.models import load_model

    out = tmp_path / "svdr"
    r = run("compress", "--model", tiny_model_dir, "--method", "svd-llm", "--ratio", "0.5", "--recover-steps", "6",
            "--recover-lr", "5e-4", "--eval-tokens", "512", "--out", out, *SMALL)
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "report.json").read_text())
    rec = rep["recovery"]
    assert rec["steps"] == 6 and not rec["reverted"] and rec["distill_after"] < rec["distill_before"]
    assert rep["perplexity"]["recovered"] == rec["perplexity"] and "after recovery" in r.stdout
    assert "after recovery" in (out / "report.md").read_text()
    # what was written is the recovered model: rankwise reloads it with the recovered perplexity
    from rankwise.train.evaluate import perplexity
    from rankwise.data.sources import read_stream

    model, tok = load_model(str(out / "model"))
    stream = read_stream("pydoc", tok, "eval")[:512]
    assert perplexity(model, stream, window=32, stride=16)["perplexity"] == pytest.approx(rec["perplexity"], rel=1e-4)
