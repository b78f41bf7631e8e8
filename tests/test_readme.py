"""README.md is executable: every `rankwise …` line of its bash blocks, then its Python block, run as a
user would run them (a subprocess in a fresh folder), on tiny models with small step counts.

The commands are read from README.md with markdown-it-py (the CommonMark parser rich is built on), so a
command that changes in the code without the README, or the reverse, fails here. Substitutions are
limited to model names, sizes and step counts (SUBSTITUTE); everything else runs as printed.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from markdown_it import MarkdownIt

from test_cli import ENV, EXE

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def fences(path: Path, lang: str) -> list[str]:
    """The bodies of the fenced code blocks of one language in a markdown file."""
    tokens = MarkdownIt("commonmark").parse(path.read_text())
    return [t.content for t in tokens if t.type == "fence" and t.info.strip() == lang]


def shell_commands(block: str) -> list[list[str]]:
    """Each command of a bash block as argv (continuations joined, comments dropped)."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


def readme_cli_commands() -> list[list[str]]:
    cmds = [argv for block in fences(ROOT / "README.md", "bash") for argv in shell_commands(block)]
    return [argv for argv in cmds if argv[0] == "rankwise"]


def makefile_demo() -> list[str]:
    """The `rankwise train` command of `make demo`."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Makefile").read_text())
    line = next(ln for ln in text.splitlines() if "/rankwise train" in ln)
    return ["rankwise"] + shlex.split(line.split("/rankwise", 1)[1])


def substitute(text: str, tiny: dict[str, str]) -> str:
    """Model names → tiny models, long runs → a few steps, generation → a few tokens."""
    for name, path in tiny.items():
        text = re.sub(rf"(?<![\w/.-]){name}(?![\w/-])", path, text)
    text = re.sub(r"--steps \d+", "--steps 2", text)
    text = re.sub(r"--limit \d+", "--limit 2 --max-new-tokens 4", text)
    text = re.sub(r"\bsteps=\d+", "steps=2", text)
    text = re.sub(r'"train\.steps": \d+', '"train.steps": 2', text)
    return text.replace("seq_len: 256", "seq_len: 64").replace("calib_samples: 32", "calib_samples: 8")


def write_user_files(cwd: Path) -> None:
    """Small stand-ins for the user's SST-2 and GSM8K files, in their formats."""
    (cwd / "sst2").mkdir()
    good, bad = ("a warm , funny and moving film", "a charming delight"), ("dull and lifeless", "a tedious mess")
    rows = [(good[i % 2] + f" {i}", 1) if i % 2 else (bad[i % 2] + f" {i}", 0) for i in range(40)]
    for name, part in (("train.tsv", rows[:32]), ("dev.tsv", rows[32:])):
        (cwd / "sst2" / name).write_text("sentence\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in part))
    (cwd / "gsm8k").mkdir()
    qa = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
           "answer": f"He has {a} + {b} = {a + b} apples.\n#### {a + b}"} for a in range(3, 9) for b in range(2, 5)]
    (cwd / "gsm8k" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa[:14]))
    (cwd / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa[14:]))


def promised(argv: list[str], cwd: Path, stdout: str) -> None:
    """The files (or output) a command promises exist."""
    sub = argv[1]
    if "--help" in argv:
        assert all(c in stdout for c in ("init", "train", "eval", "export", "config")), stdout
    if ">" in argv:
        target = cwd / argv[argv.index(">") + 1]
        assert target.stat().st_size > 0 and isinstance(yaml.safe_load(target.read_text()), dict)
    out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else None
    wanted = {"train": ["config.yaml", "report.md", "metrics.jsonl", "adapter/adapter_config.json", "adapter/rankwise.json"],
              "init": ["adapter_config.json", "adapter_model.safetensors", "plan.json", "rankwise.json"],
              "export": ["config.json", "model.safetensors"], "quantize": ["report.md", "report.json", "errors.png"],
              "compress": ["report.md", "report.json", "model/config.json"]}.get(sub, [])
    for name in wanted:
        assert (cwd / out / name).exists(), f"{' '.join(argv)}: no {out}/{name}"
    if sub == "eval":
        assert "metric" in json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model_dir, tiny_bert_dir):
    cwd = tmp_path_factory.mktemp("readme")
    write_user_files(cwd)
    return cwd, {"smollm2": str(tiny_model_dir), "minilm": str(tiny_bert_dir)}


def _run(argv: list[str], cwd: Path) -> str:
    redirect = argv[argv.index(">") + 1] if ">" in argv else None
    args = [EXE] + (argv[1 : argv.index(">")] if redirect else argv[1:])
    r = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, f"{' '.join(argv)} exited {r.returncode}:\n{r.stderr[-3000:]}"
    if redirect:
        (cwd / redirect).write_text(r.stdout)
    return r.stdout


def test_readme_cli_and_python_blocks_run_as_written(workdir):
    cwd, tiny = workdir
    commands = readme_cli_commands()
    assert len(commands) >= 10, "the README's CLI tour is missing"
    for argv in [makefile_demo()] + commands:  # `make demo` first: the tour uses runs/demo
        argv = shlex.split(substitute(shlex.join(argv), tiny))
        stdout = _run(argv, cwd)
        if ">" in argv:  # the user edits the printed config (model and sizes) before training on it
            f = cwd / argv[argv.index(">") + 1]
            f.write_text(substitute(f.read_text(), tiny))
        promised(argv, cwd, stdout)
    (python_block,) = fences(ROOT / "README.md", "python")
    r = subprocess.run([sys.executable, "-c", substitute(python_block, tiny)], cwd=cwd, capture_output=True,
                       text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("runs/eva/adapter_config.json", "runs/py/metrics.jsonl", "runs/y/report.md", "runs/gptq-ct/config.json",
                 "runs/svd-py/config.json"):
        assert (cwd / name).exists(), name


def test_every_subcommand_is_in_the_readme():
    from typer.main import get_command

    from rankwise.cli.main import app

    group = get_command(app)
    documented = {(argv[1], argv[2] if argv[1] == "config" else None) for argv in readme_cli_commands() if len(argv) > 1}
    for name, cmd in group.commands.items():
        subs = getattr(cmd, "commands", None)
        for sub in subs or [None]:
            assert (name, sub) in documented, f"`rankwise {name} {sub or ''}` is not in README.md's CLI tour"
