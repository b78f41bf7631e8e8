"""The training loop: learning happens, resume equals an uninterrupted run, exports reload exactly."""

import json
import sys

import pytest
import torch

import rankwise as rw
from rankwise.data import DataConfig, load_dataset
from rankwise.cli.runs import load_config, run_train
from rankwise.train import TrainConfig, TrainingInterrupted, train

train_module = sys.modules["rankwise.train.loop"]


def _adapted(tiny_model_dir, method="eva"):
    model, tok = rw.load_model(tiny_model_dir)
    tr, ev = load_dataset(DataConfig(train="pydoc", seq_len=32, max_train_examples=48, max_eval_examples=8), tok)
    stats = rw.calibrate(model, rw.data.batchify(tr.examples[:16], tok, 4), progress=False) if method == "eva" else None
    return rw.adapt_(model, rw.plan(stats, model, method=method, rank=4)), tok, tr, ev


def test_training_lowers_the_loss(tiny_model_dir):
    model, tok, tr, ev = _adapted(tiny_model_dir)
    tr.examples = tr.examples[:4]  # one batch, seen over and over: the loss must fall
    res = train(model, tr, None, TrainConfig(steps=40, lr=3e-2, warmup_steps=0), tok, progress=False)
    assert res.history[-1]["loss"] < 0.9 * res.history[0]["loss"]  # 0.85 observed; broken grads stay at 1.0
    assert all(r["lr"] <= 3e-2 + 1e-12 for r in res.history) and "grad_norm" in res.history[0]


def _run_cfg(model_dir, out, **extra):
    return load_config(None, {"model": str(model_dir), "out": str(out), "data.seq_len": 32, "data.max_train_examples": 48,
                              "data.max_eval_examples": 8, "init.rank": 2, "init.calib_samples": 8, "train.steps": 6,
                              "train.batch_size": 2, "train.grad_accum": 2, "train.lr": 3e-3, "train.warmup_steps": 2,
                              "train.eval_every": 2, "train.save_every": 2, "merge": False, **extra})


def _sigint_after(calls: list, when: int):
    """Send this process a real SIGINT on call number `when` (counted in `calls`)."""
    import os
    import signal

    calls.append(1)
    if len(calls) == when:
        os.kill(os.getpid(), signal.SIGINT)


def _wrap_after(owner, attr, when, monkeypatch):
    """owner.attr runs, then SIGINT arrives while still inside the call (e.g. after AdamW applied the update)."""
    original, calls = getattr(owner, attr), []

    def wrapped(*a, **k):
        out = original(*a, **k)
        _sigint_after(calls, when)
        return out

    monkeypatch.setattr(owner, attr, wrapped)


def _wrap_before(owner, attr, when, monkeypatch):
    original, calls = getattr(owner, attr), []

    def wrapped(*a, **k):
        _sigint_after(calls, when)
        return original(*a, **k)

    monkeypatch.setattr(owner, attr, wrapped)


# Where Ctrl-C lands: (what is patched, call number). Steps have 2 micro-batches; saves at steps 2, 4, 6.
SIGINT_POINTS = {
    "inside optimizer step": (lambda mp: _wrap_after(torch.optim.AdamW, "step", 3, mp)),
    "inside scheduler step": (lambda mp: _wrap_after(torch.optim.lr_scheduler.LambdaLR, "step", 4, mp)),
    "inside forward": (lambda mp: _wrap_before(train_module, "loss_terms", 6, mp)),
    "inside backward": (lambda mp: _wrap_after(torch.Tensor, "backward", 5, mp)),
    "inside periodic eval": (lambda mp: _wrap_before(train_module, "eval_loss", 2, mp)),
    "inside checkpoint save": (lambda mp: _wrap_before(train_module, "save_checkpoint", 1, mp)),
    "while loading a batch": (lambda mp: _wrap_before(train_module, "_micro_batch", 7, mp)),
}


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_train(_run_cfg(tiny_model_dir, out), progress=False, log=lambda *a: None)
    return out


