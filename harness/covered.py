"""Cells of one grid that are the same run as a finished cell of another (``Grid.cover_from``).

An ``equal-evals-cpu`` cell holds a method to E training energy evaluations and at most its ``cpu`` cell's
optimiser steps. A method that spends few evaluations per step (FAB, AS, ASBS, PIS, DDS) reaches those steps
long before E, and then the cell *is* its ``cpu`` run: same config, seed, step count and evaluation points,
stopped by the same limit. Running it again would repeat that run bit for bit, so the ``cpu`` record is
reused: copied (atomically) under the cell's own directory with the cell's spec and a ``covered_by`` block
naming the source cell, the sha256 of its record, and the evaluations it spent against E. Methods that spend
E before their steps (iDEM, NEM, BNEM) and the uncapped MCMC / PT cells run as usual.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from harness.records import (
    RECORD_NAME,
    RELEASE_SAMPLES_NAME,
    SAMPLES_NAME,
    RunRecord,
    RunSpec,
    atomic_write_bytes,
)

#: statuses of a source run that can stand for the cell (a failed or timed-out run cannot)
COVERING_STATUSES = ("ok", "diverged")


def source_spec(spec: RunSpec, source_grid: str) -> RunSpec:
    """The spec of the same (target, method, replicate) in ``source_grid`` as it would have been run: the
    cell's spec with the grid renamed and the energy limit removed (the source has only the step limit)."""
    budget = {k: v for k, v in spec.budget.items() if k != "energy_evals"}
    return RunSpec(**{**spec.to_dict(), "grid": source_grid, "budget": budget,
                      "eval_fractions": tuple(spec.eval_fractions)})


def covering_record(
    spec: RunSpec, source_grid: str | None, root: str | Path
) -> tuple[Path, RunRecord] | None:
    """The finished run in ``source_grid`` that is this cell's run, or None. It must have the cell's target,
    method, replicate, seed, config, protocol, evaluation points and sample size, the cell's step limit as
    its own step limit, a status in ``COVERING_STATUSES``, have stopped at its steps (or diverged), and have
    spent no more training energy evaluations than the cell's ``energy_evals`` limit."""
    limit = spec.budget.get("energy_evals")
    steps = spec.budget.get("steps")
    if source_grid is None or limit is None or steps is None:
        return None
    src = source_spec(spec, source_grid)
    path = src.run_dir(root) / RECORD_NAME
    try:
        rec = RunRecord.read(path)
    except (OSError, ValueError):
        return None
    s = rec.spec
    same = (
        s.seed == spec.seed and s.config == spec.config and s.protocol == spec.protocol
        and tuple(s.eval_fractions) == tuple(spec.eval_fractions) and s.n_eval_samples == spec.n_eval_samples
        and s.budget.get("steps") == steps and s.budget.get("energy_evals") is None
    )
    if not same or rec.status not in COVERING_STATUSES:
        return None
    if rec.status == "ok" and rec.stop_reason != "steps":
        return None
    if int(rec.usage.get("train_energy_evals", limit + 1)) > limit:
        return None
    return path, rec


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_covered(spec: RunSpec, source: tuple[Path, RunRecord], root: str | Path) -> Path:
    """Write the cell's record (and samples) as a copy of the covering run's; returns the record's path."""
    path, rec = source
    run_dir = spec.run_dir(root)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in (SAMPLES_NAME, RELEASE_SAMPLES_NAME):
        if (path.parent / name).is_file():
            atomic_write_bytes(run_dir / name, (path.parent / name).read_bytes())
    d: dict[str, Any] = rec.to_dict()
    d["spec"] = spec.to_dict()
    d["covered_by"] = {
        "cell": rec.spec.cell_id,
        "record_sha256": _sha256(path),
        "train_energy_evals": int(rec.usage.get("train_energy_evals", 0)),
        "energy_evals_limit": int(spec.budget["energy_evals"]),
        "why": "the run stopped at the cell's step cap within its energy budget: the same run",
    }
    out = RunRecord.from_dict(d)
    out.write(run_dir / RECORD_NAME)
    return run_dir / RECORD_NAME
