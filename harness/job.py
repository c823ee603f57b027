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
import signal
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
from harness.budget import Budget, CountingTarget, Usage
from harness.env import apply_threads, environment_info, threads_from_allocation
from harness.records import RunRecord, RunSpec, atomic_write_bytes, atomic_write_json

DONE_STATUSES = ("ok", "diverged")
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
    """Canonical JSON of a spec, to compare a record's or checkpoint's spec with a new one."""
    d = spec.to_dict() if isinstance(spec, RunSpec) else spec
    return json.dumps(d, sort_keys=True, default=str)


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


def _eval_sizes(spec: RunSpec) -> tuple[int, int]:
    if spec.n_eval_samples is not None:
        return int(spec.n_eval_samples), int(spec.n_eval_samples)
    from harness import metrics

    n_gen, n_ref = metrics.eval_sizes(spec.protocol, spec.target)
    return int(n_gen), int(n_ref)


def _metric_opts(spec: RunSpec) -> dict[str, Any]:
    """The grid's options for harness.metrics.evaluate (none for cells of unknown grids)."""
    from harness import grids

    g = grids.GRIDS.get(spec.grid)
    return dict(g.metric_opts) if g is not None else {}


def _evaluate_metrics(samples: torch.Tensor, reference: torch.Tensor, target: Any, protocol: str,
                      **opts: Any) -> dict:
    from harness import metrics

    return dict(metrics.evaluate(samples, reference, target, protocol, **opts))


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


def _save_samples(run_dir: Path, samples: torch.Tensor) -> str:
    x = samples[:MAX_SAVED_SAMPLES].detach().to("cpu", torch.float32).numpy()
    buf = io.BytesIO()
    np.savez(buf, samples=x)
    atomic_write_bytes(run_dir / SAMPLES_NAME, buf.getvalue())
    return SAMPLES_NAME


