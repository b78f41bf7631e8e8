"""GGUF tokenizer metadata (tokenizer.* keys): copied from a GGUF file, built from a transformers fast
tokenizer (byte-level BPE), or model "none" (llama.cpp loads it; no text tokenization then)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import gguf
from gguf import TokenType

from ..errors import RankwiseError


def write_tokenizer(w: gguf.GGUFWriter, config, tokenizer, source: Path | None) -> None:
    """tokenizer.* keys: copied from a GGUF, built from a transformers tokenizer, or model "none"."""
    if source is not None:
        _copy_tokenizer(w, Path(source), config.vocab_size)
    elif tokenizer is not None:
        _bpe_tokenizer(w, tokenizer, config.vocab_size)
    else:
        w.add_tokenizer_model("none")


def _copy_tokenizer(w: gguf.GGUFWriter, source: Path, n_vocab: int) -> None:
    """Every tokenizer.* key of the GGUF file `source`, with its value types (strings as raw bytes)."""
    fields = {k: f for k, f in gguf.GGUFReader(str(source)).fields.items() if k.startswith("tokenizer.")}
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens.data) != n_vocab:
        raise RankwiseError(f"{source} has {len(tokens.data)} tokens but the model's vocab_size is {n_vocab}; "
                            f"give the GGUF this model came from as source_gguf")
    for key, f in fields.items():
        kind, sub = f.types[0], (f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
        if sub == gguf.GGUFValueType.STRING:
            value = [bytes(f.parts[i]) for i in f.data]
        elif kind == gguf.GGUFValueType.STRING:
            value = bytes(f.parts[f.data[0]])
        else:
            value = f.contents()
        w.add_key_value(key, value, kind, sub_type=sub)


def _bpe_tokenizer(w: gguf.GGUFWriter, tok, n_vocab: int) -> None:
    """A GPT-2-style (byte-level BPE) vocab from a transformers fast tokenizer: tokens, types, merges, ids."""
    full = json.loads(tok.backend_tokenizer.to_str()) if hasattr(tok, "backend_tokenizer") else {}
    spec = full.get("model") or {}
    if spec.get("type") != "BPE" or spec.get("byte_fallback"):
        raise RankwiseError(f"{type(tok).__name__} is not a byte-level BPE tokenizer (tokenizer.json model "
                            f"{spec.get('type')!r}); pass source_gguf= a GGUF file that has this tokenizer")
    vocab = tok.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise RankwiseError(f"the tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is {n_vocab}")
    tokens, types = [f"[PAD{i}]" for i in range(n_vocab)], [TokenType.UNUSED] * n_vocab
    for text, i in vocab.items():
        tokens[i], types[i] = text, TokenType.NORMAL
    for i, added in tok.added_tokens_decoder.items():
        types[i] = TokenType.CONTROL if added.special else TokenType.USER_DEFINED
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer(full.get("pre_tokenizer") or {}))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["merges"]])
    for kind in ("bos", "eos", "unk", "pad"):
        if (i := getattr(tok, f"{kind}_token_id", None)) is not None:
            getattr(w, f"add_{kind}_token_id")(i)
    bos = tok.bos_token_id
    w.add_add_bos_token(bos is not None and tok.encode("a")[:1] == [bos])
    if isinstance(getattr(tok, "chat_template", None), str):
        w.add_chat_template(tok.chat_template)


def _pre_tokenizer(pre: dict) -> str:
    """tokenizer.ggml.pre: "gpt-2" for GPT-2's byte-level regex; else "default", with a warning."""
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    warnings.warn(f"llama.cpp has no name for this pre-tokenizer ({pre.get('type')}); the GGUF says 'default', so "
                  f"llama.cpp may split text differently (token ids you give it are unaffected). Pass source_gguf= "
                  f"a GGUF with this tokenizer to copy its exact metadata", stacklevel=4)
    return "default"
