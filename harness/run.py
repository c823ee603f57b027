"""CLI: ``python -m harness.run --grid NAME [...]`` — expand a grid into cells and run them.

Everything is validated before anything is submitted; bad input exits with status 2 and a message naming the
valid choices. Exit status: 0 when every cell is ok or diverged (or there was nothing to do), 1 when a cell
failed, timed out or was lost, 2 for bad input, 130 / 143 when stopped by Ctrl-C / SIGTERM (after every
running cell checkpointed; re-running the same command resumes). See docs/harness.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

from harness import dispatch, grids

DEFAULT_RESULTS = "results/runs"


def _csv(s: str | None) -> list[str] | None:
    if s is None:
        return None
    items = [x.strip() for x in s.split(",") if x.strip()]
    return items or None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m harness.run",
        description="Run a benchmark grid: every (method, target, seed) cell under a fixed budget, "
        "dispatched through submitit (local processes, SLURM job arrays, or in-process).",
        epilog="Ctrl-C or SIGTERM: every running cell checkpoints at its next step boundary, the workers "
        "exit, and re-running the same command resumes. In-cell progress: a live bar on a terminal, "
        "otherwise one line per running cell every BOLTZBENCH_PROGRESS_EVERY seconds (default 30; 0 = off).",
    )
    g = p.add_argument_group("what to run")
    g.add_argument("--grid", metavar="NAME", required=True, help=f"grid name: {', '.join(grids.names())}")
    g.add_argument("--methods", metavar="M1,M2",
                   help="comma-separated method keys (default: every registered method)")
    g.add_argument("--targets", metavar="T1,T2",
                   help="comma-separated target keys (default: the grid's targets)")
    g.add_argument("--seeds", metavar="N", type=int,
                   help="replicates per (method, target) (default: the grid's)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a method config field (idem.num_mc_samples=100) or a budget limit "
                   "(budget.steps=500, budget.wall_seconds=none); repeatable; values are parsed with the "
                   "field's type")
    g.add_argument("--plugin", action="append", default=[], metavar="MODULE[:FUNC]",
                   help="import a module or .py file (and call FUNC) before expanding the grid and in every "
                   "job, to register extra methods or targets; repeatable")
    r = p.add_argument_group("where and how")
    r.add_argument("--executor", default="auto", choices=dispatch.EXECUTORS,
                   help="auto (default) = slurm if a SLURM controller answers `scontrol ping`, else local; "
                   "debug = in-process, sequential; --dry-run says what auto resolves to")
    r.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto (default) = cuda when available (SLURM: when GPUs are requested), else cpu")
    r.add_argument("--results", metavar="DIR", default=DEFAULT_RESULTS,
                   help=f"results root: records, samples, checkpoints (default: {DEFAULT_RESULTS})")
    r.add_argument("--jobs", metavar="N", type=int, default=None,
                   help="local executor: worker processes running cells in parallel (default: CPU cores)")
    r.add_argument("--threads", metavar="N", type=int, default=None,
                   help="torch threads per cell (default: local: cores / jobs; SLURM: --cpus-per-task)")
    r.add_argument("--checkpoint-every", type=float, default=300.0, metavar="SECONDS",
                   help="wall-clock seconds between periodic checkpoints (default: 300; also at every "
                   "evaluation and on Ctrl-C / SIGTERM)")
    r.add_argument("--dry-run", action="store_true",
                   help="print the cells, their state and budgets, the resolved executor, totals (cells, "
                   "summed budget caps, core-hours) and cells that cannot be scored; run nothing")
    r.add_argument("--force", action="store_true",
                   help="re-run done cells too (their record, samples and checkpoint are discarded)")
    r.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                   help="wait for the cells and show progress (the default); --no-wait (SLURM only): exit "
                   "after submitting, each task writes its own record")
    s = p.add_argument_group("SLURM")
    s.add_argument("--partition", metavar="NAME", help="SLURM partition (default: the cluster's default)")
    s.add_argument("--time", type=int, metavar="MINUTES",
                   help="time limit per task (default: 1.25 x the cell's wall-clock budget + 10 min, or the "
                   "grid's); timed-out tasks are requeued and resume")
    s.add_argument("--gpus-per-task", metavar="N", type=int, default=None,
                   help="GPUs per task (default 0; 1 with --device cuda); no GPU flag is sent when 0")
    s.add_argument("--cpus-per-task", metavar="N", type=int, default=1,
                   help="CPUs per task (= torch threads; default: 1)")
    s.add_argument("--mem-gb", metavar="GB", type=float, default=2.0,
                   help="memory per task in GB (default: 2)")
    s.add_argument("--array-parallelism", metavar="N", type=int, default=64,
                   help="max tasks of an array running at once (default: 64)")
    s.add_argument("--max-requeues", metavar="N", type=int, default=3,
                   help="requeues allowed after timeouts (default: 3)")
    s.add_argument("--slurm-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="extra sbatch option, e.g. --slurm-opt account=myproj --slurm-opt qos=low; "
                   "repeatable")
    return p


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=root, prefix=".write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ValueError(f"results directory {str(root)!r} is not writable ({e.strerror or e})") from None


def resolve_executor(name: str) -> str:
    if name not in dispatch.EXECUTORS:
        raise ValueError(f"unknown executor {name!r}; valid executors: {', '.join(dispatch.EXECUTORS)}")
    if name == "auto":
        return "slurm" if dispatch.slurm_reachable() else "local"
    if name == "slurm" and not dispatch.slurm_reachable():
        raise ValueError(
            "--executor slurm: no SLURM controller answers here (`scontrol ping`); start one with "
            "`make slurm-up` or use --executor local"
        )
    return name


def resolve_device(device: str, executor: str, gpus: int | None) -> tuple[str, int]:
    """(spec device, GPUs per SLURM task)."""
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; valid devices: auto, cpu, cuda")
    if gpus is not None and gpus < 0:
        raise ValueError(f"--gpus-per-task must be >= 0, got {gpus}")
    if executor == "slurm":
        if device == "cuda":
            return "cuda", gpus if gpus else 1
        if device == "cpu":
            return "cpu", gpus or 0
        return ("cuda" if gpus else "cpu"), gpus or 0
    if gpus:
        raise ValueError("--gpus-per-task applies to --executor slurm only")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--device cuda asked for but CUDA is not available here; valid devices: cpu (or auto)"
        )
    if device == "auto":
        return ("cuda" if torch.cuda.is_available() else "cpu"), 0
    return device, 0


def _parse_slurm_opts(items: list[str]) -> dict[str, str]:
    out = {}
    for it in items:
        if "=" not in it:
            raise ValueError(f"malformed --slurm-opt {it!r}: expected KEY=VALUE (e.g. account=myproj)")
        k, v = it.split("=", 1)
        k = k.strip().lstrip("-").replace("-", "_")
        if not k:
            raise ValueError(f"malformed --slurm-opt {it!r}: empty key")
        out[k] = v
    return out


def main(argv: list[str] | None = None, stream=None) -> int:
    try:
        return _main(argv, stream)
    except dispatch.LaunchInterrupted as e:
        print(e.message, file=sys.stderr, flush=True)
        return 128 + e.signum
    except KeyboardInterrupt as e:  # before anything was submitted, or an in-process (debug) cell
        msg = getattr(e, "message", "") or "before any cell was submitted; nothing to resume"
        print(f"interrupted: {msg}", file=sys.stderr, flush=True)
        return 128 + int(getattr(e, "signum", signal.SIGINT))


def _raise_terminated(signum: int, frame: object) -> None:
    raise dispatch.Terminated()


def _executor_note(requested: str, resolved: str) -> str:
    if requested != "auto":
        return resolved
    why = ("a SLURM controller answers `scontrol ping`" if resolved == "slurm"
           else "no SLURM controller answers")
    return f"auto -> {resolved} ({why}; pass --executor local/slurm to choose)"


def _totals(ex: grids.Expansion, cells: list, executor: str, threads: int) -> str:
    """Totals of the cells to run: count, summed budget caps and core-hours of training (wall cap x
    threads per cell; evaluations come on top)."""
    n = len(cells)
    wall = [c.spec.budget.get("wall_seconds") for c in cells]
    capped = [w for w in wall if w]
    steps = sum(c.spec.budget.get("steps") or 0 for c in cells)
    evals = sum(c.spec.budget.get("energy_evals") or 0 for c in cells)
    parts = [f"{n} cell(s) to run"]
    if capped:
        h = sum(capped) / 3600.0
        parts.append(f"summed wall-clock caps {h:.2f} h ({h * threads:.2f} core-hours at {threads} "
                     f"thread(s) per cell)" + (f"; {n - len(capped)} cell(s) without a wall-clock cap"
                                               if len(capped) < n else ""))
    if steps:
        parts.append(f"summed step caps {steps:,}")
    if evals:
        parts.append(f"summed energy-evaluation caps {evals:.3g}")
    return "totals: " + "; ".join(parts)


def _unscorable(cells: list) -> list[str]:
    """Cells whose own protocol cannot score them (a reference smaller than the evaluation size), one line
    per reason: "N cell(s) (a, b, ...): reason"."""
    try:
        from harness import scoring

        check = scoring.check_scorable
    except (ImportError, AttributeError):
        return []
    seen: dict[tuple, str | None] = {}
    groups: dict[str, list[str]] = {}
    for c in cells:
        s = c.spec
        key = (s.target, s.protocol, s.n_eval_samples)
        if key not in seen:
            try:
                seen[key] = check(s)
            except Exception as e:  # never fatal for the listing
                seen[key] = f"could not check ({type(e).__name__}: {e})"
        reason = seen[key]
        if reason:
            reason = reason.split("cannot be scored under its protocol: ", 1)[-1]
            groups.setdefault(reason, []).append(s.cell_id)
    out = []
    for reason, ids in groups.items():
        shown = ", ".join(ids[:4]) + (f", +{len(ids) - 4} more" if len(ids) > 4 else "")
        out.append(f"{len(ids)} cell(s) ({shown}): {reason}")
    return out


def _main(argv: list[str] | None = None, stream=None) -> int:
    args = build_parser().parse_args(argv)
    out = stream or sys.stdout
    try:
        if args.grid not in grids.names():
            raise ValueError(f"unknown grid {args.grid!r}; valid grids: {', '.join(grids.names())}")
        positive = (("--jobs", args.jobs), ("--threads", args.threads),
                    ("--cpus-per-task", args.cpus_per_task),
                    ("--array-parallelism", args.array_parallelism), ("--time", args.time))
        for name, v in positive:
            if v is not None and v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v}")
        if args.mem_gb <= 0 or args.max_requeues < 0 or args.checkpoint_every < 0:
            raise ValueError("--mem-gb must be > 0, --max-requeues and --checkpoint-every >= 0")
        dispatch.load_plugins(args.plugin)
        executor = resolve_executor(args.executor)
        if not args.wait and executor != "slurm" and not args.dry_run:
            raise ValueError("--no-wait needs the slurm executor (local and debug cells run in this "
                             "process's children)")
        device, gpus = resolve_device(args.device, executor, args.gpus_per_task)
        slurm_opts = _parse_slurm_opts(args.slurm_opt)
        ex = grids.expand(
            args.grid, _csv(args.methods), _csv(args.targets), args.seeds, args.overrides, device
        )
        root = Path(args.results)
        if not args.dry_run:
            _check_writable(root)
    except ValueError as e:
        return _fail(str(e))

    pl = dispatch.plan(ex.specs, root, force=args.force)
    counts = pl.counts()
    print(f"grid {args.grid}: {ex.grid.description}", file=out)
    if ex.missing_methods:
        print(f"missing methods (planned, not implemented yet): {', '.join(ex.missing_methods)}", file=out)
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(f"{len(ex.specs)} cells ({summary}); results in {root}", file=out)
    mismatched = pl.by_state("mismatch")
    unscorable = _unscorable(pl.to_run)
    if unscorable:
        print(f"{'warning' if args.dry_run else 'error'}: cells that cannot be scored under their protocol "
              "(refused before they train; fix the reference or the sample size first, or leave them out "
              "with --targets / --methods):", file=out if args.dry_run else sys.stderr)
        for line in unscorable:
            print(f"  {line}", file=out if args.dry_run else sys.stderr)
    n_jobs = args.jobs or (os.cpu_count() or 1)
    n_par = max(1, min(n_jobs, len(pl.to_run) or 1))
    per_cell = args.threads or (args.cpus_per_task if executor == "slurm"
                                else max(1, (os.cpu_count() or 1) // n_par))
    if args.dry_run:
        for c in pl.cells:
            s = c.spec
            action = "run" if c in pl.to_run else "skip"
            if c.state == "interrupted" or (c.state in ("failed", "timeout") and action == "run"):
                action = "resume"
            print(f"  {s.cell_id:<32} seed={s.seed:<10} {c.state:<11} -> {action:<6} "
                  f"budget[{', '.join(f'{k}={v}' for k, v in s.budget.items())}] "
                  f"({ex.budget_sources[(s.target, s.method)]}) slurm-limit={ex.time_limit_min(s)}min"
                  + (f"  config{s.config}" if s.config else ""), file=out)
        print(_totals(ex, pl.to_run, executor, per_cell), file=out)
        print(f"dry run: would run {len(pl.to_run)} cell(s) with executor "
              f"{_executor_note(args.executor, executor)}", file=out)
        return 0
    if unscorable:
        return _fail(f"{len(unscorable)} cell(s) cannot be scored (listed above); nothing was submitted")
    if mismatched and not args.force:
        for c in mismatched[:10]:
            print(f"  {c.spec.cell_id}: {c.detail}", file=sys.stderr)
        return _fail(f"{len(mismatched)} cell(s) in {root} hold results of a different spec (budget, "
                     "config or seed changed); use --force to discard them or another --results directory")
    for c in pl.by_state("running"):
        print(f"  {c.spec.cell_id}: running elsewhere ({c.detail}); not started twice", file=out)
    if not args.force:
        for cell_id in dispatch.write_covered(pl.by_state("covered"), root):
            print(f"  {cell_id}: reused the record of the same run in grid {ex.grid.cover_from} "
                  "(harness.covered)", file=out)
    todo = pl.to_run
    if not todo:
        print("nothing to do: every cell is done or running; submitted 0 jobs", file=out)
        return 0
    opts = dispatch.DispatchOptions(
        executor=executor,
        jobs=n_jobs,
        threads=args.threads,
        wait=args.wait,
        plugins=tuple(args.plugin),
        checkpoint_every_s=args.checkpoint_every,
        partition=args.partition,
        time_min=args.time,
        gpus_per_task=gpus,
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem_gb,
        array_parallelism=args.array_parallelism,
        slurm_opts=slurm_opts,
        max_requeues=args.max_requeues,
        job_name=f"bb-{args.grid}",
    )
    how = "" if args.executor != "auto" else (" (auto: a SLURM controller answers)" if executor == "slurm"
                                              else " (auto: no SLURM controller answers)")
    print(f"running {len(todo)} cell(s) on the {executor} executor{how}"
          + (f", {min(opts.jobs, len(todo))} in parallel" if executor == "local" else ""),
          file=out, flush=True)
    main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        result = dispatch.launch(todo, root, opts, ex.time_limit_min, force=args.force)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old_term)
    if result.skipped_running:
        print(f"{len(result.skipped_running)} cell(s) started elsewhere meanwhile; skipped", file=out)
    if executor == "slurm" and not args.wait:
        return 0
    final: dict[str, int] = {}
    for v in result.outcomes.values():
        key = "busy" if v.startswith("busy") else v
        final[key] = final.get(key, 0) + 1
    print("done: " + ", ".join(f"{k} {v}" for k, v in sorted(final.items())), file=out)
    return 1 if result.n_failed else 0


if __name__ == "__main__":
    sys.exit(main())
