"""What one model family is, as data: where its blocks are, which op feeds which linears, its experts, its GGUF names.

Names inside a block are relative to one block ("self_attn.q_proj"); `blocks` is the dotted suffix of the
nn.ModuleList holding the blocks ("layers", "encoder.layer"), so one entry covers the base model and its task
models (LlamaModel's "layers", LlamaForCausalLM's "model.layers").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Fold:
    """An op whose output channels can absorb a per-input-channel scale 1/s of the linears in `reads`.

    kind "norm": a norm's weight (and bias) whose output feeds only `reads`; kind "rows": a linear whose output
    rows are the input of `reads` (v_proj → o_proj: attention mixes tokens, not channels; up_proj → down_proj:
    down's input is act(gate)·up, linear in up), when its rows number `parts` × the reader's in_features: a
    fused source (Phi-3's gate_up_proj, parts 2; qkv_proj, parts 3) gives its last in_features rows (up after
    gate, v after q and k), and v → o holds only without grouped KV heads. `when(config)`: a condition the fold needs beyond the names (OPT's fc1 → fc2
    holds only for ReLU, which commutes with positive scales).
    """

    source: str
    reads: tuple[str, ...]
    kind: str = "norm"
    parts: int = 1
    when: Callable[[object], bool] | None = None


@dataclass(frozen=True)
class Gguf:
    """How llama.cpp names and computes this family (gguf-py's MODEL_ARCH member and tensor map).

    permute_qk: q/k rows go from HF's rotate-half layout to llama.cpp's adjacent pairs (its NORM rope: Llama,
    Mistral, Mixtral, Granite); families llama.cpp runs with NEOX rope keep HF's layout. hparams: (GGUFWriter
    method, config field[, value when the field is None]) written when there is a value. ties: llama.cpp reads
    the token embedding as the head when output.weight is absent (OLMo 2 requires the tensor). act: the MLP activation llama.cpp computes (HF's
    name). refuse(config): why llama.cpp would compute
    something else for this config, or None.
    """

    arch: str
    permute_qk: bool = False
    act: str = "silu"
    hparams: tuple[tuple, ...] = ()
    ties: bool = True
    refuse: Callable[[object], str | None] | None = None


@dataclass(frozen=True)
class Arch:
    """One family: every model_type it covers and what rankwise needs to know about its layout.

    norm_offset: the norms compute x̂·(offset + w) (Gemma: 1), so a folded scale and a GGUF file see offset + w.
    experts / router: the fused MoE expert module and the router linear (relative to a block); the router is
    never quantized. positions_after_padding: position ids start after the padding index (RoBERTa), so the
    usable length is max_position_embeddings − pad_token_id − 1. no_compressed_tensors: why a compressed-tensors
    checkpoint of this family does not reload in transformers (refused before any work), or None.
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    folds: tuple[Fold, ...] = ()
    norm_offset: float = 0.0
    experts: str | None = None
    router: str | None = None
    positions_after_padding: bool = False
    gguf: Gguf | None = None
    no_compressed_tensors: str | None = None
