"""Known-answer tests of the shared PIS/DDS machinery (methods/control.py) on Gaussian targets.

For p̃ = Z·N(μ, s²I) and a chain y_{k+1} = a_k y + c_k u + s_k ε with Gaussian reference terminal law, the
conditional expectations h_k(y) = E_ref[φ(y_K) | y_k = y], φ = p̃ / N(0, v_ref), are exp(−α_k|y|²/2 + b_k·y)
in closed form (backward recursion). The control whose mean matches the optimal transition's mean is linear in
y; it is optimal up to the O(step) variance mismatch, so the terminal law, log Z and the objectives must be
exact up to discretisation and Monte-Carlo error.
"""

from __future__ import annotations

import math

import pytest
import torch

from methods.control import (
    ChainCoefficients,
    WorkingTarget,
    dds_betas_sq,
    dds_coefficients,
    effective_sample_size,
    gaussian_log_prob,
    kl_loss,
    log_variance_loss,
    log_weights,
    log_z_estimate,
    pis_coefficients,
    simulate,
)

D = torch.float64


class GaussianTarget:
    """E(x) = |x − μ|²/(2s²) + (d/2) log(2πs²) − log Z, i.e. p̃ = Z·N(μ, s²I). Counts evaluations."""

    name = "gauss"
    length_scale = 1.0

    def __init__(self, mu: list[float], s: float, log_z: float) -> None:
        self.mu = torch.tensor(mu, dtype=D)
        self.dim = len(mu)
        self.s, self.log_z = s, log_z
        self.n_energy = 0

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        self.n_energy += x.shape[0]
        d = x - self.mu.to(x)
        const = 0.5 * self.dim * math.log(2 * math.pi * self.s**2) - self.log_z
        return (d * d).sum(-1) / (2 * self.s**2) + const

    def energy_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.energy(x), (x - self.mu.to(x)) / self.s**2


def h_coefficients(coef: ChainCoefficients, mu_y: torch.Tensor, s_y: float) -> tuple[list[float], list]:
    """(α_k, b_k) for k = 0..K of h_k(y) ∝ exp(−α_k|y|²/2 + b_k·y) (per dimension scalar α, vector b)."""
    K = coef.n_steps
    alpha = [0.0] * (K + 1)
    b: list = [None] * (K + 1)
    alpha[K] = 1 / s_y**2 - 1 / coef.ref_var
    b[K] = mu_y / s_y**2
    for k in range(K - 1, -1, -1):
        v, a = float(coef.s[k]) ** 2, float(coef.a[k])
        alpha[k] = a * a * alpha[k + 1] / (1 + alpha[k + 1] * v)
        b[k] = a * b[k + 1] / (1 + alpha[k + 1] * v)
    return alpha, b


