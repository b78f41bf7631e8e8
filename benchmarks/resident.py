"""Resident memory for the benchmarks' memory probes: the current value and the peak while a function runs.

glibc keeps freed heap memory resident, and how much varies between identical runs (a quantized base's
resident memory before training went from 0.77 to 1.91 GiB); with the mmap threshold fixed (MMAP_ENV, set
before the process starts) every large tensor is its own mapping, returned when freed, so resident memory
follows what is alive (±0.01 GiB).
"""

from __future__ import annotations

import os
import threading
import time

MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_during(fn):
    """(result, seconds, peak resident bytes) of fn(), sampled every 5 ms by a thread."""
    peak, stop = [rss()], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.005)

    th = threading.Thread(target=sample)
    th.start()
    t = time.perf_counter()
    try:
        out = fn()
    finally:
        stop.set()
        th.join()
    return out, time.perf_counter() - t, peak[0]