@pytest.mark.parametrize("point", list(SIGINT_POINTS))
def test_sigint_anywhere_then_cli_resume_is_bit_identical(tiny_model_dir, tmp_path, monkeypatch, uninterrupted, point):
    """A real SIGINT at `point`, then `rankwise train --out DIR --resume` (no other flag): same losses, same weights."""
    from safetensors.torch import load_file

    from test_cli import run

    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        SIGINT_POINTS[point](mp)
        with pytest.raises(TrainingInterrupted, match="checkpoint saved"):
            run_train(_run_cfg(tiny_model_dir, out), progress=False, log=lambda *a: None)
    assert not (out / "adapter").exists()
    r = run("train", "--out", out, "--resume", "--quiet")
    assert r.returncode == 0, r.stderr
    a = [json.loads(x) for x in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-6 and abs(ra.get("eval_loss", 0) - rb.get("eval_loss", 0)) <= 1e-6
        assert ra["lr"] == pytest.approx(rb["lr"], rel=1e-12)
    wa, wb = load_file(uninterrupted / "adapter" / "adapter_model.safetensors"), load_file(out / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all((wa[k] - wb[k]).abs().max() <= 1e-6 for k in wa)
    assert any(wa[k].abs().max() > 0 for k in wa if "lora_B" in k)  # training moved B: the comparison means something


def test_resume_that_contradicts_the_run_is_an_error(tiny_model_dir, tmp_path, monkeypatch):
    from test_cli import run

    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        _wrap_after(torch.optim.AdamW, "step", 2, mp)
        with pytest.raises(TrainingInterrupted):
            run_train(_run_cfg(tiny_model_dir, out), progress=False, log=lambda *a: None)
    saved = (out / "config.yaml").read_text()
    r = run("train", "--out", out, "--resume", "--steps", "9", "--quiet")
    assert r.returncode == 2 and "train.steps is 9 here but 6 in" in r.stderr and "Traceback" not in r.stderr
    r = run("train", "--out", out, "--resume", "--rank", "2", "--quiet")  # agreeing flags are fine
    assert r.returncode == 0, r.stderr
    assert (out / "config.yaml").read_text() == saved  # a resume never rewrites the run's config
    r = run("train", "--out", tmp_path / "none", "--resume")
    assert r.returncode == 2 and "no run to resume" in r.stderr


def test_first_step_moves_and_schedule_ends_at_min():
    from rankwise.train.loop import lr_factor

    f = [lr_factor(s, 3, 10, 0.1) for s in range(10)]
    assert f[0] == pytest.approx(0.25) and f[:4] == sorted(f[:4]) and f[3] == 1.0  # warmup: 1/4, 2/4, 3/4, then peak
    assert all(a >= b for a, b in zip(f[3:], f[4:])) and f[-1] > 0.1 and lr_factor(10, 3, 10, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("method", ["eva", "olora"])
def test_library_train_uses_the_methods_default_lr(tiny_model_dir, method):
    from rankwise.methods import get_init

    model, tok, tr, _ = _adapted(tiny_model_dir, method)
    res = train(model, tr, None, TrainConfig(steps=1, warmup_steps=0), tok, progress=False)
    assert res.history[0]["lr"] == pytest.approx(get_init(method).default_lr)
    assert get_init("eva").default_lr != get_init("olora").default_lr  # else this test could not tell them apart


def test_run_dir_merged_equals_adapter(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = load_config(None, {"model": str(tiny_model_dir), "out": str(tmp_path / "run"), "train.steps": 4,
                             "train.lr": 1e-2, "data.seq_len": 32, "data.max_train_examples": 32, "init.rank": 4})
    summary = run_train(cfg, progress=False, log=lambda *a: None)
    out = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "plan.json", "report.md", "loss.png", "ranks.png", "variance.png",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "merged/config.json", "summary.json"):
        assert (out / name).exists(), name
    assert summary["before"]["perplexity"] > 0 and summary["steps"] == 4
    ids = torch.randint(3, 200, (2, 20), generator=torch.Generator().manual_seed(0))
    base, _ = rw.load_model(tiny_model_dir)
    with torch.no_grad():
        adapter_logits = PeftModel.from_pretrained(base, out / "adapter")(input_ids=ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(out / "merged")(input_ids=ids).logits
        plain = rw.load_model(tiny_model_dir)[0](input_ids=ids).logits
    assert (adapter_logits - merged_logits).abs().max() <= 1e-5
    assert (adapter_logits - plain).abs().max() > 1e-4  # training changed something


def test_classification_head_saved_and_reloaded(tiny_bert_dir, tmp_path):
    from peft import PeftModel

    f = tmp_path / "cls.tsv"
    f.write_text("sentence\tlabel\n" + "".join(f"{'good great fine' if i % 2 else 'bad awful poor'} item {i}\t{i % 2}\n" for i in range(64)))
    cfg = load_config(None, {"model": str(tiny_bert_dir), "task": "seq-cls", "out": str(tmp_path / "run"),
                             "data.train": str(f), "data.text_field": "sentence", "data.seq_len": 16,
                             "train.steps": 20, "train.lr": 1e-2, "train.batch_size": 8, "init.rank": 2, "merge": False})
    summary = run_train(cfg, progress=False, log=lambda *a: None)
    assert summary["labels"] == ["0", "1"] and summary["after"]["accuracy"] >= 0.9  # two separable word sets
    model, tok = rw.load_model(tiny_bert_dir, task="seq-cls", num_labels=2)
    head_before = model.classifier.weight.detach().clone()
    loaded = PeftModel.from_pretrained(model, tmp_path / "run" / "adapter").eval()
    saved_head = [p for n, p in loaded.named_parameters() if "classifier" in n and "modules_to_save" in n and n.endswith("weight")]
    assert saved_head and not torch.allclose(saved_head[0], head_before)  # the trained head came back
    from rankwise.data import DataConfig, batchify, load_dataset
    from rankwise.train.evaluate import accuracy

    _, ev = load_dataset(DataConfig(train=str(f), text_field="sentence", seq_len=16, labels=["0", "1"]), tok, "seq-cls")
    assert accuracy(loaded, batchify(ev.examples, tok, 8)) == summary["after"]  # the reloaded adapter scores the same


def test_head_gets_its_own_learning_rate():
    from rankwise.train.loop import _param_groups

    params = {"base_model.model.classifier.modules_to_save.default.weight": torch.nn.Parameter(torch.zeros(2)),
              "base_model.model.layer.lora_A.default.weight": torch.nn.Parameter(torch.zeros(2))}
    groups = _param_groups(params, TrainConfig(lr=1e-4, head_lr=3e-3))
    opt = torch.optim.AdamW(groups, lr=1e-4)
    assert sorted(g["lr"] for g in opt.param_groups) == [1e-4, 3e-3]
    assert [len(g["params"]) for g in _param_groups(params, TrainConfig(lr=1e-4))] == [1, 1]
    assert _param_groups(params, TrainConfig(lr=1e-4))[1]["lr"] == 1e-4  # head_lr unset: same as lr


def test_gradient_checkpointing_trains_the_same_steps(tiny_model_dir):
    """Recomputed activations are the same float32 operations again: the losses and gradient norms of three
    steps agree to float32 rounding of sums over ~1e3 terms (1e-7 × 1e3), and the blocks really recompute."""
    runs = {}
    for ckpt in (False, True):
        model, tok, tr, ev = _adapted(tiny_model_dir)
        res = train(model, tr, None, TrainConfig(steps=3, lr=1e-2, gradient_checkpointing=ckpt), tok, progress=False)
        assert model.is_gradient_checkpointing == ckpt
        runs[ckpt] = [v for r in res.history for v in (r["loss"], r["grad_norm"])]
    assert runs[True] == pytest.approx(runs[False], rel=1e-4)


def test_gradient_checkpointing_flag_reaches_the_run(tiny_model_dir, tmp_path):
    from test_cli import run

    r = run("train", "--model", tiny_model_dir, "--steps", "2", "--seq-len", "32", "--gradient-checkpointing",
            "--no-merge", "--out", tmp_path / "run", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "gradient_checkpointing: true" in (tmp_path / "run" / "config.yaml").read_text()
