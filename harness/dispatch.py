"""Dispatch of grid cells through submitit: ``local`` (parallel processes, default), ``slurm`` (job arrays),
``debug`` (in-process, sequential), ``auto`` (slurm when a controller answers, else local).

A cell's outcome is its record (``record.json``), never ``job.result()``: without SLURM accounting submitit
cannot tell the state of a cancelled job and ``result()`` would wait forever. The waiting loop polls the
records and ``squeue``; a job that left the queue (or a local process that exited) without writing a record
gets a ``failed`` record saying so, unless the cell's lock shows it is still running.

Idempotence (``plan``): ``ok`` and ``diverged`` cells with the same spec are done and skipped, and so are
``timeout`` cells stopped by their wall-clock guard (``guard-timeout``) unless the new guard is larger;
``failed``, ``timeout`` (SLURM) and interrupted cells (a checkpoint but no record) are re-run and resume from
their checkpoint; cells locked by a running process are skipped; cells whose record or checkpoint belongs to a
different spec are refused unless ``force`` (which discards their files first). Each launch uses a fresh
submitit folder ``<results>/_submitit/<launch id>`` (SLURM job ids restart when its state is wiped; stale
pickles of an old job with the same id must never be read).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from harness import checkpoint as ck
from harness import covered
from harness import job as hjob
from harness import progress as pg
from harness.grids import GRIDS
from harness.job import (
    DONE_STATUSES,
    RECORD_NAME,
    SAMPLES_NAME,
    SPEC_NAME,
    guard_covers,
    read_record,
    run_one,
    spec_key,
)
from harness.records import RELEASE_SAMPLES_NAME, RunRecord, RunSpec

EXECUTORS = ("auto", "local", "slurm", "debug")
_ALIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                 "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD")


# ------------------------------------------------------------------------------------------- plugins
def load_plugins(plugins: Sequence[str]) -> None:
    """Import each plugin ``MODULE``, ``MODULE:FUNC``, ``path/file.py`` or ``path/file.py:FUNC`` (and call
    FUNC): how extra methods or targets are registered in the processes that run cells."""
    for p in plugins:
        target, _, func = p.partition(":")
        if target.endswith(".py"):
            path = Path(target).resolve()
            if not path.exists():
                raise ValueError(f"plugin file {target!r} does not exist")
            name = f"_boltzbench_plugin_{abs(hash(str(path)))}"
            mod = sys.modules.get(name)
            if mod is None:
                spec = importlib.util.spec_from_file_location(name, path)
                assert spec is not None and spec.loader is not None
                mod = importlib.util.module_from_spec(spec)
                sys.modules[name] = mod
                spec.loader.exec_module(mod)
        else:
            try:
                mod = importlib.import_module(target)
            except ImportError as e:
                raise ValueError(f"cannot import plugin module {target!r}: {e}") from None
        if func:
            fn = getattr(mod, func, None)
            if not callable(fn):
                raise ValueError(f"plugin {p!r}: {target} has no callable {func!r}")
            fn()


def absolute_plugins(plugins: Sequence[str]) -> tuple[str, ...]:
    out = []
    for p in plugins:
        target, sep, func = p.partition(":")
        if target.endswith(".py"):
            target = str(Path(target).resolve())
        out.append(target + sep + func)
    return tuple(out)


# ------------------------------------------------------------------------------------------- the job
class CellJob(submitit.helpers.Checkpointable):
    """The callable submitit runs: one cell (SLURM array task), or a list of cells run one after the other
    (a local worker process: imports and caches are paid once). On preemption / timeout submitit calls
    ``checkpoint`` (the default: resubmit the same call) and requeues; finished cells are then skipped (their
    record is done) and the interrupted one resumes from its own checkpoint file."""

    def __init__(self, plugins: Sequence[str] = (), threads: int | None = None,
                 checkpoint_every_s: float = 300.0, in_process: bool = False, progress: Any = "auto"):
        self.plugins = tuple(plugins)
        self.threads = threads
        self.checkpoint_every_s = checkpoint_every_s
        self.in_process = in_process  # debug executor: signals and interrupts belong to the caller
        self.progress = progress

    def __call__(
        self, spec_dict: dict[str, Any] | list[dict[str, Any]], results_root: str
    ) -> str | list[str]:
        if not self.in_process:  # SIGINT / SIGTERM: checkpoint at the next step boundary, then exit
            hjob.install_worker_handlers()
        load_plugins(self.plugins)
        items = [spec_dict] if isinstance(spec_dict, dict) else list(spec_dict)
        out = []
        for d in items:
            spec = RunSpec.from_dict(d)
            sig = hjob.stop_requested()
            if sig is not None and not self.in_process:
                print(f"stop requested (signal {sig}): not starting {spec.cell_id} and the cells after it",
                      file=sys.stderr, flush=True)
                raise SystemExit(128 + sig)
            try:
                rec = run_one(
                    spec, results_root, threads=self.threads, checkpoint_every_s=self.checkpoint_every_s,
                    progress=self.progress,
                )
                out.append(rec.status)
            except ck.CellBusyError as e:
                out.append(f"busy: {e}")
            except hjob.CellInterrupted as e:
                if self.in_process:
                    raise
                print(e.message, file=sys.stderr, flush=True)
                raise SystemExit(130) from None
        return out[0] if isinstance(spec_dict, dict) else out


# ------------------------------------------------------------------------------------------- planning
@dataclass
class CellState:
    spec: RunSpec
    state: str  # new, interrupted, failed, timeout, guard-timeout, ok, diverged, running, mismatch,
    # covered (the same run as a finished cell of the grid's cover_from grid: reused, not run)
    detail: str = ""


def cell_state(spec: RunSpec, root: str | Path) -> CellState:
    run_dir = spec.run_dir(root)
    holder = ck.is_locked(run_dir)
    if holder is not None:
        who = ", ".join(f"{k}={v}" for k, v in holder.items() if v)
        return CellState(spec, "running", who)
    rec_path = run_dir / RECORD_NAME
    rec = read_record(rec_path)
    if rec is None and rec_path.exists():
        return CellState(spec, "failed", "unreadable record.json (will be re-run)")
    if rec is not None:
        if spec_key(rec.spec) != spec_key(spec):
            return CellState(spec, "mismatch", "record.json was written for a different spec")
        if guard_covers(rec, spec):  # stopped by its wall-clock guard; this guard is no larger: done
            return CellState(spec, "guard-timeout", f"wall-clock guard at {rec.usage.get('steps')} steps "
                             "(a larger budget.guard_seconds resumes it)")
        return CellState(spec, rec.status, rec.stop_reason or "")
    if ck.has_checkpoint(run_dir):
        try:
            ck_spec = json.loads((run_dir / SPEC_NAME).read_text())
        except (OSError, ValueError):
            ck_spec = None
        if ck_spec is not None and spec_key(ck_spec) != spec_key(spec):
            return CellState(spec, "mismatch", "checkpoint.pt was written for a different spec")
        return CellState(spec, "interrupted", "checkpoint without record: resumes")
    grid = GRIDS.get(spec.grid)
    src = covered.covering_record(spec, grid.cover_from if grid else None, root)
    if src is not None:
        used = int(src[1].usage.get("train_energy_evals", 0))
        return CellState(spec, "covered", f"the same run as {src[1].spec.cell_id} ({src[1].status}, "
                         f"{used:.3g} <= {spec.budget['energy_evals']:.3g} training evaluations)")
    return CellState(spec, "new")


@dataclass
class Plan:
    cells: list[CellState]
    force: bool

    def by_state(self, *states: str) -> list[CellState]:
        return [c for c in self.cells if c.state in states]

    @property
    def to_run(self) -> list[CellState]:
        run = ("new", "interrupted", "failed", "timeout")
        if self.force:
            run += ("ok", "diverged", "mismatch", "guard-timeout", "covered")
        return [c for c in self.cells if c.state in run]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.cells:
            out[c.state] = out.get(c.state, 0) + 1
        return out


def plan(specs: Sequence[RunSpec], root: str | Path, force: bool = False) -> Plan:
    return Plan([cell_state(s, root) for s in specs], force)


def write_covered(cells: Sequence[CellState], root: str | Path) -> list[str]:
    """Write the reused record of every ``covered`` cell (``harness.covered``); returns their cell ids.
    A cell that has become busy or no longer qualifies is left alone (the next plan sees it again)."""
    done = []
    for c in cells:
        if c.state != "covered":
            continue
        run_dir = c.spec.run_dir(root)
        try:
            with ck.CellLock(run_dir):
                src = covered.covering_record(c.spec, GRIDS[c.spec.grid].cover_from, root)
                if src is not None and not (run_dir / RECORD_NAME).exists():
                    covered.write_covered(c.spec, src, root)
                    done.append(c.spec.cell_id)
        except ck.CellBusyError:
            continue
    return done


def prepare(cell: CellState, root: str | Path, force: bool) -> bool:
    """Before submitting a cell: with ``force`` discard its record, samples and checkpoint; otherwise move a
    failed/timeout record aside (``record.prev.json``) so that the new outcome is recognisable. Returns False
    if the cell is running elsewhere (then it is not submitted)."""
    run_dir = cell.spec.run_dir(root)
    try:
        with ck.CellLock(run_dir):
            rec = run_dir / RECORD_NAME
            if force and cell.state in ("ok", "diverged", "mismatch", "failed", "timeout", "guard-timeout",
                                        "interrupted"):
                for name in (RECORD_NAME, SAMPLES_NAME, RELEASE_SAMPLES_NAME, ck.CHECKPOINT_NAME,
                             ck.PREV_CHECKPOINT_NAME,
                             SPEC_NAME, pg.PROGRESS_NAME):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(run_dir / name)
            elif rec.exists():
                os.replace(rec, run_dir / "record.prev.json")
    except ck.CellBusyError:
        return False
    return True


# ------------------------------------------------------------------------------------------- SLURM helpers
def slurm_reachable(timeout: float = 10.0) -> bool:
    """Whether a SLURM controller answers (``scontrol ping`` reports UP)."""
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return False
    try:
        p = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return False
    return p.returncode == 0 and "UP" in p.stdout


def squeue_states(job_ids: Sequence[str]) -> dict[str, str] | None:
    """State of each listed job / array task still known to squeue (``{"123_4": "RUNNING"}``); None if squeue
    itself failed (then nothing may be concluded)."""
    if not job_ids:
        return {}
    base = sorted({j.split("_")[0] for j in job_ids})
    try:
        p = subprocess.run(
            ["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(base)],
            capture_output=True, text=True, timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if p.returncode != 0:
        # squeue exits non-zero when every listed job id is unknown (all finished long ago)
        if "Invalid job id" in p.stderr:
            return {}
        return None
    out = {}
    for line in p.stdout.splitlines():
        if "|" in line:
            jid, st = line.strip().split("|", 1)
            out[jid] = st
    return out


# ------------------------------------------------------------------------------------------- options
@dataclass
class DispatchOptions:
    executor: str = "local"  # resolved: local, slurm, debug
    jobs: int = 2  # local: cells in parallel
    threads: int | None = None  # torch threads per cell (default: from the allocation)
    wait: bool = True
    plugins: tuple[str, ...] = ()
    checkpoint_every_s: float = 300.0
    poll_s: float = 2.0
    # SLURM
    partition: str | None = None
    time_min: int | None = None  # per cell; default: from the budget / grid
    gpus_per_task: int = 0
    cpus_per_task: int = 1
    mem_gb: float = 2.0
    array_parallelism: int = 64
    slurm_opts: dict[str, str] = field(default_factory=dict)
    max_requeues: int = 3
    job_name: str = "boltzbench"
    lost_grace_s: float = 20.0  # a job must be absent from squeue this long before it counts as lost
    stop_grace_s: float = 120.0  # Ctrl-C / SIGTERM: how long local workers get to checkpoint and exit
    squeue_give_up_s: float = 600.0  # stop waiting (jobs go on) when squeue keeps failing this long


@dataclass
class Launch:
    """What a launch did: the cells it submitted, their outcomes (status from the record) and job ids."""

    submitted: list[RunSpec] = field(default_factory=list)
    job_ids: dict[str, str] = field(default_factory=dict)  # cell id -> job id
    array_ids: list[str] = field(default_factory=list)
    outcomes: dict[str, str] = field(default_factory=dict)  # cell id -> ok/diverged/failed/timeout/busy/lost
    skipped_running: list[str] = field(default_factory=list)
    folder: str | None = None
    handles: dict[str, tuple[Any, RunSpec]] = field(default_factory=dict)  # cell id -> (submitit job, spec)

    @property
    def n_failed(self) -> int:
        return sum(1 for v in self.outcomes.values() if v not in DONE_STATUSES and not v.startswith("busy"))


# ------------------------------------------------------------------------------------------- progress
class Progress:
    """Launcher-side progress. On a terminal: a tqdm bar over cells that also advances by the running cells'
    budget fractions (from their ``progress.json``), its postfix naming the running cells with step, fraction,
    latest metric and ETA. Otherwise: one line per finished cell, and every ``BOLTZBENCH_PROGRESS_EVERY``
    seconds (default 30) one line per running cell."""

    def __init__(self, total: int, stream: Any = None, interactive: bool | None = None,
                 every_s: float | None = None):
        self.stream = stream or sys.stderr
        self.total = total
        self.done = 0
        self.failed = 0
        self.t0 = time.monotonic()
        self.every_s = pg.log_every_s() if every_s is None else every_s
        self.last_lines = time.monotonic()
        self.snaps: dict[str, dict[str, Any]] = {}
        if interactive is None:
            interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = None
        if interactive and total:
            from tqdm import tqdm

            fmt = "{l_bar}{bar}| {n:.2f}/{total_fmt} cells [{elapsed}<{remaining}{postfix}]"
            self.bar = tqdm(total=total, file=self.stream, unit="cell", dynamic_ncols=True, bar_format=fmt)

    def running(self, n: int, snaps: dict[str, dict[str, Any]] | None = None) -> None:
        if snaps is not None:
            self.snaps = snaps
        if self.bar is not None:
            partial = sum(min(1.0, max(0.0, s.get("fraction") or 0.0)) for s in self.snaps.values())
            self.bar.n = self.done + partial
            shown = []
            for cid, snap in list(self.snaps.items())[:2]:
                short = "/".join(cid.split("/")[1:3])
                m = snap.get("metric")
                frac = snap.get("fraction") or 0.0
                shown.append(f"{short} {100 * min(frac, 1):.0f}%" + (f" {m[0]} {m[1]:.3g}" if m else "")
                             + f" eta {pg.fmt_seconds(snap.get('eta_s'))}")
            more = f" +{len(self.snaps) - 2}" if len(self.snaps) > 2 else ""
            self.bar.set_postfix_str(f"running {n}, failed {self.failed}" + (": " + "; ".join(shown) + more
                                                                            if shown else ""))
            self.bar.refresh()
        elif self.snaps and self.every_s > 0 and time.monotonic() - self.last_lines >= self.every_s:
            self.last_lines = time.monotonic()
            for snap in self.snaps.values():
                print(f"  running {pg.describe(snap)}", file=self.stream, flush=True)

    def finished(self, spec: RunSpec, status: str, rec: RunRecord | None) -> None:
        self.done += 1
        self.snaps.pop(spec.cell_id, None)
        if status not in DONE_STATUSES:
            self.failed += 1
        line = f"[{self.done}/{self.total}] {status:<8} {spec.cell_id}"
        if rec is not None:
            u = rec.usage
            line += f"  steps={u.get('steps')} energy_evals={u.get('energy_evals')}"
            if rec.evaluations and rec.evaluations[-1].get("reference_error"):
                line += "  (no reference: metrics skipped)"
            elif rec.evaluations:
                m = rec.evaluations[-1].get("metrics", {})
                shown = [f"{k}={v:.4g}" for k, v in m.items() if isinstance(v, float)][:3]
                line += "  " + " ".join(shown)
            if rec.status not in DONE_STATUSES or rec.status == "diverged":
                line += f"  ({rec.stop_reason})"
            if (rec.environment or {}).get("resumed"):
                line += "  [resumed]"
        elapsed = time.monotonic() - self.t0
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
            self.bar.n = self.done + sum(min(1.0, s.get("fraction") or 0.0) for s in self.snaps.values())
            self.bar.refresh()
        else:
            eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
            print(f"{line}  [{elapsed:.0f}s elapsed, eta {eta:.0f}s]", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _running_snapshots(cells: dict[str, RunSpec], root: Path, since: float) -> dict[str, dict[str, Any]]:
    """progress.json of the listed cells written during this launch and still running."""
    out = {}
    for cid, spec in cells.items():
        snap = pg.read_progress(spec.run_dir(root))
        if snap and snap.get("state") == "running" and float(snap.get("updated", 0)) >= since:
            out[cid] = snap
    return out


# ------------------------------------------------------------------------------------------- outcomes
def _outcome(spec: RunSpec, root: Path) -> tuple[str, RunRecord | None]:
    rec = read_record(spec.run_dir(root) / RECORD_NAME)
    if rec is not None and spec_key(rec.spec) == spec_key(spec):
        return rec.status, rec
    return "", None


def _write_lost(spec: RunSpec, root: Path, why: str) -> tuple[str, RunRecord | None]:
    """A job ended without a record: write a failed record (unless the cell is running elsewhere)."""
    run_dir = spec.run_dir(root)
    try:
        with ck.CellLock(run_dir):
            status, rec = _outcome(spec, root)
            if rec is not None:
                return status, rec
            has_ckpt = (run_dir / ck.CHECKPOINT_NAME).exists()
            rec = RunRecord(
                spec=spec,
                status="failed",
                stop_reason="job ended without writing a record",
                error=why + (" A re-launch resumes from its checkpoint." if has_ckpt else ""),
                finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            )
            rec.write(run_dir / RECORD_NAME)
            return "failed", rec
    except ck.CellBusyError:
        return "busy: running elsewhere", None


def _tail(path: Path | None, n: int = 3000) -> str:
    if path is None:
        return ""
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------- launch
def launch(
    cells: Sequence[CellState],
    root: str | Path,
    opts: DispatchOptions,
    time_limit_min: Callable[[RunSpec], int] | None = None,
    force: bool = False,
    stream: Any = None,
    interactive: bool | None = None,
) -> Launch:
    """Prepare and submit ``cells`` with the chosen executor; wait (unless ``opts.wait`` is False) and return
    what happened. Never blocks on ``job.result()``."""
    root = Path(root).resolve()
    stream = stream or sys.stderr
    out = Launch()
    specs = []
    for c in cells:
        if prepare(c, root, force):
            specs.append(c.spec)
        else:
            out.skipped_running.append(c.spec.cell_id)
    out.submitted = specs
    if not specs:
        return out
    limit = time_limit_min or (lambda s: 60)
    if opts.executor == "debug":
        return _run_debug(specs, root, opts, out, stream, interactive)
    launch_id = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    folder = root / "_submitit" / launch_id
    out.folder = str(folder)
    job = CellJob(absolute_plugins(opts.plugins), opts.threads, opts.checkpoint_every_s)
    if opts.executor == "local":
        return _run_local(specs, root, opts, job, folder, limit, out, stream, interactive)
    if opts.executor == "slurm":
        return _run_slurm(specs, root, opts, job, folder, limit, out, stream, interactive)
    raise ValueError(f"unknown executor {opts.executor!r}; valid executors: {', '.join(EXECUTORS)}")


def _run_debug(specs: list[RunSpec], root: Path, opts: DispatchOptions, out: Launch, stream: Any,
               interactive: bool | None) -> Launch:
    prog = Progress(len(specs), stream, interactive)
    current: dict[str, str] = {}

    def on_progress(snap: dict[str, Any]) -> None:
        prog.running(1, {current["cell"]: snap})

    job = CellJob(opts.plugins, opts.threads, opts.checkpoint_every_s, in_process=True, progress=on_progress)
    since = time.time()
    try:
        for s in specs:
            current["cell"] = s.cell_id
            result = job(s.to_dict(), str(root))
            status, rec = _outcome(s, root)
            out.outcomes[s.cell_id] = status or result
            prog.finished(s, status or result, rec)
    except KeyboardInterrupt as e:
        prog.close()
        signum = getattr(e, "signum", signal.SIGINT)
        raise LaunchInterrupted(_interrupt_summary(specs, root, out, since, signum), signum) from None
    finally:
        prog.close()
    return out


def _run_local(specs: list[RunSpec], root: Path, opts: DispatchOptions, job: CellJob, folder: Path,
               limit: Callable[[RunSpec], int], out: Launch, stream: Any, interactive: bool | None) -> Launch:
    """``opts.jobs`` worker processes (submitit local jobs), each running its share of the cells one after
    the other (cells dealt round-robin); a cell is reported when its record appears."""
    ex = submitit.LocalExecutor(folder=folder, max_num_timeout=opts.max_requeues)
    n_workers = max(1, min(opts.jobs, len(specs)))
    if opts.threads is None:
        job.threads = max(1, (os.cpu_count() or 1) // n_workers)
    pending: dict[str, tuple[Any, RunSpec, int]] = {}
    workers = []
    since = time.time()
    # workers start with SIGINT ignored: a terminal's Ctrl-C must not kill submitit's controller (it would
    # SIGKILL the worker a second later); the worker installs its own handlers (checkpoint, then exit)
    with _sigint_ignored():
        for w in range(n_workers):
            chunk = specs[w::n_workers]
            ex.update_parameters(timeout_min=sum(limit(s) for s in chunk), stderr_to_stdout=True)
            j = ex.submit(job, [s.to_dict() for s in chunk], str(root))
            workers.append(j)
            for i, s in enumerate(chunk):
                pending[s.cell_id] = (j, s, i)
                out.job_ids[s.cell_id] = j.job_id
    prog = Progress(len(specs), stream, interactive)
    try:
        while pending:
            snaps = _running_snapshots({cid: v[1] for cid, v in pending.items()}, root, since)
            prog.running(sum(1 for j in workers if not j.done()), snaps)
            time.sleep(min(opts.poll_s, 0.5))
            for cid, (j, s, i) in list(pending.items()):
                done = j.done()  # before reading the record: a finished worker wrote all it ever will
                status, rec = _outcome(s, root)
                if not status and not done:
                    continue
                if not status:
                    result = _local_result(j, i)
                    if result.startswith("busy"):
                        status = result
                    else:
                        status, rec = _write_lost(
                            s, root, f"local worker {j.job_id} exited before this cell wrote its record. "
                            "Output tail:\n" + _tail(j.paths.stdout) + result
                        )
                del pending[cid]
                out.outcomes[cid] = status
                prog.finished(s, status, rec)
    except KeyboardInterrupt as e:
        prog.close()
        signum = getattr(e, "signum", signal.SIGINT)
        _stop_local_workers(workers, opts.stop_grace_s, stream)
        raise LaunchInterrupted(_interrupt_summary(specs, root, out, since, signum), signum) from None
    finally:
        prog.close()
    return out


# ------------------------------------------------------------------------------------------- interrupts
class Terminated(KeyboardInterrupt):
    """Raised in the launcher by its SIGTERM handler (``harness.run``): handled like Ctrl-C."""

    signum = signal.SIGTERM


class LaunchInterrupted(KeyboardInterrupt):
    """A launch stopped by Ctrl-C or SIGTERM after its workers checkpointed and exited; ``message`` is one
    line saying what was checkpointed and how to resume."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.message = message
        self.signum = int(signum)


