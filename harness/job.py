"""``run_one(spec, results_root) -> RunRecord``: the one training loop of the benchmark.

For one cell it: takes the cell's lock (``harness.checkpoint.CellLock``; a cell running elsewhere raises
``CellBusyError`` and is not started twice), returns the existing record if the cell is already done with
the same spec, seeds torch / numpy / python and the method's ``torch.Generator`` from ``spec.seed``, wraps
the target in a ``CountingTarget``, builds the method, resumes from ``checkpoint.pt`` if there is one, then
calls ``method.train_step()`` until the budget is exhausted, evaluating at ``spec.eval_fractions``
of the budget (sampling inside ``counted.sampling()`` and calling ``harness.metrics.evaluate``), and writes
``record.json`` (and ``samples.npz``, key ``samples``, float32, at most 10 000 rows) atomically.

Outcomes: ``ok``; ``diverged`` (non-finite loss, parameters or samples, or an energy asked at a non-finite
configuration: the step and the reason are in ``stop_reason``); ``failed`` (any other exception: traceback in
``error``; the checkpoint is kept so a re-run resumes); ``timeout`` (SLURM timed out too many times).
A target whose reference samples are not available (e.g. LJ references not generated yet) still trains
and samples; its evaluations then carry no metrics and say why in ``reference_error`` (and the record's
``reference`` holds the error).

Checkpoints are written every ``checkpoint_every_s`` seconds of wall-clock, after each evaluation, and at a
step boundary when SIGTERM or SIGUSR2 arrives (the signal is then passed on to the handler installed before,
e.g. submitit's checkpoint-and-requeue, or the process exits). Resuming restores everything the next step
depends on, so on CPU a cell resumed at a checkpoint boundary ends with the same counts and bitwise the same
samples and metrics as an uninterrupted run.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import math
import os
import signal
import socket
import sys
import threading
import time
import traceback
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness import checkpoint as ck
from harness import progress as pg
from harness.budget import Budget, CountingTarget, Usage
from harness.env import apply_threads, environment_info, threads_from_allocation
from harness.records import (
    RELEASE_SAMPLES_NAME,
    RunRecord,
    RunSpec,
    atomic_write_bytes,
    atomic_write_json,
    release_rows,
)
from harness.scoring import (
    EvalPlan,
    UnscorableCellError,
    eval_file,
    eval_plan,
    eval_samples_path,
    final_scoring,
    tidy_eval_samples,
)

DONE_STATUSES = ("ok", "diverged")
#: ``stop_reason`` of a run stopped by its budget's wall-clock guard (status ``timeout``)
GUARD_STOP = "guard_seconds"
RECORD_NAME = "record.json"
SAMPLES_NAME = "samples.npz"
SPEC_NAME = "spec.json"  # the spec of the run the checkpoint belongs to (cheap to read for planning)
MAX_SAVED_SAMPLES = 10_000
DEFAULT_CHECKPOINT_EVERY_S = 300.0


class DivergedError(Exception):
    """Internal: the run diverged (reason in the message)."""


class _StopSignal(BaseException):
    def __init__(self, signum: int):
        self.signum = signum


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def spec_key(spec: RunSpec | dict[str, Any]) -> str:
    """Canonical JSON of a spec, to compare a record's or checkpoint's spec with a new one. The budget's
    wall-clock guard (``guard_seconds``) is left out: it does not change what a cell computes, so a cell
    that timed out resumes under a larger guard."""
    d = dict(spec.to_dict() if isinstance(spec, RunSpec) else spec)
    if isinstance(d.get("budget"), dict):
        d["budget"] = {k: v for k, v in d["budget"].items() if k != "guard_seconds"}
    return json.dumps(d, sort_keys=True, default=str)


def guard_covers(record: RunRecord, spec: RunSpec) -> bool:
    """Whether ``record`` stopped at its wall-clock guard and ``spec``'s guard is no larger than the training
    time it already had (a re-run would stop at once): such a ``timeout`` cell is finished for this spec."""
    if record.status != "timeout" or record.stop_reason != GUARD_STOP:
        return False
    guard = spec.budget.get("guard_seconds")
    return guard is not None and float(guard) <= float(record.usage.get("train_seconds", 0.0))


def record_path(spec: RunSpec, results_root: str | Path) -> Path:
    return spec.run_dir(results_root) / RECORD_NAME


def read_record(path: str | Path) -> RunRecord | None:
    """The record at ``path``, or None if absent or unreadable."""
    try:
        return RunRecord.read(path)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None


def resolve_device(device: str) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'auto' -> a torch.device; CUDA asked for but absent is a ValueError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for but CUDA is not available; valid devices: cpu")
        return torch.device(device)
    if device == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {device!r}; valid devices: auto, cpu, cuda")


def _method_config(M: Any, spec: RunSpec) -> Any:
    """The resolved config; JSON lists are turned back into tuples where the field is a tuple."""
    hints = typing.get_type_hints(M.Config)
    over = {}
    for k, v in spec.config.items():
        h = hints.get(k)
        if isinstance(v, list) and h is not None and (
            typing.get_origin(h) is tuple
            or any(typing.get_origin(a) is tuple for a in typing.get_args(h))
            or h is tuple
        ):
            v = tuple(v)
        over[k] = v
    return M.Config.for_target(spec.target, **over)


def _finite_logs(logs: Any, step: int) -> dict[str, float]:
    out: dict[str, float] = {}
    if not isinstance(logs, dict):
        return out
    for k, v in logs.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if not math.isfinite(f):
            raise DivergedError(f"non-finite {k}={f} at step {step}")
        out[k] = f
    return out


def _save_samples(run_dir: Path, samples: torch.Tensor, name: str = SAMPLES_NAME) -> str:
    x = samples[:MAX_SAVED_SAMPLES].detach().to("cpu", torch.float32).numpy()
    buf = io.BytesIO()
    np.savez(buf, samples=x)
    atomic_write_bytes(run_dir / name, buf.getvalue())
    return name


def _save_release_samples(run_dir: Path, evaluations: list[dict[str, Any]]) -> None:
    """``samples_small.npz``: the first ``release_rows(dim)`` rows of the last evaluation's samples (float32,
    key ``samples``), the part of a run's samples the results release commits."""
    path = eval_samples_path(run_dir, evaluations, len(evaluations) - 1)
    if path is None:
        return
    with np.load(path, allow_pickle=False) as z:
        x = np.asarray(z["samples"], dtype=np.float32)
    buf = io.BytesIO()
    np.savez(buf, samples=x[: release_rows(x.shape[1])])
    atomic_write_bytes(run_dir / RELEASE_SAMPLES_NAME, buf.getvalue())


class CellInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped a cell at a step boundary after its checkpoint was written; ``message`` says
    what was saved and how to resume (a ``KeyboardInterrupt``, so callers that stop on Ctrl-C still do)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


#: a stop signal that reached this process outside a cell's training loop (``install_worker_handlers``)
_PENDING: dict[str, int | None] = {"signum": None}


def _request_stop(signum: int, frame: Any) -> None:
    if signum == signal.SIGINT and _PENDING["signum"] == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C: stop now, without waiting for the step boundary
    _PENDING["signum"] = signum


def install_worker_handlers() -> None:
    """In a worker process (local or SLURM): SIGINT and SIGTERM only *request* a stop, so the running cell
    checkpoints at its next step boundary, also when the signal arrives during an evaluation, set-up or
    between cells (submitit itself ignores SIGTERM, which left workers running after their launcher died)."""
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, _request_stop)


def stop_requested() -> int | None:
    """The signal number of a pending stop request of this process, or None."""
    return _PENDING["signum"]


class _SignalCatcher:
    """While active (main thread only), SIGTERM / SIGUSR2 / SIGINT set a flag; the loop checkpoints at the
    next step boundary and then: SIGTERM / SIGUSR2 go to the handler installed before (submitit: checkpoint +
    requeue) and the process exits 128 + signum; SIGINT raises ``CellInterrupted``. A second SIGINT before
    the boundary raises ``KeyboardInterrupt`` at once (the last checkpoint stays)."""

    SIGNALS = tuple(
        s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGUSR2", "SIGINT")) if s is not None
    )

    def __init__(self) -> None:
        self.pending: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _SignalCatcher:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.pending == signal.SIGINT:
            raise KeyboardInterrupt
        self.pending = signum

    def __exit__(self, *exc: object) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)
        self.previous = {}

    def check(self) -> None:
        signum = self.pending if self.pending is not None else _PENDING["signum"]
        if signum is not None:
            raise _StopSignal(signum)

    def forward(self, signum: int, message: str = "") -> None:
        """After the checkpoint: SIGINT raises ``CellInterrupted(message)``; other signals go to the handler
        that was installed before, then the process exits 128 + signum (``message`` on stderr first)."""
        prev = self.previous.get(signum)
        self.__exit__()
        if signum == signal.SIGINT:
            raise CellInterrupted(message)
        if message:
            print(message, file=sys.stderr, flush=True)
        if callable(prev) and prev is not _request_stop:
            prev(signum, None)
        raise SystemExit(128 + signum)


