"""Decoder families beyond Llama on tiny random models: EVA and PiSSA adapters, GPTQ → compressed-tensors that
plain `from_pretrained` reloads with rankwise's own logits, SVD-LLM compression merged and reloaded; MoE
models say that their fused experts are left float and refuse a checkpoint transformers cannot reload;
Conv1D models (GPT-2) are refused with one clear error."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, make_batches

import rankwise as rw
from rankwise.errors import QuantError, TargetError

BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
DENSE = {
    "mistral": {}, "qwen2": {}, "qwen3": dict(head_dim=16), "gemma2": dict(head_dim=16),
    "gemma3_text": dict(head_dim=16), "phi3": {}, "granite": {}, "olmo2": {},
    "opt": dict(ffn_dim=96, word_embed_proj_dim=64, intermediate_size=None, num_key_value_heads=None),
}
GPT2 = dict(num_key_value_heads=None, intermediate_size=None, n_inner=96)
MOE = {"mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
       "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16)}


def tiny(kind: str, extra: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {k: v for k, v in (BASE | extra).items() if v is not None}
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **kw)).eval()


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", list(DENSE))
@pytest.mark.parametrize("method", ["eva", "pissa"])
def test_adapters_start_at_the_base_model(kind, method):
    """EVA (B = 0) and PiSSA (W_res + B·A = W) both leave the model's outputs unchanged at step 0."""
    batches = make_batches(2, 2, 16)
    model = tiny(kind, DENSE[kind])
    ref = _logits(model, batches[0])
    stats = rw.calibrate(model, batches, progress=False) if method == "eva" else None
    pm = rw.adapt_(model, rw.plan(stats, model, method=method, rank=4))
    assert len([n for n, _ in pm.named_modules() if n.endswith(".lora_A")]) >= 4
    # fp32: W_res + B·A re-associates W's sums (~1e-7 relative per entry), EVA is exact
    assert _rel(_logits(pm, batches[0]), ref) <= 1e-5


