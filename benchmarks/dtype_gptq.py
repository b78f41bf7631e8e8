"""GPTQ W4g64 on SmolLM2 computed in bfloat16 against float32, over several calibration sets.

Run: .venv/bin/python benchmarks/dtype_gptq.py [--sizes 12,16,24] [--fresh]
Resumable: each finished (dtype, size) is a record in benchmarks/results/dtype_gptq.json.

For each calibration size (sequences of 256 tokens from the embedded corpus) the model is loaded in each
dtype, quantized (GPTQ, 4 bits, symmetric groups of 64) and scored in float32 on 8,192 held-out tokens
(windows of 256, stride 128), so that only the quantization differs. One run's perplexity moves by a few
percent with any perturbation of the Hessian (another calibration size does the same), so the dtypes are
compared per size and by their mean over the sizes.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import rankwise as rw
from rankwise.data.sources import read_stream
from rankwise.train.evaluate import perplexity

OUT = Path(__file__).parent / "results" / "dtype_gptq.json"


def one(dtype: str, n: int) -> dict:
    model, tok = rw.load_model("smollm2", dtype=dtype)
    stream = read_stream("pydoc", tok, "eval")[:8192]
    batches = rw.load_data("pydoc", tok, seq_len=256, n=n, batch_size=4)
    rw.quantize(model, batches, "gptq", progress=False, bits=4, group_size=64, symmetric=True)
    return {"perplexity": perplexity(model.float(), stream, window=256, stride=128)["perplexity"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="12,16,24")
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    res = json.loads(OUT.read_text()) if OUT.exists() and not args.fresh else {}
    sizes = [int(s) for s in args.sizes.split(",")]
    for n in sizes:
        for dtype in ("float32", "bfloat16"):
            key = f"{dtype}/n{n}"
            if key not in res.get("runs", {}):
                res.setdefault("runs", {})[key] = one(dtype, n)
                OUT.parent.mkdir(exist_ok=True)
                OUT.write_text(json.dumps(res, indent=1))
                print(key, res["runs"][key], flush=True)
    ppl = {d: [res["runs"][f"{d}/n{n}"]["perplexity"] for n in sizes] for d in ("float32", "bfloat16")}
    res["ratio_per_size"] = {str(n): b / f for n, f, b in zip(sizes, ppl["float32"], ppl["bfloat16"])}
    res["mean"] = {d: sum(v) / len(v) for d, v in ppl.items()}
    res["ratio_of_means"] = res["mean"]["bfloat16"] / res["mean"]["float32"]
    OUT.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: res[k] for k in ("ratio_per_size", "mean", "ratio_of_means")}, indent=1))


if __name__ == "__main__":
    main()
