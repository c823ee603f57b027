"""DDS-specific facts: stationary OU reference, cos⁴ schedule, squared control norm."""

from __future__ import annotations

import math

import pytest
import torch

import targets
from harness.budget import CountingTarget
from methods import METHODS
from methods.control import simulate


def test_schedule_and_defaults() -> None:
    M = METHODS.get("dds")
    cfg = M.Config.for_target("gmm40")
    assert (cfg.n_steps, cfg.noise_total, cfg.prior_std, cfg.score_clip) == (128, 6.4, 1.0, 100.0)
    # BNEM dds.yaml / gmm_idem.yaml / trainer: batch 1000, wd 1e-7, TimeConder(32, 1, 2), grad clip 0.5
    assert (cfg.batch_size, cfg.weight_decay, cfg.time_channels, cfg.time_layers, cfg.grad_norm_clip) == (
        1000, 1e-7, 32, 2, 0.5)
    m = M(CountingTarget(targets.get("dw4")), M.Config.for_target("dw4", hidden=8, n_layers=1, batch_size=2),
          "cpu", torch.Generator().manual_seed(0))
    b2 = m.coef.c / m.config.prior_std**2
    assert float(b2.sum()) == pytest.approx(6.4)
    assert float(b2[0]) > float(b2[-1])
    y0 = m.initial_states(5)
    torch.testing.assert_close(y0.reshape(5, 4, 2).mean(1), torch.zeros(5, 2), atol=1e-6, rtol=0)


def test_running_cost_uses_squared_control_norm() -> None:
    """Constant control u ≡ v: running cost Σ ½ β_k² σ² |v|² (quadratic in |v|, not BNEM's unsquared norm)."""
    M = METHODS.get("dds")
    cfg = M.Config.for_target("gmm40", hidden=8, emb_size=8, n_steps=16)
    m = M(CountingTarget(targets.get("gmm40")), cfg, "cpu", torch.Generator().manual_seed(0))
    for scale in (1.0, 3.0):
        v = torch.tensor([scale * 0.6, scale * -0.8])
        path = simulate(lambda t, y, s, v=v: v.expand_as(y), m.initial_states(3), m.coef, None, m.generator)
        expect = 0.5 * float((m.coef.c**2 / m.coef.s**2).sum()) * scale**2
        torch.testing.assert_close(path.running, torch.full((3,), expect), rtol=1e-5, atol=0)


def test_uncontrolled_chain_keeps_the_prior() -> None:
    M = METHODS.get("dds")
    cfg = M.Config.for_target("gmm40", hidden=8, emb_size=8, prior_std=0.7)
    m = M(CountingTarget(targets.get("gmm40")), cfg, "cpu", torch.Generator().manual_seed(2))
    zero = lambda t, y, s: torch.zeros_like(y)  # noqa: E731
    y = simulate(zero, m.initial_states(20000), m.coef, None, m.generator).y
    assert (y.std(0) - 0.7).abs().max() < 5 * 0.7 / math.sqrt(2 * 20000)
