"""The architecture table: one entry per model family (see spec.py for what each field means).

Adding a family is one entry here plus a test (tests/test_arch.py and tests/test_family_verbs.py build a tiny
one of each).
"""

from __future__ import annotations

from .spec import Arch, Fold, Gguf

_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
_V_O = Fold("self_attn.v_proj", ("self_attn.o_proj",), "rows")
_UP_DOWN = Fold("mlp.up_proj", ("mlp.down_proj",), "rows")
# Pre-norm decoders: each norm's output feeds only the linears after it.
_PRE_NORM = (Fold("input_layernorm", _QKV), Fold("post_attention_layernorm", _GATE_UP), _V_O, _UP_DOWN)
# Gemma 2/3: post-norms on the attention and MLP outputs, a separate norm before the MLP.
_GEMMA = (Fold("input_layernorm", _QKV), Fold("pre_feedforward_layernorm", _GATE_UP), _V_O, _UP_DOWN)
# BERT-likes are post-LN: a LayerNorm also feeds the residual stream, so only value → output folds.
_BERT = (Fold("attention.self.value", ("attention.output.dense",), "rows"),)


_MOE_CT = ("transformers 5.23 saves fused MoE experts per expert and then, under a quantization config, fails to "
           "fuse them again on load")


def _gemma_scale(config) -> str | None:
    scalar = getattr(config, "query_pre_attn_scalar", None)
    head_dim = getattr(config, "head_dim", None)
    if scalar is not None and scalar != head_dim:
        return (f"llama.cpp scales Gemma's attention by 1/√head_dim ({head_dim}); this config has "
                f"query_pre_attn_scalar {scalar}")
    return None


def _gemma2(config) -> str | None:
    if not getattr(config, "tie_word_embeddings", True):
        return "llama.cpp's gemma2 reads its output head from the token embedding; this model's lm_head is untied"
    return _gemma_scale(config)


def _qwen3moe(config) -> str | None:
    if not getattr(config, "norm_topk_prob", True):
        return "llama.cpp's qwen3moe renormalizes the top-k router weights; this config has norm_topk_prob false"
    if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
        return "llama.cpp's qwen3moe has experts in every block; this config has dense MLP blocks (mlp_only_layers, decoder_sparse_step)"
    return None


