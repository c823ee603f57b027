"""MCMC kernels: exactness on Gaussians (closed-form moments), tempering, adaptation, τ/ESS, seeds."""

from __future__ import annotations

import pytest
import torch

from targets import mcmc


class Gaussian:
    """E(x) = ½ |x|² / s² (a standard test model with closed-form moments)."""

    def __init__(self, s: float = 1.0) -> None:
        self.s2 = s * s

    def energy(self, x):
        return 0.5 * (x**2).sum(-1) / self.s2

    def energy_and_grad(self, x):
        return self.energy(x), x / self.s2


@pytest.mark.parametrize("kind", ["rwm", "mala", "hmc"])
def test_kernels_sample_tempered_gaussian(kind):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    C, dim, beta = 400, 3, 2.0
    x0 = torch.randn(C, dim, generator=g, dtype=torch.float64) * 3
    res = mcmc.run_chains(
        Gaussian(), x0, g, kind=kind, n_burnin=300, n_samples=40, thin=5, step_size=0.5, beta=beta
    )
    xs = res.samples.reshape(-1, dim)
    # π_β = N(0, 1/β): variance 0.5; 16000 correlated draws -> a few % tolerance
    assert xs.mean().abs() < 0.05
    assert abs(xs.var().item() - 1 / beta) < 0.05
    # adaptation reached the target acceptance (pooled), and step sizes were frozen in the sampling phase
    assert abs(res.acceptance.mean().item() - mcmc.TARGET_ACCEPT[kind]) < 0.08


def test_replica_exchange_levels_have_their_temperature():
    g = torch.Generator().manual_seed(3)
    temps = mcmc.geometric_ladder(4, 8.0)
    assert torch.allclose(temps, torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64))
    rex = mcmc.ReplicaExchange(1 / temps, n_replicas=200)
    x0 = torch.randn(800, 2, generator=g, dtype=torch.float64)
    res = mcmc.run_chains(Gaussian(), x0, g, kind="mala", n_burnin=200, n_samples=40, thin=5, exchange=rex)
    xs = res.samples.reshape(res.samples.shape[0], 4, 200, 2)
    var = xs.var(dim=(0, 2, 3))
    assert torch.allclose(var, temps, rtol=0.12), var
    assert res.swap_rates is not None and bool((res.swap_rates > 0.1).all())


def test_swap_keeps_temperatures_and_moves_states():
    g = torch.Generator().manual_seed(0)
    rex = mcmc.ReplicaExchange(torch.tensor([1.0, 1.0]), n_replicas=3)  # equal betas: every swap accepted
    x = torch.arange(6, dtype=torch.float64).reshape(6, 1)
    st = mcmc.init_state(Gaussian(), x, beta=rex.chain_betas(torch.float64))
    st.step_size = torch.tensor([1.0, 1, 1, 2, 2, 2], dtype=torch.float64)
    rex.swap(st, g)
    assert st.x.squeeze(-1).tolist() == [3, 4, 5, 0, 1, 2]
    assert torch.allclose(st.energy, 0.5 * st.x.squeeze(-1) ** 2)
    assert st.step_size.tolist() == [1, 1, 1, 2, 2, 2]


def test_iat_of_ar1_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    phi, T, C = 0.9, 20000, 8
    y = torch.zeros(T, C, dtype=torch.float64)
    eps = torch.randn(T, C, generator=g, dtype=torch.float64)
    for t in range(1, T):
        y[t] = phi * y[t - 1] + eps[t]
    tau = mcmc.integrated_autocorr_time(y)
    assert abs(tau - (1 + phi) / (1 - phi)) / 19.0 < 0.1
    assert abs(mcmc.effective_sample_size(y) - T * C / tau) < 1e-6
    white = torch.randn(5000, 4, generator=g, dtype=torch.float64)
    assert 0.8 < mcmc.integrated_autocorr_time(white) < 1.2


def test_seed_reproducible_and_projection():
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        x0 = torch.randn(16, 6, generator=g)
        proj = lambda v: v - v.mean(-1, keepdim=True)  # noqa: E731
        x0 = proj(x0)
        res = mcmc.run_chains(Gaussian(), x0, g, kind="mala", n_burnin=20, n_samples=3, thin=2, project=proj)
        return res.samples

    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.mean(-1).abs().max() < 1e-5  # chains stay in the projected subspace


def test_nonfinite_proposals_rejected():
    class Wall(Gaussian):
        def energy(self, x):
            e = super().energy(x)
            return torch.where(x[:, 0] > 0.5, torch.full_like(e, float("inf")), e)

        def energy_and_grad(self, x):
            return self.energy(x), x

    g = torch.Generator().manual_seed(0)
    res = mcmc.run_chains(Wall(), torch.zeros(64, 1) - 1, g, kind="mala", n_burnin=50, n_samples=20, thin=2)
    assert bool((res.samples <= 0.5).all())


def test_bad_arguments():
    g = torch.Generator()
    with pytest.raises(ValueError, match="valid kernels"):
        mcmc.run_chains(Gaussian(), torch.zeros(2, 2), g, kind="nuts")
    with pytest.raises(ValueError, match="shape"):
        mcmc.init_state(Gaussian(), torch.zeros(2, 2), step_size=torch.ones(3))
    with pytest.raises(ValueError):
        mcmc.geometric_ladder(0, 2.0)


def test_counting_target_counts_every_kernel_evaluation():
    import targets
    from harness.budget import CountingTarget

    t = targets.get("dw4")
    ct = CountingTarget(t)
    g = torch.Generator().manual_seed(0)
    x0 = t.center(2 * torch.randn(10, 8, generator=g))
    st = mcmc.init_state(ct, x0, step_size=0.1)
    assert ct.usage.energy_evals == 10 and ct.usage.grad_evals == 10
    mcmc.mala_step(ct, st, g, project=t.center)
    mcmc.hmc_step(ct, st, g, n_leapfrog=3, project=t.center)
    assert ct.usage.energy_evals == 10 + 10 + 30 and ct.usage.grad_evals == 50
    mcmc.rwm_step(ct, st, g, project=t.center)
    assert ct.usage.energy_evals == 60 and ct.usage.grad_evals == 50
