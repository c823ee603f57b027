"""Micro-benchmarks of FAB's building blocks at the published sizes (``make bench``):

- GMM-40 (fab-torch gmm.yaml): one AIS pass of 128 chains (1 intermediate, 1 Metropolis step), one
  prioritised-buffer gradient step of the 15-layer RealNVP at batch 128 (float64);
- DW-4, the default flow (the augmented coupling flow at the published size: 12 blocks, EGNN 3 × 64 with 128
  features, 8-bin splines): the joint log q with its gradient (what every HMC leapfrog step pays) for 128
  configurations (the published batch), and one HMC-AIS pass (2 intermediates × 5 leapfrog steps) of 128
  chains;
- DW-4, ``fab@cnf``: the equivariant CNF's log q with its x-gradient for 16 configurations at the DW-4
  settings (8 RK4 steps, EGNN 3 × 64, exact divergence), and one HMC-AIS pass of 16 chains.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import targets
from harness.budget import CountingTarget
from methods.fab import FAB, FABConfig

pytestmark = pytest.mark.bench


def _fab(name: str, device: torch.device, variant: str | None = None, **over: Any) -> FAB:
    var = FABConfig.variant(variant, name) if variant else {}
    cfg = FABConfig.for_target(name, **{**var, **over})
    return FAB(CountingTarget(targets.get(name)), cfg, device, torch.Generator(device).manual_seed(0))


def test_gmm_ais_pass(timed: Any, bench_device: torch.device) -> None:
    m = _fab("gmm40", bench_device)
    timed(lambda: m.ais.run(128, m.generator))


def test_gmm_buffer_step(timed: Any, bench_device: torch.device) -> None:
    m = _fab("gmm40", bench_device)
    m.train_step()  # fills the buffer (10 AIS batches)
    timed(m.train_step)


def test_dw4_eacf_log_prob_and_grad(timed: Any, bench_device: torch.device) -> None:
    m = _fab("dw4", bench_device)
    x = m.flow.sample(128, m.generator)

    def run() -> None:
        xg = x.clone().requires_grad_(True)
        torch.autograd.grad(m.flow.log_prob(xg).sum(), xg)

    timed(run, pedantic=True)


def test_dw4_eacf_hmc_ais_pass(timed: Any, bench_device: torch.device) -> None:
    m = _fab("dw4", bench_device)
    timed(lambda: m.ais.run(128, m.generator), pedantic=True)


def test_dw4_cnf_log_prob_and_grad(timed: Any, bench_device: torch.device) -> None:
    m = _fab("dw4", bench_device, variant="cnf")
    x = m.flow.sample(16, m.generator)

    def run() -> None:
        xg = x.clone().requires_grad_(True)
        torch.autograd.grad(m.flow.log_prob(xg).sum(), xg)

    timed(run, pedantic=True)


def test_dw4_cnf_hmc_ais_pass(timed: Any, bench_device: torch.device) -> None:
    m = _fab("dw4", bench_device, variant="cnf")
    timed(lambda: m.ais.run(16, m.generator), pedantic=True)
