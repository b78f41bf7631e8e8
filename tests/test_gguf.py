"""GGUF export (export/gguf.py) and llama.cpp evaluation (train/llamacpp.py) on tiny random Llamas.

The tiny models use initializer_range 0.1: at Llama's 0.02 a random model's perplexity is the vocab size
whatever its weights (a missing q/k permutation moved it by 1e-4), at 0.1 it moves by ~5 %, so the 2 %
llama.cpp checks can tell a right file from a wrong one.
"""

from __future__ import annotations

import sys
import warnings

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from rankwise.errors import RankwiseError
from rankwise.experts import unfuse_experts_
from rankwise.export.gguf import write_gguf
from rankwise.numerics.quantize import Grid, rtn
from rankwise.quant.linear import QuantLinear, quantized_layers, set_module
from rankwise.train.llamacpp import llamacpp_perplexity, torch_perplexity

VOCAB, HEADS, KV_HEADS = 96, 4, 2
# layer → (grid, the ggml block type that must hold its codes as they are)
GRIDS = {
    "model.layers.0.self_attn.q_proj": (Grid(4, 32, True), T.Q4_0),
    "model.layers.0.self_attn.k_proj": (Grid(4, 32, False), T.Q4_1),
    "model.layers.0.mlp.down_proj": (Grid(8, 32, True), T.Q8_0),
    "model.layers.1.self_attn.q_proj": (Grid(4, 32, False), T.Q4_1),
    "model.layers.1.self_attn.k_proj": (Grid(8, 32, True), T.Q8_0),
    "model.layers.1.mlp.up_proj": (Grid(4, 32, True), T.Q4_0),
}
CASES = [(64, True), (128, False)]  # (hidden size, tie_word_embeddings)


def make_llama(hidden=64, tied=True, seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                      tie_word_embeddings=tied, initializer_range=0.1)
    return LlamaForCausalLM(cfg).eval()


