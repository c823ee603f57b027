"""Micro-benchmarks of the NEM / BNEM building blocks at the published sizes (``make bench``):

- the MC noised-energy target (B = 512 rows × K energies: GMM-40 K = 100, DW-4 K = 1000);
- the bootstrapped target (B × M = 80 teacher-network evaluations, EMA network; B = 512 for GMM-40, 64 for
  DW-4, whose EGNN teacher costs ~0.1 s per 1000 configurations on a CPU core: scale by 8 for B = 512);
- one sampler score −∇_x E_θ (forward + backward through the energy network) for 1024 configurations,
  the cost paid at every reverse-SDE step.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import targets
from harness.budget import CountingTarget
from methods.energy_net import energy_and_score
from methods.nem import BNEM, bootstrap_noised_energy, noised_energy_mc

pytestmark = pytest.mark.bench


def _method(name: str, device: torch.device) -> BNEM:
    cfg = BNEM.Config.for_target(name)
    return BNEM(CountingTarget(targets.get(name)), cfg, device, torch.Generator(device).manual_seed(0))


@pytest.mark.parametrize("name,K", [("gmm40", 100), ("dw4", 1000)])
def test_mc_target(timed: Any, bench_device: torch.device, name: str, K: int) -> None:
    m = _method(name, bench_device)
    y, _ = m.buffer.sample(512, m.generator)
    sigma = torch.full((512,), 0.5, device=bench_device)
    timed(lambda: noised_energy_mc(m.train_energy_total, y, sigma, K, m.generator))


@pytest.mark.parametrize("name,B", [("gmm40", 512), ("dw4", 64)])
def test_bootstrap_target(timed: Any, bench_device: torch.device, name: str, B: int) -> None:
    m = _method(name, bench_device)
    y, _ = m.buffer.sample(B, m.generator)
    st = torch.full((B,), 0.5, device=bench_device)
    ss = torch.full((B,), 0.3, device=bench_device)
    s = torch.full((B,), 0.9, device=bench_device)
    timed(lambda: bootstrap_noised_energy(m._teacher, y, st, ss, s, 80, m.generator, center=m.center))


@pytest.mark.parametrize("name", ["gmm40", "dw4"])
def test_sampler_score(timed: Any, bench_device: torch.device, name: str) -> None:
    m = _method(name, bench_device)
    y = m.prior.sample(1024, m.generator)
    t = torch.full((1024,), 0.5, device=bench_device)
    timed(lambda: energy_and_score(m.net, t, y, max_norm=m.config.max_score_norm))
