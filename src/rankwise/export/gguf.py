"""GGUF export of the decoder families llama.cpp runs (arch/families.py: Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, Granite, OLMo 2, Mixtral, Qwen3-MoE), in llama.cpp's tensor layout; QuantLinear codes kept bit for bit.

Tensor types. A QuantLinear whose grid is a ggml block format is written as those blocks from our own
codes and scales, never re-quantized: symmetric 4-bit group 32 → Q4_0 (d = s, q stored as is),
asymmetric 4-bit group 32 → Q4_1 (d = s, m = −s·z), symmetric 8-bit group 32 → Q8_0 (d = s, q − 128).
Any other QuantLinear (other bits or group size, an AWQ `input_scale`, a scale that float16 cannot hold)
is dequantized and re-quantized to `qtype`, with a warning naming it. Plain linears are quantized to
`qtype` with gguf's reference quantizers ("auto": F16). Norms and biases are F32. The token embedding
(and an untied output head) is F32/F16 for those qtypes and for "auto" F16, but Q8_0 for q8_0/q4_0/q4_1:
llama.cpp's own quantizer also keeps the embedding and head at 6-8 bits when the layers get 4.
A tensor whose rows are not a multiple of 32 cannot be blocked and is written F16 (with a warning).

Tokenizer metadata: copied (every `tokenizer.*` key) from `source_gguf`, or from the GGUF the model was
loaded from (models.load_model records it); else a GPT-2-style BPE vocab built from a transformers fast
tokenizer; else `tokenizer.ggml.model = "none"`, which llama.cpp loads (no text tokenization then).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType
from torch import nn

from ..arch import arch_of, block_of, gguf_families
from ..errors import QuantError, RankwiseError
from ..experts import ExpertLinears
from ..quant.linear import QuantLinear
from .gguf_blocks import BLOCK, block_type, pack_blocks
from .gguf_tokenizer import write_tokenizer

QTYPES = {"f32": T.F32, "f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1}
FILE_TYPES = {T.F32: LlamaFileType.ALL_F32, T.F16: LlamaFileType.MOSTLY_F16, T.Q8_0: LlamaFileType.MOSTLY_Q8_0,
              T.Q4_0: LlamaFileType.MOSTLY_Q4_0, T.Q4_1: LlamaFileType.MOSTLY_Q4_1}



def write_gguf(model: nn.Module, path: str | os.PathLike, qtype: str = "auto", tokenizer=None,
               source_gguf: str | os.PathLike | None = None) -> Path:
    """Write a LlamaForCausalLM (some linears possibly QuantLinear) as one GGUF file at `path`; return it.

    qtype: "auto" (QuantLinears as their blocks, the rest F16), "f32", "f16", "q8_0", "q4_0" or "q4_1" (the
    type of every plain linear). Tokenizer metadata: source_gguf's, else that of the GGUF the model was
    loaded from, else built from `tokenizer`, else none (see the module docstring).
    """
    config = check_writable(model, qtype)
    plain = T.F16 if qtype == "auto" else QTYPES[qtype]
    path = Path(path)
    tensors = list(_tensors(model, config, plain))
    source = source_gguf if source_gguf is not None else _recorded_gguf(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch_of(config).gguf.arch]])
        _write_hparams(writer, config, _file_type(tensors, plain))
        write_tokenizer(writer, config, tokenizer, source)
        for name, data, ttype in tensors:
            writer.add_tensor(name, data, raw_dtype=ttype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def check_writable(model: nn.Module, qtype: str = "auto"):
    """The model's config, or a RankwiseError saying why this model or qtype cannot be written."""
    if qtype != "auto" and qtype not in QTYPES:
        raise RankwiseError(f"unknown GGUF qtype {qtype!r}; valid ones: {', '.join(['auto', *QTYPES])}")
    config = getattr(model, "config", None)
    arch = getattr(config, "model_type", None)
    if arch_of(config) is None or arch_of(config).gguf is None:
        raise RankwiseError(f"GGUF export cannot write model_type {arch!r} ({type(model).__name__}); it writes the "
                            f"families llama.cpp runs: {', '.join(gguf_families())}")
    window = getattr(config, "sliding_window", None)
    windowed = any(field == "sliding_window" for _, field, *_ in arch_of(config).gguf.hparams)
    if window is not None and not windowed and window < config.max_position_embeddings:
        warnings.warn(f"{arch}: llama.cpp's {arch_of(config).gguf.arch.lower()} architecture attends to the whole "
                      f"context, not a sliding window of {window} tokens; the file agrees with this model on sequences "
                      f"up to {window} tokens", stacklevel=3)
    if model.get_output_embeddings() is None:
        raise RankwiseError(f"GGUF export needs a causal LM with its output head (LlamaForCausalLM), "
                            f"not {type(model).__name__}")
    spec = arch_of(config).gguf
    act = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)
    if act != spec.act:
        raise RankwiseError(f"llama.cpp's {spec.arch.lower()} architecture computes {spec.act} MLPs; this config has "
                            f"activation {act!r}")
    why = spec.refuse(config) if spec.refuse is not None else None
    if why:
        raise RankwiseError(f"{arch}: {why}, so a GGUF file would not compute what this model does")
    for rope in _ropes(config).values():
        if rope.get("rope_type", "default") != "default":
            raise RankwiseError(f"GGUF export handles plain RoPE only; this config has rope_type {rope['rope_type']!r}")
    compensated = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.lora_a is not None]
    if compensated:  # the blocks hold the grid only: the correction would be dropped without a word
        raise QuantError(f"{compensated[0]} carries a low-rank compensation, which GGUF has no place for; export "
                         "compressed-tensors (the compensation becomes a peft adapter beside it) or safetensors (merged)")
    return config


