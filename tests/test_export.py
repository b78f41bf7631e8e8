"""Tier 2: export → peft round trip, plan.json."""

import json

import torch

import rankwise as rw
from peft import PeftModel

from conftest import make_batches, tiny_bert, tiny_llama


def _out(model, b):
    with torch.no_grad():
        o = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _roundtrip(make, tmp_path):
    model, batches = make(seed=0), make_batches(n_batches=3, batch=4, seq=16)
    p = rw.plan(rw.calibrate(model, batches, progress=False), model, rank=4)
    pm = rw.adapt_(model, p)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero B so that a wrongly loaded adapter would change the outputs
        for m in pm.modules():
            if hasattr(m, "lora_B") and "default" in m.lora_B:
                m.lora_B["default"].weight.copy_(torch.randn(m.lora_B["default"].weight.shape, generator=g) * 0.1)
    ours = _out(pm, batches[0])
    out = rw.export(pm, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(make(seed=0), out).eval()
    assert (ours - _out(loaded, batches[0])).abs().max() <= 1e-5
    assert (ours - _out(make(seed=0), batches[0])).abs().max() > 1e-3  # the adapter does change outputs
    for name, lp in p.active().items():
        assert loaded.base_model.model.get_submodule(name).lora_A["default"].weight.shape[0] == lp.rank
    return p, out


def test_llama_roundtrip(tmp_path):
    p, out = _roundtrip(tiny_llama, tmp_path)
    saved = json.loads((out / "plan.json").read_text())
    assert saved["method"] == "eva"
    assert {n: d["rank"] for n, d in saved["layers"].items()} == {n: lp.rank for n, lp in p.layers.items()}
    assert all("explained_variance_total" in d for d in saved["layers"].values())
    assert rw.Plan.load(out / "plan.json").to_dict() == p.to_dict()


def test_bert_roundtrip(tmp_path):
    _roundtrip(tiny_bert, tmp_path)


def test_export_replaces_existing_folder(tmp_path):
    model, batches = tiny_llama(), make_batches()
    pm = rw.adapt_(model, rw.plan(rw.calibrate(model, batches, progress=False), model, rank=2))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "stale.txt").write_text("old")
    rw.export(pm, tmp_path / "a")
    assert not (tmp_path / "a" / "stale.txt").exists() and (tmp_path / "a" / "adapter_config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temp folders left behind
