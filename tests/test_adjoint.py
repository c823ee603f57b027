"""Adjoint Sampling and ASBS (methods/adjoint.py, methods/asbs.py, the forward VE pieces in methods/sde.py)
against closed forms on Gaussian targets, where the optimal control is known:

- the base process: v(t) = ∫g², the bridge ("reciprocal projection") mean and variance, its marginal;
- the harmonic source equals the public code's construction after the centre-of-mass removal;
- the adjoint matching target: for π = N(m, s²I) and a delta source, E[−a_1(X_1) | X_t = x] under the optimal
  process (X_1 ~ π, X_t from the base bridge) equals the h-transform control u*(t, x), and the controlled SDE
  with u* ends in π;
- the corrector regression target: E[(X_0 − X_1)/V | X_1 = x] = −x/(s_0² + V) for a Gaussian source; with a
  delta source it is AS's ∇log p_1^base;
- short trainings of AS and ASBS on a 2-D Gaussian reach its mean and variance;
- counting, stage schedule, exact resume and the published configurations.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

import methods
import targets
from harness.budget import CountingTarget
from methods import adjoint, asbs
from methods.adjoint import AdjointSampling, ASConfig, as_terminal_adjoint, clipped_energy_grad
from methods.asbs import ASBS, ASBSConfig
from methods.idem import clip_score
from methods.noise import GeometricNoiseSchedule
from methods.sde import HARMONIC_STD_PER_SCALE, ForwardVESDE, harmonic_prior
from targets.base import Target

torch.set_num_threads(1)


class Gaussian(Target):
    """E(x) = |x − m|² / (2 s²): π = N(m, s² I)."""

    name = "gauss"
    display_name = "Gauss"

    def __init__(self, mean: list[float], var: float) -> None:
        self.m = torch.tensor(mean, dtype=torch.float64)
        self.dim, self.var = len(mean), var

    def _energy(self, x):
        return ((x - self.m.to(x.dtype)) ** 2).sum(-1) / (2 * self.var)


def _u_star(t: float, x: torch.Tensor, m: torch.Tensor, s2: float, sde: ForwardVESDE) -> torch.Tensor:
    """Optimal control of AS (delta source at 0, π = N(m, s2 I)): u* = ∇_x log φ(t, x) with the h-function
    φ(t, x) = ∫ N(y; x, w I) π(y)/p_1^base(y) dy, w = V − v(t). π/p_1^base ∝ exp(−α|y|²/2 + y·m/s2) with
    α = 1/s2 − 1/V, so the Gaussian integral gives log φ = |x/w + m/s2|²/(2P) − |x|²/(2w) + const,
    P = 1/w + α, i.e. u* = (m/s2 − α x) / (1 + α w) (= −a_1(x) at t = 1)."""
    V = sde.total_var
    w = V - float(sde.var(t))
    alpha = 1.0 / s2 - 1.0 / V
    return (m / s2 - alpha * x) / (1.0 + alpha * w)


# ------------------------------------------------------------------------------------- the base process
def test_forward_ve_schedule_matches_its_integral_and_dems_schedule():
    sde = ForwardVESDE(1e-3, 2.0)
    ts = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    g2 = sde.g(ts) ** 2
    cum = torch.cat([torch.zeros(1, dtype=torch.float64),
                     torch.cumsum((g2[1:] + g2[:-1]) / 2 * (ts[1:] - ts[:-1]), 0)])
    for t in (0.01, 0.2, 0.5, 0.9, 1.0):
        i = int(round(t * 200_000))
        assert float(sde.var(t)) == pytest.approx(float(cum[i]), rel=1e-6)
    dem = GeometricNoiseSchedule(1e-3, 2.0)
    for t in (0.0, 0.3, 1.0):
        r = torch.tensor(1.0 - t, dtype=torch.float64)
        one = torch.tensor(1.0, dtype=torch.float64)
        assert float(sde.var(t)) == pytest.approx(float(dem.h(one) - dem.h(r)), rel=1e-9, abs=1e-15)
        assert float(sde.g(t)) == pytest.approx(float(dem.g(r)), rel=1e-12)
    assert sde.total_var == pytest.approx(2.0**2 - 1e-6) and float(sde.kappa(1.0)) == 1.0


def test_bridge_mean_variance_and_marginal():
    sde = ForwardVESDE(1e-3, 1.5)
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    t = torch.full((n,), 0.3, dtype=torch.float64)
    x0 = torch.full((n, 1), -1.0, dtype=torch.float64)
    x1 = torch.full((n, 1), 2.0, dtype=torch.float64)
    xt = sde.bridge_sample(t, x0, x1, gen)
    k = float(sde.kappa(0.3))
    var = sde.total_var * k * (1 - k)
    assert float(xt.mean()) == pytest.approx((1 - k) * -1.0 + k * 2.0, abs=4 * math.sqrt(var / n))
    assert float(xt.var()) == pytest.approx(var, rel=4 * math.sqrt(2 / n))
    # pinned at 0 and at a base endpoint X_1 ~ N(0, V): X_t ~ N(0, v(t)), the base marginal
    x1 = math.sqrt(sde.total_var) * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    xt = sde.bridge_sample(t, torch.zeros_like(x1), x1, gen)
    assert float(xt.var()) == pytest.approx(float(sde.var(0.3)), rel=4 * math.sqrt(2 / n))


def test_particle_bridge_and_base_sde_are_mean_free():
    t = targets.get("lj13")
    sde = ForwardVESDE(1e-3, 1.0, t.center)
    gen = torch.Generator().manual_seed(1)
    x0 = t.center(torch.randn(4000, 39, generator=gen))
    x1 = sde.integrate(None, x0, 300, gen)
    assert t.as_particles(x1).mean(1).abs().max() < 1e-5
    # variance per coordinate of the mean-free increment: Σ g_k² dt_k (n − 1)/n
    times = torch.linspace(0, 1, 300, dtype=torch.float64)
    disc = float((sde.g(times[:-1]) ** 2 * (times[1:] - times[:-1])).sum())
    inc = (x1 - x0).double()
    assert float(inc.var(0).mean()) == pytest.approx(disc * 12 / 13, rel=0.03)
    xt = sde.bridge_sample(torch.rand(4000, generator=gen), x0, x1, gen)
    assert t.as_particles(xt).mean(1).abs().max() < 1e-5


def test_harmonic_source_equals_the_public_codes_construction():
    for n, d in ((4, 2), (13, 3)):
        A = -0.5 * torch.ones(n, n, dtype=torch.float64)
        A.fill_diagonal_(1.0)
        cov = torch.linalg.inv(torch.kron(A, torch.eye(d, dtype=torch.float64)))
        U, S, _ = torch.linalg.svd(cov)
        L = U @ torch.diag(S.sqrt())  # the code's A with cov = A Aᵀ (absolute eigenvalues)
        P = torch.kron(torch.eye(n, dtype=torch.float64) - 1.0 / n, torch.eye(d, dtype=torch.float64))
        torch.testing.assert_close(P @ L @ L.T @ P, (2.0 / 3.0) * P, atol=1e-10, rtol=0)
    src = harmonic_prior(13, 3, 2.0)
    assert src.scale == pytest.approx(2.0 * HARMONIC_STD_PER_SCALE)
    assert src.scale == pytest.approx(1.633, abs=1e-3)


# ------------------------------------------------------------------------------------- AS: closed forms
def test_as_terminal_adjoint_and_optimal_control_closed_form():
    m, s2 = torch.tensor([0.7, -0.4], dtype=torch.float64), 0.3
    tgt = CountingTarget(Gaussian(m.tolist(), s2))
    sde = ForwardVESDE(1e-3, 1.5)
    gen = torch.Generator().manual_seed(2)
    x1 = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    g = clipped_energy_grad(tgt, x1, 1.0, None)
    a1 = as_terminal_adjoint(g, x1, sde.total_var)
    torch.testing.assert_close(a1, (x1 - m) / s2 - x1 / sde.total_var)
    assert tgt.usage.energy_evals == 5 and tgt.usage.grad_evals == 5
    torch.testing.assert_close(_u_star(1.0, x1, m, s2, sde), -a1)
    # the regression target's conditional mean under the optimal process is u*: X_1 ~ π, X_0 = 0, X_t bridge
    n = 400_000
    for t in (0.25, 0.6, 0.9):
        X1 = m + math.sqrt(s2) * torch.randn(n, 2, generator=gen, dtype=torch.float64)
        Xt = sde.bridge_sample(torch.full((n,), t, dtype=torch.float64), torch.zeros_like(X1), X1, gen)
        y = -as_terminal_adjoint((X1 - m) / s2, X1, sde.total_var)
        for k in range(2):  # least squares y_k ≈ b + c x_t,k: the conditional mean is affine here
            c, b = np.polyfit(Xt[:, k].numpy(), y[:, k].numpy(), 1)
            xs = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
            u = _u_star(t, xs, m, s2, sde)[:, k]
            assert b == pytest.approx(float(u[0]), abs=0.02 * (1 + abs(float(u[0]))))
            assert c == pytest.approx(float(u[1] - u[0]), rel=0.02)


def test_controlled_sde_with_the_optimal_control_ends_in_the_target():
    m, s2 = torch.tensor([0.7, -0.4], dtype=torch.float64), 0.3
    sde = ForwardVESDE(1e-3, 1.5)
    gen = torch.Generator().manual_seed(3)
    u = lambda t, x: _u_star(float(t[0]), x, m, s2, sde)  # noqa: E731
    x1 = sde.integrate(u, torch.zeros(20_000, 2, dtype=torch.float64), 1000, gen)
    torch.testing.assert_close(x1.mean(0), m, atol=0.03, rtol=0)
    torch.testing.assert_close(x1.var(0), torch.full((2,), s2, dtype=torch.float64), atol=0.02, rtol=0)


# ------------------------------------------------------------------------------------- ASBS: the corrector
def test_corrector_regression_target_closed_form():
    sde = ForwardVESDE(1e-3, 1.0)
    gen = torch.Generator().manual_seed(4)
    s0 = 0.8
    n = 200_000
    x0 = s0 * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    x1 = sde.integrate(None, x0, 400, gen)
    v1 = float(x1.var())  # the discretised base variance from x0 (≈ s0² + V)
    c, b = np.polyfit(x1[:, 0].numpy(), sde.transition_score(x0, x1)[:, 0].numpy(), 1)
    # E[(X0 − X1)/V | X1 = x] = −(v1 − s0²)/V · x / v1 (Gaussian conditioning; continuous time: −x/(s0² + V))
    assert c == pytest.approx(-(v1 - s0**2) / sde.total_var / v1, rel=0.02)
    assert c == pytest.approx(-1.0 / (s0**2 + sde.total_var), rel=0.03)
    assert abs(b) < 5e-3
    # a delta source: the corrector's target is AS's ∇log p_1^base exactly
    z = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(sde.transition_score(torch.zeros_like(z), z),
                               as_terminal_adjoint(torch.zeros_like(z), z, sde.total_var))


def test_asbs_terminal_adjoint_uses_the_corrector_after_the_first_stage():
    tgt = CountingTarget(targets.get("dw4"))
    cfg = ASBSConfig.for_target("dw4", **ASBSConfig.preset("smoke", "dw4"))
    m = ASBS(tgt, cfg, torch.device("cpu"), torch.Generator().manual_seed(0))
    torch.nn.init.normal_(m.corrector.layers[0].coord_mlp[2].weight, std=0.3)  # a non-trivial corrector
    x1 = tgt.center(torch.randn(6, 8, generator=torch.Generator().manual_seed(1)) * 2)
    g = clipped_energy_grad(tgt, x1, 1.0, cfg.max_grad_e_norm)
    torch.testing.assert_close(m.terminal_adjoint(x1, 0), g)
    h = m.corrector_value(x1)
    assert float(h.abs().max()) > 1e-4
    torch.testing.assert_close(m.terminal_adjoint(x1, cfg.n_adjoint_epochs), g + h)


# ------------------------------------------------------------------------------------- short trainings
class _PlainMLP(nn.Module):
    """u(t, x) = MLP([t, x]) with a zero read-out: a smooth controller, so that a short training measures the
    adjoint-matching loop rather than the high-frequency coordinate features of the TimeMLP."""

    def __init__(self, dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, t, x):
        return self.net(torch.cat([t.reshape(-1, 1).expand(x.shape[0], 1).to(x.dtype), x], -1))


def _gauss_cfg(cls, **kw):
    base = dict(network="mlp", sigma_max=1.5, nfe=40, batch_size=256, n_new_per_epoch=256, resample_chunk=256,
                steps_per_epoch=20, buffer_size=2048, duplicates=2, lr=1e-3, max_grad_e_norm=None,
                sample_chunk=4000)
    return cls.Config(**{**base, **kw})


@pytest.mark.parametrize("cls, extra", [(AdjointSampling, {}),
                                        (ASBS, dict(source="gauss", source_scale=0.5, n_adjoint_epochs=8,
                                                    n_corrector_epochs=2, corrector_lr=1e-3))])
def test_short_training_on_a_gaussian_reaches_its_mean_and_variance(cls, extra, monkeypatch):
    # |mean error| and |var error| of 4000 samples after 1000 steps, seeds 0-3: at most 0.026 (measured)
    plain = lambda target, *a: _PlainMLP(target.dim)  # noqa: E731
    monkeypatch.setattr(adjoint, "build_network", plain)
    monkeypatch.setattr(asbs, "build_network", plain)
    m, s2 = [0.6, -0.3], 0.2
    tgt = CountingTarget(Gaussian(m, s2))
    method = cls(tgt, _gauss_cfg(cls, **extra), torch.device("cpu"), torch.Generator().manual_seed(0))
    for _ in range(1000):
        logs = method.train_step()
    assert math.isfinite(logs["loss"])
    x = method.sample(4000).double()
    torch.testing.assert_close(x.mean(0), torch.tensor(m, dtype=torch.float64), atol=0.06, rtol=0)
    torch.testing.assert_close(x.var(0), torch.full((2,), s2, dtype=torch.float64), atol=0.05, rtol=0)


# ------------------------------------------------------------------------------------- harness contract
def test_counting_and_stage_schedule():
    tgt = CountingTarget(targets.get("dw4"))
    cfg = ASBSConfig.for_target("dw4", **ASBSConfig.preset("smoke", "dw4"))
    m = ASBS(tgt, cfg, torch.device("cpu"), torch.Generator().manual_seed(0))
    spe, n_new = cfg.steps_per_epoch, cfg.n_new_per_epoch
    stages, evals = [], []
    for _ in range(3 * spe):
        stages.append(m.train_step()["corrector_stage"])
        evals.append(tgt.usage.energy_evals)
    assert stages == [0.0] * spe + [1.0] * spe + [0.0] * spe  # 1 adjoint, 1 corrector epoch per cycle
    assert evals[0] == n_new and evals[2 * spe - 1] == n_new and evals[-1] == 2 * n_new  # none in corrector
    assert tgt.usage.grad_evals == tgt.usage.energy_evals
    assert len(m.buffer) == 2 * n_new and len(m.corrector_buffer) == n_new
    before = tgt.usage.energy_evals
    nets = tgt.usage.network_evals
    x = m.sample(10)
    assert x.shape == (10, 8) and tgt.usage.energy_evals == before
    assert tgt.usage.network_evals - nets == 10 * (cfg.nfe - 1)
    assert float(targets.get("dw4").as_particles(x).mean(1).abs().max()) < 1e-5


def test_dataloader_order_passes_over_the_duplicated_buffer():
    tgt = CountingTarget(targets.get("dw4"))
    cfg = ASConfig.for_target("dw4", **ASConfig.preset("smoke", "dw4")).replace(
        n_new_per_epoch=10, resample_chunk=10, batch_size=4, duplicates=2, steps_per_epoch=6)
    m = AdjointSampling(tgt, cfg, torch.device("cpu"), torch.Generator().manual_seed(0))
    m._populate("adjoint", 0)
    rows = [m._next_rows(m.buffer) for _ in range(6)]
    assert [len(r) for r in rows] == [4] * 6  # the 6th batch starts a new pass
    first_pass = torch.cat(rows[:5])  # 20 = 10 rows × 2 duplicates: every row exactly twice
    assert torch.bincount(first_pass, minlength=10).tolist() == [2] * 10


@pytest.mark.parametrize("cls", [AdjointSampling, ASBS])
def test_exact_resume_across_epochs_and_stages(cls):
    tgt_a = CountingTarget(targets.get("dw4"))
    cfg = cls.Config.for_target("dw4", **cls.Config.preset("smoke", "dw4"))
    a = cls(tgt_a, cfg, torch.device("cpu"), torch.Generator().manual_seed(5))
    for _ in range(3):  # stops mid-epoch (epochs of 2 steps)
        a.train_step()
    b = cls(CountingTarget(targets.get("dw4")), cfg, torch.device("cpu"), torch.Generator().manual_seed(99))
    buf = io.BytesIO()  # a checkpoint round trip, as the harness does (weights_only)
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    la = [a.train_step()["loss"] for _ in range(5)]
    lb = [b.train_step()["loss"] for _ in range(5)]
    assert la == lb
    torch.testing.assert_close(a.sample(8), b.sample(8), atol=0, rtol=0)


def test_published_configs_and_variants():
    c = ASConfig.for_target("dw4")
    got = (c.sigma_max, c.nfe, c.duplicates, c.n_new_per_epoch, c.batch_size, c.lr)
    assert got == (2.0, 200, 10, 1000, 512, 1e-4)
    assert (c.network, c.hidden, c.n_layers, c.source, c.max_grad_e_norm, c.buffer_size) == (
        "egnn", 128, 5, "delta", 100.0, 10_000)
    l55 = ASConfig.for_target("lj55")
    assert (l55.nfe, l55.batch_size, l55.n_new_per_epoch, l55.duplicates) == (1000, 200, 200, 25)
    pub = ASConfig.for_target("dw4", **ASConfig.variant("published", "dw4"))
    assert (pub.sigma_max, pub.n_new_per_epoch) == (1.5, 512)
    b = ASBSConfig.for_target("lj13")
    assert (b.source, b.source_scale, b.sigma_max, b.nfe, b.n_adjoint_epochs, b.n_corrector_epochs) == (
        "harmonic", 2.0, 1.0, 1000, 300, 20)
    b55 = ASBSConfig.for_target("lj55")
    assert (b55.source_scale, b55.sigma_max, b55.n_new_per_epoch) == (1.0, 2.0, 200)
    assert ASBSConfig.for_target("lj55", **ASBSConfig.variant("published", "lj55")).n_new_per_epoch == 200
    assert methods.get("as@published") is AdjointSampling and methods.get("asbs@published") is ASBS
    assert ASConfig.suggested_budget("paper", "lj13") == {"steps": 400_000}
    assert ASBSConfig.suggested_budget("paper", "dw4") == {"steps": 500_000}
    with pytest.raises(ValueError, match="nfe"):
        ASConfig.for_target("dw4", nfe=1)


def test_clipped_energy_grad_clips_per_particle_then_centres():
    t = CountingTarget(targets.get("lj13"))
    # overlapping particles: huge forces
    x = t.center(torch.randn(3, 39, generator=torch.Generator().manual_seed(6)) * 0.6)
    g = clipped_energy_grad(t, x, 1.0, 100.0)
    _, raw = targets.get("lj13").energy_and_grad(x)
    torch.testing.assert_close(g, t.center(clip_score(raw, 100.0, 3)))
    assert float(t.as_particles(g).mean(1).abs().max()) < 1e-4
    assert float(clip_score(raw, 100.0, 3).reshape(3, 13, 3).norm(dim=-1).max()) <= 100.0 + 1e-3
