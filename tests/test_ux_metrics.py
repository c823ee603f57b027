"""Scoring a small batch quickly: reference energies / distances cached, noise floors cached (also on disk),
the bootstrap sized to the sample; default-size results unchanged. The timing of ``evaluate`` on 64 LJ-55
samples is a benchmark (``-m bench``), not an asserted time."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import targets
from harness import metrics as M


@pytest.fixture
def cold(monkeypatch, tmp_path):
    """Empty in-memory caches and a private on-disk floor cache."""
    monkeypatch.setattr(M, "_FLOOR_CACHE", {})
    monkeypatch.setattr(M, "_DERIVED_CACHE", {})
    monkeypatch.setenv("BOLTZBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_bootstrap_replicates_are_sized_to_the_sample():
    assert M._boot_replicates(100, 5000) == 100 and M._boot_replicates(100, 1000) == 100  # protocol sizes
    assert M._boot_replicates(100, 64) == 20 and M._boot_replicates(100, 500) == 50
    assert M._boot_replicates(5, 64) == 5 and M._boot_replicates(0, 64) == 0


def test_derived_cache_is_exact_and_read_only(cold):
    t = targets.get("dw4")
    ref = t.reference("test", 600).double().numpy()
    ref = M._center(t, ref)
    a = M._Data(ref, t).e
    b = M._Data(ref.copy(), t).e  # same rows, another array: a cache hit
    assert a is b and not a.flags.writeable
    np.testing.assert_array_equal(a, M._energies(t, ref))
    np.testing.assert_array_equal(M._Data(ref, t).d, M._distances(t, ref))


def test_floors_persist_on_disk_and_are_identical(cold, monkeypatch):
    t = targets.get("dw4")
    test, val = t.reference("test", 400), t.reference("val", 400)
    gen = val[:64] + 0.1 * torch.randn(64, t.dim, generator=torch.Generator().manual_seed(0))
    opts = dict(n_boot=5, n_boot_ot=2)
    first = M.evaluate(gen, {"test": test, "val": val}, t, "boltzbench", **opts)
    assert any(cold.rglob("*.json"))
    monkeypatch.setattr(M, "_FLOOR_CACHE", {})  # a new process: only the disk cache is left

    def boom(*a, **k):
        raise AssertionError("floors recomputed")

    real = M._compute
    monkeypatch.setattr(M, "_compute", lambda p, g, r, tg, o, with_ci: boom() if not with_ci else real(
        p, g, r, tg, o, with_ci))
    second = M.evaluate(gen, {"test": test, "val": val}, t, "boltzbench", **opts)
    for k, v in first.items():
        assert second[k] == v or (np.isnan(v) and np.isnan(second[k])), k


def test_no_disk_cache_when_switched_off(cold, monkeypatch):
    monkeypatch.setenv("BOLTZBENCH_CACHE", "off")
    assert M.floor_cache_dir() is None


@pytest.mark.bench
def test_bench_evaluate_64_lj55_samples(benchmark, cold):
    """``evaluate`` (boltzbench, defaults) on 64 LJ-55 samples: first call (floors computed) and a second
    call (floors and reference quantities cached). Timings land in the benchmark's extra_info."""
    t = targets.get("lj55")
    ref = t.reference("test")
    gen = t.reference("val", 64) + 0.05 * torch.randn(64, t.dim, generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    first = M.evaluate(gen, ref, t)
    cold_s = time.perf_counter() - t0
    result = benchmark.pedantic(M.evaluate, args=(gen, ref, t), rounds=1, iterations=1)
    t0 = time.perf_counter()
    M.evaluate(gen, ref, t)
    warm_s = time.perf_counter() - t0
    benchmark.extra_info.update(cold_seconds=cold_s, warm_seconds=warm_s)
    print(f"\nevaluate(64 LJ-55 samples, boltzbench): first call {cold_s:.1f} s, cached {warm_s:.1f} s")
    assert result["x_w2"] == first["x_w2"] and np.isfinite(result["x_w2_floor"])
