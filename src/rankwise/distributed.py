"""torch.distributed in one place: join the group torchrun describes, shard data by rank, stop every rank
when one fails, let rank 0 alone write. With no process group (one process) each function is the identity,
so every command runs the same code with one process or many (docs/distributed.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import DistributedError

TIMEOUT_ENV = "RANKWISE_DIST_TIMEOUT"  # seconds a collective waits for a silent rank before every rank stops


def timeout_seconds() -> float:
    return float(os.environ.get(TIMEOUT_ENV, "1800"))


def active() -> bool:
    """True inside an initialized process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str = "cpu") -> str:
    """Join the process group that torchrun's environment (WORLD_SIZE, RANK, MASTER_ADDR, …) describes, once;
    returns the device this rank computes on ("cuda" or any "cuda:N" becomes cuda:LOCAL_RANK: NCCL needs one
    GPU per process). Backend: NCCL for CUDA devices, gloo otherwise. Without WORLD_SIZE > 1 (a plain run)
    nothing is started."""
    cuda = str(device).startswith("cuda")
    if cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if cuda:
        torch.cuda.set_device(torch.device(device))
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_seconds()))
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"could not join the process group (rank {os.environ.get('RANK')} of "
                               f"{os.environ.get('WORLD_SIZE')}, MASTER_ADDR={os.environ.get('MASTER_ADDR')}, "
                               f"MASTER_PORT={os.environ.get('MASTER_PORT')}): {e}") from None
    return device


def shard(items: list, what: str) -> list:
    """This rank's share of `items` (every world()-th, from rank()); an error on every rank if one would get none."""
    if world() > 1 and len(items) < world():
        raise DistributedError(f"{what}: {len(items)} for {world()} processes, and every process needs at least one; "
                               f"add data or run fewer processes")
    return items[rank():: world()]


FAILED = "rankwise/failed/"  # + rank: the error of a rank that failed, in the group's key-value store


def _store():
    """The process group's key-value store (torchrun's TCPStore), or None."""
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, AttributeError, ValueError):  # pragma: no cover — a group without a store
        return None


def _reported_failure(store) -> tuple[int, str] | None:
    """(rank, error) of the first rank that recorded a failure in the store, if any."""
    if store is None:
        return None
    for r in range(dist.get_world_size()):
        try:
            if store.check([FAILED + str(r)]):
                return r, store.get(FAILED + str(r)).decode()
        except RuntimeError:  # pragma: no cover — the store's host is gone
            return None
    return None


@contextmanager
def together(what: str):
    """Run a stage on every rank; if one raises, every rank stops, the failing one with its own error and the
    others with one that names it, wherever they are. The failing rank records its error in the group's store
    and leaves the group, so a peer waiting in any collective (a per-block all_reduce, a gradient sum, the
    check at the stage's end) gets a communication error at once, finds the record and raises it. A rank that
    goes silent without failing is bounded by RANKWISE_DIST_TIMEOUT."""
    if not active():
        yield
        return
    store, n = _store(), world()
    try:
        yield
        dist.barrier()  # the stage's end: every rank got here
    except Exception as e:  # noqa: BLE001 — recorded for every rank, then raised again
        other = _reported_failure(store)
        if other is not None and other[0] != rank():  # a peer failed first: this is its consequence
            shutdown()
            raise DistributedError(f"rank {other[0]} of {n} failed while {what}, so every rank stops: {other[1]}") from None
        if store is not None:
            try:
                store.set(FAILED + str(rank()), f"{type(e).__name__}: {e}")
            except RuntimeError:  # pragma: no cover — the store's host is gone
                pass
        shutdown()  # leaving the group breaks the peers' pending collectives now, not after the timeout
        raise


def broadcast_object(obj, src: int = 0):
    """`obj` as rank `src` has it, on every rank (pickled; for plans and checkpoints, not for big tensors)."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def sharded(model) -> bool:
    """True when the model's parameters are FSDP2 shards (DTensors)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover — torch without DTensor
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def same_count(n: int, what: str) -> None:
    """Every rank holds n of `what`, or every rank stops: an FSDP-sharded block all-gathers its weights at each
    call, so ranks that call it a different number of times would wait on each other for ever."""
    if not active():
        return
    counts: list = [None] * world()
    dist.all_gather_object(counts, int(n))
    if len(set(counts)) > 1:
        raise DistributedError(f"{what}: the ranks hold {counts}; with an FSDP-sharded model every rank must hold "
                               f"the same number (make it a multiple of {world()})")


def agree(obj, fingerprint: str, what: str, log=print):
    """`obj` when every rank computed the same one (equal fingerprints), else rank 0's, sent to all: with
    deterministic kernels (CPU) the ranks agree and nothing large is sent; where they do not, a warning says so."""
    if not active():
        return obj
    prints: list = [None] * world()
    dist.all_gather_object(prints, fingerprint)
    if len(set(prints)) == 1:
        return obj
    differ = [r for r, f in enumerate(prints) if f != prints[0]]
    log(f"warning: {what} computed on ranks {differ} differs from rank 0's (nondeterministic kernels?); "
        f"every rank takes rank 0's")
    return broadcast_object(obj)


def _comm(t: torch.Tensor) -> torch.Tensor:
    """t where the backend can reduce it: NCCL reduces CUDA tensors only, so CPU ones travel through the GPU."""
    if t.device.type == "cpu" and dist.get_backend() == "nccl":
        return t.to(torch.device("cuda", torch.cuda.current_device()))
    return t


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum t over the ranks, in place (any device, any backend)."""
    if active():
        c = _comm(t)
        dist.all_reduce(c)
        if c is not t:
            t.copy_(c)
    return t


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank src's t on every rank, in place (any device, any backend)."""
    if active():
        c = _comm(t)
        dist.broadcast(c, src=src)
        if c is not t:
            t.copy_(c)
    return t


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (end of a command), so torch does not warn about one left open."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch(nproc: int, argv: list[str]) -> int:
    """`rankwise --nproc N …`: the same command line (without --nproc) in N processes of this machine, through
    torchrun's standalone rendezvous; returns its exit status."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "rankwise.cli.main", *rest]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    return subprocess.call(cmd, env=env)