def _recorded_gguf(model: nn.Module) -> Path | None:
    """The GGUF file load_model read this model from (its `rankwise_source`), if any."""
    from ..models import EMBEDDED, embedded_path

    src = getattr(model, "rankwise_source", None)
    if src in EMBEDDED:
        return embedded_path(src) if EMBEDDED[src][1].endswith(".gguf") else None
    return Path(src) if src and str(src).endswith(".gguf") and Path(src).is_file() else None


def _tensors(model: nn.Module, config, plain: T):
    """(GGUF name, numpy data, ggml type) for every tensor, in module order; the tied output left out."""
    family = arch_of(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[family.gguf.arch], config.num_hidden_layers)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = not isinstance(head, QuantLinear) and head.weight.data_ptr() == embed.weight.data_ptr()
    permute = family.gguf.permute_qk
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads} if permute else {}
    inside: tuple[str, ...] = ()  # unfused experts already written, stacked
    for name, module in model.named_modules():
        if isinstance(module, ExpertLinears):
            yield from _unfused_expert_tensors(module, name, names, plain)
            inside += (f"{name}.",)
        if name.startswith(inside) or not _has_state(module):
            continue
        if module is head and tied and family.gguf.ties:
            continue  # llama.cpp reuses token_embd as the head when output.weight is absent
        where = block_of(family, name)
        if family.experts is not None and where is not None and where[1] == family.experts:
            yield from _expert_tensors(module, name, names, plain)
            continue
        gname = names.get_name(name)
        if gname is None:
            raise RankwiseError(f"module {name!r} ({type(module).__name__}) has no place in llama.cpp's "
                                f"{family.gguf.arch.lower()} layout; merge adapters into the base weights before "
                                "exporting to GGUF")
        offset = family.norm_offset if gname.endswith("norm") else 0.0
        router = family.router is not None and where is not None and where[1] == family.router
        yield from _module_tensors(module, f"{name} ({gname})", gname, heads.get(gname.rpartition(".")[2]),
                                   T.F32 if router else plain, offset)


def _expert_tensors(module: nn.Module, name: str, names, plain: T):
    """Fused MoE experts (transformers 5: gate_up_proj [E, 2I, H], gate first; down_proj [E, H, I]) as
    llama.cpp's stacked ffn_gate_exps, ffn_up_exps [E, I, H] and ffn_down_exps [E, H, I]."""
    gate, up = module.gate_up_proj.chunk(2, dim=1)
    for part, w in (("gate_proj", gate), ("up_proj", up), ("down_proj", module.down_proj)):
        gname = names.get_name(f"{name}.{part}")
        data, ttype = _float_tensor(w, plain, f"{name}.{part} ({gname})")
        yield f"{gname}.weight", data, ttype


def _has_state(module: nn.Module) -> bool:
    """Whether the module itself (not its children) holds parameters or persistent buffers."""
    if any(True for _ in module.parameters(recurse=False)):
        return True
    return any(b is not None and n not in module._non_persistent_buffers_set for n, b in module._buffers.items())


