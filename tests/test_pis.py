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
    # BNEM pis.yaml / gmm_idem.yaml: pis_scale 1, time_range 1, 100 steps, lr 1e-3, wd 1e-7, batch 1000,
    # TimeConder(32, 1, 2); trainer clip 0.5 on the loss / (d + 1) = 1.5 on ours (d = 2)
    assert (cfg.n_steps, cfg.diffusion_sq, cfg.horizon) == (100, 1.0, 1.0)
    assert (cfg.lr, cfg.weight_decay) == (1e-3, 1e-7)
    assert (cfg.batch_size, cfg.time_channels, cfg.time_layers, cfg.grad_norm_clip) == (1000, 32, 2, 1.5)
    for name, dim in (("dw4", 8), ("lj13", 39), ("lj55", 165)):
        assert M.Config.for_target(name).grad_norm_clip == pytest.approx(0.5 * (dim + 1), rel=0.01)
    m = M(CountingTarget(targets.get("gmm40")), cfg.replace(batch_size=4, hidden=8, emb_size=8),
          "cpu", torch.Generator().manual_seed(0))
    assert m.coef.ref_var == pytest.approx(1.0)
    assert bool((m.initial_states(3) == 0).all())
    # dt = T / K and g·sqrt(dt) per step
    assert float(m.coef.s[0]) == pytest.approx(math.sqrt(1.0 * 0.01))
    assert float(m.coef.c[0]) == pytest.approx(0.01)  # drift u·g·dt: DEM's f·dt with pis_scale 1
    assert m.work.scale == 50.0  # GMM-40 in x / 50 as iDEM / BNEM
    # the original PIS parameterisation (g² = 0.2, T = 5) is the same reference process
    m5 = M(CountingTarget(targets.get("gmm40")), cfg.replace(batch_size=4, hidden=8, emb_size=8,
                                                               diffusion_sq=0.2, horizon=5.0),
           "cpu", torch.Generator().manual_seed(0))
    assert m5.coef.ref_var == pytest.approx(1.0)
    assert float(m5.coef.s[0]) == pytest.approx(math.sqrt(0.2 * 0.05))


def test_uncontrolled_pis_samples_the_reference() -> None:
    """With the control switched off (NN₂ ≡ 0, NN₁ zero-initialised) terminal samples are N(0, g²T) in y."""
    M = METHODS.get("pis")
    cfg = M.Config.for_target("gmm40", hidden=8, emb_size=8, n_steps=20, sample_chunk=4000)
    m = M(CountingTarget(targets.get("gmm40")), cfg, "cpu", torch.Generator().manual_seed(1))
    torch.nn.init.zeros_(m.net.time_net.net[-1].bias)
    y = m.sample(4000) / 50.0
    assert y.mean(0).abs().max() < 5 / math.sqrt(4000)
    assert (y.var(0) - 1.0).abs().max() < 5 * math.sqrt(2 / 4000)