def run_one(
    spec: RunSpec,
    results_root: str | Path,
    *,
    threads: int | None = None,
    checkpoint_every_s: float = DEFAULT_CHECKPOINT_EVERY_S,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    progress: Any = "auto",
) -> RunRecord:
    """Run (or resume, or return the finished record of) one cell and return its record.

    ``progress``: in-cell progress reporting (``harness.progress``): "auto" (a live line on a terminal, else
    a log line every ``BOLTZBENCH_PROGRESS_EVERY`` s on stderr), "lines", "bar", "off", or a callable taking
    each snapshot (no output then). ``progress.json`` in the run directory is written in every mode.

    ``threads``: torch threads (default: from the allocation, see ``harness.env``). ``checkpoint_every_s``:
    wall-clock seconds between periodic checkpoints (0: after every step). ``on_step(step, logs)``: called
    after each completed step and its checkpoint (tests use it to interrupt a run). Raises
    ``CellBusyError`` if another process holds the cell."""
    run_dir = spec.run_dir(results_root)
    with ck.CellLock(run_dir):
        existing = read_record(run_dir / RECORD_NAME)
        same = existing is not None and spec_key(existing.spec) == spec_key(spec)
        if same and (existing.status in DONE_STATUSES or guard_covers(existing, spec)):
            return existing
        return _run_locked(spec, run_dir, threads, checkpoint_every_s, on_step, progress)