def make_family(kind: str, extra: dict):
    """A tiny random decoder of a family llama.cpp runs, untied, with random biases (Qwen2's q/k/v biases start
    at zero, which would test nothing)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=HEADS,
                num_key_value_heads=KV_HEADS, max_position_embeddings=128, initializer_range=0.1, tie_word_embeddings=False,
                pad_token_id=0)
    cfg = AutoConfig.for_model(kind, **(base | extra))
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.1)
    return model


def quantize(model, grids: dict[str, Grid]):
    """Replace the named linears by RTN QuantLinears of their own weights (in place)."""
    for name, grid in grids.items():
        lin = model.get_submodule(name)
        set_module(model, name, QuantLinear(*rtn(lin.weight.data, grid), grid, bias=lin.bias))
    return model


def token_ids(n=3, length=40, seed=1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def read(path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order back to HF's (per head, interleaved pairs → two halves)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def stored_weight(tensors, hf_name: str) -> torch.Tensor:
    """A linear's weight as the GGUF file holds it, dequantized by gguf and in HF's row order."""
    gname = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2).get_name(hf_name)
    t = tensors[f"{gname}.weight"]
    w = gguf.quants.dequantize(t.data, t.tensor_type)
    heads = {"q_proj": HEADS, "k_proj": KV_HEADS}.get(hf_name.rpartition(".")[2])
    return torch.from_numpy(unpermute(w, heads) if heads else w.copy())


@pytest.mark.parametrize("hidden,tied", CASES)
def test_quantlinear_codes_written_bit_for_bit(tmp_path, hidden, tied):
    model = quantize(make_llama(hidden, tied), {n: g for n, (g, _) in GRIDS.items()})
    path = write_gguf(model, tmp_path / "m.gguf", qtype="f32")
    tensors = read(path)
    for name, (_, btype) in GRIDS.items():
        gname = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2).get_name(name)
        assert tensors[f"{gname}.weight"].tensor_type == btype, name
        assert torch.equal(stored_weight(tensors, name), model.get_submodule(name).grid_weight()), name
    plain = "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.gate_proj"
    for name in plain:
        assert torch.equal(stored_weight(tensors, name), model.get_submodule(name).weight.detach())
    assert ("output.weight" in tensors) == (not tied)
    assert tensors["blk.0.attn_norm.weight"].tensor_type == T.F32


@pytest.mark.parametrize("hidden,tied", CASES)
def test_transformers_reloads_the_same_model(tmp_path, hidden, tied):
    """Reloaded logits equal ours to 1e-5: the weights are the same floats, only op order may differ."""
    model = quantize(make_llama(hidden, tied), {n: g for n, (g, _) in GRIDS.items()})
    write_gguf(model, tmp_path / "m.gguf", qtype="f32")
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    assert back.config.tie_word_embeddings == tied
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_auto_writes_plain_layers_f16(tmp_path):
    """qtype="auto": blocks for QuantLinears, F16 for plain linears and the embedding, exactly those values."""
    model = quantize(make_llama(), {n: g for n, (g, _) in GRIDS.items()})
    tensors = read(write_gguf(model, tmp_path / "m.gguf"))
    assert tensors["token_embd.weight"].tensor_type == T.F16
    assert tensors["blk.0.attn_v.weight"].tensor_type == T.F16
    assert tensors["blk.0.attn_q.weight"].tensor_type == T.Q4_0
    assert gguf.GGUFReader(str(tmp_path / "m.gguf")).fields["general.file_type"].contents() in (
        gguf.LlamaFileType.MOSTLY_Q4_0, gguf.LlamaFileType.MOSTLY_Q4_1, gguf.LlamaFileType.MOSTLY_F16)
    v = model.get_submodule("model.layers.0.self_attn.v_proj").weight.detach()
    assert torch.equal(stored_weight(tensors, "model.layers.0.self_attn.v_proj"), v.half().float())


@pytest.mark.parametrize("qtype,embed", [("q4_0", T.Q8_0), ("q4_1", T.Q8_0), ("q8_0", T.Q8_0), ("f16", T.F16)])
def test_plain_model_types(tmp_path, qtype, embed):
    tensors = read(write_gguf(make_llama(tied=False), tmp_path / "m.gguf", qtype=qtype))
    assert tensors["token_embd.weight"].tensor_type == embed
    assert tensors["output.weight"].tensor_type == embed
    assert tensors["blk.1.ffn_gate.weight"].tensor_type == {"f16": T.F16}.get(qtype, T[qtype.upper()])


def test_unmatched_grids_are_requantized_with_a_warning(tmp_path):
    model = quantize(make_llama(), {"model.layers.0.mlp.down_proj": Grid(4, 64, True),
                                    "model.layers.0.mlp.up_proj": Grid(4, 32, True)})
    up = model.get_submodule("model.layers.0.mlp.up_proj")
    up.input_scale = torch.linspace(0.5, 2.0, up.in_features)
    with pytest.warns(UserWarning) as caught:
        tensors = read(write_gguf(model, tmp_path / "m.gguf", qtype="q8_0"))
    messages = " | ".join(str(w.message) for w in caught)
    assert "model.layers.0.mlp.down_proj" in messages and "group 64" in messages
    assert "model.layers.0.mlp.up_proj" in messages and "input_scale" in messages
    assert tensors["blk.0.ffn_down.weight"].tensor_type == T.Q8_0
    # the effective weight W·diag(1/input_scale) is what gets re-quantized
    torch.testing.assert_close(stored_weight(tensors, "model.layers.0.mlp.up_proj"), up.weight, rtol=0,
                               atol=float(up.weight.abs().max()) / 100)


def test_bpe_tokenizer_metadata_and_copy(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    first = write_gguf(model, tmp_path / "a.gguf", tokenizer=tok)
    fields = gguf.GGUFReader(str(first)).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.tokens"].contents() == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tok.eos_token_id
    assert len(fields["tokenizer.ggml.merges"].data) > 0
    model.rankwise_source = str(first)  # what load_model records for a model read from a GGUF file
    copied = gguf.GGUFReader(str(write_gguf(model, tmp_path / "b.gguf"))).fields
    keys = sorted(k for k in fields if k.startswith("tokenizer."))
    assert keys == sorted(k for k in copied if k.startswith("tokenizer."))
    assert all(fields[k].contents() == copied[k].contents() for k in keys)


def test_llamacpp_tokenizes_like_transformers(tmp_path, tiny_model_dir):
    """The byte-level BPE metadata (pre-tokenizer "gpt-2") makes llama.cpp split text as the HF tokenizer does."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    from rankwise.data import pydoc_texts

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = write_gguf(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "m.gguf", tokenizer=tok)
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    for text in pydoc_texts("eval")[:20]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text)
    llm.close()


