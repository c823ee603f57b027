"""Synthetic run records shared by the records / tables / figures tests (helpers; no tests of its own)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from harness.records import RunRecord, RunSpec

GRID = "testgrid"  # unknown to harness.grids: expected cells come from the records themselves


def make_record(
    root: Path,
    target: str,
    method: str,
    rep: int,
    status: str,
    metrics: dict[str, float] | None,
    protocol: str = "boltzbench",
    n_checkpoints: int = 3,
    samples: np.ndarray | None = None,
    grid: str = GRID,
) -> RunRecord:
    """Write one record (and optionally samples.npz) under ``root``; metrics decay towards the given final
    values over the checkpoints (final = given)."""
    spec = RunSpec(grid=grid, target=target, method=method, replicate=rep, seed=100 + rep, protocol=protocol)
    evals: list[dict[str, Any]] = []
    if metrics is not None:
        for i in range(n_checkpoints):
            f = (i + 1) / n_checkpoints
            evals.append(
                {
                    "fraction": f,
                    "step": 100 * (i + 1),
                    "usage": {
                        "energy_evals": int(1e6 * f),
                        "grad_evals": int(1e6 * f),
                        "steps": 100 * (i + 1),
                        "train_seconds": 10.0 * f,
                        "sample_seconds": 1.0,
                    },
                    "metrics": {k: v * (1 + (n_checkpoints - 1 - i)) for k, v in metrics.items()},
                }
            )
    run_dir = spec.run_dir(root)
    run_dir.mkdir(parents=True, exist_ok=True)
    samples_file = None
    if samples is not None:
        np.savez(run_dir / "samples.npz", samples=samples.astype(np.float32))
        samples_file = "samples.npz"
    rec = RunRecord(
        spec=spec,
        status=status,
        stop_reason="steps" if status == "ok" else "nan loss",
        usage={
            "energy_evals": 1_000_000,
            "grad_evals": 1_000_000,
            "steps": 300,
            "train_seconds": 10.0,
            "sample_seconds": 1.0,
        },
        evaluations=evals,
        reference={
            "source": "published",
            "sha256": "ef4466793b3502b2fe405aad22d3ae43b34827971594c5bab28684771d828244",
            "file": f"test_split_{target}.npy",
        },
        environment={"torch": "2.13.0"},
        error="RuntimeError: boom" if status == "failed" else None,
        samples_file=samples_file,
        started_at="2026-01-01T00:00:00Z",
        finished_at="2026-01-01T00:01:00Z",
    )
    rec.write(run_dir / "record.json")
    return rec


def standard_grid(root: Path) -> None:
    """3 methods × 2 targets × 2 seeds with a tie, a diverged cell, a failed seed and a missing cell."""
    def m(x: float, e: float, tv: float) -> dict[str, float]:
        return {"x_w2": x, "e_w2": e, "tv": tv, "x_w2_floor": 1.1, "e_w2_floor": 0.05, "tv_floor": 0.04,
                "n_generated": 1000.0}

    # dw4: alpha best x_w2; beta and gamma tie on e_w2 (both 0.5 in both seeds)
    make_record(root, "dw4", "alpha", 0, "ok", m(1.0, 0.9, 0.10))
    make_record(root, "dw4", "alpha", 1, "ok", m(1.2, 1.1, 0.12))
    make_record(root, "dw4", "beta", 0, "ok", m(2.0, 0.5, 0.20))
    make_record(root, "dw4", "beta", 1, "ok", m(2.2, 0.5, 0.22))
    make_record(root, "dw4", "gamma", 0, "ok", m(3.0, 0.5, 0.30))
    make_record(root, "dw4", "gamma", 1, "failed", None)
    # gmm40: alpha diverged in both seeds, beta ok, gamma missing entirely
    make_record(root, "gmm40", "alpha", 0, "diverged", None)
    make_record(root, "gmm40", "alpha", 1, "diverged", None)
    make_record(root, "gmm40", "beta", 0, "ok", m(5.0, 3.0, 0.50))
    make_record(root, "gmm40", "beta", 1, "ok", m(7.0, 5.0, 0.70))