def analytic_control(coef: ChainCoefficients, mu_y: torch.Tensor, s_y: float):
    """u_k(y) making the transition mean equal the optimal one: v(b' − α' a y)/(c(1 + α'v))."""
    alpha, b = h_coefficients(coef, mu_y, s_y)
    K = coef.n_steps

    def control(t: torch.Tensor, y: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        k = int(round(float(t[0]) * K))
        v, a, c = float(coef.s[k]) ** 2, float(coef.a[k]), float(coef.c[k])
        al, bb = alpha[k + 1], b[k + 1].to(y)
        return v * (bb - al * a * y) / (c * (1 + al * v))

    return control, alpha, b


def exact_terminal_law(coef: ChainCoefficients, mu_y: torch.Tensor, s_y: float, m0: float, v0: float):
    """Mean [d] and per-dim variance of y_K under the analytic control (linear-Gaussian recursion)."""
    alpha, b = h_coefficients(coef, mu_y, s_y)
    m, V = torch.full_like(mu_y, m0), v0
    for k in range(coef.n_steps):
        v, a, al = float(coef.s[k]) ** 2, float(coef.a[k]), alpha[k + 1]
        m = a * m / (1 + al * v) + v * b[k + 1] / (1 + al * v)
        V = a * a * V / (1 + al * v) ** 2 + v
    return m, V


CASES = {
    "pis": (lambda K: pis_coefficients(K, 0.2, 5.0), 0.0, 0.0),  # y0 = 0
    "dds": (lambda K: dds_coefficients(K, 1.5, 6.4), 0.0, 1.5**2),  # y0 ~ N(0, σ²)
}
MU, S, LOGZ = [1.0, -0.5], 0.7, 0.8


def _run(case: str, K: int, B: int, seed: int = 0, theta: torch.Tensor | None = None, psi=None,
         target: GaussianTarget | None = None, scale: float = 1.0, control=None):
    make, m0, v0 = CASES[case]
    coef = make(K)
    tgt = target or GaussianTarget(MU, S, LOGZ)
    work = WorkingTarget(tgt, scale)
    mu_y, s_y = tgt.mu / scale, tgt.s / scale
    if control is None:
        control, _, _ = analytic_control(coef, mu_y, s_y)
    ctrl = control
    if theta is not None:
        def ctrl(t, y, score):  # noqa: F811 (perturbed family u* + θ ψ)
            return control(t, y, score) + theta.unsqueeze(-1) * psi(y)
    g = torch.Generator().manual_seed(seed)
    y0 = math.sqrt(v0) * torch.randn(B, tgt.dim, generator=g, dtype=D)
    path = simulate(ctrl, y0, coef, work.score, g)
    term = gaussian_log_prob(path.y, coef.ref_var, tgt.dim) + work.energy(path.y, differentiable=True)
    return coef, path, term, work


@pytest.mark.parametrize("case", ["pis", "dds"])
def test_terminal_law_is_exact_discrete_law_and_converges_to_target(case: str) -> None:
    coef, path, _, _ = _run(case, K=100, B=20000)
    mu = torch.tensor(MU, dtype=D)
    m, V = exact_terminal_law(coef, mu, S, 0.0, CASES[case][2])
    y = path.y.detach()
    B = y.shape[0]
    # Monte-Carlo agreement with the exact law of the discretised chain (5 standard errors)
    assert torch.all((y.mean(0) - m).abs() < 5 * math.sqrt(V / B))
    assert torch.all((y.var(0) - V).abs() < 5 * V * math.sqrt(2 / B))
    # discretisation error: small and shrinking with K (the chain tends to the target N(μ, s²))
    errs = []
    for K in (25, 100, 400):
        mk, Vk = exact_terminal_law(CASES[case][0](K), mu, S, 0.0, CASES[case][2])
        errs.append(float((mk - mu).abs().max()) + abs(Vk - S**2) / S**2)
    assert errs[0] > errs[1] > errs[2]
    assert errs[1] < 0.05


@pytest.mark.parametrize("case", ["pis", "dds"])
def test_log_z_and_kl_at_analytic_optimum(case: str) -> None:
    _, path, term, _ = _run(case, K=100, B=20000, seed=1)
    lw = log_weights(path, term.detach())
    # importance weights are almost constant: log Z exact up to MC error, ESS ≈ 1
    assert abs(log_z_estimate(lw) - LOGZ) < 0.01
    assert effective_sample_size(lw) > 0.93  # DDS K = 100: 0.956 (discretisation of the large early steps)
    # KL = E[running + terminal] + log Z ≥ 0, ≈ 0 at the optimum
    per = (path.running + term).detach()
    kl = float(per.mean()) + LOGZ
    se = float(per.std()) / math.sqrt(per.shape[0])
    assert kl > -4 * se
    assert kl < 0.05  # discretisation at K = 100: PIS ≈ 0.01, DDS ≈ 0.027
    assert float(kl_loss(path, term)) == pytest.approx(float(per.mean()))


@pytest.mark.parametrize("case", ["pis", "dds"])
@pytest.mark.parametrize("psi_name", ["shift", "linear"])
def test_kl_gradient_vanishes_at_optimum_only(case: str, psi_name: str) -> None:
    """Per-sample pathwise gradients dL_i/dθ_i of u = u* + θ_i ψ: mean ≈ 0 at θ = 0, clearly > 0 at θ = 0.4.
    """
    psi = {"shift": lambda y: torch.ones_like(y), "linear": lambda y: y}[psi_name]
    B = 8000
    out = {}
    for th in (0.0, 0.4):
        theta = torch.full((B,), th, dtype=D, requires_grad=True)
        _, path, term, _ = _run(case, K=50, B=B, seed=2, theta=theta, psi=psi)
        (path.running + term).sum().backward()
        gi = theta.grad
        out[th] = (float(gi.mean()), float(gi.std()) / math.sqrt(B))
    m0, se0 = out[0.0]
    m1, se1 = out[0.4]
    assert abs(m0) < 4 * se0 + 0.02 * abs(m1)
    assert m1 > 10 * se1


@pytest.mark.parametrize("case", ["pis", "dds"])
def test_log_variance_loss_vanishes_at_optimum(case: str) -> None:
    coef = CASES[case][0](100)
    B = 2000
    lv = {}
    for th in (0.0, 0.4):
        theta = torch.full((B,), th, dtype=D)
        make, _, v0 = CASES[case]
        tgt = GaussianTarget(MU, S, LOGZ)
        work = WorkingTarget(tgt, 1.0)
        control, _, _ = analytic_control(coef, tgt.mu, S)

        def ctrl(t, y, score, control=control, theta=theta):
            return control(t, y, score) + theta.unsqueeze(-1)

        g = torch.Generator().manual_seed(3)
        y0 = math.sqrt(v0) * torch.randn(B, 2, generator=g, dtype=D)
        path = simulate(ctrl, y0, coef, work.score, g, detach_path=True)
        term = gaussian_log_prob(path.y, coef.ref_var, 2) + work.energy(path.y)
        # on the detached path log_rnd equals running + Itô in value
        torch.testing.assert_close(path.log_rnd, path.running + path.ito)
        lv[th] = float(log_variance_loss(path, term))
    assert lv[0.0] < 0.1  # K = 100 discretisation: ≈ 0.05
    assert lv[0.4] > 10 * lv[0.0]


@pytest.mark.parametrize("case", ["pis", "dds"])
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_importance_weights_unbiased_without_control(case: str, scale: float) -> None:
    """With u = 0 the weights are exact for the discrete chain: log Z recovered (no discretisation bias),
    including the Jacobian of working coordinates y = x / scale."""
    tgt = GaussianTarget([0.3 * scale, -0.2 * scale], 0.9 * scale, 0.4)
    zero = lambda t, y, s: torch.zeros_like(y)  # noqa: E731
    _, path, term, work = _run(case, K=20, B=40000, seed=4, target=tgt, scale=scale, control=zero)
    lw = log_weights(path, term.detach())
    ess = effective_sample_size(lw)
    assert 0.3 < ess < 0.999
    assert abs(log_z_estimate(lw) + work.log_jacobian - 0.4) < 4 / math.sqrt(ess * lw.shape[0])


def test_reference_chains_have_the_stated_terminal_variance() -> None:
    pc = pis_coefficients(100, 0.2, 5.0)
    assert float((pc.s**2).sum()) == pytest.approx(pc.ref_var) == pytest.approx(1.0)
    dc = dds_coefficients(128, 1.5, 6.4)
    # stationarity of the exponential integrator: a² σ² + s² = σ² at every step
    torch.testing.assert_close(dc.a**2 * 1.5**2 + dc.s**2, torch.full((128,), 1.5**2, dtype=D))
    b2 = dds_betas_sq(128, 6.4)
    assert float(b2.sum()) == pytest.approx(6.4)
    assert bool((b2[1:] <= b2[:-1]).all())  # shrinking towards the target
    assert pc.times[0] == 0 and float(pc.times[-1]) < 1


def test_bad_coefficients_raise() -> None:
    with pytest.raises(ValueError, match="n_steps"):
        pis_coefficients(0, 0.2, 5.0)
    with pytest.raises(ValueError, match="prior_std"):
        dds_coefficients(10, 0.0, 6.4)
    with pytest.raises(ValueError, match="scale"):
        WorkingTarget(GaussianTarget([0.0], 1.0, 0.0), 0.0)