@pytest.mark.parametrize("kind", list(DENSE))
def test_gptq_compressed_tensors_reloads_with_our_logits(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    from rankwise.export.compressed_tensors import export_compressed_tensors

    batches = make_batches(4, 4, 16)
    model = tiny(kind, DENSE[kind])
    ref = _logits(model, batches[0])
    report = rw.quantize(model, batches, "gptq", bits=4, group_size=32, progress=False)
    assert len(report.layers) == len(rw.find_targets(tiny(kind, DENSE[kind])))
    ours = _logits(model, batches[0])
    assert _rel(ours, ref) > 1e-4  # it really is quantized
    export_compressed_tensors(model, tmp_path / "ct")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    loaded.hf_quantizer.compressor.decompress_model(loaded)
    # the same float32 weights (q − z)·s on both sides: only the order of float32 sums may differ
    assert _rel(_logits(loaded, batches[0]), ours) <= 1e-5


@pytest.mark.parametrize("kind", list(DENSE))
def test_svd_llm_merged_reloads(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    batches = make_batches(4, 4, 16)
    model = tiny(kind, DENSE[kind])
    rw.compress(model, batches, "svd-llm", ratio=0.8, progress=False)
    ours = _logits(model, batches[0])
    rw.export_model(model, tmp_path / "merged", "safetensors")
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not any(info.values()), info
    assert _rel(_logits(loaded, batches[0]), ours) <= 1e-5  # B·A merged in float32


def _router_choices(model, block: int, batches) -> torch.Tensor:
    """How many unmasked tokens the router of `block` sends to each expert, over the batches."""
    router = model.model.layers[block].mlp.gate
    seen = []
    handle = router.register_forward_hook(lambda m, a, out: seen.append(out[2]))
    try:
        for b in batches:
            with torch.no_grad():
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    finally:
        handle.remove()
    counts = torch.zeros(model.model.layers[block].mlp.experts.num_experts, dtype=torch.long)
    for idx, b in zip(seen, batches):
        keep = b["attention_mask"].reshape(-1).bool()
        counts += torch.bincount(idx[keep].reshape(-1), minlength=len(counts))
    return counts


@pytest.mark.parametrize("kind", list(MOE))
def test_moe_experts_are_calibrated_per_expert(kind):
    """Unfused, the experts compute what the fused module did; each expert's statistics count exactly the
    unmasked tokens its router sent it (padding left out)."""
    from rankwise.experts import unfuse_experts_

    batches = make_batches(3, 3, 16)  # the last batch is padded
    model = tiny(kind, MOE[kind])
    ref = _logits(model, batches[-1])
    counts = _router_choices(model, 0, batches)
    assert unfuse_experts_(model) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert _rel(_logits(model, batches[-1]), ref) <= 1e-6  # the same sums, added in another order
    stats = rw.calibrate(model, batches, progress=False)
    for e, n in enumerate(counts.tolist()):
        name = f"model.layers.0.mlp.experts.{e}.w_gate"
        assert (stats[name].n if n else 0) == n
        if n:  # the down projection reads act(gate)·up of the same tokens, padding left out as well
            assert stats[f"model.layers.0.mlp.experts.{e}.w_down"].n == n
        assert stats.aliases.get(f"model.layers.0.mlp.experts.{e}.w_up") == name  # gate and up read one input


def test_unrouted_experts_get_no_adapter():
    """EVA on a MoE model whose block-1 router picks experts 0 and 1 only: every routed expert gets its LoRA, the
    two idle ones rank 0 with a note, and the adapted model still computes what the model did."""
    from rankwise.experts import unfuse_experts_

    model = tiny("mixtral", MOE["mixtral"])
    unfuse_experts_(model)
    only = lambda m, a, out: (out[0], out[1], torch.arange(2).expand_as(out[2]))  # noqa: E731
    model.model.layers[1].mlp.gate.register_forward_hook(only)
    batches = make_batches(3, 3, 16)
    ref = _logits(model, batches[0])
    stats = rw.calibrate(model, batches, progress=False)
    idle = {f"model.layers.1.mlp.experts.{e}.{p}" for e in (2, 3) for p in ("w_gate", "w_up", "w_down")}
    assert set(stats.unrouted) == idle
    p = rw.plan(stats, model, method="eva", rank=4)
    assert all(p.layers[n].rank == 0 and "no calibration token" in p.layers[n].note for n in idle)
    # EVA's budget (rank × measured layers) is spent on the measured layers alone
    assert sum(lp.rank for lp in p.layers.values()) == 4 * (len(p.layers) - len(idle))
    assert _rel(_logits(rw.adapt_(model, p), batches[0]), ref) <= 1e-6


def test_an_expert_only_padding_reaches_counts_as_unrouted(tmp_path):
    """Block 0's router sends every padded position to experts 2 and 3 and every real token to 0 and 1: experts 2
    and 3 measure nothing (padding is masked out per expert), so they are unrouted, not a zero-token error."""
    from rankwise.experts import unfuse_experts_

    model = tiny("mixtral", MOE["mixtral"])
    unfuse_experts_(model)
    batches = make_batches(3, 3, 16)
    masks = iter([b["attention_mask"].reshape(-1).bool() for b in batches])

    def route(m, a, out):  # whole-model mode: block 0's router runs once per batch, in order
        keep = next(masks)
        pad = torch.tensor([2, 3]).expand_as(out[2])
        return out[0], out[1], torch.where(keep[:, None], torch.arange(2).expand_as(out[2]), pad)

    model.model.layers[0].mlp.gate.register_forward_hook(route)
    stats = rw.calibrate(model, batches, mode="whole", progress=False)
    idle = {f"model.layers.0.mlp.experts.{e}.{p}" for e in (2, 3) for p in ("w_gate", "w_up", "w_down")}
    assert set(stats.unrouted) == idle and not idle & set(stats.layers)
    stats.save(tmp_path / "stats.safetensors")  # kept through save and load: a plan from the file skips them
    assert rw.Stats.load(tmp_path / "stats.safetensors").unrouted == stats.unrouted


@pytest.mark.parametrize("kind", list(MOE))
def test_moe_experts_are_quantized_and_reload(kind, tmp_path):
    """GPTQ quantizes every expert (the router never); an expert no token reached is reported and left float;
    compressed-tensors is refused (transformers cannot reload per-expert quantized weights); the dense folder
    fuses the experts back and reloads in plain from_pretrained with our logits."""
    from transformers import AutoModelForCausalLM

    from rankwise.export.compressed_tensors import export_compressed_tensors
    from rankwise.quant.linear import QuantLinear

    batches = make_batches(4, 4, 16)
    model = tiny(kind, MOE[kind])
    router = model.model.layers[1].mlp.gate  # block 1 routes every token to experts 0 and 1 only
    only = lambda m, a, out: (out[0], out[1], torch.arange(2).expand_as(out[2]))  # noqa: E731
    handle = router.register_forward_hook(only)
    report = rw.quantize(model, batches, "gptq", bits=4, group_size=32, progress=False)
    handle.remove()
    idle = {f"model.layers.1.mlp.experts.{e}.{p}" for e in (2, 3) for p in ("w_gate", "w_up", "w_down")}
    assert set(report.unrouted) == idle
    experts = {n for n, m in model.named_modules() if ".experts." in n and n.rpartition(".")[2] in ("w_gate", "w_up", "w_down")}
    assert len(experts) == 2 * 4 * 3
    for n in experts:
        assert isinstance(model.get_submodule(n), QuantLinear) == (n not in idle), n
    assert set(report.layers) == {n for n in rw.find_targets(model)} - idle and not any(n.endswith(".gate") for n in report.layers)
    with pytest.raises(QuantError, match="does not reload"):
        export_compressed_tensors(model, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    rw.export_model(model, tmp_path / "dense", "safetensors")
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", output_loading_info=True)
    assert not any(info.values()), info
    assert _rel(_logits(loaded, batches[0]), _logits(model, batches[0])) <= 1e-5


def test_conv1d_models_are_linearized(tmp_path):
    """GPT-2's Conv1D layers: refused by name until linearized; linearized, they compute the same bit for bit,
    every verb finds them, and the model's own save_pretrained still writes GPT-2's [in, out] layout (c_proj is
    square: a transposed weight would load without an error), which rankwise.load_model linearizes again."""
    from transformers import GPT2LMHeadModel

    model = tiny("gpt2", GPT2)
    batch = make_batches(1, 2, 16)[0]
    ref = _logits(model, batch)
    with pytest.raises(TargetError, match="gpt2: .*Conv1D.*linearize_conv1d_"):
        rw.find_targets(model)
    assert len(rw.linearize_conv1d_(model)) == 8
    assert torch.equal(_logits(model, batch), ref)
    assert len(rw.find_targets(model)) == 8  # the tied lm_head is not a target
    model.save_pretrained(tmp_path / "m")
    assert torch.equal(_logits(GPT2LMHeadModel.from_pretrained(tmp_path / "m"), batch), ref)
    from rankwise.models import load_model
    from transformers import AutoTokenizer
    from conftest import build_tiny_model_dir

    AutoTokenizer.from_pretrained(build_tiny_model_dir(tmp_path / "tok")).save_pretrained(tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.rankwise_conv1d and torch.equal(_logits(loaded, batch), ref)
