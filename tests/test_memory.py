"""One block in memory: a checkpoint four times deeper costs no more than about one more block at peak.

Two random bf16 Llama checkpoints of one width, 4 and 16 blocks; each verb runs as the installed command in
a fresh process, and its peak resident memory (getrusage of that child alone) is compared. Reading the whole
model (as before) would add 12 blocks' worth, about 3 × 12 × 14 MB here; the bound is 1.5 blocks.
"""

import json
import subprocess
import sys

import pytest
import torch

from test_cli import ENV, EXE

HIDDEN, MLP, HEADS, KV = 768, 2048, 12, 4
SMALL = ("--n-samples", "8", "--seq-len", "64", "--batch-size", "4", "--eval-tokens", "128", "--quiet")
# peak RSS of the command run as the only child of a small Python process
MEASURE = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
           "sys.stderr.write(r.stderr); print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def block_bytes() -> int:
    """bf16 bytes of one block's weights (attention, MLP, two norms)."""
    attn = HIDDEN * HIDDEN * 2 + HIDDEN * (HIDDEN // HEADS * KV) * 2
    return 2 * (attn + 3 * HIDDEN * MLP + 2 * HIDDEN)


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir, tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = {}
    for depth in (4, 16):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=depth,
                          num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=256,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        path = tmp_path_factory.mktemp(f"llama-{depth}")
        model.save_pretrained(path, max_shard_size="60MB")
        tok.save_pretrained(path)
        out[depth] = path
    return out


def peak_mb(*args) -> float:
    r = subprocess.run([sys.executable, "-c", MEASURE, EXE, *map(str, args)], capture_output=True, text=True, env=ENV,
                       timeout=600)
    code, kb = r.stdout.split()
    assert code == "0", r.stderr
    return int(kb) / 1024


# compress: one rank for every layer (uniform). With ranks chosen per layer, every block brings matrix shapes
# not seen before, and the math libraries' kernel caches (oneDNN's primitives, JIT code: bounded by their own
# capacities, holding no weights) grow by ~2 MB per block at this width; that is measured, not hidden, in
# benchmarks/big_model.py.
@pytest.mark.parametrize("verb", [("quantize", "--method", "gptq"), ("init", "--method", "eva"),
                                  ("compress", "--method", "svd-llm", "--allocation", "uniform")], ids=lambda v: v[0])
def test_peak_memory_does_not_grow_with_depth(checkpoints, tmp_path, verb):
    small = [a for a in SMALL if verb[0] != "init" or a not in ("--eval-tokens", "128")]
    peaks = {d: peak_mb(*verb, "--model", path, "--out", tmp_path / f"out-{d}", *small) for d, path in checkpoints.items()}
    if verb[0] == "quantize":
        report = json.loads((tmp_path / "out-16" / "report.json").read_text())
        assert report["streamed"] and report["dtype"] == "bfloat16"
    grown, allowed = peaks[16] - peaks[4], 1.5 * block_bytes() / 2**20
    assert grown <= allowed, f"{verb[0]}: peak {peaks[4]:.0f} MB with 4 blocks, {peaks[16]:.0f} MB with 16 " \
                             f"(+{grown:.1f} MB; one block is {block_bytes() / 2**20:.1f} MB, allowed +{allowed:.1f})"