def _run_locked(
    spec: RunSpec,
    run_dir: Path,
    threads: int | None,
    checkpoint_every_s: float,
    on_step: Callable[[int, dict[str, float]], None] | None,
    progress: Any = "auto",
) -> RunRecord:
    apply_threads(threads_from_allocation(threads))
    started_at = _now()
    # wall-clock segments this cell ran in (one per launch that advanced it); see _segment_info
    segment: dict[str, Any] = {"started_at": started_at, "host": socket.gethostname(), "pid": os.getpid(),
                               "steps_from": 0, "train_seconds_from": 0.0}
    segments: list[dict[str, Any]] = []
    recovery: list[dict[str, Any]] = []
    _RUN_INFO[run_dir] = {"segment": segment, "segments": segments, "recovery": recovery}
    usage = Usage()
    evaluations: list[dict[str, Any]] = []
    status, stop_reason, error = "ok", None, None
    config_dict: dict[str, Any] = {}
    reference_info: dict[str, Any] = {}
    diagnostics: dict[str, Any] = {}
    samples_file: str | None = None
    device_str = spec.device
    plan: EvalPlan | None = None
    target: Any = None
    try:
        import methods
        import targets

        device = resolve_device(spec.device)
        device_str = str(device)
        target = targets.get(spec.target)
        M = methods.get(spec.method)
        config = _method_config(M, spec)
        config_dict = json.loads(json.dumps(config.to_dict(), default=str))
        budget = Budget.from_dict(spec.budget)
        fractions = sorted({float(f) for f in spec.eval_fractions if 0 < float(f) <= 1} | {1.0})

        plan = eval_plan(spec, target)
        if plan.refusal:
            raise UnscorableCellError(plan.refusal)

        ck.seed_everything(spec.seed)
        generator = torch.Generator(device=device).manual_seed(spec.seed)
        counted = CountingTarget(target, usage)
        method = M(counted, config, device, generator)
        next_eval = 0
        ckpt, notes = ck.load_checkpoint_recovering(run_dir, map_location="cpu")
        recovery.extend(notes)
        if ckpt is not None:
            if ckpt["spec"] != spec_key(spec):
                raise ValueError(
                    f"{run_dir / ck.CHECKPOINT_NAME} belongs to a different spec; "
                    "re-launch with --force to discard it (or use another --results directory)"
                )
            method.load_state_dict(ckpt["method"])
            usage.load(ckpt["usage"])
            evaluations = json.loads(ckpt["evaluations"])
            next_eval = int(ckpt["next_eval"])
            started_at = ckpt.get("started_at", started_at)
            samples_file = ckpt.get("samples_file") or None
            ck.set_rng_state(ckpt["rng"], generator)
            segments.extend(json.loads(ckpt.get("segments") or "[]"))
            segment.update(steps_from=usage.steps, train_seconds_from=usage.train_seconds)
        else:  # a fresh start: say which spec the checkpoints that follow belong to
            atomic_write_json(run_dir / SPEC_NAME, spec.to_dict())

        def save() -> None:
            ck.save_checkpoint(
                run_dir,
                {
                    "spec": spec_key(spec),
                    "method": method.state_dict(),
                    "usage": usage.to_dict(),
                    "evaluations": json.dumps(evaluations),
                    "next_eval": next_eval,
                    "started_at": started_at,
                    "samples_file": samples_file or "",
                    "rng": ck.rng_state(generator),
                    "segments": json.dumps(segments + [_close_segment(segment, usage)]),
                },
            )

        reference: torch.Tensor | bool | None = None  # False: no reference available (metrics skipped)
        last_ckpt = time.monotonic()
        reporter = _make_reporter(spec, run_dir, budget, usage, progress)
        _RUN_INFO[run_dir]["reporter"] = reporter
        with _SignalCatcher() as catcher:
            try:
                while True:
                    exhausted = budget.exhausted(usage)
                    frac = budget.fraction(usage)
                    if exhausted == GUARD_STOP:  # the state at the stop, before its evaluation: a re-run
                        save()  # under a larger guard resumes from here (timeout, see Budget)
                    due = [f for f in fractions[next_eval:] if exhausted or frac >= f]
                    if due:
                        if reference is None:  # the val split only: test is read by the final scoring
                            try:
                                reference = target.reference("val")  # selection_metrics takes its rows
                            except FileNotFoundError as e:  # e.g. LJ references not generated yet
                                reference = False
                                reference_info = {"error": f"{type(e).__name__}: {e}"}
                        entry, samples = _evaluate(
                            method, counted, target, spec, reference if reference is not False else None,
                            plan.n_generate, due, frac,
                        )
                        if reference is False:
                            entry["reference_error"] = reference_info["error"]
                        entry["samples_file"] = _save_samples(run_dir, samples, eval_file(len(evaluations)))
                        samples_file = entry["samples_file"]
                        evaluations.append(entry)
                        reporter.evaluated(entry)
                        diagnostics = entry.get("diagnostics", {})
                        next_eval += len(due)
                        if entry["n_nonfinite"] > 0:
                            raise DivergedError(
                                f"{entry['n_nonfinite']} non-finite samples at evaluation "
                                f"{due[-1]:g} (step {usage.steps})"
                            )
                        if not exhausted:
                            save()
                            last_ckpt = time.monotonic()
                    if exhausted:
                        stop_reason = exhausted
                        break
                    t0 = time.perf_counter()
                    logs = method.train_step()
                    usage.train_seconds += time.perf_counter() - t0
                    usage.steps += 1
                    logs = _finite_logs(logs, usage.steps)
                    if not method.parameters_finite():
                        raise DivergedError(f"non-finite parameters after step {usage.steps}")
                    if time.monotonic() - last_ckpt >= checkpoint_every_s:
                        save()
                        last_ckpt = time.monotonic()
                    reporter.step(logs)
                    if on_step is not None:
                        on_step(usage.steps, logs)
                    catcher.check()
            except _StopSignal as s:
                save()
                reporter.close("interrupted")
                catcher.forward(s.signum, _interrupt_message(spec, run_dir, s.signum, usage))
    except DivergedError as e:
        status, stop_reason = "diverged", str(e)
    except Exception as e:
        from targets import NonFiniteInputError

        if isinstance(e, NonFiniteInputError):
            status = "diverged"
            stop_reason = f"energy asked at a non-finite configuration at step {usage.steps}"
        elif type(e).__name__ == "UncompletedJobError":  # submitit: timed out too many times
            status, stop_reason, error = "timeout", "SLURM time limit (requeues used up)", str(e)
        else:
            status, error = "failed", traceback.format_exc()
            stop_reason = f"{type(e).__name__}: {e}"[:500]
        if status == "timeout":
            _write_record(
                spec, run_dir, status, stop_reason, usage, evaluations, config_dict, reference_info,
                device_str, diagnostics, error, samples_file, started_at,
            )
            raise
    if status == "ok" and stop_reason == GUARD_STOP:
        status = "timeout"  # the wall-clock guard stopped it before its counted budget: scored, not finished
    selection: dict[str, Any] = {}
    scoring: dict[str, Any] = {}
    if (status in DONE_STATUSES or stop_reason == GUARD_STOP) and evaluations and plan is not None:
        try:  # the only place the test split is read
            selection, scoring = final_scoring(spec, run_dir, target, evaluations, plan)
            _save_release_samples(run_dir, evaluations)
            if status in DONE_STATUSES:  # a timeout keeps them: a resumed run re-scores every evaluation
                samples_file = tidy_eval_samples(run_dir, evaluations, selection)
            if "error" not in reference_info:
                reference_info = {**scoring.get("test_reference", {}), "splits": scoring.get("splits", {})}
        except Exception as e:
            status, error = "failed", traceback.format_exc()
            stop_reason = f"final scoring: {type(e).__name__}: {e}"[:500]
    rec = _write_record(
        spec, run_dir, status, stop_reason, usage, evaluations, config_dict, reference_info,
        device_str, diagnostics, error, samples_file, started_at, selection, scoring,
    )
    if status in DONE_STATUSES:
        ck.remove_checkpoint(run_dir)
    return rec


