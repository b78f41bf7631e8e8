"""Writes that never leave a half-written file or folder behind: temp name, then rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def check_out_dir(out: Path, flag: str = "--out") -> None:
    """ConfigError, before any work, when `out` (an output folder) or a folder above it is an existing file."""
    from .errors import ConfigError

    for p in (Path(out), *Path(out).parents):
        if p.exists() and not p.is_dir():
            raise ConfigError(f"{flag} {out}: {p} is a file, not a folder; choose another {flag}")


def write_text(path: Path, text: str) -> None:
    """Write `text` to path.tmp, then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished temp folder to `out`, replacing an older one only once the new one is complete."""
    old = None
    if out.exists():
        old = out.with_name(out.name + f".old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """Yield a temp folder beside `out`; on success it replaces `out`, on error it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
