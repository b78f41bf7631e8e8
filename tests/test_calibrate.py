"""Tier 2: calibration statistics on tiny models: accuracy, masks, dedupe, modes, merge, errors."""

import gc
import json
import math
import tempfile
import weakref
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import rankwise as rw
from rankwise.calib.calibrate import Recorder
from rankwise.errors import CalibrationError, TargetError
from rankwise.numerics.linalg import GramAccumulator

from conftest import make_batches, tiny_bert, tiny_llama


def _captured_inputs(model, batches, name, use_labels=True):
    """Brute force: the rows a module sees on unmasked tokens, via a plain hook, in float64."""
    rows = []
    module = model.get_submodule(name)

    def hook(mod, args):
        rows.append(args[0].detach().double())

    h = module.register_forward_pre_hook(hook)
    with torch.no_grad():
        for b in batches:
            before = len(rows)
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            x = rows[before]
            mask = rw.token_mask(b, use_labels)
            rows[before] = x[mask] if x.shape[:-1] == mask.shape else x
    h.remove()
    return torch.cat(rows)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", ["model.layers.1.self_attn.q_proj", "model.layers.0.mlp.down_proj"])
def test_xtx_matches_float64_brute_force(llama, name):
    batches = make_batches(labels=True)
    stats = rw.calibrate(llama, batches, progress=False)
    x = _captured_inputs(llama, batches, name)
    st = stats[name]
    assert st.n == x.shape[0]
    assert _rel(st.xtx, x.T @ x) <= 1e-5
    assert _rel(st.sum, x.sum(0)) <= 1e-5
    xc = x - x.mean(0)
    assert _rel(st.scatter(), xc.T @ xc) <= 1e-6  # fp32 products about a shift near the mean: ~1e-7


def test_masked_tokens_are_excluded(llama):
    batches = make_batches(labels=True)
    expected = sum(int(((b["attention_mask"] == 1) & (b["labels"] != -100)).sum()) for b in batches)
    stats = rw.calibrate(llama, batches, progress=False)
    assert stats["model.layers.0.self_attn.o_proj"].n == expected
    # with the label mask off, prompt tokens count but padding still does not
    stats_all = rw.calibrate(llama, batches, use_label_mask=False, progress=False)
    assert stats_all["model.layers.0.self_attn.o_proj"].n == sum(int(b["attention_mask"].sum()) for b in batches)
    # a padded token's activation must not leak in: change ids under the padding only
    altered = [dict(b) for b in batches]
    for b in altered:
        ids = b["input_ids"].clone()
        ids[b["attention_mask"] == 0] = 5
        b["input_ids"] = ids
    stats_alt = rw.calibrate(llama, altered, progress=False)
    for n in stats.layers:
        assert torch.allclose(stats[n].xtx, stats_alt[n].xtx, rtol=1e-6, atol=1e-6)


def test_shared_inputs_are_measured_once(llama, batches):
    stats = rw.calibrate(llama, batches, progress=False)
    q, k, v = (f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
    assert stats.aliases[k] == q and stats.aliases[v] == q
    assert stats.aliases["model.layers.0.mlp.up_proj"] == "model.layers.0.mlp.gate_proj"
    assert k not in stats.layers and stats[k] is stats[q]
    assert len(stats.layers) == 2 * 4  # per block: qkv, o, gate/up, down
    assert set(stats.order) == set(rw.find_targets(llama))


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert])
def test_blockwise_equals_whole_model(make, batches):
    model = make()
    a = rw.calibrate(model, batches, mode="blockwise", progress=False)
    b = rw.calibrate(model, batches, mode="whole", progress=False)
    assert a.order == b.order and a.aliases == b.aliases
    for name in a.layers:
        assert a[name].n == b[name].n
        assert _rel(a[name].xtx, b[name].xtx) <= 1e-5
    if make is tiny_bert:  # the pooler reads [batch, hidden]: one row per sequence
        assert a["pooler.dense"].n == sum(x["input_ids"].shape[0] for x in batches)


