"""The pipeline across torch.distributed ranks (gloo, 2 CPU processes) equals one process: adapters, plans,
training losses, checkpoints from either world size, GPTQ codes; a failing rank stops every rank."""

import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

import rankwise as rw
from rankwise.data import DataConfig, load_dataset
from rankwise.train import TrainConfig, train

from conftest import make_batches, tiny_llama

WORLD = 2
LIMIT_S = 240  # a whole multi-process test, including imports; a hang fails the test instead of the suite


def _entry(rank, world, init_file, fn, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), RANKWISE_DIST_TIMEOUT="60")
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                             timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    code = 0
    try:
        fn(rank, *args)
        tdist.barrier()
    except BaseException as e:  # noqa: BLE001 — the test reads what each rank raised
        Path(args[0], f"error-{rank}.txt").write_text(f"{type(e).__name__}: {e}")
        code = 1
    # Leave without gloo's teardown (see test_distributed.py: it aborts now and then at exit).
    os._exit(code)


def _ranks(fn, out: Path, *args, world=WORLD) -> list[int]:
    """Run fn(rank, out, *args) in `world` processes; their exit codes (every process is waited for)."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(r, world, str(out / "pg-init"), fn, (str(out), *args))) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + LIMIT_S
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, f"ranks still running after {LIMIT_S} s (a hang)"
    return [p.exitcode for p in procs]


def _ok(out: Path, codes):
    errors = {p.name: p.read_text() for p in out.glob("error-*.txt")}
    assert codes == [0] * len(codes), errors


def _lora_model(model_dir):
    model, tok = rw.load_model(model_dir)
    p = rw.plan(None, model, method="lora", rank=4, seed=0)
    return rw.adapt_(model, p), tok


def _data(tok):
    return load_dataset(DataConfig(train="pydoc", seq_len=32, max_train_examples=48, max_eval_examples=8), tok)


CFG = dict(steps=6, batch_size=4, grad_accum=2, lr=3e-3, warmup_steps=2, eval_every=3, save_every=3, seed=0)


def _trained(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _train_worker(rank, out, model_dir, resume):
    model, tok = _lora_model(model_dir)
    tr, ev = _data(tok)
    res = train(model, tr, ev, TrainConfig(**CFG), tok, run_dir=Path(out) / "run", resume=resume, progress=False)
    torch.save({"params": _trained(model), "history": res.history}, Path(out) / f"rank-{rank}.pt")


def _single_train(model_dir, run_dir, resume=False):
    model, tok = _lora_model(model_dir)
    tr, ev = _data(tok)
    res = train(model, tr, ev, TrainConfig(**CFG), tok, run_dir=run_dir, resume=resume, progress=False)
    return _trained(model), res.history


def _close(a: dict, b: dict, tol: float):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.allclose(a[n], b[n], rtol=tol, atol=tol), (n, float((a[n] - b[n]).abs().max()))


@pytest.fixture(scope="module")
def single(tiny_model_dir, tmp_path_factory):
    """The one-process run (6 steps, checkpoints at 3 and 6) every distributed run is compared with."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    params, history = _single_train(tiny_model_dir, run_dir)
    return params, history, run_dir


def test_data_parallel_training_equals_one_process(tiny_model_dir, tmp_path, single):
    params, history, _ = single
    _ok(tmp_path, _ranks(_train_worker, tmp_path, str(tiny_model_dir), False))
    r0, r1 = (torch.load(tmp_path / f"rank-{r}.pt") for r in range(WORLD))
    for n in r0["params"]:  # the same gradients everywhere: the ranks' weights are bit-identical
        assert torch.equal(r0["params"][n], r1["params"][n]), n
    # the same global batch (4 × 2 micro-batches, split between ranks) as one process: only the order of the
    # float sums differs (per-rank padding, gradient all_reduce), ~1e-7 relative; 1e-5 is the bound
    _close(r0["params"], params, 1e-5)
    assert len(r0["history"]) == len(history) == CFG["steps"]
    for a, b in zip(r0["history"], history):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * b["loss"]
        assert ("eval_loss" in a) == ("eval_loss" in b)
        if "eval_loss" in b:
            assert abs(a["eval_loss"] - b["eval_loss"]) <= 1e-5 * b["eval_loss"]
    # rank 0 alone wrote the run: one metrics line per step, checkpoints at 3 and 6
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 7))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000003", "step-000006"]


def _drop_last_checkpoint(run_dir: Path):
    import shutil

    shutil.rmtree(run_dir / "checkpoints" / "step-000006")


