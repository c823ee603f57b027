"""Metric benchmarks (``make bench``): exact OT at the LJ-55 full-batch size and the protocol evaluations.

The headline requirement: exact OT between 10 000 and 10 000 samples in 165-D (LJ-55 full batch, the
``idem`` protocol's size) in ≤ 60 s on the 2-core CPU with bounded memory (one float64 cost matrix of
0.8 GB, built in row chunks; the assignment solver adds little, POT's network simplex several GB). Both are
timed; ``extra_info`` records W2², the solver, the process CPU seconds of the solve (robust to a machine
shared with other jobs, where wall-clock is not) and the peak RSS. These are timings, not assertions.
"""

from __future__ import annotations

import resource
import time

import numpy as np
import pytest
import torch

import targets
from harness import metrics as M


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _data(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.standard_normal((n, d)) + 0.05


@pytest.mark.parametrize("solver", ["assignment", "emd"])
def test_exact_ot_10k_165d(benchmark, solver):
    """Cost matrix + exact OT solve, 10 000 × 10 000 in 165-D (one round: each takes tens of seconds)."""
    x, y = _data(10_000, 165)

    cpu: dict[str, float] = {}

    def run() -> float:
        c0 = time.process_time()
        C = M.sq_euclidean_cost(x, y)
        c1 = time.process_time()
        v = M.emd_cost(C, solver=solver)
        cpu.update(cost_cpu_s=c1 - c0, solve_cpu_s=time.process_time() - c1)
        return v

    w2sq = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(w2_squared=w2sq, solver=solver, peak_rss_gb=round(_peak_rss_gb(), 2), **cpu)
    assert np.isfinite(w2sq)


@pytest.mark.parametrize("n,d", [(1000, 8), (5000, 39)])
def test_exact_ot_sizes(benchmark, n, d):
    x, y = _data(n, d)
    w2 = benchmark.pedantic(lambda: M.w2(x, y), rounds=2, iterations=1)
    benchmark.extra_info.update(w2=w2)


def test_cost_matrix_10k_165d(benchmark):
    x, y = _data(10_000, 165)
    C = benchmark.pedantic(lambda: M.sq_euclidean_cost(x, y), rounds=2, iterations=1)
    assert C.dtype == np.float64 and C.shape == (10_000, 10_000)


@pytest.mark.parametrize("n,d,N", [(4, 2, 1000), (13, 3, 200), (55, 3, 100)])
def test_aligned_cost(benchmark, n, d, N):
    """The rotation+permutation aligned cost matrix at the boltzbench aligned sizes."""
    x, y = _data(N, n * d)
    benchmark.pedantic(lambda: M.aligned_sq_cost(x, y, n, d), rounds=1, iterations=1)


@pytest.mark.parametrize("protocol", ["idem", "bnem", "boltzbench"])
def test_evaluate_dw4(benchmark, protocol):
    """A full evaluate() on DW-4 at the protocol's sizes (generated = val split), floors included
    (the floor cache is cleared each round)."""
    t = targets.get("dw4")
    try:
        test, val = t.reference("test"), t.reference("val")
    except Exception as e:  # pragma: no cover
        pytest.skip(f"DW-4 reference unavailable: {e}")
    gen = torch.flip(val, [0])

    def run() -> dict:
        M._FLOOR_CACHE.clear()
        return M.evaluate(gen, test, t, protocol)

    out = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update({k: v for k, v in out.items() if k in ("x_w2", "e_w2", "tv", "x_w2_aligned")})
