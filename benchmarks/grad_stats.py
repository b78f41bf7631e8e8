"""Memory and time of the gradient statistics (calibrate_gradients) on SmolLM2, against one forward pass.

SmolLM2-135M (fp32), 32 × 256 pydoc tokens in batches of 4, all linear layers. One process (re-run with
glibc's mmap threshold fixed, so that resident memory follows what is alive): resident memory after
loading, peak and kept during a no-grad forward over the batches, peak and kept during
calibrate_gradients, and the bytes of the gradients it keeps (the targets' weights in fp32). What
the pass may hold beyond the model is those gradients plus one batch's activations for its backward.

Run: .venv/bin/python benchmarks/grad_stats.py   (nothing else running). Writes benchmarks/results/grad_stats.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import rankwise as rw
from rankwise.calib.gradients import calibrate_gradients

sys.path.insert(0, str(Path(__file__).parent))
from resident import MMAP_ENV, peak_during, rss  # noqa: E402

GiB = 2**30


def probe() -> dict:
    torch.manual_seed(0)
    model, tok = rw.load_model("smollm2")
    batches = rw.load_data("pydoc", tok, seq_len=256, n=32, batch_size=4)
    loaded = rss()

    def forward():
        with torch.no_grad():
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)

    _, fwd_s, fwd_peak = peak_during(forward)
    after_fwd = rss()
    stats, grad_s, grad_peak = peak_during(lambda: calibrate_gradients(model, batches, "all-linear", progress=False))
    kept = sum(g.numel() * g.element_size() for g in stats.grads.values())
    return {"tokens": sum(int(b["attention_mask"].sum()) for b in batches), "layers": len(stats.grads),
            "resident_after_load_gib": loaded / GiB, "forward_seconds": fwd_s, "forward_peak_gib": fwd_peak / GiB,
            "resident_after_forward_gib": after_fwd / GiB, "gradients_seconds": grad_s,
            "gradients_over_forward": grad_s / fwd_s, "gradients_peak_gib": grad_peak / GiB,
            "resident_after_gradients_gib": rss() / GiB, "gradient_bytes_kept_gib": kept / GiB,
            "linear_weight_bytes_gib": sum(model.get_submodule(n).weight.numel() * 4 for n in stats.grads) / GiB}


def main():
    if any(os.environ.get(k) != v for k, v in MMAP_ENV.items()):
        env = os.environ | MMAP_ENV
        raise SystemExit(subprocess.run([sys.executable, __file__, *sys.argv[1:]], env=env).returncode)
    torch.set_num_threads(os.cpu_count() or 1)
    row = probe() | {"machine": f"{os.cpu_count()} CPU cores", "torch": torch.__version__}
    out = Path(__file__).parent / "results" / "grad_stats.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2))
    for k, v in row.items():
        print(f"{k:30s} {v:.3f}" if isinstance(v, float) else f"{k:30s} {v}")


if __name__ == "__main__":
    main()