FAMILIES: tuple[Arch, ...] = (
    Arch("llama", ("llama",), "layers", _PRE_NORM, gguf=Gguf("LLAMA", permute_qk=True)),
    Arch("mistral", ("mistral",), "layers", _PRE_NORM, gguf=Gguf("LLAMA", permute_qk=True)),
    Arch("qwen2", ("qwen2",), "layers", _PRE_NORM, gguf=Gguf("QWEN2")),
    Arch("qwen3", ("qwen3",), "layers", _PRE_NORM, gguf=Gguf("QWEN3")),
    Arch("granite", ("granite",), "layers", _PRE_NORM,
         gguf=Gguf("GRANITE", permute_qk=True,
                   hparams=(("add_attention_scale", "attention_multiplier"), ("add_embedding_scale", "embedding_multiplier"),
                            ("add_residual_scale", "residual_multiplier"), ("add_logit_scale", "logits_scaling")))),
    Arch("gemma2", ("gemma2",), "layers", _GEMMA, norm_offset=1.0,
         # llama.cpp caps Gemma 2's logits at 50 / 30 unless told otherwise: no cap (None) is written as 1e6, under
         # which tanh(x/c)·c = x to (x/c)²/3 ≈ 3e-9 relative for the |x| < 100 of real logits.
         gguf=Gguf("GEMMA2", act="gelu_pytorch_tanh",
                   hparams=(("add_attn_logit_softcapping", "attn_logit_softcapping", 1e6),
                            ("add_final_logit_softcapping", "final_logit_softcapping", 1e6),
                            ("add_sliding_window", "sliding_window")), refuse=_gemma2)),
    Arch("gemma3", ("gemma3_text",), "layers", _GEMMA, norm_offset=1.0,
         gguf=Gguf("GEMMA3", act="gelu_pytorch_tanh", refuse=_gemma_scale,
                   hparams=(("add_sliding_window", "sliding_window"),
                            ("add_final_logit_softcapping", "final_logit_softcapping")))),
    Arch("phi3", ("phi3",), "layers",
         (Fold("input_layernorm", ("self_attn.qkv_proj",)), Fold("post_attention_layernorm", ("mlp.gate_up_proj",)),
          Fold("self_attn.qkv_proj", ("self_attn.o_proj",), "rows", parts=3),
          Fold("mlp.gate_up_proj", ("mlp.down_proj",), "rows", parts=2)),
         gguf=Gguf("PHI3", hparams=(("add_rope_scaling_orig_ctx_len", "original_max_position_embeddings"),))),
    # OLMo 2 normalizes the outputs of attention and MLP, not their inputs: only the linear-to-linear folds.
    Arch("olmo2", ("olmo2",), "layers", (_V_O, _UP_DOWN), gguf=Gguf("OLMO2", ties=False)),
    Arch("mixtral", ("mixtral",), "layers", (Fold("input_layernorm", _QKV), _V_O),
         experts="mlp.experts", router="mlp.gate", gguf=Gguf("LLAMA", permute_qk=True), no_compressed_tensors=_MOE_CT),
    Arch("qwen3_moe", ("qwen3_moe",), "layers", (Fold("input_layernorm", _QKV), _V_O),
         experts="mlp.experts", router="mlp.gate", gguf=Gguf("QWEN3MOE", refuse=_qwen3moe),
         no_compressed_tensors=_MOE_CT),
    Arch("opt", ("opt",), "layers",
         (Fold("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
               when=lambda c: getattr(c, "do_layer_norm_before", True)),
          Fold("final_layer_norm", ("fc1",), when=lambda c: getattr(c, "do_layer_norm_before", True)),
          Fold("self_attn.v_proj", ("self_attn.out_proj",), "rows"),
          Fold("fc1", ("fc2",), "rows", when=lambda c: getattr(c, "activation_function", "") == "relu"))),
    # GPT-2: Conv1D projections (rankwise works on them as nn.Linear, conv1d.py); c_attn is [q | k | v].
    Arch("gpt2", ("gpt2",), "h",
         (Fold("ln_1", ("attn.c_attn",)), Fold("ln_2", ("mlp.c_fc",)), Fold("attn.c_attn", ("attn.c_proj",), "rows", parts=3)),
         no_compressed_tensors="its projections are Conv1D layers, which compressed-tensors' loader does not "
                               "replace by quantized linears"),
    Arch("bert", ("bert",), "encoder.layer", _BERT),
    Arch("roberta", ("roberta", "xlm-roberta", "camembert", "data2vec-text"), "encoder.layer", _BERT,
         positions_after_padding=True),
    Arch("deberta-v2", ("deberta-v2",), "encoder.layer",
         (Fold("attention.self.value_proj", ("attention.output.dense",), "rows"),)),
    Arch("distilbert", ("distilbert",), "transformer.layer", (Fold("attention.v_lin", ("attention.out_lin",), "rows"),)),
    # ModernBERT is pre-norm (layer 0's attn_norm is an Identity: nothing to fold into); Wi is [input | gate].
    Arch("modernbert", ("modernbert",), "layers",
         (Fold("attn_norm", ("attn.Wqkv",)), Fold("mlp_norm", ("mlp.Wi",)), Fold("attn.Wqkv", ("attn.Wo",), "rows", parts=3),
          Fold("mlp.Wi", ("mlp.Wo",), "rows", parts=2)),
         no_compressed_tensors="transformers 5.23's ModernBERT weight init reads the weight of every Linear, which "
                               "compressed-tensors' quantized linears do not have, so loading fails"),
    # Position ids after the padding index, module layouts of their own: only the usable length is known.
    Arch("roberta-like", ("roberta-prelayernorm", "longformer", "ibert", "mpnet", "esm", "xlm-roberta-xl"), "layer",
         positions_after_padding=True),
)
