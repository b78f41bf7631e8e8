"""Perplexity through llama.cpp (llama-cpp-python) and the same number from a transformers model.

Both score token ids the same way: every sequence [t0 … t(L−1)] contributes the NLL of t1 … t(L−1)
given their prefix; the NLLs of all sequences are pooled (a mean over tokens, not over sequences), and
ppl = exp(mean NLL). So llamacpp_perplexity(gguf) and torch_perplexity(model) compare number to number.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from torch import nn

from ..errors import RankwiseError


def _sequences(token_ids) -> list[list[int]]:
    """list[list[int]] from a list of id lists / 1-D tensors, or a LongTensor [n, L]."""
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.reshape(-1, token_ids.shape[-1]) if token_ids.ndim > 1 else token_ids[None]
    seqs = [t.tolist() if isinstance(t, torch.Tensor) else list(t) for t in token_ids]
    if not seqs or any(len(s) < 2 for s in seqs):
        raise RankwiseError("perplexity needs at least one sequence, each of at least 2 token ids")
    return seqs


def _nll_sum(logits: np.ndarray, ids: list[int]) -> float:
    """Σ −log p(t_{i+1} | t_0..t_i) for logits [L, vocab] over the ids [L], in float64."""
    x = np.asarray(logits[: len(ids) - 1], dtype=np.float64)
    top = x.max(axis=1, keepdims=True)
    logz = np.log(np.exp(x - top).sum(axis=1)) + top[:, 0]
    return float((logz - x[np.arange(len(ids) - 1), ids[1:]]).sum())


def _result(nll: float, tokens: int) -> dict:
    mean = nll / tokens
    return {"ppl": math.exp(mean), "tokens": tokens, "nll": mean}


def _import_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise RankwiseError("evaluating a GGUF file needs llama-cpp-python: pip install 'rankwise[llama]'") from None
    return llama_cpp


@contextmanager
def _without_extra_buffers(llama_cpp):
    """Load models with use_extra_bufts off: no repacked/AMX weight buffers.

    llama.cpp's AMX matmul segfaults on some Xeons (ggml-org/llama.cpp#20824; it does on this project's
    CI machine for every quantized type), and `Llama` has no argument for it, so the default params it
    starts from are patched while it loads. The plain CPU kernels compute the same products.
    """
    low = llama_cpp.llama_cpp
    original = low.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params
    try:
        yield
    finally:
        low.llama_model_default_params = original


def _load(gguf_path, longest: int, n_ctx: int, n_threads: int, extra_buffers: bool):
    """llama_cpp.Llama on the file, every position's logits kept; RankwiseError for a missing file or a
    sequence longer than n_ctx."""
    llama_cpp = _import_llama_cpp()
    if longest > n_ctx:
        raise RankwiseError(f"a sequence has {longest} tokens, more than n_ctx={n_ctx}; raise n_ctx or cut it")
    if not os.path.isfile(gguf_path):
        raise RankwiseError(f"GGUF file {gguf_path} does not exist")
    with nullcontext() if extra_buffers else _without_extra_buffers(llama_cpp):
        return llama_cpp.Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                               verbose=False, n_threads=n_threads)


def llamacpp_logits(gguf_path: str | os.PathLike, ids: list[int], n_ctx: int, n_threads: int = 2,
                    extra_buffers: bool = False) -> np.ndarray:
    """[len(ids), vocab] float32: the logits llama.cpp computes at every position of one sequence."""
    llm = _load(gguf_path, len(ids), n_ctx, n_threads, extra_buffers)
    try:
        llm.eval(list(ids))
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def llamacpp_perplexity(gguf_path: str | os.PathLike, token_ids, n_ctx: int, n_threads: int = 2,
                        extra_buffers: bool = False) -> dict:
    """{"ppl", "tokens", "nll" (mean, nats)} of a GGUF model on token ids (each sequence ≤ n_ctx ids)."""
    seqs = _sequences(token_ids)
    llm = _load(gguf_path, max(map(len, seqs)), n_ctx, n_threads, extra_buffers)
    nll, tokens = 0.0, 0
    try:
        for ids in seqs:
            llm.reset()  # each sequence starts from an empty context
            llm.eval(ids)
            nll += _nll_sum(llm.scores[: len(ids)], ids)
            tokens += len(ids) - 1
    finally:
        llm.close()
    return _result(nll, tokens)


@torch.no_grad()
def torch_perplexity(model: nn.Module, token_ids, batch_size: int = 8) -> dict:
    """The same {"ppl", "tokens", "nll"} as llamacpp_perplexity, from a transformers causal LM.

    Runs of consecutive sequences of one length go through the model together, up to batch_size.
    """
    seqs = _sequences(token_ids)
    device = next(model.parameters()).device
    nll, tokens, i = 0.0, 0, 0
    while i < len(seqs):
        j = i + 1
        while j < len(seqs) and j - i < batch_size and len(seqs[j]) == len(seqs[i]):
            j += 1
        logits = model(input_ids=torch.tensor(seqs[i:j], device=device)).logits.float().cpu().numpy()
        for ids, row in zip(seqs[i:j], logits):
            nll += _nll_sum(row, ids)
            tokens += len(ids) - 1
        i = j
    return _result(nll, tokens)