def test_checkpoint_of_two_processes_resumes_in_one_and_back(tiny_model_dir, tmp_path, single):
    params, history, single_dir = single
    # 2 → 1: the 2-process run's step-3 checkpoint, resumed by one process, ends where one process ends
    _ok(tmp_path, _ranks(_train_worker, tmp_path, str(tiny_model_dir), False))
    _drop_last_checkpoint(tmp_path / "run")
    resumed, hist = _single_train(tiny_model_dir, tmp_path / "run", resume=True)
    _close(resumed, params, 1e-5)
    assert [r["step"] for r in hist] == list(range(1, 7))  # 1–3 read back from metrics.jsonl, 4–6 trained here
    # 1 → 2: one process's step-3 checkpoint, resumed by two
    back = tmp_path / "back"
    back.mkdir()
    import shutil

    shutil.copytree(single_dir, back / "run")
    _drop_last_checkpoint(back / "run")
    _ok(back, _ranks(_train_worker, back, str(tiny_model_dir), True))
    r0 = torch.load(back / "rank-0.pt")
    _close(r0["params"], params, 1e-5)
    rows = [json.loads(x) for x in (back / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))  # 1–3 kept from the first run, 4–6 appended once


def _init_worker(rank, out, model_dir, data, method):
    from rankwise.cli.jobs import InitJob, run_init

    job = InitJob(model=model_dir, data=data, method=method, rank=4, seq_len=32, n_samples=8, batch_size=2,
                  out=Path(out) / "adapter")
    res = run_init(job, progress=False)
    torch.save({"fingerprint": res["plan"].fingerprint(), "params": _trained(res["model"]), "tokens": res["tokens"],
                "ranks": {n: lp.rank for n, lp in res["plan"].layers.items()}}, Path(out) / f"rank-{rank}.pt")


@pytest.mark.parametrize("method", ["eva", "lora-ga"])
def test_init_on_two_processes_equals_one(tiny_model_dir, tmp_path, method):
    """EVA from summed moments, LoRA-GA from summed gradients: one plan, the same adapter on every rank and
    in one process (fp32 sums in another order: ≤ 1e-4 on the factors, whose scale is O(1))."""
    from rankwise.cli.jobs import InitJob, run_init

    _ok(tmp_path, _ranks(_init_worker, tmp_path, str(tiny_model_dir), "pydoc", method))
    r0, r1 = (torch.load(tmp_path / f"rank-{r}.pt") for r in range(WORLD))
    assert r0["fingerprint"] == r1["fingerprint"]
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), n
    one = run_init(InitJob(model=str(tiny_model_dir), data="pydoc", method=method, rank=4, seq_len=32, n_samples=8,
                           batch_size=2, out=tmp_path / "one"), progress=False)
    assert r0["tokens"] == one["tokens"]
    assert r0["ranks"] == {n: lp.rank for n, lp in one["plan"].layers.items()}
    _close(r0["params"], _trained(one["model"]), 1e-4)
    assert (tmp_path / "adapter" / "adapter_config.json").exists()


def _gptq_worker(rank, out, seed):
    from rankwise.quant.linear import quantized_layers

    model = tiny_llama()
    batches = make_batches(n_batches=4, seed=seed)[rank::WORLD]
    rw.quantize(model, batches, "gptq", bits=3, group_size=32, progress=False)
    torch.save({n: m.codes.clone() for n, m in quantized_layers(model).items()}, Path(out) / f"rank-{rank}.pt")


def test_gptq_on_two_processes_gives_the_same_codes(tmp_path):
    from rankwise.quant.linear import quantized_layers

    _ok(tmp_path, _ranks(_gptq_worker, tmp_path, 7))
    r0, r1 = (torch.load(tmp_path / f"rank-{r}.pt") for r in range(WORLD))
    model = tiny_llama()
    rw.quantize(model, make_batches(n_batches=4, seed=7), "gptq", bits=3, group_size=32, progress=False)
    one = {n: m.codes for n, m in quantized_layers(model).items()}
    assert r0.keys() == one.keys()
    for n in one:
        assert torch.equal(r0[n], r1[n]), n  # each block decided once from the same merged statistics
        assert torch.equal(r0[n], one[n]), (n, int((r0[n] != one[n]).sum()))


def _bad_shard_worker(rank, out, model_dir, good):
    _init_worker(rank, out, model_dir, good if rank == 0 else str(Path(good).with_name("missing.txt")), "eva")


def test_a_failing_rank_stops_every_rank(tiny_model_dir, tmp_path):
    good = tmp_path / "calib.txt"
    good.write_text("\n\n".join(rw.data.pydoc_texts("train")[:8]))
    t = time.monotonic()
    codes = _ranks(_bad_shard_worker, tmp_path, str(tiny_model_dir), str(good))
    assert codes == [1, 1]
    assert "missing.txt" in (tmp_path / "error-1.txt").read_text()
    msg = (tmp_path / "error-0.txt").read_text()
    assert msg.startswith("DistributedError") and "rank 1 of 2 failed while loading the model and the data" in msg
    assert "missing.txt" in msg
    assert time.monotonic() - t < 120  # agreed at the stage's end, not after the 60 s collective timeout
    assert not (tmp_path / "adapter").exists()


