"""First look at low-rank compensation: SmolLM2 GPTQ W3g64 alone and with EoRA / LoRC terms.

Run: .venv/bin/python benchmarks/compensation.py   (2-core CPU: about 4 minutes)
Same calibration (32 × 256 pydoc tokens) and held-out perplexity (4,096 tokens, windows of 512) as
benchmarks/quantize.py; writes benchmarks/results/compensation.json. The full compression benchmark
(SVD methods, mixed precision, the joint planner) is issue 11's benchmarks/compress.py, still to come.
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import rankwise as rw
from rankwise.data.sources import read_stream
from rankwise.train.evaluate import perplexity

RUNS = [("none", 0), ("eora", 8), ("eora", 32), ("lorc", 32)]


def main():
    base, tok = rw.load_model("smollm2")
    batches = rw.load_data("pydoc", tok, seq_len=256, n=32, batch_size=4)
    stream = read_stream("pydoc", tok, "eval")[:4096]
    out = {"fp": perplexity(base, stream, window=512, stride=511)["perplexity"], "runs": []}
    for kind, rank in RUNS:
        model = copy.deepcopy(base)
        extra = {} if kind == "none" else {"compensate": kind, "compensate_rank": rank}
        t = time.perf_counter()
        report = rw.quantize(model, batches, "gptq", bits=3, group_size=64, progress=False, **extra)
        rec = {"compensate": kind, "rank": rank, "seconds": time.perf_counter() - t, "bits_per_weight": report.mean_bits,
               "perplexity": perplexity(model, stream, window=512, stride=511)["perplexity"]}
        out["runs"].append(rec)
        print(json.dumps(rec), flush=True)
    gap = out["runs"][0]["perplexity"] - out["fp"]
    for rec in out["runs"][1:]:
        rec["gap_closed"] = (out["runs"][0]["perplexity"] - rec["perplexity"]) / gap
    path = Path(__file__).parent / "results" / "compensation.json"
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
