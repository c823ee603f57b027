"""Reverse VE SDE and priors: an exact Gaussian score reproduces the data mean and variance."""

import math

import pytest
import torch

from methods.noise import GeometricNoiseSchedule
from methods.sde import GaussianPrior, MeanFreeGaussianPrior, integrate_reverse_sde


def _gaussian_score(mu, s2, sched):
    # data N(mu, s2 I) noised by the VE process: N(mu, (s2 + h(t)) I)
    def score(t, x):
        return -(x - mu) / (s2 + sched.h(t).to(x.dtype)[:, None])

    return score


def test_reverse_sde_with_exact_score_recovers_gaussian():
    torch.manual_seed(0)
    sched = GeometricNoiseSchedule(0.01, 3.0)
    mu = torch.tensor([1.0, -2.0], dtype=torch.float64)
    s2 = 0.25
    g = torch.Generator().manual_seed(1)
    B = 10000
    x1 = mu + math.sqrt(s2 + float(sched.h(1.0))) * torch.randn(B, 2, generator=g, dtype=torch.float64)
    x0 = integrate_reverse_sde(_gaussian_score(mu, s2, sched), x1, sched, n_steps=300, generator=g)
    se_mean = math.sqrt(s2 / B)
    assert (x0.mean(0) - mu).abs().max() < 5 * se_mean
    var = x0.var(0)
    # MC error of the variance: s2·sqrt(2/B) ≈ 0.0025; allow 2% Euler–Maruyama bias on top
    assert (var - s2).abs().max() < 5 * s2 * math.sqrt(2 / B) + 0.02 * s2, var


def test_diffusion_scale_zero_is_deterministic_and_trajectory_shape():
    sched = GeometricNoiseSchedule(0.01, 2.0)
    x1 = torch.randn(8, 3)
    score = _gaussian_score(torch.zeros(3), 1.0, sched)
    a = integrate_reverse_sde(score, x1, sched, n_steps=20, diffusion_scale=0.0)
    b, traj = integrate_reverse_sde(score, x1, sched, n_steps=20, diffusion_scale=0.0, return_trajectory=True)
    assert torch.equal(a, b) and traj.shape == (21, 8, 3) and torch.equal(traj[0], x1)
    # chunking does not change a noise-free integration
    c = integrate_reverse_sde(score, x1, sched, n_steps=20, diffusion_scale=0.0, chunk_size=3)
    torch.testing.assert_close(a, c)


def test_seed_reproducible_and_centering_callback():
    sched = GeometricNoiseSchedule(0.01, 2.0)
    prior = MeanFreeGaussianPrior(4, 2, scale=sched.prior_scale)
    x1 = prior.sample(16, torch.Generator().manual_seed(0))
    score = _gaussian_score(torch.zeros(8), 1.0, sched)
    r1, r2 = (
        integrate_reverse_sde(score, x1, sched, 30,
                              generator=torch.Generator().manual_seed(5), center=prior.center)
        for _ in range(2)
    )
    assert torch.equal(r1, r2)
    assert r1.reshape(16, 4, 2).mean(1).abs().max() < 1e-6


def test_gaussian_prior_log_prob_and_samples():
    p = GaussianPrior(3, 2.0)
    x = torch.randn(5, 3, dtype=torch.float64)
    ref = torch.distributions.Normal(0.0, 2.0).log_prob(x).sum(-1)
    torch.testing.assert_close(p.log_prob(x), ref)
    s = p.sample(40000, torch.Generator().manual_seed(0))
    assert abs(float(s.std()) - 2.0) < 0.03


def test_mean_free_prior_matches_gaussian_on_subspace():
    n, d, scale = 5, 3, 1.7
    p = MeanFreeGaussianPrior(n, d, scale)
    # orthonormal basis of the centred subspace (per spatial coordinate): columns orthogonal to ones(n)
    q, _ = torch.linalg.qr(torch.cat([torch.ones(n, 1), torch.randn(n, n - 1)], 1).double())
    basis = q[:, 1:]  # [n, n-1]
    z = torch.randn(7, n - 1, d, dtype=torch.float64) * scale
    x = torch.einsum("nk,bkd->bnd", basis, z).reshape(7, n * d)
    ref = torch.distributions.Normal(0.0, scale).log_prob(z).sum((-1, -2))
    torch.testing.assert_close(p.log_prob(x), ref)
    torch.testing.assert_close(p.log_prob(x + 3.0), ref)  # translation invariant (centred first)
    s = p.sample(20000, torch.Generator().manual_seed(0)).reshape(-1, n, d)
    assert s.mean(1).abs().max() < 1e-5
    # per-coordinate variance of a centred N(0, s²I) sample is s²(1 − 1/n)
    assert abs(float(s.var(0).mean()) - scale**2 * (1 - 1 / n)) < 0.05
    with pytest.raises(ValueError):
        MeanFreeGaussianPrior(1, 3, 1.0)
