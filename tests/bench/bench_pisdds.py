"""Micro-benchmarks of PIS / DDS (``make bench``): one training step (simulate the controlled SDE with
gradients, terminal cost, backward, Adam) and the simulation alone (sampling 1000 trajectories, no grad),
at the `cpu` grid settings on GMM-40 (MLP control) and DW-4 (EGNN control).

Known cost note: on GMM-40 roughly a quarter of a CPU step is ``exp`` inside the GMM's energy_and_grad on very
negative logits (torch's slow path for arguments below ≈ −88); see docs/pis_dds.md.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import targets
from harness.budget import CountingTarget
from methods import METHODS

pytestmark = pytest.mark.bench


def _method(method: str, target: str, device: torch.device) -> Any:
    M = METHODS.get(method)
    cfg = M.Config.for_target(target, **M.Config.preset("cpu", target))
    return M(CountingTarget(targets.get(target)), cfg, device, torch.Generator(device).manual_seed(0))


@pytest.mark.parametrize("method", ["pis", "dds"])
@pytest.mark.parametrize("target", ["gmm40", "dw4"])
def test_train_step(timed: Any, bench_device: torch.device, method: str, target: str) -> None:
    m = _method(method, target, bench_device)
    m.train_step()
    timed(m.train_step, pedantic=True)


@pytest.mark.parametrize("method", ["pis", "dds"])
@pytest.mark.parametrize("target", ["gmm40", "dw4"])
def test_sample_1000(timed: Any, bench_device: torch.device, method: str, target: str) -> None:
    m = _method(method, target, bench_device)
    timed(lambda: m.sample(1000), pedantic=True)