def test_tokenizer_vocab_mismatch_is_an_error(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    source = write_gguf(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "src.gguf",
                        tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir))
    with pytest.raises(RankwiseError, match="300 tokens but the model's vocab_size is 96"):
        write_gguf(make_llama(), tmp_path / "m.gguf", source_gguf=source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.gguf"]  # nothing half-written left behind


def test_bad_input(tmp_path, bert):
    with pytest.raises(RankwiseError, match="'bert'.*llama, mistral, qwen2, qwen3, granite, gemma2"):
        write_gguf(bert, tmp_path / "m.gguf")
    with pytest.raises(RankwiseError, match="auto, f32, f16, q8_0, q4_0, q4_1"):
        write_gguf(make_llama(), tmp_path / "m.gguf", qtype="q3_k")
    with pytest.raises(RankwiseError, match="llama-cpp-python"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(sys.modules, "llama_cpp", None)
            llamacpp_perplexity(tmp_path / "m.gguf", [[1, 2, 3]], n_ctx=8)


def test_torch_perplexity_pools_tokens():
    model = make_llama()
    ids = token_ids(n=2, length=10)
    a, b = torch_perplexity(model, ids[:1]), torch_perplexity(model, ids[1:])
    both = torch_perplexity(model, [ids[0].tolist(), ids[1]])
    assert both["tokens"] == 18
    assert both["nll"] == pytest.approx((a["nll"] + b["nll"]) / 2)


@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0", "q4_0", "q4_1"])
def test_llamacpp_loads_every_type(tmp_path, qtype):
    """llama.cpp's perplexity is within 2 % of transformers' on the same file's weights (measured ≤ 0.3 %:
    llama.cpp rounds activations to 8 bits in its quantized matmuls); f32/f16 within 0.1 % of our model."""
    pytest.importorskip("llama_cpp")
    model = make_llama(tied=qtype != "f16")
    path = write_gguf(model, tmp_path / "m.gguf", qtype=qtype)
    ids = token_ids()
    got = llamacpp_perplexity(path, ids, n_ctx=64)
    same = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    assert got["tokens"] == 3 * 39
    assert got["ppl"] == pytest.approx(torch_perplexity(same, ids)["ppl"], rel=0.02)
    if qtype in ("f32", "f16"):
        assert got["ppl"] == pytest.approx(torch_perplexity(model, ids)["ppl"], rel=1e-3)


@pytest.mark.parametrize("hidden,tied", CASES)
def test_llamacpp_matches_quantized_model(tmp_path, hidden, tied):
    """auto-written QuantLinear model: llama.cpp perplexity within 2 % of ours (measured 0.2 %)."""
    pytest.importorskip("llama_cpp")
    model = quantize(make_llama(hidden, tied), {n: g for n, (g, _) in GRIDS.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every grid here has a block type: nothing may be re-quantized
        path = write_gguf(model, tmp_path / "m.gguf")
    ids = token_ids()
    assert llamacpp_perplexity(path, ids, n_ctx=64)["ppl"] == pytest.approx(torch_perplexity(model, ids)["ppl"], rel=0.02)


# Every family GGUF export writes, with what makes it itself: Qwen3's head_dim other than hidden/heads, Gemma's
# sliding windows shorter than the 40-token sequences (Gemma 3's sixth, global layer with its own rope base; a
# custom layer pattern and local rope base; Gemma 2 without soft-capping), Granite's four multipliers, OLMo 2's
# tied head that llama.cpp wants written, MoE routers over 4 experts. Real Gemma 2 ties its head; Qwen3-MoE
# renormalizes the router's top-k weights.
_LOCAL_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
               "full_attention": {"rope_type": "default", "rope_theta": 1e6}}
FAMILIES = {
    "llama": ("llama", {}), "mistral": ("mistral", dict(sliding_window=None)), "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", dict(head_dim=32)),
    "gemma2": ("gemma2", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=16, tie_word_embeddings=True)),
    "gemma2-uncapped": ("gemma2", dict(head_dim=16, query_pre_attn_scalar=16, tie_word_embeddings=True,
                                       attn_logit_softcapping=None, final_logit_softcapping=None)),
    "gemma3": ("gemma3_text", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=16, num_hidden_layers=6)),
    "gemma3-pattern": ("gemma3_text", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                           layer_types=["full_attention", "sliding_attention"], rope_parameters=_LOCAL_ROPE)),
    "phi3": ("phi3", dict(partial_rotary_factor=0.5)), "olmo2": ("olmo2", {}),
    "olmo2-tied": ("olmo2", dict(tie_word_embeddings=True)),
    "granite": ("granite", dict(embedding_multiplier=3.0, attention_multiplier=0.2, residual_multiplier=0.6,
                                logits_scaling=2.5)),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16,
                                    norm_topk_prob=True)),
}


