"""Progress: a tqdm bar on a terminal; in a log (stderr redirected), one plain line per stage instead.

tqdm redraws its bar with carriage returns, which a log file keeps: `make demo > log` once held a 12.7 KB
line for the training bar alone. `progress(...)` takes tqdm's arguments and returns tqdm when stderr is
a terminal; otherwise a `LineProgress` that writes one line per stage where the caller names stages
(set_description: "calibrate block 3/30"), else about ten over the whole count, each with the count,
the postfix (loss, tokens/s, …) and the elapsed time.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable


def interactive() -> bool:
    """True when progress may redraw a bar: stderr is a terminal (RANKWISE_PROGRESS=lines|bars overrides)."""
    forced = os.environ.get("RANKWISE_PROGRESS", "")
    if forced in ("lines", "bars"):
        return forced == "bars"
    return sys.stderr.isatty()


def quiet_libraries() -> None:
    """Outside a terminal, turn off the bars other libraries draw (transformers' loading and saving,
    compressed-tensors' compression): in this process every tqdm is made with disable=True (tqdm read
    TQDM_DISABLE when torch imported it, too early for us, and some libraries pass disable=False), in
    child processes through TQDM_DISABLE. rankwise's own progress then writes lines (LineProgress)."""
    if interactive():
        return
    import tqdm.std

    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    cls = tqdm.std.tqdm
    if getattr(cls, "_rankwise_quiet", False):
        return
    init = cls.__init__

    def quiet_init(self, *args, **kwargs):
        kwargs["disable"] = True
        init(self, *args, **kwargs)

    cls.__init__, cls._rankwise_quiet = quiet_init, True


class LineProgress:
    """The part of tqdm's interface rankwise uses, written as lines: "desc: n/total unit (postfix) 12.3s"."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, lines: int = 10, stream=None, **_):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.every = max(1, math.ceil(total / lines)) if total else 1
        self.postfix, self.stream, self._t0 = "", stream or sys.stderr, time.perf_counter()
        self._said = None  # (desc, n) of the last line written
        self.staged = False
        self._closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __len__(self) -> int:
        return self.total or 0

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.staged = True  # stages (blocks) set the pace: one line each, no periodic ones in between
        if desc != self.desc:
            self.desc = desc
            self._line()  # a new stage: say so once

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        if self.staged:
            return
        if self.n // self.every != before // self.every or (self.total and self.n >= self.total):
            self._line()

    def close(self) -> None:
        if not self._closed and self._said != (self.desc, self.n):
            self._line()
        self._closed = True

    def _line(self) -> None:
        if self._said == (self.desc, self.n):
            return
        self._said = (self.desc, self.n)
        count = f"{self.n}/{self.total}" if self.total else str(self.n)
        extra = f" ({self.postfix})" if self.postfix else ""
        print(f"{self.desc or 'progress'}: {count} {self.unit}{extra} {time.perf_counter() - self._t0:.1f}s",
              file=self.stream, flush=True)


def progress(iterable: Iterable | None = None, *, disable: bool = False, **kwargs):
    """tqdm(iterable, **kwargs) on a terminal, LineProgress elsewhere; a silent tqdm when `disable`."""
    from tqdm.auto import tqdm

    if disable or interactive():
        return tqdm(iterable, disable=disable, **kwargs)
    return LineProgress(iterable, **kwargs)
