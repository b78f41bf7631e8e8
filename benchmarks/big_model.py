"""Models at user size: peak memory and time of each verb on a random Llama-3-8B-shaped bf16 checkpoint.

Run: .venv/bin/python benchmarks/big_model.py [--shape 8b|1b|tiny] [--dir /big/disk] [--only rtn,gptq]
Resumable: each finished run is a record in benchmarks/results/big_model.json (for its shape), skipped when
rerun (--fresh starts over).

1. Generates, once and streaming (one block in memory, so the generator itself fits), a random checkpoint of
   the shape (8b: hidden 4096, 32 blocks, MLP 14336, 32/8 heads, vocab 128256; 16 GB) as bf16 safetensors
   shards with a tokenizer, under --dir.
2. Times two references in this process: reading and writing the whole checkpoint once (what RTN cannot
   beat), and one block-wise forward pass over the calibration tokens (what GPTQ's pass needs at least).
3. Runs each verb as the `rankwise` command in its own process and records its peak resident memory
   (getrusage of that child) and wall time: quantize rtn and gptq (W4g128, compressed-tensors), compress
   svd-llm --ratio 0.8, init eva --rank 16; for the 1b shape also `train` (a few LoRA steps on the whole bf16
   base with --gradient-checkpointing). The compressed-tensors output is reloaded: its first block's
   dequantized weights must equal the codes rankwise wrote, bit for bit. Each output is removed once measured.
Times are reported as ratios to the references measured in the same run (these machines are noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

HERE = Path(__file__).parent
SHAPES = {  # hidden, blocks, mlp, heads, kv heads, vocab
    "8b": (4096, 32, 14336, 32, 8, 128256),
    "1b": (2048, 16, 8192, 32, 8, 128256),
    "tiny": (256, 4, 768, 8, 2, 1000),
}
CALIB = ("--n-samples", "32", "--seq-len", "256", "--batch-size", "4", "--eval-tokens", "0", "--quiet")
RUNS = {
    "rtn": ("quantize", "--method", "rtn", "--group-size", "128", "--format", "compressed-tensors"),
    "gptq": ("quantize", "--method", "gptq", "--group-size", "128", "--format", "compressed-tensors"),
    "svd-llm": ("compress", "--method", "svd-llm", "--ratio", "0.8"),
    "eva": ("init", "--method", "eva", "--rank", "16"),
    # the 1b shape: a few LoRA steps on the whole bf16 base (train reads the model whole), checkpointed blocks
    "train": ("train", "--method", "lora", "--steps", "3", "--seq-len", "256", "--batch-size", "4",
              "--gradient-checkpointing", "--max-eval-examples", "8", "--no-merge", "--quiet"),
}
MEASURE = ("import resource, subprocess, sys, time; t = time.perf_counter(); r = subprocess.run(sys.argv[1:]); "
           "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t)")


def config(shape: str):
    from transformers import LlamaConfig

    hidden, blocks, mlp, heads, kv, vocab = SHAPES[shape]
    return LlamaConfig(hidden_size=hidden, num_hidden_layers=blocks, intermediate_size=mlp, num_attention_heads=heads,
                       num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=8192, rope_theta=500000.0,
                       tie_word_embeddings=shape == "1b", dtype="bfloat16", bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tokenizer(vocab: int):
    """A byte-level BPE trained on the embedded corpus (no download), padded to the config's vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rankwise.data import pydoc_texts

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab, 4000), special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(pydoc_texts("train")[:200], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def generate(shape: str, folder: Path) -> Path:
    """The random checkpoint, one shard per block (N(0, 0.02) weights, unit norms), written once."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    if (folder / "model.safetensors.index.json").exists():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = config(shape)
    with init_empty_weights():
        skeleton = LlamaForCausalLM(cfg)
    groups: dict[str, list[tuple[str, tuple]]] = {}
    for name, p in skeleton.state_dict().items():
        key = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else "rest"
        groups.setdefault(key, []).append((name, tuple(p.shape)))
    gen = torch.Generator().manual_seed(0)
    weight_map, total, n = {}, 0, len(groups)
    for i, (key, tensors) in enumerate(groups.items()):
        shard = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        out = {}
        for name, shape_ in tensors:
            t = torch.ones(shape_) if name.endswith("norm.weight") else torch.randn(shape_, generator=gen) * 0.02
            out[name] = t.to(torch.bfloat16)
            weight_map[name] = shard
            total += t.numel() * 2
        save_file(out, tmp / shard, metadata={"format": "pt"})
        print(f"generated {key} ({i + 1}/{n})", flush=True)
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(tmp)
    tokenizer(cfg.vocab_size).save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def read_write_seconds(folder: Path, scratch: Path) -> float:
    """Read every tensor of the checkpoint and write it again (what a round-to-nearest pass must at least do)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    scratch.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    for shard in sorted(folder.glob("model-*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        save_file(tensors, scratch / shard.name)
        del tensors
    seconds = time.perf_counter() - t
    shutil.rmtree(scratch)
    return seconds


def forward_seconds(folder: Path) -> float:
    """One block-wise forward pass over the calibration tokens, the model read one block at a time."""
    import rankwise as rw

    model, tok = rw.load_model(folder, lazy=True)
    batches = rw.load_data("pydoc", tok, seq_len=256, n=32, batch_size=4)
    t = time.perf_counter()
    rw.calibrate(model, batches, targets=["model.layers.0.self_attn.q_proj"], keep=1, progress=False)
    return time.perf_counter() - t


def run_verb(name: str, folder: Path, out: Path) -> dict:
    exe = shutil.which("rankwise") or str(Path(sys.executable).parent / "rankwise")
    args = [exe, *RUNS[name], "--model", str(folder), "--out", str(out / name)]
    if name != "train":
        args += [a for a in CALIB if name != "eva" or a not in ("--eval-tokens", "0")]
    r = subprocess.run([sys.executable, "-c", MEASURE, *args], capture_output=True, text=True)
    code, kb, seconds = r.stdout.split()[-3:]
    written = sum(f.stat().st_size for f in (out / name).rglob("*") if f.is_file()) if (out / name).exists() else 0
    return {"returncode": int(code), "peak_rss_gib": int(kb) / 2**20, "seconds": float(seconds),
            "output_gib": written / 2**30, "stderr_tail": r.stderr[-500:]}


def check_reload(out: Path, source: Path, method: str) -> dict:
    """The compressed-tensors folder loads in transformers; block 0's linears, decompressed by
    compressed-tensors itself, equal (RTN) rankwise's round-to-nearest of the source weights, bit for bit."""
    from compressed_tensors.compressors.base import decompress_module
    from transformers import AutoModelForCausalLM

    from rankwise.lazy import Shards
    from rankwise.numerics.quantize import dequantize, rtn
    from rankwise.quant.rtn import RTNConfig

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # packed codes stay packed
    block = model.model.layers[0]
    linears = {n: m for n, m in block.named_modules() if hasattr(m, "quantization_scheme")}
    for m in linears.values():
        decompress_module(m)
    result = {"loads": True, "layers": len(linears)}
    if method == "rtn":
        shards, grid = Shards(source), RTNConfig(bits=4, group_size=128).grid_for("")
        same = [torch.equal(dequantize(*rtn(shards.get(f"model.layers.0.{n}.weight"), grid)), m.weight.float())
                for n, m in linears.items()]
        result["block0_bit_exact"] = all(same) and bool(same)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    ap.add_argument("--dir", type=Path, default=Path.home() / ".cache" / "rankwise" / "big")
    ap.add_argument("--only", help="comma-separated runs (default: all but train for 8b, train for 1b, all for tiny)")
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    results_path = HERE / "results" / "big_model.json"
    results = json.loads(results_path.read_text()) if results_path.exists() and not args.fresh else {}
    rec = results.setdefault(args.shape, {"machine": {"cpu": platform.processor() or platform.machine(),
                                                      "cores": os.cpu_count(), "torch": torch.__version__}})

    def save():
        results_path.parent.mkdir(exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1))

    folder = generate(args.shape, args.dir / f"llama-{args.shape}")
    rec["checkpoint_gib"] = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**30
    if "read_write_seconds" not in rec:
        rec["read_write_seconds"] = read_write_seconds(folder, args.dir / "scratch")
        save()
    if "forward_seconds" not in rec:
        rec["forward_seconds"] = forward_seconds(folder)
        save()
    default = {"8b": [r for r in RUNS if r != "train"], "1b": ["train"]}.get(args.shape, list(RUNS))
    for name in args.only.split(",") if args.only else default:
        if name in rec.get("runs", {}):
            continue
        r = run_verb(name, folder, args.dir / "out")
        base = rec["read_write_seconds"] if name == "rtn" else rec["forward_seconds"]
        r["time_ratio"] = r["seconds"] / base
        r["ratio_to"] = "read_write" if name == "rtn" else "forward"
        r["peak_fraction_of_checkpoint"] = r["peak_rss_gib"] / rec["checkpoint_gib"]
        if name in ("rtn", "gptq") and r["returncode"] == 0:
            r["reload"] = check_reload(args.dir / "out" / name / "model", folder, name)
        shutil.rmtree(args.dir / "out" / name, ignore_errors=True)  # outputs of 16 GB models fill a disk fast
        rec.setdefault("runs", {})[name] = r
        save()
        print(name, {k: v for k, v in r.items() if k != "stderr_tail"}, flush=True)


if __name__ == "__main__":
    main()
