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
    import json

    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    meta = json.loads((out / "rankwise.json").read_text())
    assert meta["base_model"] == "smollm2" and "Q4_1" in meta["note"] and meta["task"] == "causal-lm"
    base, _ = rw.load_model("smollm2")
    loaded = PeftModel.from_pretrained(base, out)
    with torch.no_grad():
        assert (loaded(input_ids=b["input_ids"]).logits - before).abs().max() <= 1e-4


def test_minilm_eva_with_pooler():
    from rankwise.numerics.linalg import subspace_cos2

    model, tok = rw.load_model("minilm")
    assert type(model).__name__ == "BertModel"
    batches = rw.load_data("pydoc", tok, seq_len=64, n=16, batch_size=8)
    stats = rw.calibrate(model, batches, targets=["query", "value", "dense"], progress=False)
    assert "pooler.dense" in stats.order and stats["pooler.dense"].n == 16
    rows = []
    h = model.pooler.dense.register_forward_pre_hook(lambda m, a: rows.append(a[0].detach().double()))
    with torch.no_grad():
        before = [model(**{k: b[k] for k in ("input_ids", "attention_mask")}).last_hidden_state for b in batches]
    h.remove()
    p = rw.plan(stats, model, rank=4, rho=1.0)
    pm = rw.adapt_(model, p)
    assert sum(lp.rank for lp in p.layers.values()) == 4 * len(stats.order)
    x = torch.cat(rows)
    vh = torch.linalg.svd(x - x.mean(0), full_matrices=False).Vh
    a = pm.base_model.model.pooler.dense.lora_A["default"].weight.detach()
    assert subspace_cos2(a, vh[:4]) >= 1 - 1e-5  # the pooler's A: top directions of its (CLS) inputs
    with torch.no_grad():
        after = pm(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"]).last_hidden_state
    assert (after - before[0]).abs().max() <= 1e-5  # B = 0: the model is unchanged at step 0


def test_smollm2_pissa_export_loads_on_the_original_base(tmp_path):
    """Residual init on the real model: the exported rank-2r adapter on the unmodified SmolLM2 gives the
    adapted model's logits. Tolerance 1e-3 max abs on logits of magnitude ~20 (30 fp32 blocks, W_res + s·B·A
    re-associated as W + s·(B·A − B₀A₀)); measured 1.1e-4 (2026-12-01)."""
    from peft import PeftModel

    model, tok = rw.load_model("smollm2")
    p = rw.plan(None, model, method="pissa", rank=8, targets="q_proj,v_proj,down_proj")
    pm = rw.adapt_(model, p)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in pm.modules():
            if hasattr(m, "lora_B") and "default" in m.lora_B:
                m.lora_B["default"].weight.mul_(1 + 0.1 * torch.randn(m.lora_B["default"].weight.shape, generator=g))
    ids = rw.load_data("pydoc", tok, seq_len=64, n=2, batch_size=2)[0]["input_ids"]
    with torch.no_grad():
        trained = pm(input_ids=ids).logits
        out = rw.export(pm, tmp_path / "adapter")
        loaded = PeftModel.from_pretrained(rw.load_model("smollm2")[0], out)(input_ids=ids).logits
        plain = rw.load_model("smollm2")[0](input_ids=ids).logits
    assert (loaded - trained).abs().max() <= 1e-3
    assert (plain - trained).abs().max() > 1e-2  # the perturbed adapter does change the model
