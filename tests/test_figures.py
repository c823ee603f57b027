"""Figures from synthetic records are written as non-empty PNG files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_records_synthetic import GRID, make_record

import targets
from harness.figures import write_figures
from harness.records import load_records

PNG = b"\x89PNG\r\n\x1a\n"


def test_figures_written(tmp_path):
    g = torch.Generator().manual_seed(0)
    gmm = targets.get("gmm40").sample(500, generator=g).numpy()
    dw = targets.get("dw4")
    try:
        dws = dw.reference("test", 500).numpy()
    except Exception as e:  # pragma: no cover - data absent
        pytest.skip(f"DW-4 reference unavailable: {e}")
    runs = tmp_path / "runs"
    m = {"x_w2": 1.0, "e_w2": 0.5, "tv": 0.1}
    make_record(runs, "gmm40", "alpha", 0, "ok", m, samples=gmm)
    make_record(runs, "gmm40", "beta", 0, "ok", m, samples=gmm + 3)
    make_record(runs, "dw4", "alpha", 0, "ok", m, samples=dws + np.float32(0.1))
    bad = make_record(runs, "dw4", "beta", 0, "ok", m)
    (bad.spec.run_dir(runs) / "samples.npz").write_bytes(b"corrupt")  # unreadable samples: skipped
    df = load_records(runs)
    paths = write_figures(df, tmp_path / "figs")
    names = sorted(p.name for p in paths)
    assert names == sorted([f"{GRID}_gmm40_samples.png", f"{GRID}_dw4_energy_hist.png",
                            f"{GRID}_dw4_distance_hist.png", f"{GRID}_boltzbench_gmm40_curves.png",
                            f"{GRID}_boltzbench_dw4_curves.png"])
    for p in paths:
        data = p.read_bytes()
        assert data.startswith(PNG) and len(data) > 5000


def test_no_figures_from_empty_records(tmp_path):
    assert write_figures(load_records(tmp_path), tmp_path / "figs") == []
