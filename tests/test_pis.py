"""PIS-specific facts: the Brownian reference from 0 and the published settings."""

from __future__ import annotations

import math

import pytest
import torch

import targets
from harness.budget import CountingTarget
from methods import METHODS


def test_reference_is_brownian_from_zero_with_variance_g2T() -> None:
    M = METHODS.get("pis")
    cfg = M.Config.for_target("gmm40")
    assert (cfg.n_steps, cfg.diffusion_sq, cfg.horizon, cfg.lr) == (100, 0.2, 5.0, 1e-3)
    m = M(CountingTarget(targets.get("gmm40")), cfg.replace(batch_size=4, hidden=8, emb_size=8),
          "cpu", torch.Generator().manual_seed(0))
    assert m.coef.ref_var == pytest.approx(1.0)
    assert bool((m.initial_states(3) == 0).all())
    # dt = T / K and g·sqrt(dt) per step
    assert float(m.coef.s[0]) == pytest.approx(math.sqrt(0.2 * 0.05))
    assert m.work.scale == 50.0  # GMM-40 in x / 50 as iDEM / BNEM


def test_uncontrolled_pis_samples_the_reference() -> None:
    """With the control switched off (NN₂ ≡ 0, NN₁ zero-initialised) terminal samples are N(0, g²T) in y."""
    M = METHODS.get("pis")
    cfg = M.Config.for_target("gmm40", hidden=8, emb_size=8, n_steps=20, sample_chunk=4000)
    m = M(CountingTarget(targets.get("gmm40")), cfg, "cpu", torch.Generator().manual_seed(1))
    torch.nn.init.zeros_(m.net.time_net.net[-1].bias)
    y = m.sample(4000) / 50.0
    assert y.mean(0).abs().max() < 5 / math.sqrt(4000)
    assert (y.var(0) - 1.0).abs().max() < 5 * math.sqrt(2 / 4000)
