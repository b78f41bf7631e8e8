"""Calibration of SmolLM2-135M across processes: time, bytes communicated per block, peak memory per rank.

For each (processes, data size) one fresh launch (plain python for 1, torchrun --standalone for 2): load the
model, take its share of the calibration batches (pydoc, 256-token sequences, 8 × SIZE of them, batch 4),
calibrate every linear layer as EVA does (blockwise; per-block all_reduce of n, Σx, XᵀX, then the top 16
eigenpairs kept), and record per rank the calibration seconds, the peak resident memory (ru_maxrss, whole
process: model, torch, statistics, the block's cached hidden states) and every byte handed to all_reduce /
broadcast (the payload per rank; a ring all_reduce moves about 2(N−1)/N of it over the wire). Beside it:
what gathering the raw activations to every rank would send per rank (peft's EVA gathers them): its share
of the tokens × Σ over distinct inputs of their width × 4 bytes × (N − 1) peers.

Resumable: one record per (processes, size) in benchmarks/results/scaling.json; --summary prints the table.
The machine must be otherwise idle (2 cores: the two processes share them).

Run: .venv/bin/python benchmarks/scaling.py [--sizes 1,4,16] [--procs 1,2] [--summary]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).parent
OUT = HERE / "results" / "scaling.json"
BASE_SAMPLES, SEQ, BATCH, KEEP = 8, 256, 4, 16


def _count_bytes(sent: dict) -> None:
    """Wrap the collectives Stats uses so that every tensor handed to them is counted (payload per rank)."""
    import torch.distributed as dist

    for name in ("all_reduce", "broadcast"):
        inner = getattr(dist, name)

        def counted(t, *a, _inner=inner, **k):
            sent["bytes"] += t.numel() * t.element_size()
            sent["calls"] += 1
            return _inner(t, *a, **k)

        setattr(dist, name, counted)


def worker(size: int, out: str) -> None:
    import torch

    import rankwise as rw
    from rankwise import distributed

    distributed.init_from_env("cpu")
    sent = {"bytes": 0, "calls": 0}
    _count_bytes(sent)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // distributed.world()))
    model, tok = rw.load_model("smollm2")
    batches = rw.load_data("pydoc", tok, seq_len=SEQ, n=BASE_SAMPLES * size, batch_size=BATCH)
    mine = distributed.shard(batches, "calibration batches")
    t = time.perf_counter()
    stats = rw.calibrate(model, mine, "all-linear", keep=KEEP, progress=False)
    seconds = time.perf_counter() - t
    tokens = sum(int(b["attention_mask"].sum()) for b in mine)
    widths = {name: stats[name].mean.numel() for name in stats.groups()}  # one input per group of readers
    rec = {"rank": distributed.rank(), "world": distributed.world(), "size": size, "seconds": seconds,
           "tokens_here": tokens, "tokens_all": max(st.n for st in stats.layers.values()),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "bytes_sent": sent["bytes"], "collectives": sent["calls"], "inputs": len(widths),
           "width_sum": sum(widths.values()), "blocks": len(model.model.layers)}
    Path(out, f"rank-{rec['rank']}.json").write_text(json.dumps(rec))
    distributed.barrier()
    distributed.shutdown()


def launch(world: int, size: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        me = [str(Path(__file__).resolve()), "--worker", str(size), "--tmp", tmp]
        cmd = [sys.executable, *me] if world == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *me]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world))}
        subprocess.run(cmd, check=True, env=env)
        return [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank-*.json"))]


def summarize(records: dict) -> list[dict]:
    rows = []
    for key, ranks in sorted(records.items(), key=lambda kv: (kv[1][0]["world"], kv[1][0]["size"])):
        r0, world = ranks[0], ranks[0]["world"]
        tokens = r0["tokens_all"]
        gather = tokens / world * r0["width_sum"] * 4 * (world - 1)  # a rank's rows to every other rank, fp32
        rows.append({"processes": world, "size": r0["size"], "tokens": tokens,
                     "seconds": max(r["seconds"] for r in ranks), "tokens_per_s": tokens / max(r["seconds"] for r in ranks),
                     "peak_rss_mb_per_rank": max(r["peak_rss_mb"] for r in ranks),
                     "sent_per_rank_mb": r0["bytes_sent"] / 2**20, "sent_per_block_mb": r0["bytes_sent"] / 2**20 / r0["blocks"],
                     "gather_per_block_mb": gather / 2**20 / r0["blocks"], "collectives": r0["collectives"]})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| processes | calibration tokens | seconds | tokens/s | peak RSS per rank (MB) | sent per block per rank, "
             "ours (MB) | gathering raw activations instead (MB) |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ours = f"{r['sent_per_block_mb']:.2f}" if r["processes"] > 1 else "0 (one process)"
        gather = f"{r['gather_per_block_mb']:.1f}" if r["processes"] > 1 else "0"
        lines.append(f"| {r['processes']} | {r['tokens']:,} | {r['seconds']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{r['peak_rss_mb_per_rank']:.0f} | {ours} | {gather} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4,16", help="Calibration data as multiples of 8 sequences of 256 tokens.")
    ap.add_argument("--procs", default="1,2")
    ap.add_argument("--summary", action="store_true")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        return worker(args.worker, args.tmp)
    data = json.loads(OUT.read_text()) if OUT.exists() else {"records": {}}
    if not args.summary:
        for world in (int(x) for x in args.procs.split(",")):
            for size in (int(x) for x in args.sizes.split(",")):
                key = f"p{world}/x{size}"
                if key in data["records"]:
                    continue
                data["records"][key] = launch(world, size)
                print(key, json.dumps(summarize({key: data["records"][key]})[0]), flush=True)
                OUT.parent.mkdir(parents=True, exist_ok=True)
                OUT.write_text(json.dumps(data, indent=1))
    data["summary"] = summarize(data["records"])
    data["setup"] = {"machine": f"{os.cpu_count()} CPU cores", "model": "SmolLM2-135M (fp32)",
                     "calibration": f"pydoc, {SEQ}-token sequences, batch {BATCH}, keep top {KEEP}, blockwise"}
    OUT.write_text(json.dumps(data, indent=1))
    print(table(data["summary"]))


if __name__ == "__main__":
    main()
