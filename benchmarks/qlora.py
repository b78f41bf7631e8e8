"""Fine-tuning on a compressed base, one run: QLoRA inits on GPTQ-quantized SmolLM2, PELA recovery of
SVD-LLM-compressed SmolLM2, and training memory on the quantized vs the float base.

Run: .venv/bin/python benchmarks/qlora.py [--data ../shared/data] [--part qlora|svd|memory|all]
Resumable: each finished run is a record in benchmarks/results/qlora.json, skipped when rerun (--fresh
starts over); --summary only prints the tables from what is recorded.

- qlora: SmolLM2 quantized with GPTQ (W3g64, W4g64, symmetric; 32 GSM8K train records to calibrate), then
  a rank-8 adapter (alpha 16, all linears) started by random LoRA, LoftQ, EVA (on the quantized model's
  activations) or the compensation term (EoRA), trained 60 steps of 2 GSM8K records on the answer tokens,
  each init at 5 learning rates; eval loss on the answer tokens of 16 GSM8K test records every 10 steps.
  No peer: peft's LoftQ asserts CUDA and needs bitsandbytes; random LoRA on the same base is the baseline.
- svd: SVD-LLM at 80 % and 60 % of the linears' parameters (pydoc calibration, 32×256 tokens), held-out
  pydoc perplexity (4,096 tokens, window 512) before and after PELA recovery (60 steps of 2×256 pydoc
  train tokens, the float model as teacher).
- memory: peak resident memory of 5 LoRA steps (batch 1 and 4 × 256 tokens) on the float base vs the RTN
  W4g64 base (the codes are what matters, not which quantizer made them), each in its own process that
  loads the base already made (torch.save of the module), so the quantized one never holds float linears.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import rankwise as rw
from rankwise.adapt import adapt_
from rankwise.compress.base import compress_base
from rankwise.data.sources import DataConfig, batchify, load_dataset, read_stream
from rankwise.methods import keep_for
from rankwise.train.loop import TrainConfig, eval_loss, train

sys.path.insert(0, str(Path(__file__).parent))
from quantize import Results, ppl  # noqa: E402
from resident import MMAP_ENV, peak_during, rss  # noqa: E402

HERE = Path(__file__).parent
BASES = {"W3g64": dict(bits=3, group_size=64), "W4g64": dict(bits=4, group_size=64)}
INITS = {"lora": {}, "loftq": {"iters": 3}, "eva": {"whiten": False}, "compensation": {}}  # plain EVA, as measured
LRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
RATIOS = [0.8, 0.6]


def gsm8k(root: str, tok, steps: int, batch: int):
    cfg = DataConfig(train=f"{root}/gsm8k/train.jsonl", eval=f"{root}/gsm8k/test.jsonl", prompt_field="question",
                     completion_field="answer", seq_len=256, max_train_examples=steps * batch, max_eval_examples=16)
    return load_dataset(cfg, tok, "causal-lm")


def init_plan(qmodel, originals, calib, method: str):
    keep = keep_for([method], 8, 2.0)
    stats = rw.calibrate(qmodel, calib, "all-linear", keep=keep, progress=False) if keep else None
    return rw.plan(stats, qmodel, method=method, originals=originals, rank=8, alpha=16, **INITS[method])


def qlora(res: Results, args) -> None:
    base, tok = rw.load_model("smollm2")
    tr, ev = gsm8k(args.data, tok, args.steps, args.batch)
    calib = batchify(tr.examples[:32], tok, 4)
    eval_batches = batchify(ev.examples, tok, 4)
    for bname, grid in BASES.items():
        todo = [(m, lr) for m in INITS for lr in LRS if not res.has(f"qlora/{bname}/{m}/{lr:g}")]
        if not todo:
            continue
        qmodel = copy.deepcopy(base)
        t = time.perf_counter()
        _, originals = compress_base(qmodel, calib, "gptq", progress=False, **grid)
        print(f"{bname}: GPTQ in {time.perf_counter() - t:.0f} s", flush=True)
        for method in INITS:
            lrs = [lr for m, lr in todo if m == method]
            if not lrs:
                continue
            t = time.perf_counter()
            p = init_plan(qmodel, originals, calib, method)
            init_s = time.perf_counter() - t
            for lr in lrs:
                torch.manual_seed(0)
                pm = adapt_(copy.deepcopy(qmodel), copy.deepcopy(p))
                start = eval_loss(pm, eval_batches, "causal-lm", "cpu")["eval_loss"]
                cfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=lr, eval_every=args.eval_every,
                                  warmup_steps=6, seed=0, save_every=10**9)
                t = time.perf_counter()
                out = train(pm, tr, ev, cfg, tok, progress=False)
                curve = [{"step": 0, "eval_loss": start}] + [{"step": r["step"], "eval_loss": r["eval_loss"]}
                                                             for r in out.history if "eval_loss" in r]
                res.put(f"qlora/{bname}/{method}/{lr:g}", {
                    "base": bname, "init": method, "lr": lr, "curve": curve, "final": curve[-1]["eval_loss"],
                    "train_loss": [r["loss"] for r in out.history], "init_seconds": init_s,
                    "train_seconds": time.perf_counter() - t})
                del pm


def svd(res: Results, args) -> None:
    from rankwise.compress import compress
    from rankwise.compress.recover import recover, teacher_copy

    base, tok = rw.load_model("smollm2")
    stream = read_stream("pydoc", tok, "eval")[:4096]
    if not res.has("svd/fp"):
        res.put("svd/fp", {"perplexity": ppl(base, stream)})
    calib = rw.load_data("pydoc", tok, seq_len=256, n=32, batch_size=4)
    data, _ = load_dataset(DataConfig(seq_len=256, max_train_examples=args.steps * 2), tok, "causal-lm")
    for ratio in RATIOS:
        if res.has(f"svd/{ratio:g}/recovered"):
            continue
        model = copy.deepcopy(base)
        compress(model, calib, "svd-llm", progress=False, ratio=ratio)
        if not res.has(f"svd/{ratio:g}/none"):
            res.put(f"svd/{ratio:g}/none", {"perplexity": ppl(model, stream)})
        t = time.perf_counter()
        r = recover(model, teacher_copy(base), data, tok, TrainConfig(steps=args.steps, batch_size=2, lr=args.recover_lr,
                                                                        warmup_steps=6, save_every=10**9), progress=False)
        res.put(f"svd/{ratio:g}/recovered", {"perplexity": ppl(model, stream), "distill_before": r.before,
                                             "distill_after": r.after, "reverted": r.reverted, "lr": args.recover_lr,
                                             "loss": [h["loss"] for h in r.history], "seconds": time.perf_counter() - t})


MEMORY_BATCHES = [1, 4]


def memory_probe(path: str, root: str, batch: int) -> dict:
    """One process: unpickle a saved model (float, or with its linears quantized already, so that no float
    weight of theirs is ever in this process), adapt, then 5 LoRA steps of batch×256 tokens while a thread
    samples the resident memory."""
    from transformers import AutoTokenizer

    base = torch.load(path, weights_only=False)
    tok = AutoTokenizer.from_pretrained(Path(path).parent / "tokenizer")
    tr, _ = gsm8k(root, tok, 5, batch)
    pm = adapt_(base, rw.plan(None, base, method="lora", rank=8, alpha=16))
    held = sum(t.numel() * t.element_size() for t in list(pm.parameters()) + list(pm.buffers()))
    before = rss()
    _, _, peak = peak_during(lambda: train(pm, tr, None, TrainConfig(steps=5, batch_size=batch, lr=1e-4, save_every=10**9),
                                           tok, progress=False))
    return {"model_bytes": held, "rss_before_training": before, "peak_rss_training": peak, "batch": batch}


def memory(res: Results, args) -> None:
    """Each base saved once (torch.save of the whole module), then each probe in its own process."""
    import tempfile

    todo = [(k, b) for k in ("fp", "W4g64") for b in MEMORY_BATCHES if not res.has(f"memory/{k}/b{b}")]
    if not todo:
        return
    with tempfile.TemporaryDirectory() as tmp:
        base, tok = rw.load_model("smollm2")
        tok.save_pretrained(Path(tmp) / "tokenizer")
        for kind in sorted({k for k, _ in todo}):
            model = copy.deepcopy(base)
            if kind != "fp":  # RTN: the codes are what matters here, not which quantizer made them
                compress_base(model, None, "rtn", progress=False, **BASES[kind])
            torch.save(model, Path(tmp) / f"{kind}.pt")
            del model
        del base
        env = os.environ | MMAP_ENV  # resident memory that follows what is alive (see resident.py)
        for kind, batch in todo:
            out = subprocess.run([sys.executable, __file__, "--memory-probe", str(Path(tmp) / f"{kind}.pt"),
                                  "--data", args.data, "--batch", str(batch)],
                                 check=True, capture_output=True, text=True, env=env).stdout
            res.put(f"memory/{kind}/b{batch}", json.loads(out.strip().splitlines()[-1]))


def steps_to(curve: list[dict], target: float) -> int | None:
    return next((c["step"] for c in curve if c["eval_loss"] <= target), None)


def summarize(records: dict) -> dict:
    """Per base: each init's best lr (lowest final eval loss) and the first eval step at which it reaches
    random LoRA's best final loss; the target is met when the best of the others does so by 70 % of the steps."""
    out = {}
    for bname in BASES:
        runs = [r for k, r in records.items() if k.startswith(f"qlora/{bname}/")]
        best = {}
        for r in runs:
            if r["init"] not in best or r["final"] < best[r["init"]]["final"]:
                best[r["init"]] = r
        if "lora" not in best:
            continue
        target = best["lora"]["final"]
        rows = {m: {"lr": r["lr"], "start": r["curve"][0]["eval_loss"], "final": r["final"],
                    "steps_to_random_final": steps_to(r["curve"], target)} for m, r in best.items()}
        total = best["lora"]["curve"][-1]["step"]
        others = [v["steps_to_random_final"] for m, v in rows.items() if m != "lora" and v["steps_to_random_final"]]
        out[bname] = {"inits": rows, "random_final": target, "steps": total,
                      "best_other_steps": min(others) if others else None,
                      "target_met": bool(others) and min(others) <= 0.7 * total}
    fp = records.get("svd/fp", {}).get("perplexity")
    for ratio in RATIOS:
        a, b = records.get(f"svd/{ratio:g}/none"), records.get(f"svd/{ratio:g}/recovered")
        if fp and a and b:
            out[f"svd{ratio:g}"] = {"fp": fp, "compressed": a["perplexity"], "recovered": b["perplexity"],
                                    "gap_closed": (a["perplexity"] - b["perplexity"]) / (a["perplexity"] - fp)}
    for b in MEMORY_BATCHES:
        fp, q = records.get(f"memory/fp/b{b}"), records.get(f"memory/W4g64/b{b}")
        if fp and q:
            out[f"memory_b{b}"] = {k: {"model_mb": r["model_bytes"] / 2**20, "before_gb": r["rss_before_training"] / 2**30,
                                       "peak_gb": r["peak_rss_training"] / 2**30,
                                       "training_gb": (r["peak_rss_training"] - r["rss_before_training"]) / 2**30}
                                   for k, r in (("fp", fp), ("W4g64", q))}
    return out


