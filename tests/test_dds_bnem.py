"""`dds@bnem`: DDS as BNEM's code ran it (BNEM's α(t, dt) schedules, variance-preserving step, unsquared-norm
running cost, prior ≠ noise level, ReduceLROnPlateau). Closed forms and direct computations; all fast."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import methods
import targets
from harness import grids
from harness.budget import CountingTarget
from methods.control import (
    bnem_alphas,
    dds_betas_sq,
    dds_coefficients,
    gaussian_log_prob,
    kl_loss,
    ou_coefficients,
    simulate,
    terminal_variance,
)
from methods.dds import DDSConfig
from methods.noise import GeometricNoiseSchedule, cosine_alpha

D = torch.float64
TINY = {"hidden": 8, "n_layers": 1, "emb_size": 8, "time_channels": 8, "time_layers": 1, "n_diag_samples": 8}


def make(target: str, seed: int = 0, **over):
    """dds@bnem on ``target`` with tiny networks and ``over`` applied after the variant."""
    M = methods.get("dds@bnem")
    cfg = M.Config.for_target(target, **{**M.Config.variant("bnem", target), **TINY, **over})
    ct = CountingTarget(targets.get(target))
    return M(ct, cfg, "cpu", torch.Generator().manual_seed(seed)), ct


# ------------------------------------------------------------------------------------------ the variant
def test_variant_resolves_and_validates_for_every_target() -> None:
    assert "dds@bnem" in methods.variants()
    M = methods.get("dds@bnem")
    assert M is methods.get("dds")
    spec = M.Config.VARIANTS["bnem"]
    assert spec["description"] and "dds_module.py" in spec["source"]
    assert "sde_integration.py" in spec["source"]
    expect = {"gmm40": ("bnem_cosine", 1.0, 1000, False), "dw4": ("bnem_cosine", 3.0, 1000, True),
              "dw4-bnem": ("bnem_cosine", 3.0, 1000, True), "lj13": ("bnem_cosine", 6.0, 1000, True),
              "lj55": ("geometric", 4.0, 16, True)}
    for t, (sched, sig, batch, plateau) in expect.items():
        c = M.Config.for_target(t, **M.Config.variant("bnem", t))
        assert (c.schedule, c.sigma_max, c.batch_size, c.lr_plateau) == (sched, sig, batch, plateau)
        assert (c.n_steps, c.integrator, c.running_cost, c.prior_std, c.time_phase) == (
            100, "var_preserve", "norm", 1.0, True)
        assert (c.lr, c.weight_decay, c.grad_norm_clip, c.score_clip, c.score_clip_mode) == (
            1e-3, 1e-7, 0.5, 100.0, "norm")
    assert M.Config.for_target("gmm40", **M.Config.variant("bnem", "gmm40")).readout_init == "default"
    lj55 = M.Config.for_target("lj55", **M.Config.variant("bnem", "lj55"))
    assert (lj55.sigma_min, lj55.plateau_check_steps, lj55.plateau_val_batches) == (0.5, 5000, 4)
    # our default DDS is unchanged
    d = DDSConfig.for_target("dw4")
    assert (d.schedule, d.integrator, d.running_cost, d.sigma_max, d.n_steps) == (
        "cos4", "exponential", "squared", None, 128)
    with pytest.raises(KeyError, match="variants of dds"):
        methods.get("dds@nope")


def test_grid_expansion() -> None:
    e = grids.expand("paper", methods=["dds@bnem"])
    assert {s.target for s in e.specs} >= {"gmm40", "dw4", "lj13", "lj55"}
    for s in e.specs:
        assert s.cell_id == f"paper/{s.target}/dds@bnem/r{s.replicate}"
        c = DDSConfig.for_target(s.target, **s.config)
        assert c.integrator == "var_preserve" and c.running_cost == "norm"
    lj55 = next(s for s in e.specs if s.target == "lj55")
    assert lj55.budget["steps"] == 200_000
    # the cpu grid's cost presets still apply over the variant
    s = grids.expand("cpu", methods=["dds@bnem"], targets=["dw4"]).specs[0]
    c = DDSConfig.for_target("dw4", **s.config)
    assert (c.batch_size, c.hidden, c.sigma_max, c.schedule) == (128, 32, 3.0, "bnem_cosine")


# ------------------------------------------------------------------------------------------ schedules
def test_cosine_alpha_closed_form() -> None:
    K, s = 100, 1e-4
    dt = 1 / K
    a = cosine_alpha(torch.arange(K, dtype=D) * dt, dt, s)
    for k in (0, 1, 37, K - 1):
        assert float(a[k]) == pytest.approx(dt * math.cos(math.pi / 2 * (1 - k * dt + s) / (1 + s)) ** 4,
                                            rel=1e-12, abs=1e-300)
    assert float(a[0]) < 1e-60  # cos(π/2) = 0 at the prior end
    assert float(cosine_alpha(1.0, dt, s)) == pytest.approx(dt, rel=1e-6)  # ≈ dt at the target end
    assert bool((a[1:] > a[:-1]).all())  # grows towards the target
    # Σ_k dt·sin⁴(π t_k / 2) → ∫_0^1 sin⁴(πt/2) dt = 3/8
    assert float(a.sum()) == pytest.approx(3 / 8 - dt / 2, abs=2e-3)
    torch.testing.assert_close(bnem_alphas("bnem_cosine", K, s, 3.0), a)


def test_geometric_alpha_closed_form() -> None:
    sched = GeometricNoiseSchedule(0.5, 4.0)
    K = 50
    dt = 1 / K
    # ∫ g against the trapezoid rule on a fine grid
    grid = torch.linspace(0.3, 0.3 + dt, 20001, dtype=D)
    num = torch.trapezoid(sched.g(grid), grid)
    t0, t1 = torch.tensor(0.3, dtype=D), torch.tensor(0.3 + dt, dtype=D)
    assert float(sched.g_integral(t0, t1)) == pytest.approx(float(num), rel=1e-8)
    # ∫_0^1 g = sqrt(2 ln σ_d)/ln σ_d · (σ_max − σ_min)
    ld = math.log(8.0)
    one, zero = torch.tensor(1.0, dtype=D), torch.tensor(0.0, dtype=D)
    assert float(sched.g_integral(zero, one)) == pytest.approx(math.sqrt(2 * ld) / ld * 3.5, rel=1e-12)
    t = torch.arange(K, dtype=D) * dt
    a = sched.alpha(t, dt)
    assert float(a[0]) == float(a[1])  # t = 0 is clamped to dt
    assert float(a[-1]) == pytest.approx(1 - math.exp(-2 * float(sched.g_integral(t[-2], t[-1]))), rel=1e-12)
    assert float(sched.alpha(one, dt)) == pytest.approx(
        1 - math.exp(-2 * 0.5 * math.sqrt(2 * ld) / ld * (8.0 - 8.0 ** (1 - dt))), rel=1e-12)
    assert bool((a > 0).all() and (a < 1).all() and (a[2:] > a[1:-1]).all())
    torch.testing.assert_close(bnem_alphas("geometric", K, 0.5, 4.0), a)


# ------------------------------------------------------------------------------------------ the step
def test_var_preserving_step_closed_form_and_stationarity() -> None:
    al = bnem_alphas("geometric", 40, 1e-4, 1.0)
    sig = 1.7
    coef = ou_coefficients(al, sig, sig)
    # BNEM's step: sqrt(1 − α) y + 2σ²(1 − sqrt(1 − α)) u + σ sqrt(α) ε
    torch.testing.assert_close(coef.a, torch.sqrt(1 - al))
    torch.testing.assert_close(coef.c, 2 * sig**2 * (1 - torch.sqrt(1 - al)), rtol=1e-9, atol=0)
    torch.testing.assert_close(coef.s, sig * al.sqrt())
    # exact stationarity of the uncontrolled step
    torch.testing.assert_close(coef.a**2 * sig**2 + coef.s**2, torch.full_like(al, sig**2))
    assert coef.ref_var == sig**2 and coef.loss_ref_var is None
    # the "exponential" form on the cos4 scheme is our default DDS chain
    ours = ou_coefficients(dds_betas_sq(64, 6.4), sig, sig, "exponential")
    default = dds_coefficients(64, sig, 6.4)
    for f in ("a", "c", "s", "times"):
        torch.testing.assert_close(getattr(ours, f), getattr(default, f))
    assert ours.ref_var == default.ref_var
    # zero drift keeps N(0, σ²) (Monte Carlo)
    n = 40_000
    y0 = sig * torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=D)
    y = simulate(lambda t, y, s: torch.zeros_like(y), y0, coef, None, torch.Generator().manual_seed(1)).y
    assert (y.std(0) - sig).abs().max() < 5 * sig / math.sqrt(2 * n)
    assert y.mean(0).abs().max() < 5 * sig / math.sqrt(n)


def test_noise_level_above_the_prior_terminal_variance() -> None:
    """BNEM's DW-4: y_0 ~ N(0, 1), noise σ = 3: the reference is not stationary;
    v_K = σ² + (1 − σ²)Π(1 − α)."""
    al = bnem_alphas("bnem_cosine", 100, 1e-4, 3.0)
    coef = ou_coefficients(al, 3.0, 1.0)
    closed = 9.0 + (1 - 9.0) * float(torch.prod(1 - al))
    assert coef.ref_var == pytest.approx(closed, rel=1e-12)
    assert terminal_variance(coef.a, coef.s, 1.0) == pytest.approx(closed, rel=1e-12)
    assert coef.loss_ref_var == 1.0 and coef.loss_var == 1.0
    n = 40_000
    y0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(2), dtype=D)
    y = simulate(lambda t, y, s: torch.zeros_like(y), y0, coef, None, torch.Generator().manual_seed(3)).y
    assert abs(float(y.var(0).mean()) - closed) < 5 * closed * math.sqrt(2 / (2 * n))


# ------------------------------------------------------------------------------------------ the cost
def test_running_cost_is_bnems_unsquared_norm() -> None:
    """cost = Σ_k 2σ²λ_k²/α_k ‖u_k‖ (λ = 1 − sqrt(1 − α)), computed here from the recorded controls; the
    importance-weight running cost stays Σ ½ r²‖u‖²; the KL loss uses the former."""
    K, sig = 12, 3.0
    al = bnem_alphas("bnem_cosine", K, 1e-4, sig)
    coef = ou_coefficients(al, sig, 1.0)
    W = torch.tensor([[0.3, -1.1], [0.7, 0.2]], dtype=D, requires_grad=True)
    us: list[torch.Tensor] = []

    def control(t: torch.Tensor, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        u = torch.tanh(y @ W) + t[:, None]
        us.append(u.detach())
        return u

    y0 = torch.randn(5, 2, generator=torch.Generator().manual_seed(4), dtype=D)
    path = simulate(control, y0, coef, None, torch.Generator().manual_seed(5), running_cost="norm")
    lam = 1 - torch.sqrt(1 - al)
    direct = sum(2 * sig**2 * lam[k] ** 2 / al[k] * us[k].norm(dim=-1) for k in range(K))
    squared = sum(2 * sig**2 * lam[k] ** 2 / al[k] * (us[k] ** 2).sum(-1) for k in range(K))  # ½ r²‖u‖²
    assert path.cost is not None
    torch.testing.assert_close(path.cost, direct, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(path.running, squared, rtol=1e-9, atol=1e-12)
    assert not path.running.requires_grad and path.cost.requires_grad
    term = torch.zeros(5, dtype=D)
    assert float(kl_loss(path, term).detach()) == pytest.approx(float(direct.mean()))
    kl_loss(path, term).backward()
    assert W.grad is not None and bool(torch.isfinite(W.grad).all()) and float(W.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="log-variance"):
        simulate(control, y0, coef, None, None, detach_path=True, running_cost="norm")


def test_method_loss_and_weights() -> None:
    """The method's loss = mean(cost + log N(y; 0, 1) + E(y)) (BNEM's prior_ll − sample_ll + r_k); its
    importance weights use the chain's true terminal law N(0, ref_var) and the squared cost."""
    m, ct = make("dw4", batch_size=6, n_steps=10)
    assert m.coef.loss_var == 1.0 and m.coef.ref_var > 1.0
    path, term, loss = m.paths_and_loss(6)
    y = path.y.detach()
    e = targets.get("dw4").energy(y)
    expect_term = gaussian_log_prob(y, 1.0, 6, m.center) + e.to(y.dtype)
    torch.testing.assert_close(term.detach(), expect_term, rtol=1e-5, atol=1e-4)
    assert path.cost is not None
    assert float(loss.detach()) == pytest.approx(float((path.cost + term).mean().detach()), rel=1e-6)
    w_term = m.weight_terminal_cost(path.y, term)
    torch.testing.assert_close(w_term, gaussian_log_prob(y, m.coef.ref_var, 6, m.center) + e.to(y.dtype),
                               rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="log-variance"):
        make("gmm40", loss="lv")