def test_merge_equals_union(llama):
    part1, part2 = make_batches(seed=1), make_batches(seed=2)
    merged = rw.calibrate(llama, part1, progress=False) + rw.calibrate(llama, part2, progress=False)
    union = rw.calibrate(llama, part1 + part2, progress=False)
    for name in union.layers:
        assert merged[name].n == union[name].n
        assert _rel(merged[name].xtx, union[name].xtx) <= 1e-6
        assert _rel(merged[name].sum, union[name].sum) <= 1e-6
        assert _rel(merged[name].scatter(), union[name].scatter()) <= 1e-6


def test_save_load_roundtrip(llama, batches, tmp_path):
    stats = rw.calibrate(llama, batches, progress=False)
    stats.save(tmp_path / "s.safetensors")
    back = rw.Stats.load(tmp_path / "s.safetensors")
    assert back.order == stats.order and back.aliases == stats.aliases
    for n in stats.layers:
        assert back[n].n == stats[n].n and torch.equal(back[n].xtx, stats[n].xtx)
        for key in ("shift", "sum_shifted", "m2"):
            assert torch.equal(getattr(back[n], key), getattr(stats[n], key))
    small = rw.calibrate(llama, batches, keep=4, progress=False)
    small.save(tmp_path / "k.safetensors")
    back = rw.Stats.load(tmp_path / "k.safetensors")
    name = stats.order[0]
    assert back[name].xtx is None and back[name].eigvecs.shape == (4, 64)
    vals, _, trace = stats[name].spectrum(4)
    assert torch.allclose(back[name].eigvals, vals) and math.isclose(back[name].trace, trace, rel_tol=1e-12)


def _layer_stats(xs, d):
    acc = GramAccumulator(d, panel=8)
    for x in xs:
        acc.update(x)
    return rw.LayerStats(acc.n, acc.shift, acc.sum_shifted, acc.m2)


@settings(max_examples=15, deadline=None)
@given(d=st.integers(1, 20), rows=st.lists(st.integers(1, 30), min_size=1, max_size=4), offset=st.floats(-1e4, 1e4),
       keep=st.sampled_from(["full", 1, 3]), seed=st.integers(0, 1000))
def test_save_load_roundtrips_exactly(d, rows, offset, keep, seed):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(r, d, generator=g) + offset * torch.rand(d, generator=g) for r in rows]
    layers = {"a": _layer_stats(xs, d), "b": _layer_stats(xs[::-1], d) + _layer_stats(xs[:1], d)}
    if keep != "full":
        for v in layers.values():
            v.summarize_(keep)
    stats = rw.Stats(layers, {"c": "a"}, ["a", "b", "c"])
    with tempfile.TemporaryDirectory() as tmp:
        stats.save(Path(tmp) / "s.safetensors")
        back = rw.Stats.load(Path(tmp) / "s.safetensors")
    assert back.order == stats.order and back.aliases == stats.aliases
    for name, st_ in stats.layers.items():
        b = back.layers[name]
        assert b.n == st_.n and b.trace == st_.trace
        for key in ("shift", "sum_shifted", "m2", "eigvals", "eigvecs"):
            mine, theirs = getattr(st_, key), getattr(b, key)
            assert (mine is None and theirs is None) or torch.equal(mine, theirs), key


def test_load_reads_raw_moment_files(llama, batches, tmp_path):
    """Files written before the shift (sum, xtx) still load, with shift 0."""
    stats = rw.calibrate(llama, batches, progress=False)
    tensors = {f"{n}::{k}": getattr(s, k).contiguous() for n, s in stats.layers.items() for k in ("sum", "xtx")}
    meta = {"order": stats.order, "aliases": stats.aliases, "n": {k: v.n for k, v in stats.layers.items()},
            "trace": {k: None for k in stats.layers}}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"rankwise_stats": json.dumps(meta)})
    back = rw.Stats.load(tmp_path / "old.safetensors")
    for n, s in stats.layers.items():
        assert torch.equal(back[n].shift, torch.zeros_like(s.shift)) and torch.equal(back[n].xtx, tensors[f"{n}::xtx"])
        assert _rel(back[n].scatter(), s.scatter()) <= 1e-6  # these inputs have small means: raw centring is fine


