"""Reading a checkpoint one block at a time (rankwise.lazy) and writing the result as each block finishes
(export/stream.py) give exactly what the whole model in memory gives; bad checkpoints fail before any work."""

import json
import os
import shutil

import pytest
import torch

import rankwise
from rankwise.errors import ModelLoadError
from rankwise.models import load_model

from test_cli import ENV, run


@pytest.fixture(scope="module")
def sharded(tiny_model_dir, tmp_path_factory):
    """The tiny Llama in bfloat16, in several shards."""
    model, tok = load_model(tiny_model_dir, dtype="bfloat16")
    path = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(path, max_shard_size="60KB")
    tok.save_pretrained(path)
    assert len(list(path.glob("model-*.safetensors"))) > 2
    return path


def test_lazy_model_reads_blocks_on_demand_and_calibrates_identically(sharded, batches):
    eager, _ = load_model(sharded)
    lazy, _ = load_model(sharded, lazy=True)
    assert lazy.rankwise_lazy is not None and lazy.model.layers[0].mlp.up_proj.weight.is_meta
    assert torch.equal(lazy.model.embed_tokens.weight, eager.model.embed_tokens.weight)
    s1, s2 = rankwise.calibrate(eager, batches, progress=False), rankwise.calibrate(lazy, batches, progress=False)
    assert all(torch.equal(s1[n].xtx, s2[n].xtx) for n in s1.layers) and set(s1.layers) == set(s2.layers)
    assert all(p.is_meta for p in lazy.model.layers.parameters())  # every block freed after its turn


