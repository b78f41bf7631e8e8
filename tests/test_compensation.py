"""Low-rank compensation of quantization error (LoRC, EoRA) on tiny models: error, export, reload."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_batches, tiny_llama

from rankwise.errors import QuantError
from rankwise.quant import quantize, quantize_
from rankwise.quant.rtn import RTNConfig


def logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in batches])


@pytest.mark.parametrize("method", ["gptq", "awq"])
@pytest.mark.parametrize("kind", ["lorc", "eora"])
def test_compensation_never_increases_the_output_error(method, kind):
    batches = make_batches(n_batches=4, batch=4, seq=32)
    report = quantize(tiny_llama(), batches, method, bits=3, group_size=32, compensate=kind, compensate_rank=8,
                      progress=False)
    for name, r in report.layers.items():
        # EoRA is the optimal rank-8 correction of exactly this objective, so it can only lower it;
        # LoRC optimises the unweighted error, which only bounds the weighted one loosely.
        assert r.compensated_error is not None
        if kind == "eora":
            assert r.compensated_error <= r.error * (1 + 1e-6), name
    mean = sum(r.compensated_error for r in report.layers.values()) / len(report.layers)
    assert mean < sum(r.error for r in report.layers.values()) / len(report.layers)


def test_eora_beats_lorc_on_the_weighted_error():
    batches = make_batches(n_batches=4, batch=4, seq=32)
    runs = {k: quantize(tiny_llama(), batches, "gptq", bits=3, group_size=32, compensate=k, compensate_rank=4,
                        progress=False) for k in ("lorc", "eora")}
    first = "model.layers.0.mlp.gate_proj"  # block 0: both see the same inputs
    assert runs["eora"].layers[first].compensated_error < runs["lorc"].layers[first].compensated_error


def test_compressed_tensors_plus_compensation_adapter_reload_to_the_same_logits(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rankwise.export import export_model

    model, batches = tiny_llama(), make_batches()
    quantize(model, batches, "gptq", bits=3, group_size=32, compensate="eora", compensate_rank=8, progress=False)
    ours = logits(model, batches)
    out = export_model(model, tmp_path / "ct", "compressed-tensors")
    assert (out / "compensation" / "adapter_config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(out).eval()
    without = logits(base, batches)
    back = PeftModel.from_pretrained(base, out / "compensation").eval()
    # The checkpoint holds the grid alone and the adapter the correction: together they are our model
    # (≤ 1e-4, the acceptance bound; float32 order of operations only), apart they are not.
    assert (logits(back, batches) - ours).abs().max() <= 1e-4
    assert (without - ours).abs().max() > 1e-3
    dense = export_model(model, tmp_path / "dense", "safetensors")  # merged for any tool
    assert (logits(AutoModelForCausalLM.from_pretrained(dense).eval(), batches) - ours).abs().max() <= 1e-5


def test_compensation_bad_input(tmp_path):
    from rankwise.export import export_model

    with pytest.raises(QuantError, match="needs calibration data"):
        quantize_(tiny_llama(), RTNConfig(compensate="eora"))
    model = tiny_llama()
    report = quantize_(model, RTNConfig(bits=3, compensate="lorc", compensate_rank=2))  # data-free: fine
    assert all(r.compensated_error < r.error for r in report.layers.values())  # weight error, unweighted SVD
    with pytest.raises(QuantError, match="carries a low-rank compensation, which GGUF has no place for"):
        export_model(model, tmp_path / "g", "gguf")
    big = copy.deepcopy(tiny_llama())
    report = quantize_(big, RTNConfig(bits=3, compensate="lorc", compensate_rank=500))  # capped at the layer's size
    assert big.model.layers[0].self_attn.k_proj.lora_a.shape[0] == 32
    # full rank fits the error exactly; the factors are float16-exact (each entry within 2⁻¹¹ relative), so the
    # relative squared error left is at most about (2⁻¹¹)² ≈ 2.4e-7
    assert report.layers["model.layers.0.self_attn.k_proj"].compensated_error < 2.4e-7


def test_write_gguf_itself_refuses_a_compensation(tmp_path):
    from rankwise.export.gguf import write_gguf

    model = tiny_llama()
    quantize_(model, RTNConfig(bits=4, compensate="lorc", compensate_rank=2))
    with pytest.raises(QuantError, match="carries a low-rank compensation, which GGUF has no place for"):
        write_gguf(model, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())
