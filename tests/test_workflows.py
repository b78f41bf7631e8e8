"""Documented workflows as a user runs them: eval on text, classification export and labels, bad inputs."""

import json

import pytest
import torch
import yaml

import rankwise as rw
from rankwise.errors import ConfigError
from rankwise.cli.runs import load_config, run_train

from test_cli import run


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_eval_perplexity_of_a_text_file(tiny_model_dir, tmp_path):
    from rankwise.data import read_stream
    from rankwise.train.evaluate import perplexity

    f = tmp_path / "notes.txt"
    f.write_text("Lists are mutable sequences.\n\nTuples are immutable.\n\n" * 8)
    r = run("eval", "--model", tiny_model_dir, "--data", f, "--metric", "perplexity", "--seq-len", "32")
    assert r.returncode == 0, r.stderr
    res = _last_json(r.stdout)
    model, tok = rw.load_model(tiny_model_dir)
    stream = read_stream(str(f), tok)
    assert res["tokens"] == len(stream) - 1  # every token after the first is scored
    assert res["perplexity"] == pytest.approx(perplexity(model, stream, window=32, stride=16)["perplexity"], rel=1e-5)


@pytest.fixture(scope="module")
def cls_run(tiny_bert_dir, tmp_path_factory):
    """A trained classification run with classes '2', '7', '10' (they must not sort as strings). 40 steps: EVA's
    whitened A (the default) starts smaller than plain EVA's and reached 0.86 accuracy in 30, 1.0 in 40."""
    root = tmp_path_factory.mktemp("cls")
    words = {"2": "good great fine", "7": "plain table chair", "10": "bad awful poor"}
    f = root / "train.tsv"
    f.write_text("sentence\tlabel\n" + "".join(f"{words[c]} item {i}\t{c}\n" for i in range(60) for c in [("2", "7", "10")[i % 3]]))
    cfg = load_config(None, {"model": str(tiny_bert_dir), "task": "seq-cls", "out": str(root / "run"),
                             "data.train": str(f), "data.text_field": "sentence", "data.seq_len": 16,
                             "train.steps": 40, "train.lr": 1e-2, "train.batch_size": 8, "init.rank": 2, "merge": False})
    summary = run_train(cfg, progress=False, log=lambda *a: None)
    return root, summary, words


def test_classification_labels_travel_with_the_adapter(cls_run):
    root, summary, _ = cls_run
    assert summary["labels"] == ["2", "7", "10"]
    meta = json.loads((root / "run" / "adapter" / "rankwise.json").read_text())
    assert meta["task"] == "seq-cls" and meta["labels"] == ["2", "7", "10"]
    assert yaml.safe_load((root / "run" / "config.yaml").read_text())["data"]["labels"] == ["2", "7", "10"]
    assert summary["after"]["accuracy"] >= 0.9  # three separable word sets: the head and adapter learnt them