class _SignalCatcher:
    """While active (main thread only), SIGTERM / SIGUSR2 set a flag; the loop checkpoints at the next step
    boundary and then hands the signal to the previous handler (submitit: checkpoint + requeue)."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR2", None)) if s)

    def __init__(self) -> None:
        self.pending: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _SignalCatcher:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.pending = signum

    def __exit__(self, *exc: object) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)
        self.previous = {}

    def check(self) -> None:
        if self.pending is not None:
            raise _StopSignal(self.pending)

    def forward(self, signum: int) -> None:
        """Give the signal to the handler that was installed before; default: exit 128 + signum."""
        prev = self.previous.get(signum)
        self.__exit__()
        if callable(prev):
            prev(signum, None)
        raise SystemExit(128 + signum)


def run_one(
    spec: RunSpec,
    results_root: str | Path,
    *,
    threads: int | None = None,
    checkpoint_every_s: float = DEFAULT_CHECKPOINT_EVERY_S,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> RunRecord:
    """Run (or resume, or return the finished record of) one cell and return its record.

    ``threads``: torch threads (default: from the allocation, see ``harness.env``). ``checkpoint_every_s``:
    wall-clock seconds between periodic checkpoints (0: after every step). ``on_step(step, logs)``: called
    after each completed step and its checkpoint (tests use it to interrupt a run). Raises
    ``CellBusyError`` if another process holds the cell."""
    run_dir = spec.run_dir(results_root)
    with ck.CellLock(run_dir):
        existing = read_record(run_dir / RECORD_NAME)
        same = existing is not None and spec_key(existing.spec) == spec_key(spec)
        if same and existing.status in DONE_STATUSES:
            return existing
        return _run_locked(spec, run_dir, threads, checkpoint_every_s, on_step)


def _run_locked(
    spec: RunSpec,
    run_dir: Path,
    threads: int | None,
    checkpoint_every_s: float,
    on_step: Callable[[int, dict[str, float]], None] | None,
) -> RunRecord:
    apply_threads(threads_from_allocation(threads))
    started_at = _now()
    usage = Usage()
    evaluations: list[dict[str, Any]] = []
    status, stop_reason, error = "ok", None, None
    config_dict: dict[str, Any] = {}
    reference_info: dict[str, Any] = {}
    diagnostics: dict[str, Any] = {}
    samples_file: str | None = None
    device_str = spec.device
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

        ck.seed_everything(spec.seed)
        generator = torch.Generator(device=device).manual_seed(spec.seed)
        counted = CountingTarget(target, usage)
        method = M(counted, config, device, generator)
        next_eval = 0
        ckpt = ck.load_checkpoint(run_dir, map_location="cpu")
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
                },
            )

        reference: torch.Tensor | bool | None = None  # False: no reference available (metrics skipped)
        last_ckpt = time.monotonic()
        with _SignalCatcher() as catcher:
            try:
                while True:
                    exhausted = budget.exhausted(usage)
                    frac = budget.fraction(usage)
                    due = [f for f in fractions[next_eval:] if exhausted or frac >= f]
                    if due:
                        if reference is None:
                            n_gen, n_ref = _eval_sizes(spec)
                            try:
                                reference = target.reference("test", n_ref)
                                reference_info = dict(target.reference_info("test"))
                            except FileNotFoundError as e:  # e.g. LJ references not generated yet
                                reference = False
                                reference_info = {"error": f"{type(e).__name__}: {e}"}
                        entry, samples = _evaluate(
                            method, counted, target, spec, reference if reference is not False else None,
                            n_gen, due, frac,
                        )
                        if reference is False:
                            entry["reference_error"] = reference_info["error"]
                        evaluations.append(entry)
                        diagnostics = entry.get("diagnostics", {})
                        next_eval += len(due)
                        if entry["n_nonfinite"] > 0:
                            raise DivergedError(
                                f"{entry['n_nonfinite']} non-finite samples at evaluation "
                                f"{due[-1]:g} (step {usage.steps})"
                            )
                        samples_file = _save_samples(run_dir, samples)
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
                    if on_step is not None:
                        on_step(usage.steps, logs)
                    catcher.check()
            except _StopSignal as s:
                save()
                catcher.forward(s.signum)
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
    rec = _write_record(
        spec, run_dir, status, stop_reason, usage, evaluations, config_dict, reference_info,
        device_str, diagnostics, error, samples_file, started_at,
    )
    if status in DONE_STATUSES:
        ck.remove_checkpoint(run_dir)
    return rec


def _write_record(
    spec: RunSpec, run_dir: Path, status: str, stop_reason: str | None, usage: Usage,
    evaluations: list[dict[str, Any]], config: dict[str, Any], reference: dict[str, Any], device: str,
    diagnostics: dict[str, Any], error: str | None, samples_file: str | None, started_at: str,
) -> RunRecord:
    rec = RunRecord(
        spec=spec,
        status=status,
        stop_reason=stop_reason,
        usage=usage.to_dict(),
        evaluations=evaluations,
        config=config,
        reference=reference,
        environment=environment_info(device),
        diagnostics=diagnostics,
        error=error,
        samples_file=samples_file if samples_file and (run_dir / samples_file).exists() else None,
        started_at=started_at,
        finished_at=_now(),
    )
    rec.write(run_dir / RECORD_NAME)
    return rec


def _evaluate(
    method: Any, counted: CountingTarget, target: Any, spec: RunSpec, reference: torch.Tensor | None,
    n_gen: int, due: list[float], frac: float,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Sample ``n_gen`` configurations, compute the metrics (none without a reference); returns
    (evaluation entry, samples on CPU)."""
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
    opts = _metric_opts(spec)
    metrics = _evaluate_metrics(x, reference, target, spec.protocol, **opts) if reference is not None else {}
    metrics = {
        k: (float(v) if isinstance(v, (int, float)) or hasattr(v, "item") else v) for k, v in metrics.items()
    }
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
        "metrics": metrics,
        "diagnostics": diag,
        "n_samples": int(x.shape[0]),
        "n_nonfinite": n_nonfinite,
        "eval_seconds": time.perf_counter() - t0,
    }
    return entry, x