def quantize_blocks(model):
    """Every linear inside the blocks (not the router) as RTN QuantLinears, the three block grids in turn."""
    from rankwise.targets import linear_modules

    grids = [g for g, _ in GRIDS.values()][:3]
    names = [n for n in linear_modules(model) if ".layers." in n]
    return quantize(model, {n: grids[i % 3] for i, n in enumerate(names)})


@pytest.mark.parametrize("case", [k for k in FAMILIES if k != "llama"])
def test_other_families_through_llamacpp(tmp_path, case):
    """Every family but Llama (tested above) with block-quantized linears: llama.cpp's perplexity of the written
    file within 2 % of ours (the files hold our codes; llama.cpp rounds activations to 8 bits)."""
    pytest.importorskip("llama_cpp")
    model = make_family(*FAMILIES[case])
    unfuse_experts_(model)  # MoE: one linear per expert, quantized like the rest
    model = quantize_blocks(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = write_gguf(model, tmp_path / "m.gguf")
    ids = token_ids()
    assert llamacpp_perplexity(path, ids, n_ctx=64)["ppl"] == pytest.approx(torch_perplexity(model, ids)["ppl"], rel=0.02)


@pytest.mark.parametrize("case", list(FAMILIES))
def test_llamacpp_logits_match_position_by_position(tmp_path, case):
    """The float model written F16: llama.cpp's logits at every position of three sequences are ours up to float16
    rounding of weights and activations (2⁻¹¹ relative each, through a few blocks: well under 1e-2), and the
    top token agrees at ≥ 99 % of the 120 positions. A wrong rotary layout of q/k, a missing Gemma norm offset,
    multiplier or sliding window puts the logits far off."""
    pytest.importorskip("llama_cpp")
    from rankwise.train.llamacpp import llamacpp_logits

    model = make_family(*FAMILIES[case])
    path = write_gguf(model, tmp_path / "m.gguf", qtype="f16")
    seqs = token_ids().tolist()
    theirs = torch.cat([torch.from_numpy(llamacpp_logits(path, seq, n_ctx=64)) for seq in seqs])
    with torch.no_grad():
        ours = model(input_ids=torch.tensor(seqs)).logits.reshape(theirs.shape).float()
    assert float((theirs - ours).norm() / ours.norm()) <= 1e-2
    assert float((theirs.argmax(-1) == ours.argmax(-1)).float().mean()) >= 0.99


@pytest.mark.parametrize("case", ["mixtral", "qwen3_moe"])
def test_quantized_experts_are_stacked_bit_for_bit(tmp_path, case):
    """Per-expert QuantLinears of one projection go into one [E, rows, blocks] tensor of their own codes; experts
    with mixed grids are re-quantized with a warning."""
    from rankwise.export.gguf_blocks import pack_blocks

    model = make_family(*FAMILIES[case])
    unfuse_experts_(model)
    experts = model.model.layers[0].mlp.experts
    quantize(model, {f"model.layers.0.mlp.experts.{e}.{p}": Grid(4, 32, False)
                     for e in range(len(experts)) for p in ("w_gate", "w_up", "w_down")})
    tensors = read(write_gguf(model, tmp_path / "m.gguf"))
    for part, gname in (("w_gate", "ffn_gate_exps"), ("w_up", "ffn_up_exps"), ("w_down", "ffn_down_exps")):
        t = tensors[f"blk.0.{gname}.weight"]
        assert t.tensor_type == T.Q4_1
        want = np.stack([pack_blocks(q.codes, q.scale, q.zero, T.Q4_1) for q in (getattr(e, part) for e in experts)])
        assert np.array_equal(np.asarray(t.data).reshape(want.shape), want)
    assert tensors["blk.1.ffn_gate_exps.weight"].tensor_type == T.F16  # block 1's experts are float
    quantize(model, {"model.layers.1.mlp.experts.0.w_up": Grid(8, 32, True)})
    with pytest.warns(UserWarning, match="no single GGUF block type"):
        write_gguf(model, tmp_path / "m.gguf", qtype="q8_0")


def test_families_llamacpp_would_compute_differently_are_refused(tmp_path):
    """A config llama.cpp would run differently is refused before a byte is written, saying why."""
    cases = {"qwen3_moe": (dict(FAMILIES["qwen3_moe"][1], norm_topk_prob=False), "norm_topk_prob"),
             "gemma2": (dict(FAMILIES["gemma2"][1], tie_word_embeddings=False), "untied"),
             "gemma3_text": (dict(FAMILIES["gemma3"][1], query_pre_attn_scalar=32), "query_pre_attn_scalar")}
    for kind, (extra, why) in cases.items():
        with pytest.raises(RankwiseError, match=why):
            write_gguf(make_family(kind, extra), tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_smollm2_rtn_q4_0_through_llamacpp(tmp_path):
    """SmolLM2-135M, RTN 4-bit group 32 (→ Q4_0) on every linear but the tied head: same perplexity."""
    from rankwise import load_data, load_model

    model, tok = load_model("smollm2")
    grid = Grid(4, 32, True)
    quantize(model, {n: grid for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"})
    path = write_gguf(model, tmp_path / "smollm2-q4_0.gguf")  # tokenizer copied from the source GGUF
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert read(path)["blk.0.attn_q.weight"].tensor_type == T.Q4_0
    batches = load_data("pydoc", tok, seq_len=256, n=4, split="eval")
    ids = [row[mask.bool()].tolist() for b in batches for row, mask in zip(b["input_ids"], b["attention_mask"])]
    ours = torch_perplexity(model, ids)
    print(f"\nSmolLM2 RTN q4_0 torch ppl {ours['ppl']:.4f} on {ours['tokens']} tokens")
    pytest.importorskip("llama_cpp")
    theirs = llamacpp_perplexity(path, ids, n_ctx=256)
    print(f"SmolLM2 RTN q4_0 llama.cpp ppl {theirs['ppl']:.4f} ({theirs['ppl'] / ours['ppl'] - 1:+.4%})")
    assert theirs["tokens"] == ours["tokens"]
    assert theirs["ppl"] == pytest.approx(ours["ppl"], rel=0.02)


@pytest.mark.parametrize("method, grid, btype", [("gptq", Grid(4, 32, True), T.Q4_0), ("gptq", Grid(4, 32, False), T.Q4_1),
                                                 ("gptq", Grid(8, 32, True), T.Q8_0), ("awq", Grid(4, 32, False), T.Q4_1)])
def test_gptq_and_awq_codes_written_bit_for_bit(tmp_path, method, grid, btype):
    """The calibrated methods' own codes (error-compensated, clipped) go into the blocks unchanged."""
    from conftest import make_batches

    from rankwise.quant import quantize as rw_quantize

    model = make_llama(64, tied=True)
    extra = {"explicit_scales": False} if method == "awq" else {}  # an explicit scale has no GGUF block
    rw_quantize(model, make_batches(n_batches=4, batch=4, seq=24, vocab=VOCAB), method, bits=grid.bits,
                group_size=32, symmetric=grid.symmetric, progress=False, **extra)
    path = write_gguf(model, tmp_path / "m.gguf")
    tensors = read(path)
    for name, layer in quantized_layers(model).items():
        gname = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2).get_name(name)
        assert tensors[f"{gname}.weight"].tensor_type == btype, name
        assert torch.equal(stored_weight(tensors, name), layer.grid_weight()), name
