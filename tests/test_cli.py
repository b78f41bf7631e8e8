"""Tier 4: the installed `rankwise` command as a subprocess."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXE = shutil.which("rankwise") or str(Path(sys.executable).parent / "rankwise")
# As a user's shell has it: no COLUMNS override (output piped, so rich sees no terminal: 80 columns).
ENV = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")} | {"HF_HUB_OFFLINE": "1"}


def run(*args, timeout=600):
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout)


def test_help_lists_commands_and_options():
    r = run("--help")
    assert r.returncode == 0 and "init" in r.stdout
    r = run("init", "--help")
    for opt in ("--model", "--data", "--method", "--rank", "--rho", "--targets", "--out", "--n-samples"):
        assert opt in r.stdout


def test_init_writes_adapter(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    r = run("init", "--model", tiny_model_dir, "--data", "pydoc", "--rank", "4", "--seq-len", "32",
            "--n-samples", "8", "--out", out, "--quiet", "--save-stats")
    assert r.returncode == 0, r.stderr
    assert {"adapter_config.json", "adapter_model.safetensors", "plan.json", "stats.safetensors"} <= {p.name for p in out.iterdir()}
    plan = json.loads((out / "plan.json").read_text())
    assert plan["rank_total"] == 4 * 14  # 2 blocks × 7 linear layers
    assert "rank per layer" in r.stdout and "adapter written to" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["--model", "/no/such/model"], "not found"),
    (["--method", "nope"], "unknown method"),
    (["--targets", "qkv_proj"], "no linear layer matches"),
    (["--rank", "100"], "larger than layer"),
])
def test_init_bad_input_is_a_clear_error(tiny_model_dir, tmp_path, args, needle):
    base = ["init", "--model", tiny_model_dir, "--seq-len", "32", "--n-samples", "4", "--out", tmp_path / "o", "--quiet"]
    r = run(*base, *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
