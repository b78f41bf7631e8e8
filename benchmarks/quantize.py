"""Quantization benchmark: RTN, AWQ, GPTQ (± act-order, ± true-sequential) vs llm-compressor, one run.

Run: .venv/bin/python benchmarks/quantize.py [--n 32 --seq-len 256 --eval-tokens 4096] [--skip-peer]
(the peer needs `bash benchmarks/setup_peer.sh` once). Resumable: each finished configuration is a record
in benchmarks/results/quantize.json and is skipped when rerun (--fresh starts over).

- SmolLM2-135M (its weights come from a Q4_1 GGUF, i.e. already sit on a 4-bit grid of group 32):
  held-out perplexity on the pydoc held-out paragraphs (windows of 512, stride 511), for each method at
  W4g64, W3g64, W2g32, W4g32 (symmetric); seconds as a ratio to one plain forward pass over the same
  calibration tokens, timed in the same run. llm-compressor's GPTQ and AWQ run in their own venv as a
  subprocess on the same calibration tokens; their fake-quantized weights are scored by our code.
  W4g32 models are also written as GGUF (Q4_0 blocks from our codes) and run in llama.cpp.
- all-MiniLM-L6-v2 (genuine fp32): mean cosine of sentence embeddings (mean pooling) to the fp32 model's
  on all 872 SST-2 dev sentences, calibrated on 32 SST-2 train sentences (needs ../shared/data/sst2).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

import rankwise as rw
from rankwise.data.sources import read_stream
from rankwise.quant import quantize
from rankwise.train.evaluate import perplexity

HERE = Path(__file__).parent
PEER_PY = HERE / ".venv-llmc" / "bin" / "python"
GRIDS = [(4, 64), (3, 64), (2, 32), (4, 32)]
METHODS = {"rtn": {}, "awq": {}, "gptq": {}, "gptq+act_order": {"act_order": True},
           "gptq+true_sequential": {"true_sequential": True}}
BASE_METHOD = {"gptq+act_order": "gptq", "gptq+true_sequential": "gptq"}


class Results:
    """benchmarks/results/quantize.json: {"setup", "records": {key: record}}, written after each record."""

    def __init__(self, path: Path, fresh: bool, setup: dict):
        self.path = path
        old = json.loads(path.read_text()) if path.exists() and not fresh else {}
        keep = ("n", "seq_len", "eval_tokens")  # what the recorded numbers depend on
        before = old.get("setup", {}).get("args", {})
        if old and any(before.get(k) != setup["args"][k] for k in keep):
            raise SystemExit(f"{path} was recorded with {[(k, before.get(k)) for k in keep]}; rerun with those "
                             "settings to resume, or pass --fresh")
        self.data = {"setup": setup, "records": old.get("records", {})}

    def has(self, key):
        return key in self.data["records"]

    def put(self, key, rec):
        self.data["records"][key] = rec
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)
        print(key, json.dumps({k: v for k, v in rec.items() if k != "layers"}), flush=True)


def timed_forward(model, batches) -> float:
    t = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    return time.perf_counter() - t


def ppl(model, stream) -> float:
    return perplexity(model, stream, window=512, stride=511)["perplexity"]


def peer(method, bits, group, model_dir: Path, calib: Path, work: Path) -> tuple[dict, dict]:
    out, js = work / f"{method}.safetensors", work / f"{method}.json"
    cmd = [str(PEER_PY), str(HERE / "peer_llmcompressor.py"), "--model", str(model_dir), "--calib", str(calib),
           "--method", method, "--bits", str(bits), "--group-size", str(group), "--symmetric", "--out", str(out),
           "--json", str(js)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    from safetensors.torch import load_file

    return json.loads(js.read_text()), load_file(str(out))


def smollm2(res: Results, args) -> None:
    from rankwise.models import convert_gguf, embedded_path

    base, tok = rw.load_model("smollm2")
    batches = rw.load_data("pydoc", tok, seq_len=args.seq_len, n=args.n, batch_size=4)
    stream = read_stream("pydoc", tok, "eval")[: args.eval_tokens]
    fwd = timed_forward(base, batches)
    if not res.has("smollm2/fp"):
        res.put("smollm2/fp", {"perplexity": ppl(base, stream), "forward_seconds": fwd})
    for bits, group in GRIDS:
        for name, extra in METHODS.items():
            key = f"smollm2/{name}/W{bits}g{group}"
            if res.has(key):
                continue
            model = copy.deepcopy(base)
            t = time.perf_counter()
            report = quantize(model, batches, BASE_METHOD.get(name, name), bits=bits, group_size=group,
                              progress=False, **extra)
            seconds = time.perf_counter() - t
            rec = {"perplexity": ppl(model, stream), "seconds": seconds, "forward_seconds": fwd,
                   "ratio_to_forward": seconds / fwd, "bits_per_weight": report.mean_bits}
            if (bits, group) == (4, 32):
                rec |= llama_cpp_check(model, tok, stream, name)
            res.put(key, rec)
    if args.skip_peer or not PEER_PY.exists():
        print("llm-compressor peer skipped (run benchmarks/setup_peer.sh)", flush=True)
        return
    model_dir = convert_gguf(embedded_path("smollm2"))
    with tempfile.TemporaryDirectory() as work:
        calib = Path(work) / "calib.pt"
        torch.save({"input_ids": torch.cat([b["input_ids"] for b in batches]),
                    "attention_mask": torch.cat([b["attention_mask"] for b in batches])}, calib)
        for bits, group in [(4, 32), (3, 64)]:
            for method in ("gptq", "awq"):
                key = f"smollm2/llmcompressor-{method}/W{bits}g{group}"
                if res.has(key):
                    continue
                info, weights = peer(method, bits, group, model_dir, calib, Path(work))
                model = copy.deepcopy(base)
                missing, unexpected = model.load_state_dict(weights, strict=False)
                assert not unexpected, unexpected[:3]
                res.put(key, {"perplexity": ppl(model, stream), "seconds": info["seconds"], "forward_seconds": fwd,
                              "ratio_to_forward": info["seconds"] / fwd, "peer": info})


def llama_cpp_check(model, tok, stream, name) -> dict:
    """Write the W4g32 model as GGUF (Q4_0 blocks from our codes); llama.cpp's perplexity beside ours."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return {}
    from rankwise.export.gguf import write_gguf
    from rankwise.train.llamacpp import llamacpp_perplexity, torch_perplexity

    seqs = [stream[i:i + 512] for i in range(0, len(stream) - 511, 512)]
    with tempfile.TemporaryDirectory() as d:
        path = write_gguf(model, Path(d) / f"{name}.gguf", qtype="auto")
        theirs = llamacpp_perplexity(path, seqs, n_ctx=512)
    ours = torch_perplexity(model, seqs)
    return {"gguf": {"llama_cpp_ppl": theirs["ppl"], "torch_ppl": ours["ppl"], "tokens": theirs["tokens"],
                     "rel_diff": theirs["ppl"] / ours["ppl"] - 1}}