def _mid_calibration_worker(rank, out):
    from rankwise import distributed as dist

    model = tiny_llama()
    if rank == 1:  # this rank's block 0 emits NaN: it fails measuring block 1, after block 0's all_reduce
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    with dist.together("calibrating"):
        rw.calibrate(model, make_batches(n_batches=2, seed=rank), mode="blockwise", progress=False)


def _mid_training_worker(rank, out, model_dir):
    from rankwise import distributed as dist

    model, tok = _lora_model(model_dir)
    tr, ev = _data(tok)
    if rank == 1:  # fails in the forward of its 3rd micro-batch (step 2), while rank 0 sums step 2's gradients
        calls, forward = [0], model.forward

        def failing(*a, **k):
            calls[0] += 1
            if calls[0] == 3:
                raise RuntimeError("out of memory (simulated)")
            return forward(*a, **k)

        model.forward = failing
    with dist.together("training"):
        train(model, tr, ev, TrainConfig(**{**CFG, "eval_every": 100}), tok, progress=False)


@pytest.mark.parametrize("where", ["calibration", "training"])
def test_a_rank_failing_between_collectives_stops_every_rank_at_once(tiny_model_dir, tmp_path, where):
    """The failure comes while rank 0 waits in a collective (a block's all_reduce, a step's gradient sum), not at
    a stage's end: rank 1 records its error and leaves the group, rank 0 stops with an error naming it, well
    before the 60 s collective timeout."""
    t = time.monotonic()
    if where == "calibration":
        codes = _ranks(_mid_calibration_worker, tmp_path)
    else:
        codes = _ranks(_mid_training_worker, tmp_path, str(tiny_model_dir))
    assert codes == [1, 1]
    own = (tmp_path / "error-1.txt").read_text()
    assert ("non-finite activations" in own) if where == "calibration" else ("out of memory (simulated)" in own)
    msg = (tmp_path / "error-0.txt").read_text()
    assert msg.startswith("DistributedError") and f"rank 1 of 2 failed while {'calibrating' if where == 'calibration' else 'training'}" in msg
    assert ("non-finite activations" in msg) if where == "calibration" else ("out of memory (simulated)" in msg)
    assert time.monotonic() - t < 50  # not the timeout (60 s); the spawn and imports take ~10 s


def _dead_peer_worker(rank, out):
    if rank == 1:
        os._exit(3)  # dies without a word, outside any agreed stage
    stats = rw.calibrate(tiny_llama(), make_batches(n_batches=2), mode="whole", progress=False, keep="full")
    Path(out, "unreachable.txt").write_text(str(stats.order))


def test_a_rank_that_dies_inside_a_collective_does_not_hang_the_others(tmp_path):
    t = time.monotonic()
    codes = _ranks(_dead_peer_worker, tmp_path)
    assert codes == [1, 3]
    assert not (tmp_path / "unreachable.txt").exists()
    assert time.monotonic() - t < LIMIT_S


def test_cli_nproc_runs_train_in_two_processes(tiny_model_dir, tmp_path):
    """`rankwise --nproc 2 train` (torchrun) writes one run folder equal to one process's run."""
    flags = ["train", "--model", str(tiny_model_dir), "--data", "pydoc", "--steps", "4", "--batch-size", "4",
             "--seq-len", "32", "--rank", "2", "--eval-every", "2", "--lr", "3e-3", "--no-merge", "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RANKWISE_DIST_TIMEOUT": "120"}
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"n{n}"
        cmd = [sys.executable, "-m", "rankwise.cli.main", *(["--nproc", "2"] if n == 2 else []), *flags, "--out", str(out),
               "--init-opt", "calib_samples=8"]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=LIMIT_S)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[n] = (out, res.stdout)
    (o1, _), (o2, stdout2) = runs[1], runs[2]
    assert stdout2.count("run folder:") == 1  # rank 0 speaks for the run
    m1, m2 = ([json.loads(x) for x in (o / "metrics.jsonl").read_text().splitlines()] for o in (o1, o2))
    assert [r["step"] for r in m2] == [1, 2, 3, 4]
    for a, b in zip(m2, m1):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * b["loss"]
    l1, l2 = (json.loads((o / "plan.json").read_text())["layers"] for o in (o1, o2))
    assert {n: (d["rank"], d["alpha"]) for n, d in l1.items()} == {n: (d["rank"], d["alpha"]) for n, d in l2.items()}
    for n in l1:  # the explained variances come from sums taken in another order: fp32 accuracy
        assert l2[n]["explained_variance"] == pytest.approx(l1[n]["explained_variance"], rel=1e-4, abs=1e-7)
    from safetensors.torch import load_file

    _close(load_file(o2 / "adapter" / "adapter_model.safetensors"), load_file(o1 / "adapter" / "adapter_model.safetensors"), 1e-5)


