"""Compression benchmark (issue 11): SVD methods, GPTQ + low-rank compensation, mixed precision and the
joint planner on SmolLM2 and MiniLM, one run; the Pareto figure of perplexity vs bytes.

Run: .venv/bin/python benchmarks/compress.py [--only smollm2|minilm] [--fresh]   (2-core CPU: ~45 min)
Resumable: each finished configuration is a record in benchmarks/results/compress.json, skipped when rerun.

Same setup as benchmarks/quantize.py: calibration 32 × 256 pydoc tokens (SmolLM2) / 32 SST-2 train
sentences (MiniLM); SmolLM2 held-out perplexity on 4,096 pydoc held-out tokens (windows of 512); MiniLM
mean cosine of sentence embeddings to fp32 on all 872 SST-2 dev sentences (needs ../shared/data/sst2).
Size: bytes of the targeted linears as stored (codes + float16 scales + float16 compensation factors;
SVD factors and dense layers in float16). Embeddings and norms are the same for every method and not counted.

(a) svd, asvd, svd-llm at 90/80/60 % of the linears' parameters (global rank allocation);
(b) GPTQ W3g64 and W2g32, alone and + LoRC / EoRA at ranks 8/16/32;
(c) mixed precision (GPTQ, bits from {2, 3, 4, 8}, group 64) at 3.5 and 2.5 average bits vs uniform GPTQ
    W3g32 (3.5 bits) and W2g32 (2.5 bits), the same size;
(d) the joint planner (bits {2, 3, 4, 8} g64 × EoRA ranks {0, 8, 16, 32}; `joint+svd`: × SVD-LLM ranks too)
    at 3 budgets vs the best single method at no more bytes.
Records of (a) and (b) may come from an earlier run of the same script (resumed); a record is rerun by
deleting its key from the JSON.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import rankwise as rw  # noqa: E402
from quantize import Results, minilm_setup, ppl  # noqa: E402  (the same result file logic and perplexity setup)
from rankwise.compress import compress, compress_planned, lowrank_layers  # noqa: E402
from rankwise.data.sources import read_stream  # noqa: E402
from rankwise.quant import quantize, quantized_layers  # noqa: E402
from rankwise.targets import find_targets  # noqa: E402

SVD = [(m, r) for m in ("svd", "asvd", "svd-llm") for r in (0.9, 0.8, 0.6)]
COMPENSATED = [(bits, group, kind, rank) for bits, group in ((3, 64), (2, 32))
               for kind, rank in [("none", 0)] + [(k, r) for k in ("lorc", "eora") for r in (8, 16, 32)]]
UNIFORM = [(3, 32), (4, 64)]  # beside (b)'s W3g64 and W2g32: the uniform grids at mixed precision's sizes and above
MIXED = [3.5, 2.5]
BUDGETS_MB = {"smollm2": [36.0, 48.0, 64.0], "minilm": [4.0, 5.5, 7.5]}


def linear_bytes(model, names) -> float:
    """Bytes of the targeted linears as stored (see the module docstring)."""
    q, lr = quantized_layers(model), lowrank_layers(model)
    total = 0.0
    for n in names:
        if n in q:
            total += q[n].bits_per_weight * q[n].codes.numel() / 8
        elif n in lr:
            total += 2 * lr[n].n_params
        else:
            total += 2 * model.get_submodule(n).weight.numel()
    return total


def runs():
    """(key, function(model, batches) → extra record fields) for every configuration, in order."""
    out = []
    for m, r in SVD:
        out.append((f"{m}/{int(r * 100)}%", lambda mod, b, m=m, r=r: _svd(mod, b, m, r)))
    for bits, group, kind, rank in COMPENSATED:
        name = f"gptq/W{bits}g{group}" + ("" if kind == "none" else f"+{kind}{rank}")
        extra = {} if kind == "none" else {"compensate": kind, "compensate_rank": rank}
        out.append((name, lambda mod, b, bits=bits, group=group, extra=extra: _quant(mod, b, bits, group, extra)))
    for bits, group in UNIFORM:
        out.append((f"gptq/W{bits}g{group}", lambda mod, b, bits=bits, group=group: _quant(mod, b, bits, group, {})))
    for avg in MIXED:
        out.append((f"mixed/{avg}bits", lambda mod, b, avg=avg: _plan(mod, b, avg_bits=avg, ranks=[0])))
    return out


def _svd(model, batches, method, ratio):
    rep = compress(model, batches, method, ratio=ratio, progress=False)
    after, before = rep.params
    return {"params_ratio": after / before, "sum_error": sum(r.error for r in rep.layers.values())}


def _quant(model, batches, bits, group, extra):
    rep = quantize(model, batches, "gptq", bits=bits, group_size=group, progress=False, **extra)
    errs = [r.compensated_error if r.compensated_error is not None else r.error for r in rep.layers.values()]
    return {"sum_error": sum(errs)}


def _plan(model, batches, **opts):
    rep = compress_planned(model, batches, progress=False, group_size=64, bits=[2, 3, 4, 8], **opts)
    d = rep.to_dict()
    kinds = {}
    for c in rep.layers.values():
        label = "svd" if c.kind == "svd" else f"W{c.bits}" + (f"+r{c.rank}" if c.rank else "")
        kinds[label] = kinds.get(label, 0) + 1
    return {"budget": d["budget"], "sum_error": d["measured"], "predicted": d["predicted"], "choices": kinds,
            "curve": d["curve"]}


def evaluate_all(res: Results, tag: str, base, batches, names, score, budgets) -> None:
    if not res.has(f"{tag}/fp"):
        res.put(f"{tag}/fp", {**score(base), "bytes": linear_bytes(base, names)})
    todo = runs() + [(f"{name}/{mb:g}MB", lambda mod, b, mb=mb, svd=svd: _plan(mod, b, budget=mb * 1e6,
                                                                                 ranks=[0, 8, 16, 32], svd=svd))
                     for name, svd in (("joint", False), ("joint+svd", True)) for mb in budgets]
    for key, fn in todo:
        if res.has(f"{tag}/{key}"):
            continue
        model = copy.deepcopy(base)
        t = time.perf_counter()
        try:
            extra = fn(model, batches)
        except rw.RankwiseError as e:  # e.g. a budget below what this model can reach: recorded, not fatal
            res.put(f"{tag}/{key}", {"error": str(e)})
            continue
        seconds = time.perf_counter() - t
        res.put(f"{tag}/{key}", {**score(model), **extra, "bytes": linear_bytes(model, names), "seconds": seconds})


def smollm2(res: Results, args) -> None:
    base, tok = rw.load_model("smollm2")
    batches = rw.load_data("pydoc", tok, seq_len=args.seq_len, n=args.n, batch_size=4)
    stream = read_stream("pydoc", tok, "eval")[: args.eval_tokens]
    names = find_targets(base, "all-linear")
    evaluate_all(res, "smollm2", base, batches, names, lambda m: {"perplexity": ppl(m, stream)}, BUDGETS_MB["smollm2"])


def minilm(res: Results, args) -> None:
    setup = minilm_setup(args)
    if setup is None:
        return
    base, batches, embed = setup
    ref = embed(base)

    def score(model):
        cos = (embed(model) * ref).sum(-1)
        return {"mean_cos": float(cos.mean()), "min_cos": float(cos.min())}

    evaluate_all(res, "minilm", base, batches, find_targets(base, "all-linear"), score, BUDGETS_MB["minilm"])


def family(key: str) -> str:
    """The curve a record belongs to: uniform GPTQ grids, one curve per grid + compensation kind, or the method."""
    k = key.split("/", 1)[1]
    if k.startswith("gptq/"):
        grid, _, comp = k.split("/")[1].partition("+")
        return f"gptq {grid} + {comp.rstrip('0123456789')} r8/16/32" if comp else "gptq, uniform grids"
    return k.split("/")[0]


def targets(res: Results) -> dict:
    """The issue's three targets, checked on the recorded numbers."""
    r = res.data["records"]
    out = {}
    p = lambda k: r.get(f"smollm2/{k}", {}).get("perplexity")  # noqa: E731
    wins = {f"{int(x * 100)}%": (p(f"svd-llm/{int(x * 100)}%"), p(f"svd/{int(x * 100)}%")) for x in (0.9, 0.8, 0.6)}
    out["svd_llm_beats_svd"] = {k: {"svd-llm": a, "svd": b, "holds": a is not None and b is not None and a < b}
                                for k, (a, b) in wins.items()}
    fp, q, e = p("fp"), p("gptq/W3g64"), p("gptq/W3g64+eora32")
    if None not in (fp, q, e):
        out["eora32_gap_closed_W3g64"] = {"gap_closed": (q - e) / (q - fp), "holds": (q - e) / (q - fp) >= 0.3}
    singles = [(v["bytes"], v["perplexity"], k) for k, v in r.items()
               if k.startswith("smollm2/") and "perplexity" in v and family(k) not in ("joint", "joint+svd")
               and not k.endswith("/fp")]
    planner = {}
    for k, v in r.items():
        if k.startswith("smollm2/joint/") and "perplexity" in v:
            fit = [s for s in singles if s[0] <= v["bytes"] * (1 + 1e-9)]
            best = min(fit, key=lambda s: s[1]) if fit else None
            planner[k] = {"bytes": v["bytes"], "perplexity": v["perplexity"],
                          "best_single": None if best is None else {"key": best[2], "bytes": best[0], "perplexity": best[1]},
                          "holds": best is None or v["perplexity"] <= best[1]}
    out["planner_on_or_below_every_curve"] = planner
    return out


