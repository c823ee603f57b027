"""Progress inside a cell: step, energy evaluations, budget fraction, the latest metric and an ETA.

``CellProgress`` is driven by the training loop (``harness.job``): after every step it may

- write ``<run dir>/progress.json`` (atomically, at most every ``file_every_s`` = 2 s): what the dispatcher
  reads to show in-cell progress of local and SLURM cells (its bar advances by the running cells' budget
  fractions; without a terminal it prints one line per running cell every ``BOLTZBENCH_PROGRESS_EVERY`` s);
- print a log line (no terminal: every ``BOLTZBENCH_PROGRESS_EVERY`` seconds, default 30, 0 = never; these
  lines land in the submitit / SLURM log of the worker) or redraw one live status line (on a terminal);
- call a callback with the snapshot (the in-process ``debug`` executor feeds its own bar with it).

A log line reads::

    [cpu/dw4/idem/r0] step 1200/5000 24.0% | energy evals 1.23e+06 | x_w2 0.512 @10% | loss 1.23 |
    2m31s elapsed, eta 7m58s

The ETA extrapolates the budget fraction spent per second of this segment (training only: the remaining
evaluations add to it). ``read_progress`` returns a cell's last snapshot (or None).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROGRESS_NAME = "progress.json"
ENV_EVERY = "BOLTZBENCH_PROGRESS_EVERY"
DEFAULT_LOG_EVERY_S = 30.0
#: metrics shown, in order of preference (the first finite one of the latest evaluation)
SHOWN_METRICS = ("x_w2", "e_w2", "tv", "dist_w2", "val_x_w2", "val_e_w2")


def log_every_s(default: float = DEFAULT_LOG_EVERY_S) -> float:
    """Seconds between progress log lines: ``BOLTZBENCH_PROGRESS_EVERY`` (0 = none), else ``default``."""
    v = os.environ.get(ENV_EVERY)
    if v:
        try:
            f = float(v)
            if f >= 0 and math.isfinite(f):
                return f
        except ValueError:
            pass
    return default


def fmt_seconds(s: float | None) -> str:
    """``42s``, ``7m58s``, ``2h03m``; ``?`` when unknown."""
    if s is None or not math.isfinite(s) or s < 0:
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def latest_metric(metrics: dict[str, Any] | None) -> tuple[str, float] | None:
    for k in SHOWN_METRICS:
        v = (metrics or {}).get(k)
        if isinstance(v, (int, float)) and math.isfinite(float(v)):
            return k, float(v)
    return None


def describe(snap: dict[str, Any], with_cell: bool = True) -> str:
    """One line from a snapshot (see the module docstring)."""
    parts = []
    step = snap.get("step", 0)
    lim = snap.get("steps_limit")
    frac = snap.get("fraction")
    head = f"step {step}" + (f"/{lim}" if lim else "")
    if isinstance(frac, (int, float)) and math.isfinite(frac):
        head += f" {100 * min(frac, 1.0):.1f}%"
    parts.append(head)
    ev = snap.get("train_energy_evals")
    if ev is not None:
        lim_e = snap.get("energy_limit")
        parts.append(f"energy evals {ev:.3g}" + (f"/{lim_e:.3g}" if lim_e else ""))
    m = snap.get("metric")
    if m:
        at = snap.get("metric_at")
        parts.append(f"{m[0]} {m[1]:.4g}" + (f" @{100 * at:.0f}%" if isinstance(at, (int, float)) else ""))
    if snap.get("loss") is not None:
        parts.append(f"loss {snap['loss']:.4g}")
    parts.append(f"{fmt_seconds(snap.get('elapsed_s'))} elapsed, eta {fmt_seconds(snap.get('eta_s'))}")
    line = " | ".join(parts)
    return f"[{snap.get('cell', '?')}] {line}" if with_cell else line


def read_progress(run_dir: str | Path) -> dict[str, Any] | None:
    """The cell's last progress snapshot, or None (absent or being replaced)."""
    try:
        return json.loads((Path(run_dir) / PROGRESS_NAME).read_text())
    except (OSError, ValueError):
        return None