@contextlib.contextmanager
def _sigint_ignored() -> Any:
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (Linux /proc; empty elsewhere)."""
    parents: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for e in entries:
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(e))
    out, todo = [], [pid]
    while todo:
        for c in parents.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _signal_quietly(pid: int, sig: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, sig)


def _stop_local_workers(workers: Sequence[Any], grace_s: float, stream: Any) -> None:
    """Ask every live local worker to checkpoint at its next step boundary and exit (SIGTERM to submitit's
    controller, which forwards it, and to its worker processes; re-sent every 5 s), wait up to ``grace_s``,
    then SIGKILL what is left (the cells resume from their last checkpoint). A second Ctrl-C or SIGTERM
    kills at once. Returns when no worker process is left."""
    import threading

    force = {"now": False}

    def _force(signum: int, frame: Any) -> None:
        force["now"] = True

    old: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, _force)
    try:
        procs = [p for p in (getattr(j, "_process", None) for j in workers) if p is not None]
        t0 = time.monotonic()
        last_send = -1e9
        told = False
        while True:
            alive = [p for p in procs if p.poll() is None]
            if not alive:
                return
            now = time.monotonic()
            if force["now"] or now - t0 > grace_s:
                for p in alive:
                    for pid in _descendants(p.pid):
                        _signal_quietly(pid, signal.SIGKILL)
                    _signal_quietly(p.pid, signal.SIGKILL)
                for p in alive:
                    with contextlib.suppress(Exception):
                        p.wait(timeout=10)
                return
            if now - last_send >= 5.0:
                last_send = now
                for p in alive:
                    for pid in [p.pid, *_descendants(p.pid)]:
                        _signal_quietly(pid, signal.SIGTERM)
            if not told and now - t0 > 5.0:
                told = True
                print(f"waiting for {len(alive)} worker(s) to checkpoint and stop (up to {grace_s:.0f} s; "
                      "Ctrl-C again to kill them now)", file=stream or sys.stderr, flush=True)
            time.sleep(0.2)
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _interrupt_summary(specs: Sequence[RunSpec], root: Path, out: Launch, since: float, signum: int) -> str:
    """One line: the running cells checkpointed (and at which step), how many finished, how to go on."""
    try:
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    saved, finished, waiting = [], 0, 0
    for s in specs:
        if s.cell_id in out.outcomes or _outcome(s, root)[0]:
            finished += 1
            continue
        snap = pg.read_progress(s.run_dir(root))
        if (snap and snap.get("state") == "interrupted" and float(snap.get("updated", 0)) >= since
                and ck.has_checkpoint(s.run_dir(root))):
            saved.append(f"{s.cell_id} at step {snap.get('step')}")
        else:
            waiting += 1
    what = "no cell was running"
    if saved:
        what = (f"{len(saved)} running cell(s) checkpointed ({', '.join(saved[:3])}"
                + (f", +{len(saved) - 3} more" if len(saved) > 3 else "") + ")")
    return (f"interrupted ({name}): {what}; {finished} finished, {waiting} not started; "
            "every worker has stopped. Re-run the same command to resume.")


def _local_result(j: Any, index: int | None = None) -> str:
    """The callable's return value (item ``index`` of a worker's list) from the result pickle, if the job
    wrote one (never waits)."""
    path = j.paths.result_pickle
    if not path.exists():
        return ""
    try:
        outcome, value = submitit.core.utils.pickle_load(path)
    except Exception:
        return ""
    if outcome != "success":
        return f"\n{value}"
    if isinstance(value, list):
        return str(value[index]) if index is not None and index < len(value) else ""
    return str(value)


def _run_slurm(specs: list[RunSpec], root: Path, opts: DispatchOptions, job: CellJob, folder: Path,
               limit: Callable[[RunSpec], int], out: Launch, stream: Any, interactive: bool | None) -> Launch:
    groups: dict[int, list[RunSpec]] = {}
    for s in specs:
        groups.setdefault(opts.time_min or limit(s), []).append(s)
    jobs: dict[str, tuple[Any, RunSpec]] = {}
    for tmin, group in groups.items():
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=opts.max_requeues)
        params: dict[str, Any] = {
            "timeout_min": int(tmin),
            "cpus_per_task": int(opts.cpus_per_task),
            "mem_gb": float(opts.mem_gb),
            "slurm_array_parallelism": int(opts.array_parallelism),
            "name": opts.job_name,
            "stderr_to_stdout": True,
            "slurm_setup": [f"export OMP_NUM_THREADS={int(opts.cpus_per_task)}"],
        }
        if opts.partition:
            params["slurm_partition"] = opts.partition
        if opts.gpus_per_task:
            params["gpus_per_node"] = int(opts.gpus_per_task)
        if opts.slurm_opts:
            params["slurm_additional_parameters"] = dict(opts.slurm_opts)
        ex.update_parameters(**params)
        with ex.batch():
            submitted = [(ex.submit(job, s.to_dict(), str(root)), s) for s in group]
        array_ids = sorted({j.job_id.split("_")[0] for j, _ in submitted})
        out.array_ids.extend(array_ids)
        print(
            f"submitted {len(group)} cell(s) as SLURM array job {', '.join(array_ids)} "
            f"(time limit {tmin} min, {opts.cpus_per_task} CPU(s)"
            + (f", {opts.gpus_per_task} GPU(s)" if opts.gpus_per_task else "") + ")",
            file=stream, flush=True,
        )
        for j, s in submitted:
            jobs[s.cell_id] = (j, s)
            out.job_ids[s.cell_id] = j.job_id
    out.handles = jobs
    if not opts.wait:
        print(f"not waiting; each task writes its own record under {root} (submitit logs: {folder})",
              file=stream, flush=True)
        return out
    return wait_slurm(jobs, root, opts, out, stream, interactive)


def wait_slurm(jobs: dict[str, tuple[Any, RunSpec]], root: Path, opts: DispatchOptions, out: Launch,
               stream: Any = None, interactive: bool | None = None) -> Launch:
    """Poll records and squeue until every submitted cell has an outcome (never calls job.result())."""
    pending = dict(jobs)
    since = time.time() - 3600.0  # SLURM tasks may have started before this wait (--no-wait, re-attach)
    missing_since: dict[str, float] = {}
    squeue_ok = time.monotonic()
    prog = Progress(len(jobs), stream, interactive)
    try:
        while pending:
            states = squeue_states([j.job_id for j, _ in pending.values()])
            now = time.monotonic()
            if states is not None:
                squeue_ok = now
            elif now - squeue_ok > opts.squeue_give_up_s:
                print(f"\nsqueue has failed for {opts.squeue_give_up_s:.0f} s: no longer waiting for "
                      f"{len(pending)} cell(s); their jobs write their own records (re-run the command to "
                      "see what is done)", file=stream or sys.stderr)
                for cid in pending:
                    out.outcomes[cid] = "unknown"
                break
            n_running = 0
            for cid, (j, s) in list(pending.items()):
                status, rec = _outcome(s, root)
                if status:
                    del pending[cid]
                    out.outcomes[cid] = status
                    prog.finished(s, status, rec)
                    continue
                if states is None:
                    continue
                st = states.get(j.job_id)
                if st is not None and st.split()[0] in _ALIVE_STATES:
                    missing_since.pop(cid, None)
                    n_running += st == "RUNNING"
                    continue
                first = missing_since.setdefault(cid, now)
                if now - first < opts.lost_grace_s:
                    continue
                if ck.is_locked(s.run_dir(root)) is not None:
                    continue
                result = _local_result(j)
                if result.startswith("busy"):
                    status, rec = result, None
                else:
                    status, rec = _write_lost(
                        s, root, f"SLURM job {j.job_id} left the queue without writing a record "
                        "(cancelled, killed or out of requeues). Log tail:\n"
                        + _tail(j.paths.stdout) + result,
                    )
                del pending[cid]
                out.outcomes[cid] = status
                prog.finished(s, status, rec)
            prog.running(n_running, _running_snapshots({c: v[1] for c, v in pending.items()}, root, since))
            if pending:
                time.sleep(opts.poll_s)
    except KeyboardInterrupt as e:
        prog.close()
        ids = ", ".join(sorted({j.job_id.split("_")[0] for j, _ in pending.values()})) or "none"
        raise LaunchInterrupted(
            f"interrupted: {len(pending)} cell(s) still queued or running as SLURM job(s) {ids}; they keep "
            "running and write their own records (scancel them to stop; each checkpoints first). Re-run the "
            "same command to wait for them or to resume.", getattr(e, "signum", signal.SIGINT)) from None
    finally:
        prog.close()
    return out