def minilm_setup(args):
    """(model, batches, embed) for the MiniLM part, or None without ../shared/data/sst2: 32 SST-2 train
    sentences (64 tokens) to calibrate; embed(model) = mean-pooled, normalized embeddings of the 872 dev ones."""
    import csv

    data = HERE.parent.parent / "shared" / "data" / "sst2"
    if not data.exists():
        print(f"MiniLM part skipped: {data} not found", flush=True)
        return None
    base, tok = rw.load_model("minilm")

    def sentences(f):
        with open(data / f, newline="") as fh:
            return [r["sentence"] for r in csv.DictReader(fh, delimiter="\t")]

    train, dev = sentences("train.tsv")[: args.n], sentences("dev.tsv")
    enc = tok(train, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    batches = [{k: enc[k][i:i + 8] for k in ("input_ids", "attention_mask")} for i in range(0, len(train), 8)]

    def embed(model):
        out = []
        with torch.no_grad():
            for i in range(0, len(dev), 64):
                e = tok(dev[i:i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
                h = model(**e).last_hidden_state
                m = e["attention_mask"].unsqueeze(-1).float()
                out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
        return torch.cat(out)

    return base, batches, embed


def minilm(res: Results, args) -> None:
    setup = minilm_setup(args)
    if setup is None:
        return
    base, batches, embed = setup
    ref = embed(base)
    fwd = timed_forward(base, batches)
    for bits, group in GRIDS:
        for name, extra in METHODS.items():
            key = f"minilm/{name}/W{bits}g{group}"
            if res.has(key):
                continue
            model = copy.deepcopy(base)
            t = time.perf_counter()
            quantize(model, batches, BASE_METHOD.get(name, name), bits=bits, group_size=group, progress=False, **extra)
            seconds = time.perf_counter() - t
            cos = (embed(model) * ref).sum(-1)
            res.put(key, {"mean_cos": float(cos.mean()), "min_cos": float(cos.min()), "seconds": seconds,
                          "ratio_to_forward": seconds / fwd})


def plot(res: Results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = res.data["records"]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for name in METHODS:
        pts = sorted((b, recs[f"smollm2/{name}/W{b}g{g}"]["perplexity"]) for b, g in [(4, 64), (3, 64), (2, 32)]
                     if f"smollm2/{name}/W{b}g{g}" in recs)
        if pts:
            ax.plot(*zip(*pts), "o-", label=name)
    if "smollm2/fp" in recs:
        ax.axhline(recs["smollm2/fp"]["perplexity"], color="k", ls="--", lw=1, label="fp (dequantized Q4_1)")
    ax.set_yscale("log"), ax.set_xlabel("bits per weight code (W4/W3 group 64, W2 group 32)")
    ax.set_ylabel("held-out perplexity"), ax.set_title("SmolLM2-135M, pydoc held-out", fontsize=9)
    ax.set_xticks([2, 3, 4]), ax.grid(alpha=0.3), ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "results" / "quantize.png", dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--only", choices=["smollm2", "minilm"])
    ap.add_argument("--fresh", action="store_true", help="discard earlier records")
    ap.add_argument("--out", default=str(HERE / "results" / "quantize.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    setup = {"args": vars(args), "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
             "machine": platform.processor() or platform.machine(), "python": sys.version.split()[0]}
    res = Results(Path(args.out), args.fresh, setup)
    if args.only in (None, "smollm2"):
        smollm2(res, args)
    if args.only in (None, "minilm"):
        minilm(res, args)
    plot(res)


if __name__ == "__main__":
    main()
