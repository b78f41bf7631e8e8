"""`rankwise train / config show / eval / export` as subprocesses."""

import json

import pytest
import yaml

from rankwise.cli.runs import RunConfig

from test_cli import run


@pytest.mark.parametrize("columns", [None, "40"])
def test_config_show_piped_to_a_file_trains(tiny_model_dir, tmp_path, columns):
    """`rankwise config show > run.yaml` at any width, then `rankwise train --config run.yaml`."""
    import subprocess

    from test_cli import ENV, EXE

    env = ENV | ({"COLUMNS": columns} if columns else {})
    f = tmp_path / "run.yaml"
    with open(f, "w") as fh:
        r = subprocess.run([EXE, "config", "show"], stdout=fh, stderr=subprocess.PIPE, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    text = f.read_text()
    assert "# " in text and max(map(len, text.splitlines())) > 80  # long comments are kept whole, not wrapped
    RunConfig(**yaml.safe_load(text))  # what it prints loads back
    # the user edits the model and sizes; the rest stays as printed
    text = text.replace("model: smollm2", f"model: {tiny_model_dir}").replace("seq_len: 256", "seq_len: 32")
    f.write_text(text)
    r = run("train", "--config", f, "--steps", "1", "--out", tmp_path / "o", "--quiet", "--no-merge")
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())["model"] == str(tiny_model_dir)


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


def test_ctrl_c_saves_a_checkpoint_and_prints_resume(tiny_model_dir, tmp_path):
    import os
    import signal
    import subprocess
    import time

    from test_cli import ENV, EXE

    out = tmp_path / "run"
    proc = subprocess.Popen([EXE, "train", "--model", str(tiny_model_dir), "--steps", "100000", "--seq-len", "32",
                             "--rank", "2", "--out", str(out), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "checkpoint saved" in stderr and "--resume" in stderr
    ckpts = list((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "state.pt").exists()
    step = int(ckpts[0].name.split("-")[1])
    assert step >= 3 and len(metrics.read_text().splitlines()) >= step