def _write_record(
    spec: RunSpec, run_dir: Path, status: str, stop_reason: str | None, usage: Usage,
    evaluations: list[dict[str, Any]], config: dict[str, Any], reference: dict[str, Any], device: str,
    diagnostics: dict[str, Any], error: str | None, samples_file: str | None, started_at: str,
    selection: dict[str, Any] | None = None, scoring: dict[str, Any] | None = None,
) -> RunRecord:
    rec = RunRecord(
        spec=spec,
        status=status,
        stop_reason=stop_reason,
        usage=usage.to_dict(),
        evaluations=evaluations,
        config=config,
        reference=reference,
        environment=_environment(device, run_dir, usage, status),
        diagnostics=diagnostics,
        error=error,
        samples_file=samples_file if samples_file and (run_dir / samples_file).exists() else None,
        started_at=started_at,
        finished_at=_now(),
        selection=selection or {},
        scoring=scoring or {},
    )
    rec.write(run_dir / RECORD_NAME)
    return rec


#: per run directory, while _run_locked runs: its segment, the earlier segments and checkpoint-recovery notes
_RUN_INFO: dict[Path, dict[str, Any]] = {}


def _close_segment(segment: dict[str, Any], usage: Usage) -> dict[str, Any]:
    """The segment as recorded: when and where it ran, the steps it advanced and its training seconds."""
    return {
        "started_at": segment["started_at"],
        "ended_at": _now(),
        "host": segment["host"],
        "pid": segment["pid"],
        "steps_from": int(segment["steps_from"]),
        "steps_to": int(usage.steps),
        "train_seconds": float(usage.train_seconds - segment["train_seconds_from"]),
    }