def plot(res: Results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = res.data["records"]
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    fams: dict[str, list] = {}
    for k, v in r.items():
        if k.startswith("smollm2/") and "perplexity" in v and not k.endswith("/fp"):
            fams.setdefault(family(k), []).append((v["bytes"] / 1e6, v["perplexity"]))
    style = {"joint": dict(marker="*", ms=11, color="k"), "joint+svd": dict(marker="*", ms=8, color="0.6"),
             "mixed": dict(marker="D", color="C4")}
    palette = iter(["C0", "C1", "C2", "C3", "C5", "C6", "C8", "C9", "C7"])
    for f, pts in sorted(fams.items()):
        pts.sort()
        ax.plot(*zip(*pts), ":" if f in ("joint", "joint+svd", "mixed") else "-", marker=style.get(f, {}).get("marker", "o"),
                ms=style.get(f, {}).get("ms", 4), color=style[f]["color"] if f in style else next(palette), label=f)
    if "smollm2/fp" in r:
        fp = r["smollm2/fp"]
        ax.axhline(fp["perplexity"], color="gray", ls="--", lw=1, label=f"fp ({fp['bytes'] / 1e6:.0f} MB in fp16)")
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("MB of the compressed linears (codes, fp16 scales, fp16 factors)")
    ax.set_ylabel("held-out perplexity"), ax.set_title("SmolLM2-135M: perplexity vs size, every method", fontsize=9)
    ax.grid(alpha=0.3, which="both"), ax.legend(fontsize=6.5, ncol=2)
    fig.tight_layout()
    fig.savefig(HERE / "results" / "compress.png", dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--only", choices=["smollm2", "minilm"])
    ap.add_argument("--fresh", action="store_true", help="discard earlier records")
    ap.add_argument("--out", default=str(HERE / "results" / "compress.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    setup = {"args": vars(args), "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
             "machine": platform.processor() or platform.machine(), "python": sys.version.split()[0]}
    res = Results(Path(args.out), args.fresh, setup)
    if args.only in (None, "smollm2"):
        smollm2(res, args)
    if args.only in (None, "minilm"):
        minilm(res, args)
    res.data["targets"] = targets(res)
    res.put("_targets_checked", {"at": time.strftime("%Y-%m-%d %H:%M:%S")})
    plot(res)


if __name__ == "__main__":
    main()