def test_networks_as_published() -> None:
    m, _ = make("gmm40")
    last = [mod for mod in m.net.base.modules() if isinstance(mod, torch.nn.Linear)][-1]
    assert float(last.weight.detach().abs().sum()) > 0  # MyMLP: torch's default init, not zero
    assert m.net.time_net.emb.phase is not None  # TimeConder's learnable phase
    d = methods.get("dds")(CountingTarget(targets.get("gmm40")), DDSConfig.for_target("gmm40", **TINY), "cpu",
                           torch.Generator().manual_seed(0))
    assert d.net.time_net.emb.phase is None


# ------------------------------------------------------------------------------------------ training
def test_plateau_schedule() -> None:
    m, _ = make("gmm40", lr_plateau=True, plateau_patience=2)
    for v in (5.0, 4.0, 4.0, 4.0):  # best 4.0; two checks without improvement: not yet
        m.plateau_step(v)
    assert m.learning_rate(0) == pytest.approx(1e-3)
    m.plateau_step(3.9999)  # below best·(1 − 1e-4)? 3.9999 > 3.9996: no improvement, third bad check
    assert m.learning_rate(0) == pytest.approx(1e-4) and m.plateau_bad == 0
    m.plateau_step(1.0)
    assert m.plateau_best == 1.0 and m.learning_rate(0) == pytest.approx(1e-4)


def test_seeded_short_training_is_reproducible_and_resumes() -> None:
    over = dict(batch_size=6, n_steps=8, plateau_check_steps=2, plateau_patience=0)
    a, ca = make("dw4", seed=7, **over)
    b, cb = make("dw4", seed=7, **over)
    la = [a.train_step() for _ in range(3)]
    lb = [b.train_step() for _ in range(3)]
    assert la == lb
    assert "val_loss" in la[1] and "lr" in la[1]
    assert ca.usage.energy_evals == cb.usage.energy_evals == 3 * 6 * 9 + 6 * 9  # 3 steps + one val batch
    state = copy.deepcopy(a.state_dict())
    after = [a.train_step() for _ in range(2)]
    xa = a.sample(4)
    c, _ = make("dw4", seed=99, **over)
    c.load_state_dict(state)
    assert [c.train_step() for _ in range(2)] == after
    torch.testing.assert_close(c.sample(4), xa)
    assert c.lr_scale == a.lr_scale
