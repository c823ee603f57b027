"""The ``asbs`` metric protocol against a direct, loop-by-loop implementation of facebookresearch/
adjoint_samplers' ``SyntheticEenergyEvaluator`` (Hungarian permutation on the unaligned particle distances
per pair, Kabsch with reflections allowed, POT ``emd2`` on the squared distances with a square root; energy W2
with a square root; interatomic-distance W2²), on random data and on the published DW-4 splits."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import targets
from harness import metrics as M


def _direct_eq_w2(gen: np.ndarray, ref: np.ndarray, n: int, d: int) -> float:
    """eq_w2 as the published evaluator computes it, one pair at a time (float64)."""
    x0 = torch.from_numpy(gen).double().reshape(-1, n, d)
    x1 = torch.from_numpy(ref).double().reshape(-1, n, d)
    cost = torch.empty(x0.shape[0], x1.shape[0], dtype=torch.float64)
    for i in range(x0.shape[0]):
        for j in range(x1.shape[0]):
            _, col = linear_sum_assignment(torch.cdist(x0[i], x1[j]).numpy())
            b = x1[j][col]
            a_c, b_c = x0[i] - x0[i].mean(0), b - b.mean(0)
            U, _, V = torch.svd(a_c.T @ b_c)
            R = V @ U.T  # no determinant correction: reflections allowed
            cost[i, j] = torch.linalg.norm(x0[i].reshape(-1) - (b @ R).reshape(-1))
    w = np.full(x0.shape[0], 1.0 / x0.shape[0])
    return float(ot.emd2(w, np.full(x1.shape[0], 1.0 / x1.shape[0]), (cost**2).numpy())) ** 0.5


def _direct(gen: np.ndarray, ref: np.ndarray, t) -> dict[str, float]:
    e = lambda a: t.energy(torch.from_numpy(a)).double().numpy()  # noqa: E731
    dist = lambda a: t.interatomic_distances(torch.from_numpy(a)).double().numpy().reshape(-1)  # noqa: E731
    return {
        "x_w2": _direct_eq_w2(gen, ref, t.n_particles, t.spatial_dim),
        "e_w2": float(ot.emd2_1d(e(ref), e(gen))) ** 0.5,
        "dist_w2": float(ot.emd2_1d(dist(gen), dist(ref))),
    }


def _centred(t, a: np.ndarray) -> np.ndarray:
    return t.center(torch.from_numpy(a)).numpy()


@pytest.mark.parametrize("name, n, scale", [("dw4", 40, 1.5), ("lj13", 14, 0.8)])
def test_asbs_protocol_equals_direct_implementation_on_random_data(name, n, scale):
    t = targets.get(name)
    rng = np.random.default_rng(3)
    gen, ref = (_centred(t, rng.standard_normal((n, t.dim)) * scale) for _ in range(2))
    got = M.evaluate(gen, {"test": ref}, t, "asbs", noise_floor=False)
    want = _direct(gen, ref, t)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    assert math.isnan(got["tv"]) and got["n_generated"] == got["n_reference"] == n


def test_asbs_protocol_uses_as_many_reference_rows_as_generated():
    t = targets.get("dw4")
    rng = np.random.default_rng(4)
    gen, ref = _centred(t, rng.standard_normal((12, 8))), _centred(t, rng.standard_normal((30, 8)))
    got = M.evaluate(gen, {"test": ref}, t, "asbs", noise_floor=False)
    want = _direct(gen, ref[:12], t)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k


def test_asbs_alignment_permutations_and_reflections():
    t = targets.get("lj13")
    rng = np.random.default_rng(5)
    x = _centred(t, rng.standard_normal((6, 39)))
    perm = rng.permutation(13)
    c0 = M.hungarian_kabsch_sq_cost(x, x.reshape(6, 13, 3)[:, perm].reshape(6, 39), 13, 3)
    assert (c0 >= 0).all() and np.abs(np.diag(c0)).max() < 1e-9  # a permuted copy: distance 0
    # a mirror image whose particles the (unaligned) assignment still matches: 0 with reflections allowed,
    # > 0 for rotations only (the boltzbench alignment)
    p = np.array([[-2.0, 0.1], [0.0, 0.3], [2.0, -0.4]])
    p -= p.mean(0)
    q = p * np.array([1.0, -1.0])
    assert M.hungarian_kabsch_sq_cost(p.reshape(1, 6), q.reshape(1, 6), 3, 2)[0, 0] < 1e-12
    assert M.aligned_sq_cost(p.reshape(1, 6), q.reshape(1, 6), 3, 2)[0, 0] > 1e-3


def test_asbs_protocol_spec():
    assert "asbs" in M.PROTOCOLS
    assert {M.eval_sizes("asbs", k) for k in ("gmm40", "dw4", "lj13", "lj55")} == {(2000, 2000)}
    assert {M.metric_split("asbs", k) for k in ("x_w2", "e_w2", "dist_w2")} == {"test"}


def test_asbs_protocol_gmm_is_the_unaligned_w2():
    t = targets.get("gmm40")
    g = torch.Generator().manual_seed(1)
    gen, ref = t.sample(50, generator=g).double().numpy() + 1.0, t.sample(50, generator=g).double().numpy()
    got = M.evaluate(gen, {"test": ref}, t, "asbs", noise_floor=False)
    e = lambda a: t.energy(torch.from_numpy(a)).numpy()  # noqa: E731
    direct = math.sqrt(ot.emd2(ot.unif(50), ot.unif(50), ot.dist(gen, ref)))
    assert got["x_w2"] == pytest.approx(direct, rel=1e-9)
    assert got["e_w2"] == pytest.approx(math.sqrt(ot.emd2_1d(e(ref), e(gen))), rel=1e-9)


def _published_dw4():
    t = targets.get("dw4")
    try:
        if t.reference_info("test").get("source") != "published":
            pytest.skip("published DW-4 splits absent (expected in ../shared/data beside the checkout)")
        return t, t.reference("val", 120).double().numpy(), t.reference("test", 120).double().numpy()
    except (FileNotFoundError, ValueError) as e:
        pytest.skip(f"published DW-4 splits unavailable: {e}")


def test_asbs_protocol_equals_direct_implementation_on_published_dw4():
    t, val, test = _published_dw4()
    got = M.evaluate(val, {"test": test}, t, "asbs", noise_floor=False)
    want = _direct(_centred(t, val), _centred(t, test), t)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
