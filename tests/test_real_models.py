"""Tier 3: the embedded real models end to end (slow; still part of `make test`)."""

import pytest
import torch

import rankwise as rw

pytestmark = pytest.mark.slow


def test_smollm2_eva_end_to_end(tmp_path):
    from peft import PeftModel

    model, tok = rw.load_model("smollm2")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    batches = rw.load_data("pydoc", tok, seq_len=64, n=8, batch_size=4)
    stats = rw.calibrate(model, batches, keep=16, progress=False)
    p = rw.plan(stats, model, rank=8, rho=2.0)
    assert sum(lp.rank for lp in p.layers.values()) == 8 * 210
    b = batches[0]
    with torch.no_grad():
        before = model(input_ids=b["input_ids"]).logits
    pm = rw.adapt_(model, p)
    out = rw.export(pm, tmp_path / "adapter")
    base, _ = rw.load_model("smollm2")
    loaded = PeftModel.from_pretrained(base, out)
    with torch.no_grad():
        assert (loaded(input_ids=b["input_ids"]).logits - before).abs().max() <= 1e-4


def test_minilm_eva_with_pooler():
    model, tok = rw.load_model("minilm")
    assert type(model).__name__ == "BertModel"
    batches = rw.load_data("pydoc", tok, seq_len=64, n=16, batch_size=8)
    stats = rw.calibrate(model, batches, targets=["query", "value", "dense"], progress=False)
    assert "pooler.dense" in stats.order and stats["pooler.dense"].n == 16
    p = rw.plan(stats, model, rank=4)
    pm = rw.adapt_(model, p)
    assert sum(lp.rank for lp in p.layers.values()) == 4 * len(stats.order)
    assert any(hasattr(m, "lora_A") for m in pm.modules())
