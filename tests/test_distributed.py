"""Statistics merged across torch.distributed ranks (gloo, 2 processes) equal one process on all data."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rankwise as rw
from rankwise.numerics.linalg import GramAccumulator

from conftest import make_batches, tiny_llama

D = 24


def _large_mean_rows(rank):
    """Each rank's rows: mean/std ~1e4, the two ranks' means 3 std apart (so their shifts differ)."""
    g = torch.Generator().manual_seed(100 + rank)
    mean = 1e4 * torch.linspace(-1, 1, D) + 3.0 * rank
    return [torch.randn(rows, D, generator=g) + mean for rows in (50, 70, 30)]


def _large_mean_stats(parts):
    acc = GramAccumulator(D, panel=8, flush_every=2)
    for x in parts:
        acc.update(x)
    return rw.Stats({"x": rw.LayerStats(acc.n, acc.shift, acc.sum_shifted, acc.m2)}, {}, ["x"])


def _worker(rank, world, init_file, out_dir, mode):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        batches = make_batches(n_batches=4, seed=7)[rank::world]  # each rank sees its own half
        stats = rw.calibrate(tiny_llama(), batches, mode=mode, progress=False)
        big = _large_mean_stats(_large_mean_rows(rank))
        big.all_reduce_()
        grads = None
        if mode == "whole":  # gradient statistics: each rank's half, summed inside calibrate_gradients
            from rankwise.calib.gradients import calibrate_gradients

            grads = calibrate_gradients(tiny_llama(), make_batches(n_batches=4, seed=7, labels=True)[rank::world],
                                        progress=False)
        if rank == 0:
            stats.save(os.path.join(out_dir, "merged.safetensors"))
            big.save(os.path.join(out_dir, "big.safetensors"))
            if grads is not None:
                grads.save(os.path.join(out_dir, "grads.safetensors"))
        dist.barrier()  # rank 0's files are written before either rank leaves
    except BaseException:
        dist.destroy_process_group()
        raise
    # Leave without gloo's teardown: about one run in 15 a child aborted at exit ("terminate called without
    # an active exception", SIGABRT), on this code and on the code before it alike; the test's results
    # are on disk by now, so nothing is lost by skipping it.
    os._exit(0)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("mode", ["blockwise", "whole"])
def test_all_reduce_equals_single_process(tmp_path, mode):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), mode), nprocs=2, join=True)
    merged = rw.Stats.load(tmp_path / "merged.safetensors")
    single = rw.calibrate(tiny_llama(), make_batches(n_batches=4, seed=7), mode=mode, progress=False)
    for name in single.layers:
        assert merged[name].n == single[name].n
        assert _rel(merged[name].xtx, single[name].xtx) <= 1e-6
        assert _rel(merged[name].scatter(), single[name].scatter()) <= 1e-6
    # large means, different shifts per rank: the reduced centred scatter equals the float64 brute force
    # from the same float32 rows, to fp32-product accuracy (~1e-7; raw moments would be off by > 100 %)
    big = rw.Stats.load(tmp_path / "big.safetensors")["x"]
    rows = _large_mean_rows(0) + _large_mean_rows(1)
    full = torch.cat(rows).double()
    xc = full - full.mean(0)
    assert big.n == full.shape[0]
    assert _rel(big.scatter(), xc.T @ xc) <= 1e-6
    assert _rel(big.scatter(), _large_mean_stats(rows)["x"].scatter()) <= 1e-6
    assert torch.allclose(big.mean, full.mean(0), rtol=1e-9, atol=1e-9)
    if mode == "whole":  # the weight gradients too: summed over ranks = one process on all four batches
        from rankwise.calib.gradients import calibrate_gradients

        merged_g = rw.Stats.load(tmp_path / "grads.safetensors")
        single_g = calibrate_gradients(tiny_llama(), make_batches(n_batches=4, seed=7, labels=True), progress=False)
        assert merged_g.grad_count == single_g.grad_count > 0
        assert set(merged_g.grads) == set(single_g.grads)
        for name in single_g.grads:
            assert _rel(merged_g.gradient(name), single_g.gradient(name)) <= 1e-6
