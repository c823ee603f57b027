"""Helpers of the benchmark files (not a benchmark itself): ``PeakRSS`` / ``peak_rss()``, the peak resident
memory of this process while a block runs (what ``make bench`` reports beside each training step's time)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

# ----------------------------------------------------------------------------------------- peak memory
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: fall back to the process's lifetime maximum
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class PeakRSS:
    """Peak resident set size of this process while the block runs (sampled every ``interval`` s by a
    thread; /proc/self/statm), in bytes: ``peak``; ``before`` the RSS on entry. On CUDA the device's peak
    allocation is what matters: ``cuda_peak`` (torch.cuda.max_memory_allocated, reset on entry)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.before = self.peak = 0
        self.cuda_peak: int | None = None
        self._stop = threading.Event()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.before = self.peak = _rss_bytes()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        if torch.cuda.is_available():
            self.cuda_peak = int(torch.cuda.max_memory_allocated())

    def info(self) -> dict[str, float]:
        out = {"peak_rss_mb": self.peak / 2**20, "rss_before_mb": self.before / 2**20}
        if self.cuda_peak is not None:
            out["cuda_peak_mb"] = self.cuda_peak / 2**20
        return out


@contextlib.contextmanager
def peak_rss() -> Iterator[PeakRSS]:
    with PeakRSS() as p:
        yield p


# ------------------------------------------------------------------------------------ target selection
def chosen_targets(
    config: Any, every: tuple[str, ...], cpu_default: tuple[str, ...] = ("gmm40", "dw4")
) -> list[str]:
    """The targets a paper-settings benchmark runs: ``--bench-targets a,b`` (``all`` = ``every``; unknown keys
    dropped), else ``cpu_default`` on CPU and ``every`` on CUDA (LJ at paper settings is minutes per call on
    a CPU)."""
    raw = config.getoption("bench_targets", default=None)
    if raw is None:
        on_cpu = config.getoption("device", default="cpu") == "cpu"
        return list(cpu_default) if on_cpu else list(every)
    if raw.strip() == "all":
        return list(every)
    return [k.strip() for k in raw.split(",") if k.strip() in every]
