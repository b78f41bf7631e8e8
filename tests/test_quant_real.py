"""Tier 3: quantization math on the embedded real models' own layers and calibration statistics."""

from __future__ import annotations

import pytest
import torch

import rankwise as rw
from rankwise.numerics.quantize import Grid, dequantize, fake_quantize, gptq, output_error

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name, data", [("smollm2", "pydoc"), ("minilm", "pydoc")])
def test_gptq_beats_rtn_on_real_layers(name, data):
    model, tok = rw.load_model(name)
    batches = rw.load_data(data, tok, seq_len=128, n=8, batch_size=4)  # 1,024 tokens: more than any input width
    stats = rw.calibrate(model, batches, r"re:.*layers?\.(0|1)\..*", progress=False)
    checked = 0
    for layer, st in stats.layers.items():
        w = model.get_submodule(layer).weight.detach()
        h = st.xtx.float()
        for grid in (Grid(4, 32, True), Grid(3, 64, False)):
            res = gptq(w, h, grid)
            e_gptq = output_error(w, dequantize(res.codes, res.scale, res.zero), h)
            e_rtn = output_error(w, fake_quantize(w, grid), h)
            assert e_gptq <= e_rtn, (layer, grid, e_gptq, e_rtn)
            checked += 1
    assert checked >= 8


def test_smollm2_compressed_tensors_export_matches_in_memory(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = rw.load_model("smollm2")
    batches = rw.load_data("pydoc", tok, seq_len=64, n=4, batch_size=4)
    rw.quantize(model, batches, "rtn", bits=4, group_size=64, progress=False)
    out = rw.export_model(model, tmp_path / "ct", "compressed-tensors", tokenizer=tok)
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = batches[0]["input_ids"][:2]
    with torch.no_grad():
        diff = (back(input_ids=ids).logits - model(input_ids=ids).logits).abs().max()
    assert diff <= 1e-4, float(diff)  # the acceptance bound; the integers and scales are the same
