"""Tier 2: calibration statistics on tiny models: accuracy, masks, dedupe, modes, merge, errors."""

import math

import pytest
import torch

import rankwise as rw
from rankwise.errors import CalibrationError, TargetError

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


def test_save_load_roundtrip(llama, batches, tmp_path):
    stats = rw.calibrate(llama, batches, progress=False)
    stats.save(tmp_path / "s.safetensors")
    back = rw.Stats.load(tmp_path / "s.safetensors")
    assert back.order == stats.order and back.aliases == stats.aliases
    for n in stats.layers:
        assert back[n].n == stats[n].n and torch.equal(back[n].xtx, stats[n].xtx)
    small = rw.calibrate(llama, batches, keep=4, progress=False)
    small.save(tmp_path / "k.safetensors")
    back = rw.Stats.load(tmp_path / "k.safetensors")
    name = stats.order[0]
    assert back[name].xtx is None and back[name].eigvecs.shape == (4, 64)
    vals, _, trace = stats[name].spectrum(4)
    assert torch.allclose(back[name].eigvals, vals) and math.isclose(back[name].trace, trace, rel_tol=1e-12)


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
    assert rw.find_targets(llama, r".*\.1\.mlp\..*") == [f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    assert "lm_head" not in rw.find_targets(llama, "all-linear")
    with pytest.raises(TargetError, match="Embedding"):
        rw.find_targets(llama, ["embed_tokens"])
