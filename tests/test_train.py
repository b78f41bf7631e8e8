"""The training loop: learning happens, resume equals an uninterrupted run, exports reload exactly."""

import json
import sys

import pytest
import torch

import rankwise as rw
from rankwise.data import DataConfig, load_dataset
from rankwise.runs import load_config, run_train
from rankwise.train import TrainConfig, TrainingInterrupted, train

train_module = sys.modules["rankwise.train"]


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


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_equals_uninterrupted(tiny_model_dir, tmp_path, monkeypatch, accum):
    cfg = TrainConfig(steps=6, batch_size=4, grad_accum=accum, lr=3e-3, eval_every=2, save_every=2, warmup_steps=1)
    model, tok, tr, ev = _adapted(tiny_model_dir)
    full = train(model, tr, ev, cfg, tok, run_dir=tmp_path / "a", progress=False)
    ref_weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    model, tok, tr, ev = _adapted(tiny_model_dir)
    original = train_module._one_step

    def interrupt_at_step_3(model_, ds, tok_, cfg_, step, *a):
        if step == 3:
            raise KeyboardInterrupt
        return original(model_, ds, tok_, cfg_, step, *a)

    monkeypatch.setattr(train_module, "_one_step", interrupt_at_step_3)
    with pytest.raises(TrainingInterrupted, match="checkpoint saved"):
        train(model, tr, ev, cfg, tok, run_dir=tmp_path / "b", progress=False)
    monkeypatch.setattr(train_module, "_one_step", original)
    model, tok, tr, ev = _adapted(tiny_model_dir)  # a fresh process would start from scratch like this
    resumed = train(model, tr, ev, cfg, tok, run_dir=tmp_path / "b", resume=True, progress=False)
    a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-6 and abs(ra.get("eval_loss", 0) - rb.get("eval_loss", 0)) <= 1e-6
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert (p.detach() - ref_weights[n]).abs().max() <= 1e-6
    assert resumed.step == full.step == 6


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
    from transformers import AutoModelForSequenceClassification

    f = tmp_path / "cls.tsv"
    f.write_text("sentence\tlabel\n" + "".join(f"{'good great fine' if i % 2 else 'bad awful poor'} item {i}\t{i % 2}\n" for i in range(64)))
    cfg = load_config(None, {"model": str(tiny_bert_dir), "task": "seq-cls", "out": str(tmp_path / "run"),
                             "data.train": str(f), "data.text_field": "sentence", "data.seq_len": 16,
                             "train.steps": 8, "train.lr": 5e-3, "train.batch_size": 8, "init.rank": 2, "merge": False})
    summary = run_train(cfg, progress=False, log=lambda *a: None)
    assert 0.0 <= summary["after"]["accuracy"] <= 1.0 and summary["labels"] == ["0", "1"]
    model, tok = rw.load_model(tiny_bert_dir, task="seq-cls", num_labels=2)
    head_before = model.classifier.weight.detach().clone()
    loaded = PeftModel.from_pretrained(model, tmp_path / "run" / "adapter").eval()
    saved_head = [p for n, p in loaded.named_parameters() if "classifier" in n and "modules_to_save" in n and n.endswith("weight")]
    assert saved_head and not torch.allclose(saved_head[0], head_before)  # the trained head came back
    batch = tok(["good great fine item 3"], return_tensors="pt")
    with torch.no_grad():
        logits = loaded(**batch).logits
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()


def test_head_gets_its_own_learning_rate():
    from rankwise.train import _param_groups

    params = {"base_model.model.classifier.modules_to_save.default.weight": torch.nn.Parameter(torch.zeros(2)),
              "base_model.model.layer.lora_A.default.weight": torch.nn.Parameter(torch.zeros(2))}
    groups = _param_groups(params, TrainConfig(lr=1e-4, head_lr=3e-3))
    opt = torch.optim.AdamW(groups, lr=1e-4)
    assert sorted(g["lr"] for g in opt.param_groups) == [1e-4, 3e-3]
    assert [len(g["params"]) for g in _param_groups(params, TrainConfig(lr=1e-4))] == [1, 1]
    assert _param_groups(params, TrainConfig(lr=1e-4))[1]["lr"] == 1e-4  # head_lr unset: same as lr
