"""Target energy + gradient speed (``make bench``): the analytic [B, n, n] LJ formulation against the
straightforward one (all ordered pairs, sqrt, gradient by autograd), measured in the same run.

Issue 3 asks for LJ-55 energy+gradient ≥ 10× faster than the straightforward formulation at batch 1024 on
the CPU in float32; the ratio of the two means is stored in the fast benchmark's ``extra_info`` and printed.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import targets
from targets.reference import SamplerSettings, initial_positions

pytestmark = pytest.mark.bench

_MEANS: dict[tuple[str, int], float] = {}


def straightforward_energy_and_grad(name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E = Σ_{i≠j} [r^-12 − 2 r^-6] + ½ Σ|x_i − x̄|², all ordered pairs, r = sqrt(|Δ|² + 1e-6); autograd."""
    t = targets.get(name)
    n = t.n_particles
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        p = xg.reshape(-1, n, 3)
        d = p.unsqueeze(2) - p.unsqueeze(1)
        r = ((d**2).sum(-1) + 1e-6).sqrt()[:, ~torch.eye(n, dtype=torch.bool, device=x.device)]
        c = p - p.mean(1, keepdim=True)
        e = (r**-12 - 2 * r**-6).sum(-1) + 0.5 * (c**2).sum((1, 2))
        (g,) = torch.autograd.grad(e.sum(), xg)
    return e.detach(), g


def _configs(name: str, B: int, device: torch.device) -> torch.Tensor:
    t = targets.get(name)
    x = initial_positions(t, B, SamplerSettings(), torch.Generator().manual_seed(0), torch.float32)
    return x.to(device)


@pytest.mark.parametrize("name", ["lj13", "lj55"])
def test_lj_straightforward_autograd(
    timed: Any, benchmark: Any, bench_device: torch.device, name: str
) -> None:
    benchmark.group = f"{name}-energy-grad-B1024-float32"
    x = _configs(name, 1024, bench_device)
    timed(straightforward_energy_and_grad, name, x)
    _MEANS[(name, 0)] = benchmark.stats.stats.mean


@pytest.mark.parametrize("name", ["lj13", "lj55"])
def test_lj_analytic(timed: Any, benchmark: Any, bench_device: torch.device, name: str) -> None:
    benchmark.group = f"{name}-energy-grad-B1024-float32"
    t = targets.get(name)
    x = _configs(name, 1024, bench_device)
    timed(t.energy_and_grad, x)
    mean = benchmark.stats.stats.mean
    if (name, 0) in _MEANS:
        ratio = _MEANS[(name, 0)] / mean
        benchmark.extra_info["speedup_vs_straightforward"] = ratio
        print(f"\n{name} B=1024 float32: analytic {mean * 1e3:.2f} ms, straightforward "
              f"{_MEANS[(name, 0)] * 1e3:.2f} ms -> {ratio:.1f}x")


@pytest.mark.parametrize("name,B", [("gmm40", 4096), ("dw4", 4096)])
def test_energy_and_grad_other_targets(
    timed: Any, benchmark: Any, bench_device: torch.device, name: str, B: int
) -> None:
    benchmark.group = f"{name}-energy-grad-B{B}-float32"
    t = targets.get(name)
    g = torch.Generator().manual_seed(0)
    x = (3.0 * torch.randn(B, t.dim, generator=g)).to(bench_device)
    timed(t.energy_and_grad, x)
