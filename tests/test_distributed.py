"""Statistics merged across torch.distributed ranks (gloo, 2 processes) equal one process on all data."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rankwise as rw

from conftest import make_batches, tiny_llama


def _worker(rank, world, init_file, out_dir, mode):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        batches = make_batches(n_batches=4, seed=7)[rank::world]  # each rank sees its own half
        stats = rw.calibrate(tiny_llama(), batches, mode=mode, progress=False)
        if rank == 0:
            stats.save(os.path.join(out_dir, "merged.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["blockwise", "whole"])
def test_all_reduce_equals_single_process(tmp_path, mode):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), mode), nprocs=2, join=True)
    merged = rw.Stats.load(tmp_path / "merged.safetensors")
    single = rw.calibrate(tiny_llama(), make_batches(n_batches=4, seed=7), mode=mode, progress=False)
    for name in single.layers:
        assert merged[name].n == single[name].n
        assert float((merged[name].xtx - single[name].xtx).norm() / single[name].xtx.norm()) <= 1e-6