def test_streamed_compressed_tensors_equal_the_in_memory_quantization(sharded, tmp_path):
    """The CLI's streamed checkpoint, reloaded by transformers, holds the very weights (q − z)·s that
    quantizing the whole model in memory gives (same calibration batches, same order)."""
    from transformers import AutoModelForCausalLM

    from rankwise.data.sources import load_data
    from rankwise.quant.linear import quantized_layers

    r = run("quantize", "--model", sharded, "--method", "gptq", "--format", "compressed-tensors", "--n-samples", "8",
            "--seq-len", "64", "--eval-tokens", "128", "--out", tmp_path / "q", "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "q" / "report.json").read_text())["streamed"] is True
    model, tok = load_model(sharded)
    batches = load_data("pydoc", tok, seq_len=64, n=8, batch_size=4)
    rankwise.quantize(model, batches, "gptq", progress=False, bits=4, group_size=32, symmetric=True)
    ours = {n: q.grid_weight() for n, q in quantized_layers(model).items()}  # float32, as the file holds it
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q" / "model", dtype=torch.float32)
    loaded.hf_quantizer.compressor.decompress_model(loaded)
    assert ours and all(torch.equal(loaded.get_submodule(n).weight, w) for n, w in ours.items())


def test_streamed_svd_folders_equal_the_in_memory_export(sharded, tmp_path):
    from rankwise.compress import compress
    from rankwise.data.sources import load_data
    from rankwise.export import export_model

    r = run("compress", "--model", sharded, "--n-samples", "8", "--seq-len", "64", "--eval-tokens", "128",
            "--out", tmp_path / "c", "--quiet")
    assert r.returncode == 0, r.stderr
    model, tok = load_model(sharded)
    compress(model, load_data("pydoc", tok, seq_len=64, n=8, batch_size=4), progress=False, ratio=0.8)
    export_model(model, tmp_path / "dense", "safetensors", tokenizer=tok)
    x = torch.randint(0, 200, (2, 24))
    streamed, _ = load_model(tmp_path / "c" / "model")  # factored: the very factors
    assert torch.equal(streamed(x).logits, model(x).logits)
    merged, dense = load_model(tmp_path / "c" / "merged")[0].state_dict(), load_model(tmp_path / "dense")[0].state_dict()
    assert set(merged) == set(dense) and all(torch.equal(merged[k], dense[k]) for k in dense)


@pytest.mark.parametrize("method", ["eva", "pissa"])
def test_lazy_init_writes_the_adapter_the_whole_model_gives(sharded, tmp_path, method):
    from safetensors.torch import load_file

    from rankwise.cli.jobs import InitJob, run_init
    from rankwise.export.peft import export

    job = dict(model=str(sharded), method=method, n_samples=8, seq_len=64)
    lazy = run_init(InitJob(**job, out=tmp_path / "lazy"), progress=False)
    assert lazy["model"].get_base_model().rankwise_hollow  # the base was never read whole
    model, _ = load_model(sharded)
    stats = rankwise.calibrate(model, rankwise.load_data("pydoc", _tok(sharded), seq_len=64, n=8, batch_size=4),
                               progress=False, keep=16) if method == "eva" else None
    p = rankwise.plan(stats, model, method=method, rank=8)
    export(rankwise.adapt_(model, p), tmp_path / "eager", plan=p)
    a, b = load_file(tmp_path / "lazy" / "adapter_model.safetensors"), load_file(tmp_path / "eager" / "adapter_model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_truncated_or_missing_shard_named_before_any_work(sharded, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sharded, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:500])
    with pytest.raises(ModelLoadError, match=f"shard {shard.name} is truncated or damaged \\(it should hold model"):
        load_model(broken, lazy=True)
    shard.unlink()
    r = run("quantize", "--model", broken, "--out", tmp_path / "out")
    assert r.returncode != 0 and f"shard {shard.name} is missing (it should hold model." in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_bin_checkpoint_is_read_whole_with_a_note(tiny_model_dir, tmp_path):
    model, tok = load_model(tiny_model_dir)
    folder = tmp_path / "bin"
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # transformers 5 writes safetensors only
    tok.save_pretrained(folder)
    notes = []
    loaded, _ = load_model(tmp_path / "bin", lazy=True, log=notes.append)
    assert getattr(loaded, "rankwise_lazy", None) is None and not loaded.model.layers[0].mlp.up_proj.weight.is_meta
    assert len(notes) == 1 and "pytorch_model.bin, not safetensors" in notes[0] and "whole model" in notes[0]


def test_out_that_is_a_file_and_too_little_memory_are_refused(sharded, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for args in (("train", "--steps", "1"), ("init",), ("quantize",), ("compress",)):
        r = run(*args, "--model", sharded, "--out", afile)
        assert r.returncode != 0 and "is a file, not a folder" in r.stderr and "Traceback" not in r.stderr, args
    r = run("init", "--model", sharded, "--offload-cache", afile, "--out", tmp_path / "i")
    assert r.returncode != 0 and "--offload-cache" in r.stderr and "is a file" in r.stderr and "Traceback" not in r.stderr
    assert afile.read_text() == "keep me" and not (tmp_path / "i").exists()
    env = ENV | {"RANKWISE_MAX_MEMORY": "1KB"}  # not even one block (1MB would fit with the cache in files)
    import subprocess

    from test_cli import EXE

    r = subprocess.run([EXE, "quantize", "--model", str(sharded), "--out", str(tmp_path / "q")], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode != 0 and "GiB more" in r.stderr and "--n-samples" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "q").exists()
    assert "RANKWISE_MAX_MEMORY" not in os.environ


def test_offloaded_cache_quantizes_identically_and_leaves_nothing(sharded, batches, tmp_path, monkeypatch):
    """Hidden states round-trip through safetensors files bit for bit, so GPTQ on a lazily read model gives the
    same weights with the cache in files as in memory; the files exist during the pass and are gone after."""
    from rankwise.calib import blocks
    from rankwise.quant.linear import quantized_layers

    written = []
    real_set = blocks.SpilledCache.__setitem__
    monkeypatch.setattr(blocks.SpilledCache, "__setitem__",
                        lambda self, b, h: (real_set(self, b, h), written.append(self.folder / f"{b}.safetensors")))
    weights = {}
    for folder in (None, tmp_path / "cache"):
        model, _ = load_model(sharded, lazy=True)
        blocks.offload_cache(model, folder)

        def keep(i, block, folder=folder):
            assert folder is None or written[-1].exists()  # the cache is in files while the pass runs
            weights.setdefault(folder, {}).update({(i, n): q.grid_weight() for n, q in quantized_layers(block).items()})

        rankwise.quantize(model, batches, "gptq", progress=False, bits=4, group_size=32, after_block=keep)
    assert written and weights[None].keys() == weights[tmp_path / "cache"].keys() and len(weights[None]) == 14
    assert all(torch.equal(w, weights[tmp_path / "cache"][n]) for n, w in weights[None].items())
    assert list((tmp_path / "cache").iterdir()) == []


def test_cache_spills_when_only_it_does_not_fit_and_disk_is_checked(sharded, tmp_path, monkeypatch):
    from rankwise import memory
    from rankwise.errors import DiskSpaceError, MemoryBudgetError

    model, _ = load_model(sharded, lazy=True)
    parts = memory.estimate(model, 10_000)
    assert parts["cache"] > 0
    rest = sum(parts.values()) - parts["cache"]
    monkeypatch.setenv("RANKWISE_MAX_MEMORY", str(rest + parts["cache"] // 2))  # fits without the cache only
    notes = []
    got = memory.check_fits(model, "cpu", 10_000, log=notes.append)
    assert got["cache"] == 0 and model.rankwise_cache_dir is not None and "--offload-cache" in notes[0]
    monkeypatch.setenv("RANKWISE_MAX_MEMORY", str(rest // 2))  # not even without it: refused
    with pytest.raises(MemoryBudgetError):
        memory.check_fits(load_model(sharded, lazy=True)[0], "cpu", 10_000)
    with pytest.raises(DiskSpaceError, match="GiB free"):
        memory.check_disk(tmp_path / "not" / "yet", 2**60, "the output")
    # the CLI checks the output's size against the disk before any work
    monkeypatch.delenv("RANKWISE_MAX_MEMORY")
    monkeypatch.setattr(memory.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    from rankwise.cli.quantize import QuantJob, run_quantize

    with pytest.raises(DiskSpaceError, match="the output of rtn"):
        run_quantize(QuantJob(model=str(sharded), method="rtn", out=tmp_path / "q", eval_tokens=0), progress=False)
    assert not (tmp_path / "q").exists()
