"""Every registered init at the same rank and step budget, learning rate swept per method, one run.

(a) sst2: all-MiniLM-L6-v2 + fresh head on SST-2, 150 steps × 32, dev accuracy on all 872 dev sentences.
(b) gsm8k: SmolLM2-135M on GSM8K (prompt = question, loss on the answer tokens), 30 steps × 4 × 256,
    answer-token eval loss on 16 test records every 5 steps, and the steps to reach random LoRA's final loss.

Rows: every registered method at its defaults, EVA twice: eva (plain, whiten=False: the paper's and peft's
default) and eva-whiten (whiten=True, the variant that closed its SST-2 gap in benchmarks/eva_gap.py, whose
seed-0 SST-2 runs were copied in; rankwise's default since it won on both tasks). Per method: four learning rates on the 1-3-10 ladder (two below the method's default, the default, one
above), widened by one rung past an edge while the best is at that edge (at most 7), then seeds 1 and 2 at the best rate. The default rate each method gets from this: among the rates run on
both tasks, the one whose worse task comes closest to that task's best (relative score: accuracy / best
accuracy, best loss / loss), once both grids are settled (best not at an open edge). Each run
records its init time (calibration, gradients, plan, adapt) and the time of one forward pass over the same
calibration tokens in the same process, for the ratio. Resumable: one record per finished run in
benchmarks/results/init_zoo.json, skipped when rerun; --summary prints the tables from what is there.

Run: .venv/bin/python benchmarks/init_zoo.py [--task sst2|gsm8k|all] [--methods a,b] [--data ../shared/data]
     [--stage sweep|widen|seeds|all] [--summary]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import rankwise as rw
from rankwise.calib.gradients import calibrate_gradients
from rankwise.cli.runs import head_modules
from rankwise.data import DataConfig, batchify, load_dataset
from rankwise.methods import get_init, grads_for, keep_for
from rankwise.train import TrainConfig, train

HERE = Path(__file__).parent
METHODS = ["lora", "rslora", "eva", "eva-whiten", "pissa", "olora", "milora", "corda", "lora-ga", "lora-sb", "lora-one", "svfit"]
TASKS = {
    "sst2": dict(model="minilm", task="seq-cls", targets=["query", "key", "value", "dense"], rank=8, alpha=16,
                 steps=150, batch_size=32, eval_every=15, calib=256, calib_batch=16,
                 data=lambda root: DataConfig(train=f"{root}/sst2/train.tsv", eval=f"{root}/sst2/dev.tsv",
                                              text_field="sentence", seq_len=64, max_train_examples=150 * 32,
                                              max_eval_examples=None, labels=["0", "1"])),
    "gsm8k": dict(model="smollm2", task="causal-lm", targets="all-linear", rank=8, alpha=16,
                  steps=30, batch_size=4, eval_every=5, calib=32, calib_batch=4,
                  data=lambda root: DataConfig(train=f"{root}/gsm8k/train.jsonl", eval=f"{root}/gsm8k/test.jsonl",
                                               prompt_field="question", completion_field="answer", seq_len=256,
                                               max_train_examples=30 * 4, max_eval_examples=16)),
}
# Rows that are a registered method with options other than its defaults: name -> (method, variant).
ROWS = {"eva": ("eva", {"opts": {"whiten": False}}), "eva-whiten": ("eva", {"opts": {"whiten": True}})}
# The row that is the registered method at its current defaults, where that is not the row of the same name.
AT_DEFAULTS = {"eva": "eva-whiten"}
METRIC = {"sst2": ("eval_accuracy", max), "gsm8k": ("eval_loss", min)}
MAX_GRID = 7


def key(task: str, method: str, lr: float, seed: int) -> str:
    return f"{task}/{method}/{lr:.3g}/s{seed}"


LADDER = [float(f"{m}e{k}") for k in range(-6, 0) for m in (1, 3)]  # 1e-6, 3e-6, …, 1e-1, 3e-1


def _rung(lr: float) -> int:
    return min(range(len(LADDER)), key=lambda i: abs(math.log(LADDER[i] / lr)))


# Each method's default rate when the sweep started: the grid's centre stays put when the sweep's results
# become the defaults (later methods, not listed, centre on their current default).
GRID_CENTRE = {"lora": 1e-3, "rslora": 1e-3, "eva": 5e-4, "eva-whiten": 5e-4, "pissa": 5e-4, "olora": 5e-4, "milora": 5e-4, "corda": 5e-4,
               "lora-ga": 5e-5, "lora-sb": 1e-3, "lora-one": 2e-4, "svfit": 1e-3}


def base_grid(method: str) -> list[float]:
    """Four rungs of the 1-3-10 ladder: two below the method's centre rate, the centre, one above."""
    i = _rung(GRID_CENTRE.get(method) or get_init(method).default_lr)
    return LADDER[max(0, i - 2): i + 2]


