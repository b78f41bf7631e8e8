"""The architecture table (rankwise.arch) against tiny random models of every family it lists: every fold it
declares names modules that exist, and folding a scale leaves the float model's outputs unchanged (a wrong
source, a missing Gemma norm offset or a wrong slice of a fused projection changes them)."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_batches
from test_decoder_families import DENSE, GPT2, MOE, tiny

import rankwise as rw

from rankwise.arch import FAMILIES, arch_of, block_of
from rankwise.calib.calibrate import calibrate
from rankwise.quant.fold import fold_, fold_source

ENCODERS = {
    "bert": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64),
    "roberta": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64),
    "distilbert": dict(n_layers=2, dim=32, n_heads=4, hidden_dim=64),
    "deberta-v2": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64),
    "modernbert": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64),
}
# Folds per tiny model (2 blocks), counted by hand from each family's layout. GQA (4 heads, 2 KV heads) rules
# out v → o; OLMo 2 and the MoE models have no norm before gate/up linears; ModernBERT's first attn_norm is
# an Identity.
EXPECTED = {"mistral": 6, "qwen2": 6, "qwen3": 6, "gemma2": 6, "gemma3_text": 6, "phi3": 6, "phi3-mha": 8,
            "granite": 6, "olmo2": 2, "opt": 8, "mixtral": 2, "qwen3_moe": 2,
            "gpt2": 6, "bert": 2, "roberta": 2, "distilbert": 2, "deberta-v2": 2, "modernbert": 7}


def _model(kind: str):
    if kind in ENCODERS:
        from transformers import AutoConfig, AutoModel

        torch.manual_seed(0)
        return AutoModel.from_config(AutoConfig.for_model(kind, vocab_size=96, pad_token_id=0, **ENCODERS[kind])).eval()
    if kind == "phi3-mha":
        return tiny("phi3", dict(num_key_value_heads=4))
    if kind == "gpt2":
        model = tiny("gpt2", GPT2)
        rw.linearize_conv1d_(model)  # Conv1D as nn.Linear
        return model
    return tiny(kind, (DENSE | MOE)[kind])


def _outputs(model, batch):
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_folded_scales_leave_every_family_unchanged(kind):
    model = _model(kind)
    with torch.no_grad():  # norms start at weight 1 (Gemma: 0) and zero bias: make every term count
        for n, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    batch = make_batches(1, 2, 10)[0]
    before = _outputs(model, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MoE: experts left out of the linear targets
        stats = calibrate(model, [batch], progress=False)
    folded = 0
    for group in stats.groups().values():
        src = fold_source(model, group)
        if src is None:
            continue
        gen = torch.Generator().manual_seed(folded)
        s = torch.rand(model.get_submodule(group[0]).in_features, generator=gen) * 4 + 0.25
        with torch.no_grad():
            fold_(model, src, s)
            for n in group:
                model.get_submodule(n).weight.mul_(s[None, :])
        folded += 1
    assert folded == EXPECTED[kind]
    after = _outputs(model, batch)
    # float32 through two blocks, each weight rescaled by s and 1/s: a few ε32 per sum
    assert float((after - before).norm() / before.norm()) <= 1e-5


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_table_names_modules_that_exist(kind):
    """Every fold of the family's entry names a source and readers in block 0 (unless its condition rules it out);
    the experts and router, where declared, exist too."""
    model = _model(kind)
    arch = arch_of(model)
    assert arch is not None
    names = dict(model.named_modules())
    block = next(n for n in names if (w := block_of(arch, n + ".x")) and w[0] == n and n.endswith(".0"))
    for fold in arch.folds:
        if fold.when is not None and not fold.when(model.config):
            continue
        for rel in (fold.source, *fold.reads):
            assert f"{block}.{rel}" in names, f"{kind}: {rel} is not in {block}"
    for rel in (arch.experts, arch.router):
        if rel is not None:
            assert f"{block}.{rel}" in names


def test_every_model_type_is_known_to_transformers():
    from transformers import AutoConfig

    for arch in FAMILIES:
        for t in arch.model_types:
            assert AutoConfig.for_model(t).model_type == t


def test_a_model_without_blocks_goes_the_generic_way():
    """No block list: blockwise calibration is refused naming the model and the way out; the default (auto) runs
    the whole model; AWQ folding says once that this family has no table entry."""
    from torch import nn

    from rankwise.errors import CalibrationError

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(input_ids=None, attention_mask=None, **_):
        return model(nn.functional.one_hot(input_ids % 8, 8).float())

    batches = make_batches(2, 2, 6)
    wrapped = nn.Module()
    wrapped.net = model
    wrapped.forward = forward
    with pytest.raises(CalibrationError, match="Module: blockwise mode needs.*mode='whole'"):
        calibrate(wrapped, batches, mode="blockwise", progress=False)
    stats = calibrate(wrapped, batches, progress=False)
    assert set(stats.layers) == {"net.0", "net.2"}
    with pytest.warns(UserWarning, match="no entry for this family.*stay explicit"):
        assert fold_source(wrapped, ["net.2"]) is None