def test_export_of_a_classification_run_keeps_head_and_classes(cls_run, tiny_bert_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    root, _, _ = cls_run
    r = run("export", root / "run" / "adapter", "--out", tmp_path / "merged")
    assert r.returncode == 0, r.stderr
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.id2label == {0: "2", 1: "7", 2: "10"} and merged.config.label2id["10"] == 2
    base, tok = rw.load_model(tiny_bert_dir, task="seq-cls", labels=["2", "7", "10"])
    adapted = PeftModel.from_pretrained(base, root / "run" / "adapter").eval()
    batch = tok(["good great fine item 3", "bad awful poor item 9", "plain chair"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a, m = adapted(**batch).logits, merged(**batch).logits
    assert (a - m).abs().max() <= 1e-5
    fresh = rw.load_model(tiny_bert_dir, task="seq-cls", num_labels=3)[0]
    with torch.no_grad():
        assert (fresh(**batch).logits - m).abs().max() > 1e-3  # not the bare base with a random head


def test_eval_accuracy_uses_the_adapters_classes(cls_run, tmp_path):
    from peft import PeftModel

    root, _, words = cls_run
    dev = tmp_path / "dev.tsv"  # no '7' at all, and rows in another order: indices must not shift
    rows = [(f"{words[c]} new {i}", c) for i, c in enumerate(["10", "2", "10", "10", "2", "2"])]
    dev.write_text("sentence\tlabel\n" + "".join(f"{t}\t{c}\n" for t, c in rows))
    r = run("eval", "--adapter", root / "run" / "adapter", "--data", dev, "--metric", "accuracy", "--text-field", "sentence")
    assert r.returncode == 0, r.stderr
    res = _last_json(r.stdout)
    base, tok = rw.load_model(json.loads((root / "run" / "adapter" / "rankwise.json").read_text())["base_model"],
                              task="seq-cls", labels=["2", "7", "10"])
    model = PeftModel.from_pretrained(base, root / "run" / "adapter").eval()
    with torch.no_grad():
        pred = model(**tok([t for t, _ in rows], return_tensors="pt", padding=True)).logits.argmax(-1).tolist()
    expected = sum(["2", "7", "10"][p] == c for p, (_, c) in zip(pred, rows)) / len(rows)
    assert res["accuracy"] == pytest.approx(expected) and res["examples"] == 6 and res["labels"] == ["2", "7", "10"]
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\nfine\t2\nodd\t3\n")
    r = run("eval", "--adapter", root / "run" / "adapter", "--data", bad, "--metric", "accuracy", "--text-field", "sentence")
    assert r.returncode == 2 and "bad.tsv:3: label '3' is not in the label set" in r.stderr


def test_held_out_perplexity_scores_completions_only(tiny_model_dir, tmp_path):
    from rankwise.data import DataConfig, batchify, load_dataset
    from rankwise.train.evaluate import record_perplexity

    f = tmp_path / "qa.jsonl"
    f.write_text("".join(json.dumps({"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}."}) + "\n" for i in range(40)))
    over = {"model": str(tiny_model_dir), "out": str(tmp_path / "run"), "data.train": str(f), "data.prompt_field": "question",
            "data.completion_field": "answer", "data.seq_len": 64, "init.rank": 2, "train.steps": 1, "merge": False}
    summary = run_train(load_config(None, over), progress=False, log=lambda *a: None)
    model, tok = rw.load_model(tiny_model_dir)
    _, ev = load_dataset(DataConfig(train=str(f), prompt_field="question", completion_field="answer", seq_len=64), tok)
    expected = record_perplexity(model, batchify(ev.examples, tok, 4))
    completion_tokens = sum(sum(t != -100 for t in lab[1:]) for _, lab in ev.examples)
    assert summary["before"]["tokens"] == expected["tokens"] == completion_tokens
    assert summary["before"]["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)


def test_targets_mean_the_same_in_yaml_python_and_cli(tiny_model_dir, tmp_path):
    model, _ = rw.load_model(tiny_model_dir)
    qv = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert rw.find_targets(model, "q_proj,v_proj") == rw.find_targets(model, ["q_proj", "v_proj"]) == qv
    assert rw.find_targets(model, r"re:model\.layers\.\d\.self_attn\.[qv]_proj") == qv
    f = tmp_path / "run.yaml"
    f.write_text(f"model: {tiny_model_dir}\nout: {tmp_path / 'run'}\nmerge: false\ndata: {{seq_len: 32}}\n"
                 "init:\n  rank: 2\n  targets: q_proj,v_proj\n  calib_samples: 8\ntrain: {steps: 1}\n")
    run_train(load_config(f), progress=False, log=lambda *a: None)
    assert sorted(json.loads((tmp_path / "run" / "plan.json").read_text())["layers"]) == sorted(qv)
    r = run("init", "--model", tiny_model_dir, "--targets", "re:.*\\.0\\.mlp\\.up_proj", "--rank", "2", "--seq-len", "32",
            "--n-samples", "4", "--out", tmp_path / "i", "--quiet")
    assert r.returncode == 0, r.stderr
    assert list(json.loads((tmp_path / "i" / "plan.json").read_text())["layers"]) == ["model.layers.0.mlp.up_proj"]


def test_null_section_with_a_flag_and_bad_sections(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("data: null\n")
    assert load_config(f, {"data.train": "notes.txt"}).data.train == "notes.txt"
    f.write_text("data: pydoc\n")
    with pytest.raises(ConfigError, match="data must be a mapping of keys"):
        load_config(f, {"data.seq_len": 32})


@pytest.mark.parametrize("case", ["latin1", "missing-field", "bom"])
def test_bad_files_end_with_an_error_line(tiny_model_dir, tiny_bert_dir, tmp_path, case):
    if case == "latin1":
        f = tmp_path / "dev.tsv"
        f.write_bytes("sentence\tlabel\nfine\t1\ncaf\xe9\t0\n".encode("latin-1"))
        r = run("train", "--model", tiny_bert_dir, "--task", "seq-cls", "--data", f, "--text-field", "sentence",
                "--out", tmp_path / "o", "--quiet")
        assert r.returncode == 2 and "dev.tsv:3: not valid UTF-8" in r.stderr
        assert not (tmp_path / "o").exists()  # nothing half-written
    elif case == "missing-field":
        f = tmp_path / "test.jsonl"
        f.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+2?"}\n')
        r = run("eval", "--model", tiny_model_dir, "--data", f, "--metric", "exact-match", "--prompt-field", "question",
                "--completion-field", "answer", "--max-new-tokens", "2")
        assert r.returncode == 2 and "test.jsonl:2: no 'answer' field" in r.stderr
    else:
        f = tmp_path / "excel.csv"
        f.write_bytes("\ufeffsentence,label\n".encode() + "".join(f"w{i},{i % 2}\n" for i in range(20)).encode())
        r = run("eval", "--model", tiny_bert_dir, "--data", f, "--metric", "accuracy", "--text-field", "sentence")
        assert r.returncode == 0, r.stderr
        assert _last_json(r.stdout)["examples"] == 20
    assert "Traceback" not in r.stderr


def test_init_with_a_data_free_method_does_not_calibrate(tiny_model_dir, tmp_path, monkeypatch):
    import sys

    from rankwise.cli.jobs import InitJob, run_init

    calibrate_module = sys.modules["rankwise.calib.calibrate"]  # the package exports a function of the same name

    def no_calibration(*a, **k):
        raise AssertionError("lora needs no data; calibrate() must not run")

    monkeypatch.setattr(calibrate_module, "calibrate", no_calibration)
    res = run_init(InitJob(model=str(tiny_model_dir), method="lora", rank=2, out=tmp_path / "o"), progress=False)
    assert res["tokens"] == 0 and (tmp_path / "o" / "adapter_config.json").exists()
    cfg = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model_dir.resolve())  # the folder given, not a cache path