class Results:
    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"records": {}}

    def has(self, k: str) -> bool:
        return k in self.data["records"]

    def put(self, k: str, rec: dict) -> None:
        self.data["records"][k] = rec
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)
        final = {k2: round(v, 4) for k2, v in rec["final"].items() if k2 != "step"}
        print(f"{k}: {final} init {rec['init_seconds']:.1f}s ({rec['init_over_forward']:.2f}× forward)", flush=True)


def _forward_seconds(model, calib) -> float:
    t = time.perf_counter()
    with torch.no_grad():
        for b in calib:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    return time.perf_counter() - t


def _kaiming_energy_scale_(model, stats, rank: int) -> dict[str, float]:
    """Scale each layer's A (B = 0, so the outputs do not move) so that E‖Ax‖² equals what peft's Kaiming-uniform
    A passes on the same inputs: r·E‖x‖²/(3·d) (rows U(±1/√d)). EVA's rows are unit eigenvectors of the scatter
    and pass Σᵢ(λᵢ/n + (vᵢ·μ)²). Returns the factor per layer."""
    factors = {}
    for name, mod in model.named_modules():
        if not hasattr(mod, "lora_A") or "default" not in getattr(mod, "lora_A", {}):
            continue
        key_ = name.removeprefix("base_model.model.")
        if key_ not in stats:
            continue
        st, a = stats[key_], mod.lora_A["default"].weight
        r, d = a.shape
        mu = st.mean
        second = (st.spectrum(1)[2] / st.n + float(mu @ mu))  # E‖x‖² = tr(scatter)/n + ‖μ‖²
        rows = a.detach().double()
        eva = float(((rows @ mu) ** 2).sum() + (st.spectrum(r)[0][:r] / st.n).sum())
        c = math.sqrt(r * second / (3 * d) / max(eva, 1e-30))
        with torch.no_grad():
            a.mul_(c)
        factors[key_] = c
    return factors


