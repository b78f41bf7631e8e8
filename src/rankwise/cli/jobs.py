"""Library entry points behind the CLI subcommands: a config in, files out."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from ..config import StrictModel


class InitJob(StrictModel):
    """`rankwise init`: calibrate on data, plan an adapter init, adapt, export a peft adapter."""

    model: str = "smollm2"
    data: str = "pydoc"
    method: str = "eva"
    rank: int = Field(8, ge=1)
    alpha: float | None = None
    rho: float = Field(2.0, ge=1.0)
    whiten: bool | None = None  # None: the method's default (EVA: on)
    targets: str | list[str] = "all-linear"
    seq_len: int = Field(256, ge=2)
    n_samples: int = Field(32, ge=1)
    batch_size: int = Field(4, ge=1)
    use_label_mask: bool = True
    device: str = "cpu"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # the model's compute dtype; auto: the checkpoint's own
    out: Path = Path("runs/init")
    save_stats: bool = False
    offload_cache: Path | None = None  # hidden-state cache in files under this folder (None: in memory if it fits)
    options: dict = {}  # the method's own keys (e.g. {"niter": 4} for pissa), validated by its config


def _note(message: str) -> None:
    print(message, file=sys.stderr)


def run_init(job: InitJob, progress: bool = True) -> dict:
    """Run the init job; returns {"plan", "model", "out", "tokens", "seconds": {...}} after writing job.out.

    The model is read one block at a time where the checkpoint allows (rankwise.lazy); the "model" returned
    is then a PeftModel whose base holds no weights (`model.get_base_model().rankwise_hollow`): load the
    adapter on the base to compute with it.

    Under torchrun the calibration batches are shared out, the statistics summed, the plan checked equal on
    every rank, and rank 0 writes job.out."""
    import torch

    from .. import distributed as dist
    from ..adapt import adapt_
    from ..calib.calibrate import calibrate
    from ..data.sources import load_data
    from ..export.peft import export
    from ..calib.gradients import calibrate_gradients
    from ..methods import config_options, get_init, grads_for, keep_for
    from ..plan.plan import plan

    from ..atomic import check_out_dir
    from ..models import fit_seq_len

    impl = get_init(job.method)  # an unknown method fails before anything is loaded
    check_out_dir(job.out)
    if job.offload_cache is not None:
        check_out_dir(job.offload_cache, "--offload-cache")
    device = dist.init_from_env(job.device)
    progress = progress and dist.is_main()
    t0 = time.perf_counter()
    stats, tokens, batches = None, 0, None
    keep = "full" if job.save_stats else keep_for([job.method], job.rank, job.rho)
    needs_grad = grads_for([job.method])
    with dist.together("loading the model and the data"):
        # one block in memory (rankwise.lazy) unless a backward pass over the whole model is needed
        lazy = not needs_grad and not dist.active()
        model, tok = load_model_on(job.model, device, job.dtype, lazy, _note if lazy else None)
        lazy = getattr(model, "rankwise_lazy", None)
        if keep is not None or needs_grad:  # data-free methods skip calibration entirely
            seq_len = fit_seq_len(model, job.seq_len, _note if dist.is_main() else (lambda *a: None))
            from ..memory import check_fits

            check_fits(model, device, job.n_samples * seq_len, 0, f"init {job.method} on {job.model}",
                       job.offload_cache, _note)
            batches = load_data(job.data, tok, seq_len=seq_len, n=job.n_samples, batch_size=job.batch_size)
            batches = dist.shard(batches, "calibration batches (--n-samples / --batch-size)")
    t1 = time.perf_counter()
    with dist.together("calibrating and planning"):
        if batches is not None:
            torch.manual_seed(0)
            if keep is not None:
                stats = calibrate(model, batches, job.targets, use_label_mask=job.use_label_mask, keep=keep, progress=progress)
            if needs_grad:
                stats = calibrate_gradients(model, batches, job.targets, stats, progress=progress)
            tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        t2 = time.perf_counter()
        options = config_options(job.method, rank=job.rank, alpha=job.alpha, rho=job.rho, whiten=job.whiten) | job.options
        p = plan(stats if impl.needs != "none" or needs_grad else None, model, method=job.method, targets=job.targets,
                 **options)
    if dist.active():
        tokens = int(dist.all_reduce_sum_(torch.tensor([tokens], dtype=torch.float64)).item())
    p = dist.agree(p, p.fingerprint(), "the plan")
    if lazy is not None:  # the adapter is written from the plan alone: the base needs no memory behind it
        lazy.hollow()
    peft_model = adapt_(model, p)
    t3 = time.perf_counter()
    out = Path(job.out)
    if dist.is_main():  # rank 0 alone writes, with no collective: the others are done
        out = export(peft_model, job.out, plan=p)
        if job.save_stats:
            stats.save(out / "stats.safetensors")
    return {"plan": p, "model": peft_model, "out": out, "tokens": tokens, "dtype": model.rankwise_dtype,
            "seconds": {"load": t1 - t0, "calibrate": t2 - t1, "plan_adapt": t3 - t2, "export": time.perf_counter() - t3}}


def load_model_on(name: str, device: str, dtype: str = "auto", lazy: bool = False, log=None):
    """(model, tokenizer) on `device`; lazy: blocks left unread where the checkpoint allows (rankwise.lazy),
    for a causal LM, whose work runs block by block from start to end."""
    from ..models import load_model

    model, tok = load_model(name, dtype=dtype, lazy=lazy, log=log)
    lazy = getattr(model, "rankwise_lazy", None)
    if lazy is not None:
        if model.rankwise_task != "causal-lm":  # an encoder's held-out measure runs it whole: read it all now
            lazy.load("")
            model.rankwise_lazy = None
        else:
            lazy.device = torch.device(device)
            return _move_loaded(model, device), tok
    return model.to(device), tok


def _move_loaded(model, device: str):
    """Move the tensors already read to `device` (those still on meta stay there until their block is read)."""
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for k, t in store.items():
                if t is not None and not t.is_meta and t.device != torch.device(device):
                    store[k] = t.to(device) if not isinstance(t, torch.nn.Parameter) else torch.nn.Parameter(
                        t.to(device), requires_grad=t.requires_grad)
    return model


def load_for_export(job, device: str, log, lazy: bool = False):
    """(model, tokenizer, job) for quantize/compress: the model on `device` (lazy: see load_model_on), job.seq_len
    fitted to its position table, and a format that could not hold this model refused now, before any work."""
    from ..memory import check_disk, check_fits
    from ..models import fit_seq_len

    model, tok = load_model_on(job.model, device, job.dtype, lazy, log)
    job = job.model_copy(update={"seq_len": fit_seq_len(model, job.seq_len, log)})
    check_fits(model, device, job.n_samples * job.seq_len, 2 * job.eval_tokens, f"{job.method} on {job.model}",
               job.offload_cache, log)
    check_disk(job.out, job.output_bytes(model), f"the output of {job.method} on {job.model}")
    if job.format == "compressed-tensors":
        from ..export.compressed_tensors import check_model_type

        check_model_type(model)
    if job.format == "gguf":
        from ..export.gguf import check_writable

        check_writable(model)
    return model, tok, job
