"""EVA vs random LoRA (peft's default init) at the same rank, steps and data, in one run.

(a) all-MiniLM-L6-v2 on SST-2 (classification, fresh head): dev accuracy and loss.
(b) SmolLM2-135M on GSM8K (prompt = question, loss on answer tokens): held-out answer loss.
Each method gets its own learning-rate sweep; the best LR per method is then rerun with more seeds.

Run: .venv/bin/python benchmarks/convergence.py [--task sst2|gsm8k|all] [--data ../shared/data]
Writes benchmarks/results/convergence.json (merged with what is there for the other task).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import rankwise as rw
from rankwise.data import DataConfig, batchify, load_dataset
from rankwise.cli.runs import head_modules
from rankwise.train import TrainConfig, train

TASKS = {
    "sst2": dict(model="minilm", task="seq-cls", targets=["query", "key", "value", "dense"], rank=8, alpha=16,
                 steps=150, batch_size=32, eval_every=15, seq_len=64, lrs=[2e-4, 6e-4, 2e-3], calib=256,
                 data=lambda root: DataConfig(train=f"{root}/sst2/train.tsv", eval=f"{root}/sst2/dev.tsv",
                                              text_field="sentence", seq_len=64, max_train_examples=150 * 32,
                                              max_eval_examples=None)),
    # The same, with the classification head's learning rate fixed (2e-3, LoRA's best) for both methods,
    # so that the adapter's learning rate is swept alone: does EVA's lower best LR starve the head?
    "sst2_headlr": dict(model="minilm", task="seq-cls", targets=["query", "key", "value", "dense"], rank=8, alpha=16,
                        steps=150, batch_size=32, eval_every=15, seq_len=64, lrs={"lora": [6e-4, 2e-3], "eva": [2e-4, 6e-4]},
                        head_lr=2e-3, calib=256,
                        data=lambda root: DataConfig(train=f"{root}/sst2/train.tsv", eval=f"{root}/sst2/dev.tsv",
                                                     text_field="sentence", seq_len=64, max_train_examples=150 * 32,
                                                     max_eval_examples=None)),
    "gsm8k": dict(model="smollm2", task="causal-lm", targets="all-linear", rank=8, alpha=16,
                  steps=30, batch_size=4, eval_every=10, seq_len=256, lrs=[1e-4, 3e-4, 1e-3], calib=32,
                  data=lambda root: DataConfig(train=f"{root}/gsm8k/train.jsonl", eval=f"{root}/gsm8k/test.jsonl",
                                               prompt_field="question", completion_field="answer", seq_len=256,
                                               max_train_examples=30 * 4, max_eval_examples=16)),
}


def one_run(spec: dict, root: str, method: str, lr: float, seed: int) -> dict:
    torch.manual_seed(seed)
    dcfg = spec["data"](root)
    labels = ["0", "1"] if spec["task"] == "seq-cls" else None
    model, tok = rw.load_model(spec["model"], task=spec["task"], num_labels=2 if labels else None)
    if labels:
        dcfg.labels = labels
    tr, ev = load_dataset(dcfg, tok, spec["task"])
    t0 = time.perf_counter()
    stats = None
    if method == "eva":
        calib = batchify(tr.examples[: spec["calib"]], tok, 16 if spec["task"] == "seq-cls" else 4)
        stats = rw.calibrate(model, calib, spec["targets"], keep=2 * spec["rank"], progress=False)
    # plain EVA (whiten=False: what this benchmark measured, before rankwise whitened by default)
    opts = {"rank": spec["rank"], "alpha": spec["alpha"]} | ({"seed": seed} if method == "lora" else {"whiten": False})
    p = rw.plan(stats, model, method=method, targets=spec["targets"], **opts)
    extra = {"modules_to_save": head_modules(model)} if spec["task"] == "seq-cls" else {}
    model = rw.adapt_(model, p, **extra)
    init_s = time.perf_counter() - t0
    cfg = TrainConfig(steps=spec["steps"], batch_size=spec["batch_size"], lr=lr, eval_every=spec["eval_every"], head_lr=spec.get("head_lr"),
                      warmup_steps=max(1, spec["steps"] // 10), seed=seed, save_every=10**9)
    res = train(model, tr, ev, cfg, tok, progress=False)
    curve = [{k: r[k] for k in ("step", "eval_loss", "eval_accuracy") if k in r} for r in res.history if "eval_loss" in r]
    return {"method": method, "lr": lr, "seed": seed, "init_seconds": init_s, "curve": curve,
            "final": curve[-1], "train_seconds": sum(1 / max(r["tokens_per_s"], 1e-9) for r in res.history)}


def steps_to(curve: list[dict], target: float) -> int | None:
    """First eval step whose eval loss is at or below target (None: never)."""
    return next((c["step"] for c in curve if c["eval_loss"] <= target), None)


def input_gain(spec: dict, root: str) -> dict:
    """Why the same LR is not the same step: how much of the layer inputs' energy A passes on.

    gain = mean over layers of ‖A X‖²_F / ‖X‖²_F (calibration inputs X), and the mean row norm of A.
    With B = 0, Adam's first updates to B have a fixed size, so the change of the output is ∝ ‖A x‖.
    """
    model, tok = rw.load_model(spec["model"], task=spec["task"], num_labels=2 if spec["task"] == "seq-cls" else None)
    tr, _ = load_dataset(spec["data"](root), tok, spec["task"])
    calib = batchify(tr.examples[: spec["calib"]], tok, 16 if spec["task"] == "seq-cls" else 4)
    stats = rw.calibrate(model, calib, spec["targets"], progress=False)  # keep="full": XᵀX for the gain
    out = {}
    for method in ("lora", "eva"):
        p = rw.plan(stats if method == "eva" else None, model, method=method, targets=spec["targets"], rank=spec["rank"],
                    **({"whiten": False} if method == "eva" else {}))
        gains, norms = [], []
        for n, lp in p.active().items():
            a, xtx = lp.lora_A.double(), stats[n].xtx
            gains.append(float(torch.trace(a @ xtx @ a.T) / torch.trace(xtx)))
            norms.append(float(a.norm(dim=1).mean()))
        out[method] = {"gain_mean": statistics.mean(gains), "row_norm_mean": statistics.mean(norms)}
    out["gain_ratio_eva_over_lora"] = out["eva"]["gain_mean"] / out["lora"]["gain_mean"]
    return out


def run_task(name: str, root: str, seeds: int, log) -> dict:
    spec = TASKS[name]
    gain = input_gain(spec, root) if spec.get("head_lr") is None else None
    if gain:
        log(f"[{name}] input gain ‖AX‖²/‖X‖²: lora {gain['lora']['gain_mean']:.4f} (row norm {gain['lora']['row_norm_mean']:.3f}), "
            f"eva {gain['eva']['gain_mean']:.4f} (row norm {gain['eva']['row_norm_mean']:.3f}); ratio {gain['gain_ratio_eva_over_lora']:.1f}")
    sweep = []
    for method in ("lora", "eva"):
        for lr in (spec["lrs"][method] if isinstance(spec["lrs"], dict) else spec["lrs"]):
            r = one_run(spec, root, method, lr, seed=0)
            log(f"[{name}] {method:4s} lr {lr:.0e} seed 0: final {r['final']}")
            sweep.append(r)
    best = {m: min((r for r in sweep if r["method"] == m), key=lambda r: r["final"]["eval_loss"])["lr"] for m in ("lora", "eva")}
    runs = {m: [r for r in sweep if r["method"] == m and r["lr"] == best[m]] for m in ("lora", "eva")}
    for seed in range(1, seeds):
        for m in ("lora", "eva"):
            r = one_run(spec, root, m, best[m], seed)
            log(f"[{name}] {m:4s} lr {best[m]:.0e} seed {seed}: final {r['final']}")
            runs[m].append(r)
    summary = {}
    for m in ("lora", "eva"):
        finals = [r["final"] for r in runs[m]]
        summary[m] = {"lr": best[m], "seeds": len(finals),
                      **{f"{k}_mean": statistics.mean(f[k] for f in finals) for k in finals[0] if k != "step"},
                      **{f"{k}_std": statistics.pstdev(f[k] for f in finals) for k in finals[0] if k != "step"}}
    # steps each method needs to reach random LoRA's final (mean) eval loss, per seed
    target = summary["lora"]["eval_loss_mean"]
    for m in ("lora", "eva"):
        summary[m]["steps_to_lora_final"] = [steps_to(r["curve"], target) for r in runs[m]]
    reached = [s for s in summary["eva"]["steps_to_lora_final"] if s is not None]
    summary["eva_steps_ratio"] = (statistics.mean(reached) / spec["steps"]) if len(reached) == len(runs["eva"]) else None
    return {"spec": {k: v for k, v in spec.items() if k != "data"}, "input_gain": gain, "sweep": sweep, "runs": runs,
            "summary": summary}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--task", choices=[*TASKS, "all"], default="all")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "convergence.json"))
    args = ap.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    for name in ("sst2", "gsm8k") if args.task == "all" else [args.task]:
        t = time.perf_counter()
        results[name] = run_task(name, args.data, args.seeds if name == "sst2" else 1, lambda s: print(s, flush=True))
        results[name]["wall_seconds"] = time.perf_counter() - t
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        s = results[name]["summary"]
        print(f"== {name}: " + "; ".join(f"{m} lr {s[m]['lr']:.0e} eval loss {s[m]['eval_loss_mean']:.4f}±{s[m]['eval_loss_std']:.4f}"
                                          + (f" acc {s[m]['eval_accuracy_mean']:.4f}±{s[m]['eval_accuracy_std']:.4f}" if "eval_accuracy_mean" in s[m] else "")
                                          + f" steps→LoRA final {s[m]['steps_to_lora_final']}" for m in ("lora", "eva"))
              + f"; EVA steps ratio {s['eva_steps_ratio']}", flush=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