def one_run(task: str, root: str, method: str, lr: float, seed: int, variant: dict | None = None) -> dict:
    """One training run. variant (the EVA gap study, benchmarks/eva_gap.py): "opts" (method options over the
    task's), "head_lr", "calib" (sentences), "targets", "a_scale" ("kaiming-energy")."""
    row, variant = method, variant or {}
    if row in ROWS:
        method, fixed = ROWS[row]
        variant = {**fixed, **variant, "opts": {**fixed.get("opts", {}), **variant.get("opts", {})}}
    spec = {**TASKS[task], **{k: variant[k] for k in ("calib", "targets") if k in variant}}
    torch.manual_seed(seed)
    dcfg = spec["data"](root)
    model, tok = rw.load_model(spec["model"], task=spec["task"], labels=dcfg.labels)
    tr, ev = load_dataset(dcfg, tok, spec["task"])
    calib = batchify(tr.examples[: spec["calib"]], tok, spec["calib_batch"])
    forward_s = _forward_seconds(model, calib)
    opts = {"rank": spec["rank"], "alpha": spec["alpha"], **variant.get("opts", {})}
    impl = get_init(method)
    if "seed" in impl.config.model_fields:
        opts["seed"] = seed
    if "first_lr" in impl.config.model_fields:  # LoRA-SB: the first step this run's schedule takes
        opts["first_lr"] = lr / (max(1, spec["steps"] // 10) + 1)
    t0 = time.perf_counter()
    keep = keep_for([method], spec["rank"], opts.get("rho", 2.0))
    stats = rw.calibrate(model, calib, spec["targets"], keep=keep, progress=False) if keep is not None else None
    if grads_for([method]):
        stats = calibrate_gradients(model, calib, spec["targets"], stats, progress=False)
    p = rw.plan(stats, model, method=method, targets=spec["targets"], **opts)
    extra = {"modules_to_save": head_modules(model)} if spec["task"] == "seq-cls" else {}
    model = rw.adapt_(model, p, **extra)
    a_scale = None
    if variant.get("a_scale") == "kaiming-energy":
        a_scale = _kaiming_energy_scale_(model, stats, spec["rank"])
    init_s = time.perf_counter() - t0
    trainable = sum(t.numel() for n, t in model.named_parameters() if t.requires_grad and "modules_to_save" not in n)
    cfg = TrainConfig(steps=spec["steps"], batch_size=spec["batch_size"], lr=lr, eval_every=spec["eval_every"],
                      warmup_steps=max(1, spec["steps"] // 10), seed=seed, save_every=10**9,
                      head_lr=variant.get("head_lr"))
    t1 = time.perf_counter()
    res = train(model, tr, ev, cfg, tok, progress=False)
    curve = [{k: r[k] for k in ("step", "eval_loss", "eval_accuracy") if k in r} for r in res.history if "eval_loss" in r]
    return {"task": task, "method": row, "lr": lr, "seed": seed, "init_seconds": init_s, "forward_seconds": forward_s,
            "init_over_forward": init_s / forward_s, "trainable": trainable, "curve": curve, "final": curve[-1],
            "train_seconds": time.perf_counter() - t1, "variant": variant,
            **({"a_scale_median": statistics.median(a_scale.values())} if a_scale else {})}


def sweep_runs(records: dict, task: str, method: str) -> dict[float, dict]:
    return {r["lr"]: r for k, r in records.items() if k.startswith(f"{task}/{method}/") and r["seed"] == 0}


def best_lr(records: dict, task: str, method: str) -> float | None:
    runs = sweep_runs(records, task, method)
    if not runs:
        return None
    name, pick = METRIC[task]
    return pick(runs, key=lambda lr: runs[lr]["final"][name])


def settled(records: dict, task: str, method: str) -> bool:
    """Whether the sweep is over: runs exist and the best is interior, or the grid is full."""
    return bool(sweep_runs(records, task, method)) and next_lr(records, task, method) is None


def default_lr(records: dict, method: str) -> dict | None:
    """The rate for the method's default: of the rates run on both tasks at seed 0, the one whose worse relative
    score (accuracy / best accuracy on SST-2, best loss / loss on GSM8K) is highest. None until both sweeps
    are settled."""
    if not all(settled(records, task, method) for task in TASKS):
        return None
    rel = {}
    for task, (name, pick) in METRIC.items():
        runs = {lr: r["final"][name] for lr, r in sweep_runs(records, task, method).items()}
        best = pick(runs.values())
        rel[task] = {lr: (v / best if pick is max else best / v) for lr, v in runs.items()}
    common = sorted(set.intersection(*(set(r) for r in rel.values())))
    if not common:
        return None
    lr = max(common, key=lambda x: min(rel[t][x] for t in TASKS))
    return {"lr": lr, **{task: round(rel[task][lr], 4) for task in TASKS}}


def next_lr(records: dict, task: str, method: str) -> float | None:
    """The value past the grid's edge when the best is at that edge (None: interior, or the grid is full)."""
    runs = sweep_runs(records, task, method)
    lrs = sorted(runs)
    best = best_lr(records, task, method)
    if best is None or len(lrs) >= MAX_GRID or not (best == lrs[0] or best == lrs[-1]):
        return None
    i = _rung(lrs[0]) - 1 if best == lrs[0] else _rung(lrs[-1]) + 1
    return LADDER[i] if 0 <= i < len(LADDER) else None


def run_all(res: Results, tasks: list[str], methods: list[str], root: str, stages: list[str]) -> None:
    def go(task, method, lr, seed):
        k = key(task, method, lr, seed)
        if not res.has(k):
            res.put(k, one_run(task, root, method, lr, seed))

    for task in tasks:
        if "sweep" in stages:
            for method in methods:
                for lr in base_grid(method):
                    go(task, method, lr, 0)
        if "widen" in stages:
            for method in methods:
                while (lr := next_lr(res.data["records"], task, method)) is not None:
                    go(task, method, lr, 0)
        if "seeds" in stages:
            for method in methods:
                if settled(res.data["records"], task, method):
                    lr = best_lr(res.data["records"], task, method)
                    for seed in (1, 2):
                        go(task, method, lr, seed)


def summarize(records: dict) -> dict:
    out = {}
    for task in TASKS:
        name, pick = METRIC[task]
        rows = {}
        for method in METHODS:
            best = best_lr(records, task, method)
            if best is None:
                continue
            seeds = [r for k, r in records.items() if k.startswith(f"{task}/{method}/") and r["lr"] == best]
            finals = [r["final"][name] for r in seeds]
            grid = sorted(sweep_runs(records, task, method))
            rows[method] = {"best_lr": best, "edge": best in (grid[0], grid[-1]), "grid": grid, "seeds": len(seeds),
                            "mean": statistics.mean(finals), "std": statistics.pstdev(finals) if len(finals) > 1 else None,
                            "init_over_forward": statistics.median(r["init_over_forward"] for r in seeds),
                            "trainable": seeds[0]["trainable"]}
        if task == "gsm8k" and "lora" in rows:
            target = rows["lora"]["mean"]
            for method, row in rows.items():
                curves = [r["curve"] for k, r in records.items() if k.startswith(f"gsm8k/{method}/") and r["lr"] == row["best_lr"]]
                reached = [next((c["step"] for c in cv if c["eval_loss"] <= target), None) for cv in curves]
                row["steps_to_lora_final"] = reached
        out[task] = rows
    out["defaults"] = {}
    for method in (m for m in METHODS if m not in ROWS or ROWS[m][0] == m):  # registered methods, not variant rows
        row = AT_DEFAULTS.get(method, method)
        pick = default_lr(records, row)
        if pick is not None:
            out["defaults"][method] = {"row": row, **pick}
    return out


def tables(summary: dict) -> str:
    lines = []
    for task, rows in summary.items():
        if not rows or task not in TASKS:
            continue
        name = METRIC[task][0].removeprefix("eval_")
        extra = " | steps to random LoRA's final loss" if task == "gsm8k" else ""
        lines += [f"{task}:", "", f"| method | best lr | {name} (mean ± std, seeds) | lrs tried | trainable | init / forward{extra} |",
                  "|---|---:|---:|---|---:|---:|" + ("---:|" if extra else "")]
        for method, r in sorted(rows.items(), key=lambda kv: -kv[1]["mean"] if task == "sst2" else kv[1]["mean"]):
            std = f" ± {r['std']:.4f}" if r["std"] is not None else ""
            edge = " (edge)" if r["edge"] else ""
            cell = f" | {r['steps_to_lora_final']}" if extra else ""
            lines.append(f"| {method} | {r['best_lr']:.0e}{edge} | {r['mean']:.4f}{std} ({r['seeds']}) | "
                         f"{', '.join(f'{x:.0e}' for x in r['grid'])} | {r['trainable']:,} | {r['init_over_forward']:.2f}{cell} |")
        lines.append("")
    if summary.get("defaults"):
        lines += ["defaults (the rate whose worse task is closest to that task's best; relative scores):", "",
                  "| method | row | default lr | sst2 acc / best | gsm8k best loss / loss |", "|---|---|---:|---:|---:|"]
        for method, d in summary["defaults"].items():
            lines.append(f"| {method} | {d['row']} | {d['lr']:.0e} | {d['sst2']:.3f} | {d['gsm8k']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def plot(records: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, task in zip(axes, TASKS):
        name = METRIC[task][0]
        for method in METHODS:
            runs = sweep_runs(records, task, method)
            if runs:
                lrs = sorted(runs)
                ax.plot(lrs, [runs[lr]["final"][name] for lr in lrs], marker="o", label=method)
        ax.set(xscale="log", xlabel="learning rate", ylabel=name.removeprefix("eval_"),
               title={"sst2": "MiniLM / SST-2, 150×32: dev accuracy", "gsm8k": "SmolLM2 / GSM8K, 30×4: answer loss"}[task])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=[*TASKS, "all"], default="all")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--stage", choices=["sweep", "widen", "seeds", "all"], default="all")
    ap.add_argument("--data", default=str(HERE.resolve().parents[1] / "shared" / "data"))
    ap.add_argument("--summary", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "init_zoo.json"))
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    res = Results(Path(args.out))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {METHODS}")
    if not args.summary:
        tasks = list(TASKS) if args.task == "all" else [args.task]
        run_all(res, tasks, methods, args.data, ["sweep", "widen", "seeds"] if args.stage == "all" else [args.stage])
    summary = summarize(res.data["records"])
    res.data["summary"] = summary
    res.data["setup"] = {"machine": f"{os.cpu_count()} CPU cores", "torch": torch.__version__}
    res.path.parent.mkdir(parents=True, exist_ok=True)
    res.path.write_text(json.dumps(res.data, indent=1))
    plot(res.data["records"], res.path.with_suffix(".png"))
    print(tables(summary))


if __name__ == "__main__":
    main()