def _fsdp_worker(rank, out, mode, method):
    from torch.distributed.fsdp import fully_shard

    from rankwise.distributed import sharded

    model = tiny_llama()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    assert sharded(model)
    stats = rw.calibrate(model, make_batches(n_batches=4, seed=7)[rank::WORLD], mode=mode, progress=False)
    p = rw.plan(stats, model, method=method, rank=4)  # pissa reads whole weights: all-gathered per layer
    torch.save({"n": {k: st.n for k, st in stats.layers.items()}, "xtx": {k: st.xtx for k, st in stats.layers.items()},
                "ranks": {n: lp.rank for n, lp in p.layers.items()},
                "A": {n: lp.lora_A for n, lp in p.layers.items() if lp.rank}}, Path(out) / f"rank-{rank}.pt")


@pytest.mark.parametrize("mode,method", [("whole", "eva"), ("blockwise", "pissa")])
def test_calibration_of_an_fsdp_sharded_model_equals_the_unsharded_run(tmp_path, mode, method):
    """FSDP2 fully_shard per decoder layer: the hooks see the unsharded compute, so the summed statistics, the
    ranks and the initial A equal one process on the unsharded model (fp32 sums in another order: 1e-6 on XᵀX;
    1e-4 on A, unit rows from an eigen/SVD solve)."""
    _ok(tmp_path, _ranks(_fsdp_worker, tmp_path, mode, method))
    r0, r1 = (torch.load(tmp_path / f"rank-{r}.pt") for r in range(WORLD))
    model = tiny_llama()
    stats = rw.calibrate(model, make_batches(n_batches=4, seed=7), mode=mode, progress=False)
    p = rw.plan(stats, model, method=method, rank=4)
    assert r0["n"] == r1["n"] == {k: st.n for k, st in stats.layers.items()}
    for k, st in stats.layers.items():
        assert float((r0["xtx"][k] - st.xtx).norm() / st.xtx.norm()) <= 1e-6
    assert r0["ranks"] == r1["ranks"] == {n: lp.rank for n, lp in p.layers.items()}
    for n, a in r0["A"].items():
        assert torch.equal(a, r1["A"][n])
        assert torch.allclose(a.abs(), p.layers[n].lora_A.abs(), atol=1e-4), n  # eigenvector signs may flip


@pytest.mark.parametrize("command", [["quantize", "--method", "gptq", "--bits", "3", "--group-size", "32"],
                                     ["compress", "--method", "svd-llm", "--ratio", "0.7"]])
def test_cli_nproc_block_sequential_commands_equal_one_process(tiny_model_dir, tmp_path, command):
    """`rankwise --nproc 2 quantize|compress`: each block is transformed once from the merged statistics, so the
    written model is the one-process model (GPTQ codes exactly; SVD-LLM's merged weights, from a Cholesky/SVD
    solve on sums taken in another order, fp32: 1e-4 on weights of O(0.02–1))."""
    from safetensors.torch import load_file

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RANKWISE_DIST_TIMEOUT": "120"}
    written = {}
    for n in (1, 2):
        out = tmp_path / f"n{n}"
        cmd = [sys.executable, "-m", "rankwise.cli.main", *(["--nproc", "2"] if n == 2 else []), *command,
               "--model", str(tiny_model_dir), "--n-samples", "8", "--batch-size", "2", "--seq-len", "32",
               "--eval-tokens", "64", "--quiet", "--out", str(out)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=LIMIT_S)
        assert res.returncode == 0, res.stderr[-3000:]
        written[n] = out
        if n == 2:
            assert res.stdout.count("written to") + res.stdout.count("compressed to") >= 1, res.stdout
    r1, r2 = (json.loads((written[n] / "report.json").read_text()) for n in (1, 2))
    assert r1["tokens"] == r2["tokens"] > 0
    # SVD: the merged weights (a factor pair's signs may flip together between solves; the product does not)
    folder = "merged" if command[0] == "compress" else "model"
    # one process streams its output block by block (one shard per block), several write it whole: same tensors
    tensors = [{k: v for f in sorted((written[n] / folder).rglob("*.safetensors")) for k, v in load_file(f).items()
                if "compensation" not in f.parts} for n in (1, 2)]
    a, b = tensors
    assert a and a.keys() == b.keys()
    for k in a:
        if a[k].dtype.is_floating_point:
            assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-4), k
        else:
            assert torch.equal(a[k], b[k]), k