def _environment(device: str, run_dir: Path, usage: Usage, status: str = "") -> dict[str, Any]:
    """``environment_info`` plus this run's ``resumed`` flag, its wall-clock ``segments`` (one per launch
    that advanced the cell, each with ``train_seconds``) and any ``checkpoint_recovery`` notes."""
    env = environment_info(device)
    info = _RUN_INFO.pop(run_dir, None)
    if info is None:
        return env
    segs = [*info["segments"], _close_segment(info["segment"], usage)]
    env["resumed"] = len(segs) > 1
    env["segments"] = segs
    if info["recovery"]:
        env["checkpoint_recovery"] = info["recovery"]
    rep = info.get("reporter")
    if rep is not None:
        rep.close(status or "finished")
    return env


def _make_reporter(spec: RunSpec, run_dir: Path, budget: Budget, usage: Usage, progress: Any
                   ) -> pg.CellProgress:
    if callable(progress):
        return pg.CellProgress(spec.cell_id, run_dir, budget, usage, mode="off", callback=progress)
    mode = progress if progress in ("auto", "lines", "bar", "off") else "auto"
    return pg.CellProgress(spec.cell_id, run_dir, budget, usage, mode=mode)


def _interrupt_message(spec: RunSpec, run_dir: Path, signum: int, usage: Usage) -> str:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    return (f"{spec.cell_id}: stopped by {name} at step {usage.steps}; checkpoint written to "
            f"{run_dir / ck.CHECKPOINT_NAME} (re-running the same command resumes it)")


def _evaluate(
    method: Any, counted: CountingTarget, target: Any, spec: RunSpec, reference: torch.Tensor | None,
    n_gen: int, due: list[float], frac: float,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Sample ``n_gen`` configurations and compute the val-split selection metrics against ``reference``
    (the val split; none without one); returns (evaluation entry, samples on CPU)."""
    t0 = time.perf_counter()
    with counted.sampling():
        x = method.sample(n_gen)
    x = x.detach().to("cpu", torch.float32)
    if x.ndim != 2 or x.shape[1] != target.dim:
        raise ValueError(
            f"{spec.method}.sample({n_gen}) returned shape {list(x.shape)}, expected [n, {target.dim}]"
        )
    finite = torch.isfinite(x).all(dim=1)
    n_nonfinite = int((~finite).sum())
    from harness import metrics as hm

    val = hm.selection_metrics(x, reference, target) if reference is not None else {}
    try:
        diag = {k: float(v) for k, v in (method.diagnostics() or {}).items()}
    except Exception as e:  # diagnostics are informative; a failure is reported, not fatal
        diag = {"error": f"{type(e).__name__}: {e}"}
    entry = {
        "fraction": due[-1],
        "fractions_due": due,
        "budget_fraction": frac,
        "step": counted.usage.steps,
        "usage": counted.usage.to_dict(),
        "metrics": {},  # filled by the final scoring (harness.scoring), the only reader of the test split
        "val": val,
        "diagnostics": diag,
        "n_samples": int(x.shape[0]),
        "n_nonfinite": n_nonfinite,
        "eval_seconds": time.perf_counter() - t0,
    }
    return entry, x
