"""The iDEM score estimator at paper settings: ours (``IDEM.estimate_score``: sub-blocks, plane kernels)
against the straightforward formulation of the published code (autograd through ``logsumexp`` of −E over the K
perturbations, E the target's differentiable energy), on the same noise draws, interleaved in one run
(straightforward, ours, straightforward, ours …).

Before timing, the two scores are checked equal to float32 rounding. pytest-benchmark times *our* call (the
straightforward one runs in the untimed ``setup`` of each round, timed by hand); ``extra_info`` holds both
minima and ``ratio`` = straightforward / ours. Targets: ``--bench-targets`` (CPU default gmm40, dw4; LJ-13 at
paper settings differentiates 512 000 configurations per call). Print with ``scripts/bench_compare.py
--extra``. The side-by-side against the published code itself is ``scripts/bench_published.py``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
import torch
from benchutil import chosen_targets

import targets
from harness.budget import CountingTarget
from methods.idem import IDEM, Config, clip_score

pytestmark = pytest.mark.bench
ALL = ("gmm40", "dw4", "lj13", "lj55")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "target_name" in metafunc.fixturenames:
        metafunc.parametrize("target_name", chosen_targets(metafunc.config, ALL))


def straightforward_score(m: IDEM, x_t: torch.Tensor, t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """∇_x [logsumexp_k(−E(x + σ ε_k)) − log K] by autograd, per noise block as the method draws it, then the
    method's clipping (the published ``estimate_grad_Rt`` + clipper, written plainly)."""
    c = m.config
    B, D = x_t.shape
    K = c.num_mc_samples
    sigma = m.schedule.sigma(t.double()).to(x_t.dtype)
    rows = max(1, c.estimator_chunk_rows // K)
    out = []
    for i in range(0, B, rows):
        eps = torch.randn(min(rows, B - i), K, D, generator=gen, dtype=x_t.dtype, device=x_t.device)
        with torch.enable_grad():
            x = x_t[i : i + eps.shape[0]].detach().requires_grad_(True)
            y = (x[:, None] + sigma[i : i + eps.shape[0], None, None] * eps) * m.scale
            e = m.target.target.energy(y.reshape(-1, D)).reshape(-1, K)
            lse = torch.logsumexp(-e, 1) - math.log(K)
            (g,) = torch.autograd.grad(lse.sum(), x)
        out.append(g)
    s = torch.cat(out)
    spatial = m.target.spatial_dim if (m.particles and c.clip_per_particle) else None
    return clip_score(s, c.max_score_norm, spatial)


def test_idem_estimator_vs_straightforward(target_name: str, benchmark: Any, bench_device: torch.device,
                                           bench_sync: Any, pytestconfig: pytest.Config) -> None:
    cfg = Config.for_target(target_name).replace(init_from_prior=True, steps_per_epoch=10**9)
    m = IDEM(CountingTarget(targets.get(target_name)), cfg, bench_device,
             torch.Generator(device=bench_device).manual_seed(0))
    B = cfg.batch_size
    x0 = m.prior.sample(B, m.generator)
    t = torch.rand(B, generator=m.generator, device=bench_device)
    noise = torch.randn(x0.shape, generator=m.generator, device=bench_device)
    x_t = m._center(x0 + m.schedule.sigma(t.double()).to(x0.dtype)[:, None] * noise)
    gen = torch.Generator(device=bench_device)
    gen.manual_seed(3)
    m.generator.manual_seed(3)
    with torch.no_grad():
        ours_s = m.estimate_score(x_t, t)
    ref_s = straightforward_score(m, x_t, t, gen)
    err = float((ours_s - ref_s).norm(dim=-1).max())
    assert err <= 2e-3 * float(ref_s.norm(dim=-1).max()), err  # float32 rounding of two formulations

    ref_times: list[float] = []

    def setup() -> None:
        bench_sync()
        t0 = time.perf_counter()
        straightforward_score(m, x_t, t, gen)
        bench_sync()
        ref_times.append(time.perf_counter() - t0)

    def ours() -> None:
        with torch.no_grad():
            m.estimate_score(x_t, t)
        bench_sync()

    rounds = max(1, int(pytestconfig.getoption("bench_rounds", default=3)))
    benchmark.pedantic(ours, setup=setup, rounds=rounds, iterations=1, warmup_rounds=1)
    ours_min = float(benchmark.stats.stats.min)
    ref_min = min(ref_times[-rounds:])
    benchmark.extra_info.update({"straightforward_min_s": ref_min, "ours_min_s": ours_min,
                                 "ratio": ref_min / ours_min, "max_diff": err,
                                 "threads": torch.get_num_threads()})
    print(f"\niDEM estimator {target_name}: straightforward {ref_min:.4g} s, ours {ours_min:.4g} s, "
          f"ratio {ref_min / ours_min:.2f}")
