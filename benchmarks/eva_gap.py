"""What closes EVA's SST-2 gap to random LoRA? One change at a time against plain EVA (peft's defaults; the
study led rankwise to whiten by default), same budget as
benchmarks/init_zoo.py (MiniLM + fresh head, 150 steps × 32, all 872 dev sentences, seed 0, rank 8, alpha 16).

Variants: A rescaled so that it passes the input energy of a Kaiming-uniform A; peft's whitening; alpha 8 and
32; uniform ranks (rho 1) and a wider redistribution (rho 4); 4× the calibration sentences; attention only;
the classifier head at its own learning rate (and random LoRA with that head rate, since it helps both).
Runs already in init_zoo.json with the same settings are reused, not rerun. Resumable: one record per
finished run in benchmarks/results/eva_gap.json.

Run: .venv/bin/python benchmarks/eva_gap.py [--lrs 1e-3,3e-3] [--variants a,b] [--summary]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from init_zoo import HERE, Results, key, one_run

VARIANTS = {  # name: (method, variant, what it changes)
    "eva": ("eva", {}, "plain EVA (rho 2, alpha 16, 256 calibration sentences, head at the adapter's lr)"),
    "a-kaiming": ("eva", {"a_scale": "kaiming-energy"}, "A scaled per layer to pass a Kaiming A's input energy"),
    "whiten": ("eva", {"opts": {"whiten": True}}, "A's rows divided by √(singular value) (peft's whiten)"),
    "alpha8": ("eva", {"opts": {"alpha": 8}}, "alpha 8 (scale 1)"),
    "alpha32": ("eva", {"opts": {"alpha": 32}}, "alpha 32 (scale 4)"),
    "rho1": ("eva", {"opts": {"rho": 1.0}}, "uniform ranks (rho 1)"),
    "rho4": ("eva", {"opts": {"rho": 4.0}}, "ranks redistributed more widely (rho 4)"),
    "calib1024": ("eva", {"calib": 1024}, "1024 calibration sentences (4×)"),
    "attn-only": ("eva", {"targets": ["query", "key", "value"]}, "rank on query/key/value only"),
    "head1e-2": ("eva", {"head_lr": 1e-2}, "classifier head at lr 1e-2"),
    "lora-head1e-2": ("lora", {"head_lr": 1e-2}, "random LoRA, classifier head at lr 1e-2"),
}


def run(res: Results, zoo: dict, root: str, names: list[str], lrs: list[float]) -> None:
    for lr in lrs:
        for name in names:
            method, variant, _ = VARIANTS[name]
            k = f"{name}/{lr:.3g}"
            if res.has(k):
                continue
            reuse = zoo.get(key("sst2", method, lr, 0)) if not variant else None
            res.put(k, reuse or one_run("sst2", root, method, lr, 0, variant))


def table(records: dict, zoo: dict) -> str:
    lines = ["| variant | what it changes | lr | dev accuracy | vs plain EVA | vs random LoRA |",
             "|---|---|---:|---:|---:|---:|"]
    for name, (method, _, what) in VARIANTS.items():
        for k, r in sorted(records.items(), key=lambda kv: kv[1]["lr"]):
            if k.split("/")[0] != name:
                continue
            acc = r["final"]["eval_accuracy"]
            base = records.get(f"eva/{r['lr']:.3g}")
            lora = zoo.get(key("sst2", "lora", r["lr"], 0))
            d_eva = f"{acc - base['final']['eval_accuracy']:+.4f}" if base and name != "eva" else ""
            d_lora = f"{acc - lora['final']['eval_accuracy']:+.4f}" if lora else ""
            lines.append(f"| {name} | {what} | {r['lr']:.0e} | {acc:.4f} | {d_eva} | {d_lora} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lrs", default="1e-3")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--data", default=str(HERE.resolve().parents[1] / "shared" / "data"))
    ap.add_argument("--summary", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "eva_gap.json"))
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    zoo_path = HERE / "results" / "init_zoo.json"
    zoo = json.loads(zoo_path.read_text())["records"] if zoo_path.exists() else {}
    res = Results(Path(args.out))
    if not args.summary:
        run(res, zoo, args.data, names, [float(x) for x in args.lrs.split(",")])
    print(table(res.data["records"], zoo))


if __name__ == "__main__":
    main()