def test_whole_mode_holds_no_input_alive(llama, batches):
    """Recording keeps no measured input alive (weak references only), and q/k/v, gate/up still share one entry."""
    names = rw.find_targets(llama)
    refs = []
    hooks = [llama.get_submodule(n).register_forward_pre_hook(lambda m, args: refs.append(weakref.ref(args[0]))) for n in names]
    recorder = Recorder(llama, names)
    recorder.active = set(names)
    try:
        with torch.no_grad():
            for i, b in enumerate(batches):
                recorder.start_batch(rw.token_mask(b), i)
                llama(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
                gc.collect()
                assert refs and all(r() is None for r in refs), "an input outlived its forward"
                assert not any(isinstance(v, torch.Tensor) for e in recorder._seen.values() for v in e)
                refs.clear()
    finally:
        recorder.remove()
        for h in hooks:
            h.remove()
    q, k, v = (f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
    assert recorder.aliases[k] == q and recorder.aliases[v] == q
    assert recorder.aliases["model.layers.1.mlp.up_proj"] == "model.layers.1.mlp.gate_proj"
    assert len(recorder.acc) == 2 * 4


def test_freed_input_at_a_reused_address_is_not_an_alias():
    """A module reading a new tensor at the address of a freed one (same layout) gets its own entry."""
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    recorder = Recorder(torch.nn.ModuleDict({"a": a, "b": b}), ["a", "b"])
    recorder.active = {"a", "b"}
    recorder.start_batch(torch.ones(2, 3, dtype=torch.bool), 0)
    try:
        with torch.no_grad():
            x = torch.randn(2, 3, 4)
            a(x)
            memory, ptr = x.untyped_storage(), x.data_ptr()
            del x  # a's input is gone; its memory now backs another tensor (as the allocator would reuse it)
            y = torch.empty(0).set_(memory, 0, (2, 3, 4), (12, 4, 1)).normal_()
            assert y.data_ptr() == ptr
            b(y)
    finally:
        recorder.remove()
    assert "b" not in recorder.aliases and set(recorder.acc) == {"a", "b"}


def test_summarized_stats_refuse_merge(llama, batches):
    a = rw.calibrate(llama, batches, keep=4, progress=False)
    with pytest.raises(CalibrationError, match="merge"):
        a + a


def test_error_empty_data(llama):
    with pytest.raises(CalibrationError, match="no calibration batches"):
        rw.calibrate(llama, [], progress=False)


def test_error_every_token_masked(llama, batches):
    for b in batches:
        b["attention_mask"] = torch.zeros_like(b["attention_mask"])
    with pytest.raises(CalibrationError, match="every token is masked"):
        rw.calibrate(llama, batches, progress=False)


def test_error_nan_activations(llama, batches):
    with torch.no_grad():
        llama.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(CalibrationError, match=r"non-finite.*model\.layers\.1\.mlp\.down_proj"):
        rw.calibrate(llama, batches, progress=False)


def test_error_no_target_matched_lists_linears(llama, batches):
    with pytest.raises(TargetError) as e:
        rw.calibrate(llama, batches, targets=["query_key_value"], progress=False)
    assert "q_proj" in str(e.value) and "down_proj" in str(e.value)


def test_targets_by_list_and_regex(llama):
    assert rw.find_targets(llama, ["q_proj", "v_proj"]) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert rw.find_targets(llama, r"re:.*\.1\.mlp\..*") == [f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    assert "lm_head" not in rw.find_targets(llama, "all-linear")
    with pytest.raises(TargetError, match="Embedding"):
        rw.find_targets(llama, ["embed_tokens"])