class CellProgress:
    """Progress reporter of one cell (see the module docstring).

    ``mode``: "auto" (a live line if ``stream`` is a terminal, else log lines), "bar", "lines" or "off" (the
    file and the callback only)."""

    def __init__(
        self,
        cell_id: str,
        run_dir: str | Path | None,
        budget: Any,
        usage: Any,
        *,
        stream: Any = None,
        mode: str = "auto",
        every_s: float | None = None,
        file_every_s: float = 2.0,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.cell = cell_id
        self.path = Path(run_dir) / PROGRESS_NAME if run_dir is not None else None
        self.budget, self.usage = budget, usage
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if bool(getattr(self.stream, "isatty", lambda: False)()) else "lines"
        self.mode = mode
        self.every_s = log_every_s() if every_s is None else every_s
        self.file_every_s = file_every_s
        self.callback = callback
        self.t0 = time.monotonic()
        self.frac0 = self._fraction()
        self.last_file = self.last_log = self.last_bar = self.last_cb = -math.inf
        self.metric: tuple[str, float] | None = None
        self.metric_at: float | None = None
        self.loss: float | None = None
        self._bar_shown = False

    def _fraction(self) -> float:
        try:
            return float(self.budget.fraction(self.usage))
        except Exception:
            return float("nan")

    def snapshot(self, state: str = "running") -> dict[str, Any]:
        now = time.monotonic()
        elapsed = now - self.t0
        frac = self._fraction()
        eta = None
        done = frac - self.frac0
        if math.isfinite(frac) and done > 0 and elapsed > 0:
            eta = max(0.0, (1.0 - frac) * elapsed / done)
        b = self.budget
        return {
            "cell": self.cell,
            "state": state,
            "step": int(self.usage.steps),
            "steps_limit": getattr(b, "steps", None),
            "train_energy_evals": int(self.usage.train_energy_evals),
            "energy_limit": getattr(b, "energy_evals", None),
            "train_seconds": float(self.usage.train_seconds),
            "fraction": frac if math.isfinite(frac) else None,
            "metric": list(self.metric) if self.metric else None,
            "metric_at": self.metric_at,
            "loss": self.loss,
            "elapsed_s": elapsed,
            "eta_s": eta,
            "pid": os.getpid(),
            "updated": time.time(),
        }

    def step(self, logs: dict[str, float] | None = None) -> None:
        """After a completed training step: refresh whatever is due."""
        if logs:
            v = logs.get("loss")
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.loss = float(v)
        self._emit(force=False)

    def evaluated(self, entry: dict[str, Any]) -> None:
        """After an evaluation: remember its headline metric and report it at once."""
        # the test-split metrics if scored already, else the val-split (selection) metrics of the run
        m = latest_metric(entry.get("metrics")) or latest_metric(entry.get("val"))
        if m is not None:
            self.metric, self.metric_at = m, entry.get("fraction")
        self._emit(force=True)

    def _emit(self, force: bool, state: str = "running") -> None:
        now = time.monotonic()
        file_due = self.path is not None and (force or now - self.last_file >= self.file_every_s)
        log_due = self.mode == "lines" and self.every_s > 0 and (force or now - self.last_log >= self.every_s)
        bar_due = self.mode == "bar" and (force or now - self.last_bar >= 0.2)
        cb_due = self.callback is not None and (force or now - self.last_cb >= 0.2)
        if not (file_due or log_due or bar_due or cb_due):
            return
        snap = self.snapshot(state)
        if file_due:
            self.last_file = now
            self._write(snap)
        if log_due:
            self.last_log = now
            print(describe(snap), file=self.stream, flush=True)
        if bar_due:
            self.last_bar = now
            cols = 120
            with contextlib.suppress(OSError, AttributeError, ValueError):
                cols = os.get_terminal_size(self.stream.fileno()).columns
            line = describe(snap)[: max(20, cols - 1)]
            self.stream.write("\r" + line + "\x1b[K")
            self.stream.flush()
            self._bar_shown = True
        if cb_due:
            self.last_cb = now
            self.callback(snap)

    def _write(self, snap: dict[str, Any]) -> None:
        assert self.path is not None
        tmp = self.path.with_name(f".{PROGRESS_NAME}.{os.getpid()}")
        try:
            tmp.write_text(json.dumps(snap))
            os.replace(tmp, self.path)
        except OSError:  # progress is informative only
            pass

    def close(self, state: str = "finished") -> None:
        """Final snapshot (file, callback) and end of the live line."""
        snap = self.snapshot(state)
        if self.path is not None:
            self._write(snap)
        if self.callback is not None:
            self.callback(snap)
        if self._bar_shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._bar_shown = False
