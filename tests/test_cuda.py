"""The CUDA path (skipped without a GPU): statistics and adapters on the GPU equal the CPU's."""

import pytest
import torch

import rankwise as rw

from conftest import make_batches, tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_calibrate_and_adapt_on_cuda():
    batches = make_batches(n_batches=4, batch=4, seq=16, labels=True)
    cpu = rw.calibrate(tiny_llama(), batches, progress=False)
    model = tiny_llama().cuda()
    gpu = rw.calibrate(model, batches, progress=False)
    for name in cpu.layers:
        assert gpu[name].xtx.device.type == "cuda" and gpu[name].n == cpu[name].n
        # TF32 may be on for matmuls on the GPU; 1e-3 covers its 10-bit mantissa, fp32 gives ~1e-6
        rel = float((gpu[name].xtx.cpu() - cpu[name].xtx).norm() / cpu[name].xtx.norm())
        assert rel <= (1e-3 if torch.backends.cuda.matmul.allow_tf32 else 1e-5)
        rel = float((gpu[name].scatter().cpu() - cpu[name].scatter()).norm() / cpu[name].scatter().norm())
        assert rel <= (1e-3 if torch.backends.cuda.matmul.allow_tf32 else 1e-5)
    p = rw.plan(gpu, model, rank=4)
    pm = rw.adapt_(model, p)
    b = {k: v.cuda() for k, v in batches[0].items()}
    with torch.no_grad():
        assert torch.isfinite(pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits).all()
    summarized = rw.calibrate(tiny_llama().cuda(), batches, keep=8, progress=False)
    name = cpu.order[0]
    from rankwise.numerics.linalg import subspace_cos2
    assert subspace_cos2(summarized[name].eigvecs.cpu(), cpu[name].spectrum(8)[1]) >= 1 - 1e-4


def test_scatter_stable_at_large_mean_on_cuda():
    """mean/std 1e4: the shifted accumulation on the GPU matches the float64 brute force of the same rows."""
    from rankwise.numerics.linalg import GramAccumulator

    g = torch.Generator().manual_seed(0)
    d = 300
    xs = [torch.randn(256, d, generator=g) + 1e4 * torch.linspace(-1, 1, d) for _ in range(6)]
    acc = GramAccumulator(d, device="cuda")
    for x in xs:
        acc.update(x.cuda())
    full = torch.cat(xs).double()
    xc = full - full.mean(0)
    ref = xc.T @ xc
    rel = float((acc.scatter().cpu() - ref).norm() / ref.norm())
    assert acc.scatter().device.type == "cuda"
    assert rel <= (1e-3 if torch.backends.cuda.matmul.allow_tf32 else 1e-6)  # TF32: 10-bit mantissa


def test_train_run_on_cuda(tiny_model_dir, tmp_path):
    from rankwise.cli.runs import load_config, run_train

    cfg = load_config(None, {"model": str(tiny_model_dir), "device": "cuda", "out": str(tmp_path / "run"), "train.steps": 4,
                             "data.seq_len": 32, "data.max_train_examples": 32, "init.rank": 2})
    summary = run_train(cfg, progress=False, log=lambda *a: None)
    assert summary["steps"] == 4 and summary["after"]["perplexity"] > 1
    assert (tmp_path / "run" / "merged" / "config.json").exists()