NAMES = {"lora": "random LoRA", "loftq": "LoftQ (T = 3)", "eva": "EVA (on the quantized activations)",
         "compensation": "compensation (EoRA r8)"}


def _e(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def tables(records: dict) -> str:
    """The README's markdown tables, from the records."""
    summary, lines = summarize(records), []
    for bname in BASES:
        if bname not in summary:
            continue
        sm = summary[bname]
        lines += [f"{bname}: random LoRA's best final loss {sm['random_final']:.3f}", "",
                  "| init | eval loss at step 0 | " + " | ".join(f"lr {_e(lr)}" for lr in LRS)
                  + f" | best lr | first eval step ≤ {sm['random_final']:.3f} |",
                  "|---|" + "---:|" * (len(LRS) + 3)]
        for m, row in sm["inits"].items():
            cells = []
            for lr in LRS:
                r = records.get(f"qlora/{bname}/{m}/{lr:g}")
                cells.append("–" if r is None else f"**{r['final']:.3f}**" if lr == row["lr"] else f"{r['final']:.3f}")
            reached = row["steps_to_random_final"]
            lines.append(f"| {NAMES[m]} | {row['start']:.3f} | " + " | ".join(cells)
                         + f" | {_e(row['lr'])} | {reached if reached is not None else 'not in ' + str(sm['steps'])} |")
        lines.append("")
    for b in MEMORY_BATCHES:
        if (m := summary.get(f"memory_b{b}")) is None:
            continue
        if b == MEMORY_BATCHES[0]:
            lines += ["| base | batch | model bytes (MiB) | resident before training (GiB) | peak while training (GiB) | "
                      "added by training (GiB) |", "|---|---:|---:|---:|---:|---:|"]
        for k, r in m.items():
            lines.append(f"| {k} | {b}×256 | {r['model_mb']:.0f} | {r['before_gb']:.2f} | {r['peak_gb']:.2f} | "
                         f"{r['training_gb']:.2f} |")
    return "\n".join(lines)


def plot(records: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(records)
    bases = [b for b in BASES if b in summary]
    if not bases:
        return
    fig, axes = plt.subplots(1, len(bases), figsize=(5.5 * len(bases), 4), squeeze=False)
    for ax, bname in zip(axes[0], bases):
        for m, row in summary[bname]["inits"].items():
            r = records[f"qlora/{bname}/{m}/{row['lr']:g}"]
            ax.plot([c["step"] for c in r["curve"]], [c["eval_loss"] for c in r["curve"]], marker="o",
                    label=f"{m} (lr {row['lr']:g})")
        ax.axhline(summary[bname]["random_final"], color="gray", ls=":", lw=1)
        ax.set(title=f"SmolLM2 GPTQ {bname}: GSM8K answer-token eval loss", xlabel="step", ylabel="eval loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data"))
    ap.add_argument("--part", default="all", choices=["qlora", "svd", "memory", "all"])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--recover-lr", type=float, default=1e-4)
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--summary", action="store_true")
    ap.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(HERE / "results" / "qlora.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(os.cpu_count() or 1)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.data, args.batch)))
        return
    setup = {"args": {"n": 32, "seq_len": 256, "eval_tokens": 4096, "steps": args.steps, "batch": args.batch},
             "machine": f"{os.cpu_count()} CPU cores", "torch": torch.__version__}
    res = Results(Path(args.out), args.fresh, setup)
    if not args.summary:
        for part in (["qlora", "svd", "memory"] if args.part == "all" else [args.part]):
            {"qlora": qlora, "svd": svd, "memory": memory}[part](res, args)
    res.data["summary"] = summarize(res.data["records"])
    res.put("_summary_written", {"at": time.strftime("%Y-%m-%d %H:%M")})
    plot(res.data["records"], Path(args.out).with_suffix(".png"))
    print(json.dumps(res.data["summary"], indent=1))
    print(tables(res.data["records"]))


if __name__ == "__main__":
    main()
