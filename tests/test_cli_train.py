"""`rankwise train / config show / eval / export` as subprocesses."""

import json

import yaml

from rankwise.runs import RunConfig

from test_cli import run


def test_config_show_is_a_complete_valid_config():
    r = run("config", "show")
    assert r.returncode == 0, r.stderr
    assert "# " in r.stdout and "lr:" in r.stdout
    RunConfig(**yaml.safe_load(r.stdout))  # what it prints loads back


def test_config_typo_is_caught(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("train:\n  lrr: 0.001\n")
    r = run("train", "--config", f, "--out", tmp_path / "o")
    assert r.returncode == 2 and "unknown key 'train.lrr'" in r.stderr and "did you mean 'lr'" in r.stderr
    f.write_text("modle: smollm2\n")
    r = run("train", "--config", f)
    assert r.returncode == 2 and "did you mean 'model'" in r.stderr


def test_train_eval_export_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "data": {"seq_len": 32, "max_train_examples": 32},
                                   "train": {"steps": 2, "lr": 0.01}, "init": {"rank": 2}}))
    r = run("train", "--config", cfg, "--steps", "3", "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert (out / "report.md").exists() and (out / "merged" / "config.json").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3  # the flag overrode the file's 2 steps
    r = run("train", "--config", cfg, "--out", out, "--quiet")
    assert r.returncode == 2 and "--resume" in r.stderr  # an existing run is not silently replaced
    r = run("eval", "--model", tiny_model_dir, "--adapter", out / "adapter", "--data", "pydoc", "--seq-len", "32", "--limit", "200")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["metric"] == "perplexity" and res["perplexity"] > 1 and res["tokens"] == 199
    r = run("export", str(out / "adapter"), "--out", tmp_path / "merged2", "--model", tiny_model_dir)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "merged2" / "model.safetensors").exists()
