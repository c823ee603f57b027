"""AIS towards p^α q^{1−α}: exact identities, unbiasedness, counted cost, the α-divergence gradient."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from harness.budget import CountingTarget
from methods.ais import (
    HMC,
    AnnealedImportanceSampler,
    Metropolis,
    _Evaluator,
    adapt_step,
    alpha_div_loss,
    beta_schedule,
    intermediate_coefficients,
    log_weights_ess,
)
from methods.flows import RealNVP
from targets.base import Target


class Gaussian(Target):
    """E(x) = |x − m|²/(2 s²) + c: an unnormalised isotropic Gaussian, Z = (2π s²)^{d/2} e^{−c}."""

    name = "gauss"
    display_name = "Gauss"

    def __init__(self, dim: int, mean: float = 0.0, std: float = 1.0, c: float = 0.0) -> None:
        self.dim, self.mean, self.std, self.c = dim, mean, std, c

    def _energy(self, x: Tensor) -> Tensor:
        return ((x - self.mean) ** 2).sum(-1) / (2 * self.std**2) + self.c

    def log_z(self) -> float:
        return 0.5 * self.dim * math.log(2 * math.pi * self.std**2) - self.c


def _identity_flow(dim: int, scale: float) -> RealNVP:
    """Zero-initialised RealNVP: exactly N(0, scale² I) up to a rotation, i.e. N(0, scale² I)."""
    g = torch.Generator().manual_seed(0)
    return RealNVP(dim, n_layers=2, hidden=8, base_scale=scale, generator=g, dtype=torch.float64)


def _transition(kind: str, n_int: int, step: float) -> Metropolis | HMC:
    if kind == "metropolis":
        return Metropolis(n_int, step_size=step, n_steps=2)
    return HMC(n_int, step_size=step, n_leapfrog=5, adapt=True)


def test_schedule_and_coefficients() -> None:
    assert beta_schedule(1) == [0.0, 0.5, 1.0]
    assert beta_schedule(3) == [0.0, 0.25, 0.5, 0.75, 1.0]
    # β = 0: q; β = 1: p^α q^{1−α}
    assert intermediate_coefficients(0.0, 2.0) == (1.0, 0.0)
    assert intermediate_coefficients(1.0, 2.0) == (-1.0, 2.0)
    assert intermediate_coefficients(1.0, 1.5) == pytest.approx((-0.5, 1.5))


@pytest.mark.parametrize("kind", ["metropolis", "hmc"])
@pytest.mark.parametrize("alpha", [2.0, 1.5])
def test_q_equal_p_gives_constant_log_weights(kind: str, alpha: float) -> None:
    # q = N(0, 1.7² I) exactly and p ∝ q: every intermediate density is q, every increment α·log Z_p
    target = Gaussian(3, std=1.7, c=0.4)
    flow = _identity_flow(3, 1.7)
    ais = AnnealedImportanceSampler(flow, target, _transition(kind, 3, 0.8), 3, alpha)
    res = ais.run(400, torch.Generator().manual_seed(0))
    assert res.log_w.dtype == torch.float64
    assert float(res.log_w.std()) < 1e-10
    assert float(res.log_w.mean()) == pytest.approx(alpha * target.log_z(), abs=1e-10)
    assert float(res.accept.min()) > 0.3  # the chains did move


def _log_int_p_alpha_q(alpha: float, mp: float, sp: float, cp: float, sq: float, d: int) -> float:
    """log ∫ p^α q^{1−α} for unnormalised p = exp(−|x−mp|²/(2sp²) − cp) and q = N(0, sq² I) in d dims."""
    a = alpha / sp**2 + (1 - alpha) / sq**2  # precision of the product
    b = alpha * mp / sp**2
    const = -alpha * cp - (1 - alpha) * 0.5 * d * math.log(2 * math.pi * sq**2)
    return const + d * (0.5 * math.log(2 * math.pi / a) + 0.5 * b**2 / a - 0.5 * alpha * mp**2 / sp**2)


@pytest.mark.parametrize("kind,alpha", [("metropolis", 2.0), ("hmc", 2.0), ("hmc", 1.5)])
def test_ais_weights_are_unbiased_for_the_normaliser_of_p_alpha_q(kind: str, alpha: float) -> None:
    d, mp, sp, cp, sq = 2, 0.3, 1.0, 0.7, 1.2
    target = Gaussian(d, mean=mp, std=sp, c=cp)
    flow = _identity_flow(d, sq)
    ais = AnnealedImportanceSampler(flow, target, _transition(kind, 2, 0.7), 2, alpha)
    res = ais.run(20000, torch.Generator().manual_seed(1))
    w = torch.exp(res.log_w)
    est, se = float(w.mean()), float(w.std()) / math.sqrt(w.numel())
    exact = math.exp(_log_int_p_alpha_q(alpha, mp, sp, cp, sq, d))
    assert abs(est - exact) < 4 * se + 1e-3 * exact, (est, exact, se)
    # and the weighted samples have the mean of g ∝ p^α q^{1−α}
    a = alpha / sp**2 + (1 - alpha) / sq**2
    g_mean = alpha * mp / sp**2 / a
    wn = w / w.sum()
    assert float((wn.unsqueeze(-1) * res.x).sum(0).mean()) == pytest.approx(g_mean, abs=0.03)


@pytest.mark.parametrize("kind,n_int,steps", [("hmc", 3, 5), ("metropolis", 2, 2)])
def test_every_target_evaluation_is_counted(kind: str, n_int: int, steps: int) -> None:
    counted = CountingTarget(Gaussian(4, std=1.3))
    trans = HMC(n_int, 0.5, n_leapfrog=steps) if kind == "hmc" else Metropolis(n_int, 0.5, n_steps=steps)
    ais = AnnealedImportanceSampler(_identity_flow(4, 1.0), counted, trans, n_int, 2.0)
    n = 37
    ais.run(n, torch.Generator().manual_seed(0))
    assert counted.usage.energy_evals == n * (1 + n_int * steps)
    assert counted.usage.grad_evals == (n * (1 + n_int * steps) if kind == "hmc" else 0)


@pytest.mark.parametrize("alpha", [2.0, 1.5, 3.0])
def test_hmc_uses_the_gradient_of_the_annealed_density(alpha: float) -> None:
    # ∇ log π_β = (1 − αβ) ∇ log q + αβ ∇ log p for any α (fab-torch hard-codes 2β)
    target = Gaussian(2, mean=0.5, std=0.8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        flow = RealNVP(
            2, n_layers=2, hidden=8, generator=torch.Generator().manual_seed(0), dtype=torch.float64
        )
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(
                0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype)
            )
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    st = _Evaluator(flow, target, with_grad=True)(x)
    beta = 0.6
    xg = x.clone().requires_grad_(True)
    log_pi = (1 - alpha * beta) * flow.log_prob(xg) + alpha * beta * (-target.energy(xg))
    (ref,) = torch.autograd.grad(log_pi.sum(), xg)
    assert torch.allclose(st.grad_log_pi(beta, alpha), ref, atol=1e-10)


def test_hmc_step_size_adapts_towards_target_acceptance() -> None:
    target = Gaussian(2, std=0.5)
    hmc = HMC(1, step_size=3.0, n_leapfrog=5, adapt=True, target_accept=0.65)
    ais = AnnealedImportanceSampler(_identity_flow(2, 0.5), target, hmc, 1, 2.0)
    g = torch.Generator().manual_seed(0)
    rates = []
    for _ in range(80):
        ais.run(256, g)
        rates.append(float(hmc.last_accept[0]))
    assert float(hmc.step_sizes[0]) < 3.0
    assert rates[0] < 0.3  # far too large a step at first
    assert 0.5 < sum(rates[-30:]) / 30 < 0.8  # oscillates around 0.65 after adaptation


def test_multiplicative_step_rule_of_fab_jax() -> None:
    # fab-jax (and the variant fab@published): ×/÷ f per pass, whatever the size of the miss
    assert adapt_step(1.0, 0.9, 0.65, 1.02) == pytest.approx(1.02)
    assert adapt_step(1.0, 0.0, 0.65, 1.02) == pytest.approx(1 / 1.02)
    assert adapt_step(1.0, 0.9, 0.65) == pytest.approx(math.exp(0.25))  # default rule
    hmc = HMC(1, step_size=1.0, n_leapfrog=2, adapt=True, adapt_factor=1.02)
    ais = AnnealedImportanceSampler(_identity_flow(2, 0.5), Gaussian(2, std=0.5), hmc, 1, 2.0)
    ais.run(64, torch.Generator().manual_seed(0))
    assert float(hmc.step_sizes[0]) in (pytest.approx(1.02), pytest.approx(1 / 1.02))
    with pytest.raises(ValueError, match="adapt_factor"):
        HMC(1, adapt_factor=1.0)


def test_non_finite_chains_get_zero_weight() -> None:
    class Walled(Gaussian):
        def _energy(self, x: Tensor) -> Tensor:
            e = super()._energy(x)
            return torch.where(x[:, 0] > 1.0, torch.full_like(e, float("inf")), e)

    ais = AnnealedImportanceSampler(_identity_flow(2, 1.0), Walled(2), Metropolis(1, 0.5), 1, 2.0)
    res = ais.run(500, torch.Generator().manual_seed(0))
    bad = res.x[:, 0] > 1.0
    assert bool(torch.isneginf(res.log_w[bad]).all()) and bool(torch.isfinite(res.log_w[~bad]).all())
    assert 0.0 < log_weights_ess(res.log_w) <= 1.0


def test_ess_of_equal_weights_is_one() -> None:
    assert log_weights_ess(torch.zeros(10, dtype=torch.float64)) == pytest.approx(1.0)
    assert log_weights_ess(torch.tensor([0.0, -float("inf")])) == pytest.approx(0.5)


# ------------------------------------------------------------------ the α-divergence gradient


def _tiny_flow(seed: int) -> RealNVP:
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # nn.Linear's default init draws from the global generator
        f = RealNVP(2, n_layers=1, hidden=4, base_scale=1.5, generator=g, dtype=torch.float64)
    with torch.no_grad():
        for p in f.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return f


def _grid(n: int = 400, lim: float = 9.0) -> tuple[Tensor, float]:
    g = torch.linspace(-lim, lim, n, dtype=torch.float64)
    X, Y = torch.meshgrid(g, g, indexing="ij")
    return torch.stack([X.reshape(-1), Y.reshape(-1)], -1), float((g[1] - g[0]) ** 2)


def _log_int(flow: RealNVP, target: Gaussian, alpha: float, pts: Tensor, dA: float) -> float:
    with torch.no_grad():
        f = alpha * (-target.energy(pts)) + (1 - alpha) * flow.log_prob(pts)
        return float(torch.logsumexp(f, 0) + math.log(dA))


@pytest.mark.parametrize("alpha", [2.0, 1.5])
def test_alpha_div_surrogate_gradient_matches_finite_differences(alpha: float) -> None:
    # ∇_θ loss = −E_g[∇ log q_θ] = (α − 1)⁻¹ ∇_θ log ∫ p^α q_θ^{1−α}; the expectation under g is taken on a
    # quadrature grid (points weighted by g·dA, exactly what the AIS weights estimate)
    target = Gaussian(2, mean=0.4, std=1.1, c=0.3)
    flow = _tiny_flow(0)
    pts, dA = _grid()
    with torch.no_grad():
        log_w = alpha * (-target.energy(pts)) + (1 - alpha) * flow.log_prob(pts)
    loss = alpha_div_loss(flow.log_prob(pts), log_w)
    params = list(flow.parameters())
    grads = torch.autograd.grad(loss, params)
    h = 1e-5
    checked = 0
    for p, gp in zip(params, grads):
        for k in range(min(p.numel(), 3)):
            with torch.no_grad():
                p.view(-1)[k] += h
                up = _log_int(flow, target, alpha, pts, dA)
                p.view(-1)[k] -= 2 * h
                dn = _log_int(flow, target, alpha, pts, dA)
                p.view(-1)[k] += h
            fd = (up - dn) / (2 * h) / (alpha - 1)
            assert float(gp.view(-1)[k]) == pytest.approx(fd, abs=1e-5, rel=1e-3)
            checked += abs(fd) > 1e-3
    assert checked >= 5  # non-trivial components were compared


def test_alpha_div_gradient_from_ais_samples_matches_finite_differences() -> None:
    # the same identity with the estimator FAB actually uses: AIS samples from q, self-normalised weights
    alpha = 2.0
    target = Gaussian(2, mean=0.4, std=1.1, c=0.3)
    flow = _tiny_flow(0)
    ais = AnnealedImportanceSampler(flow, target, Metropolis(1, step_size=1.0, n_steps=2), 1, alpha)
    res = ais.run(20000, torch.Generator().manual_seed(3))
    loss = alpha_div_loss(flow.log_prob(res.x), res.log_w)
    params = list(flow.parameters())
    grads = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
    pts, dA = _grid(250)
    h = 1e-5
    fd = []
    for p in params:
        for k in range(p.numel()):
            with torch.no_grad():
                p.view(-1)[k] += h
                up = _log_int(flow, target, alpha, pts, dA)
                p.view(-1)[k] -= 2 * h
                dn = _log_int(flow, target, alpha, pts, dA)
                p.view(-1)[k] += h
            fd.append((up - dn) / (2 * h) / (alpha - 1))
    fd_t = torch.tensor(fd, dtype=torch.float64)
    rel = float((grads - fd_t).norm() / fd_t.norm())
    assert rel < 0.1, rel