def _unfused_expert_tensors(module: ExpertLinears, name: str, names, plain: T):
    """Experts as one linear per expert (quantize unfuses them), stacked into ffn_{gate,up,down}_exps [E, …]:
    each expert's codes as ggml blocks when every expert of the projection has the same block type, else
    the float weights in `plain` (with a warning naming why)."""
    for part, attr in (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_down")):
        gname = names.get_name(f"{name}.{part}")
        layers = [getattr(e, attr) for e in module]
        kinds = {block_type(q)[0] if isinstance(q, QuantLinear) else None for q in layers}
        if len(kinds) == 1 and None not in kinds:
            btype = kinds.pop()
            data = np.stack([pack_blocks(q.codes, q.scale, q.zero, btype) for q in layers])
        else:
            if any(isinstance(q, QuantLinear) for q in layers):
                warnings.warn(f"{name}.*.{attr} ({gname}): its experts have no single GGUF block type, so they are "
                              f"dequantized and re-quantized to {plain.name} (not bit-exact)", stacklevel=4)
            data, btype = _float_tensor(torch.stack([q.weight.detach().float() for q in layers]), plain, f"{name}.{part}")
        yield f"{gname}.weight", data, btype


def _module_tensors(module: nn.Module, where: str, gname: str, heads: int | None, plain: T, offset: float = 0.0):
    """The tensors of one module: its weight in the chosen type (a norm's as offset + w), its bias F32 (rows
    permuted for q/k)."""
    if isinstance(module, QuantLinear):
        data, ttype = _quant_weight(module, where, heads, plain)
    elif isinstance(module, nn.Embedding) or gname == "output":
        big = {T.F32: T.F32, T.F16: T.F16}.get(plain, T.Q8_0)
        data, ttype = _float_tensor(module.weight, big, where)
    elif module.weight.ndim == 2:
        data, ttype = _float_tensor(_permute(module.weight, heads), plain, where)
    else:
        data, ttype = _float_tensor(_permute(module.weight.float() + offset, heads), T.F32, where)
    yield f"{gname}.weight", data, ttype
    if getattr(module, "bias", None) is not None:
        yield f"{gname}.bias", _float_tensor(_permute(module.bias, heads), T.F32, where)[0], T.F32


def _permute(t: torch.Tensor, heads: int | None) -> torch.Tensor:
    """Rows of q/k (any trailing shape) from HF's rotary layout to llama.cpp's, as its converter does.

    HF rotates the two halves of each head (row i with i + d/2); llama.cpp's llama rope rotates adjacent
    pairs (2i, 2i+1). Per head, the rows [h0 | h1] become interleaved h0[0], h1[0], h0[1], h1[1], ...
    """
    if heads is None:
        return t
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def _float_tensor(w: torch.Tensor, ttype: T, name: str) -> tuple[np.ndarray, T]:
    """A float tensor [rows, in] (or 1-D) as ttype with gguf's reference quantizers."""
    w = w.detach().float().cpu().numpy()
    if ttype not in (T.F32, T.F16) and w.shape[-1] % BLOCK:
        warnings.warn(f"{name}: rows of {w.shape[-1]} values are not whole blocks of {BLOCK}; written F16", stacklevel=4)
        ttype = T.F16
    return gguf.quants.quantize(w, ttype), ttype


def _quant_weight(layer: QuantLinear, name: str, heads: int | None, plain: T) -> tuple[np.ndarray, T]:
    """A QuantLinear's weight: its own codes and scales as ggml blocks, or re-quantized (with a warning)."""
    btype, why = block_type(layer)
    if btype is None:
        warnings.warn(f"{name}: {why}, so it is dequantized and re-quantized to {plain.name} (not bit-exact)",
                      stacklevel=4)
        return _float_tensor(_permute(layer.weight, heads), plain, name)
    codes, scale, zero = (_permute(t, heads) for t in (layer.codes, layer.scale, layer.zero))
    return pack_blocks(codes, scale, zero, btype), btype


def _file_type(tensors: list, plain: T) -> LlamaFileType:
    """general.file_type: the type holding most elements among the layers' 2-D weights."""
    count: dict[T, int] = {}
    for name, data, ttype in tensors:
        if name.startswith("blk.") and data.ndim == 2:
            count[ttype] = count.get(ttype, 0) + data.size
    return FILE_TYPES[max(count, key=count.get) if count else plain]


def _write_hparams(w: gguf.GGUFWriter, config, file_type: LlamaFileType) -> None:
    """The <arch>.* hyperparameters llama.cpp (and transformers' GGUF loader) read."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = _ropes(config).get("full_attention", {})
    w.add_name(str(getattr(config, "_name_or_path", "") or "rankwise export"))
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(config.num_key_value_heads)
    if head_dim != config.hidden_size // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_vocab_size(config.vocab_size)
    _write_family(w, config)
    _write_experts(w, config)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _ropes(config) -> dict[str, dict]:
    """{layer type: rope parameters}: Gemma 3's per-type dict as it is, a single one as "full_attention"."""
    rope = getattr(config, "rope_parameters", None) or {}
    if rope and all(isinstance(v, dict) for v in rope.values()):
        return rope
    return {"full_attention": rope}


def _write_family(w: gguf.GGUFWriter, config) -> None:
    """The family's own keys (arch/families.py), and where some layers attend locally (Gemma): which ones and
    their rope base."""
    spec = arch_of(config).gguf
    for method, field, *none in spec.hparams:
        value = getattr(config, field, None)
        value = none[0] if value is None and none else value
        if value is not None:
            getattr(w, method)(value)
    types = getattr(config, "layer_types", None)
    if any(field == "sliding_window" for _, field, *_ in spec.hparams) and types:
        w.add_sliding_window_pattern([t == "sliding_attention" for t in types])
    local = _ropes(config).get("sliding_attention")
    if local is not None:
        w.add_rope_freq_base_swa(float(local["rope_theta"]))


def _write_experts(w: gguf.GGUFWriter, config) -> None:
    """MoE hyperparameters: experts, experts per token, each expert's width (Qwen3-MoE's moe_intermediate_size)."""
    if arch_of(config).experts is None:
        return
    count = getattr(config, "num_local_experts", None) or config.num_experts
    w.add_expert_count(count)
    w.add_expert_used_count(config.num_experts_per_tok)
    if getattr(config, "moe_intermediate_size", None):
        w.add_expert_feed_forward_length(config.moe_intermediate_size)
