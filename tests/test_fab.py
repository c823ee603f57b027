"""Method ``fab``: registry and configs, end-to-end smoke cells, counted cost, exact resume, diagnostics."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import Tensor

import methods
import targets
from harness.budget import CountingTarget
from methods.fab import FAB, FABConfig
from targets.base import Target


class StdGaussian(Target):
    """E(x) = |x|²/(2σ²) + c in 2-D; log Z = log(2πσ²) − c."""

    name = "stdgauss"
    display_name = "StdGauss"

    def __init__(self, sigma: float, c: float) -> None:
        self.dim, self.sigma, self.c = 2, sigma, c

    def _energy(self, x: Tensor) -> Tensor:
        return (x**2).sum(-1) / (2 * self.sigma**2) + self.c


# cheaper still for the bookkeeping tests (CNF and EACF sizes; each flow reads its own fields)
_LIGHT = {"dw4": {"hidden": 8, "n_layers": 1, "n_inner": 3, "eacf_hidden": 8, "eacf_features": 8,
                  "eacf_egnn_layers": 1, "spline_bins": 3, "marginal_k": 2, "diag_marginal_samples": 8}}


def _make(target_name: str, seed: int = 0, grid: str = "smoke", variant: str | None = None,
          **over: object) -> tuple[FAB, CountingTarget]:
    ct = CountingTarget(targets.get(target_name))
    var = FABConfig.variant(variant, target_name) if variant else {}
    cfg = FABConfig.for_target(target_name, **{**var, **FABConfig.preset(grid, target_name), **over})
    return FAB(ct, cfg, torch.device("cpu"), torch.Generator().manual_seed(seed)), ct


def test_registered_and_configs_valid() -> None:
    assert "fab" in methods.names() and methods.get("fab") is FAB
    for t in ("gmm40", "dw4", "lj13", "lj55"):
        for grid in ("smoke", "cpu", "paper"):
            FABConfig.for_target(t, **FABConfig.preset(grid, t))
    gmm = FABConfig.for_target("gmm40")
    # the published fab-torch GMM settings
    assert (gmm.n_layers, gmm.hidden, gmm.batch_size, gmm.lr, gmm.grad_clip, gmm.dtype) == (
        15,
        80,
        128,
        1e-4,
        100.0,
        "float64",
    )
    assert (gmm.n_intermediate, gmm.transition, gmm.n_inner, gmm.step_size, gmm.adapt_step_size) == (
        1,
        "metropolis",
        1,
        5.0,
        False,
    )
    assert (gmm.buffer_max, gmm.buffer_min, gmm.n_updates_per_ais, gmm.alpha) == (12_800, 1_280, 4, 2.0)
    dw4 = FABConfig.for_target("dw4")
    assert (dw4.n_intermediate, dw4.transition, dw4.n_inner, dw4.flow) == (2, "hmc", 5, "eacf")
    # the published EACF FAB settings (dw4_fab.yaml, fab/default.yaml, flow/default.yaml, the lr schedule)
    assert (dw4.eacf_blocks, dw4.eacf_egnn_layers, dw4.eacf_hidden, dw4.eacf_features, dw4.spline_bins) == (
        12, 3, 64, 128, 8)
    assert (dw4.batch_size, dw4.buffer_max, dw4.buffer_min, dw4.n_updates_per_ais) == (128, 65_536, 8_192, 8)
    assert (dw4.lr_init, dw4.lr, dw4.lr_end, dw4.lr_warmup_steps, dw4.lr_total_steps) == (
        2e-5, 2e-4, 2e-5, 240, 160_000)
    assert (dw4.grad_clip_mode, dw4.dyn_clip_factor, dw4.dyn_skip_factor, dw4.dyn_window) == (
        "dynamic", 2.0, 10.0, 100)
    assert (dw4.aux_loss_weight, dw4.aug_scale, dw4.marginal_k, dw4.base_scale) == (0.0, 0.1, 20, 1.0)
    lj13 = FABConfig.for_target("lj13")
    assert (lj13.n_intermediate, lj13.batch_size, lj13.aux_loss_weight, lj13.lr_total_steps) == (
        8, 1024, 1.0, 112_000)
    for t in ("dw4", "lj13", "lj55"):
        assert FABConfig.for_target(t, **FABConfig.variant("cnf", t)).flow == "cnf"
        assert FABConfig.variant("published", t) == {"step_adapt_factor": 1.02}
    assert methods.get("fab@cnf") is FAB and "fab@published" in methods.variants()


def test_bad_configs_are_rejected() -> None:
    with pytest.raises(ValueError, match="valid keys"):
        FABConfig.for_target("gmm40", n_steps=3)
    with pytest.raises(ValueError, match="n_intermediate"):
        FABConfig(n_intermediate=0)
    with pytest.raises(ValueError, match="buffer_min"):
        FABConfig(buffer_min=64, batch_size=128)
    with pytest.raises(ValueError, match="eacf"):
        _make("dw4", flow="realnvp")
    with pytest.raises(ValueError, match="realnvp"):  # flow="cnf" on GMM-40 is fab@bnem's MLP CNF
        _make("gmm40", flow="eacf")
    with pytest.raises(ValueError, match="step_adapt_factor"):
        FABConfig.for_target("dw4", step_adapt_factor=1.0)


@pytest.mark.parametrize(
    "target_name,variant",
    [("gmm40", None), ("dw4", None), ("lj13", None), ("lj55", None), ("dw4", "cnf"), ("lj13", "cnf")],
)
def test_smoke_cell_end_to_end(target_name: str, variant: str | None) -> None:
    m, ct = _make(target_name, variant=variant)
    for _ in range(2):
        logs = m.train_step()
        assert math.isfinite(logs["loss"])
    x = m.sample(8)
    assert x.shape == (8, ct.dim) and bool(torch.isfinite(x).all())
    if ct.n_particles is not None:
        assert torch.allclose(ct.as_particles(x).mean(1), torch.zeros(8, ct.spatial_dim), atol=1e-5)
    d = m.diagnostics()
    assert {"log_z", "ess"} <= set(d) and 0.0 <= d["ess"] <= 1.0
    assert m.parameters_finite()


@pytest.mark.parametrize("target_name,variant", [("gmm40", None), ("dw4", None), ("dw4", "cnf")])
def test_energy_evaluations_counted_per_ais_chain(target_name: str, variant: str | None) -> None:
    m, ct = _make(target_name, variant=variant, **_LIGHT.get(target_name, {}))
    c = m.config
    for _ in range(5):
        m.train_step()
    per_chain = 1 + c.n_intermediate * c.n_inner
    assert m.n_ais_batches == math.ceil(c.buffer_min / c.batch_size) + math.ceil(5 / c.n_updates_per_ais)
    assert ct.usage.energy_evals == m.n_ais_batches * c.batch_size * per_chain
    assert ct.usage.grad_evals == (ct.usage.energy_evals if c.transition == "hmc" else 0)
    before = ct.usage.energy_evals
    m.sample(10)
    assert ct.usage.energy_evals == before  # plain flow samples need no energy
    m.diagnostics()
    assert ct.usage.energy_evals == before + c.diag_samples


def test_resample_mode_draws_from_flow_samples_and_counts() -> None:
    m, ct = _make("gmm40", sample_mode="resample")
    before = ct.usage.energy_evals
    x = m.sample(50)
    assert ct.usage.energy_evals == before + 50
    assert x.shape == (50, 2)


def _params(m: FAB) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in m.flow.parameters()])


@pytest.mark.parametrize("target_name,variant", [("gmm40", None), ("dw4", None), ("dw4", "cnf")])
def test_resume_is_exact(target_name: str, variant: str | None) -> None:
    m, _ = _make(target_name, seed=3, variant=variant, **_LIGHT.get(target_name, {}))
    for _ in range(3):
        m.train_step()
    buf = io.BytesIO()
    torch.save({"method": m.state_dict(), "rng": m.generator.get_state()}, buf)
    for _ in range(3):
        m.train_step()
    expected = _params(m)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m2, _ = _make(target_name, seed=99, variant=variant, **_LIGHT.get(target_name, {}))
    m2.load_state_dict(ck["method"])
    m2.generator.set_state(ck["rng"])
    for _ in range(3):
        m2.train_step()
    assert torch.equal(_params(m2), expected)
    assert torch.equal(m2.ais.transition.step_sizes, m.ais.transition.step_sizes)


def test_same_seed_same_samples_different_seed_different() -> None:
    a, _ = _make("gmm40", seed=1)
    b, _ = _make("gmm40", seed=1)
    c, _ = _make("gmm40", seed=2)
    for m in (a, b, c):
        m.train_step()
    xa, xb, xc = a.sample(20), b.sample(20), c.sample(20)
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)


def test_diagnostics_exact_when_flow_equals_target() -> None:
    # a zero-initialised RealNVP is N(0, base_scale² I) exactly: with p ∝ N(0, σ²) and σ = base_scale the
    # importance weights are constant, ESS = 1 and the log Z estimate is exact
    sigma, c = 2.5, 0.7
    ct = CountingTarget(StdGaussian(sigma, c))
    cfg = FABConfig(n_layers=2, hidden=8, base_scale=sigma, diag_samples=64)
    m = FAB(ct, cfg, torch.device("cpu"), torch.Generator().manual_seed(0))
    d = m.diagnostics()
    assert d["ess"] == pytest.approx(1.0, abs=1e-12)
    assert d["log_z"] == pytest.approx(math.log(2 * math.pi * sigma**2) - c, abs=1e-10)


def test_training_reduces_alpha_divergence_on_a_gaussian() -> None:
    # p = N(0, 2.5² I)·e^{−c}, flow starts at N(0, 1): ESS of p/q must improve with FAB training
    ct = CountingTarget(StdGaussian(2.5, 0.0))
    cfg = FABConfig(
        n_layers=2,
        hidden=8,
        base_scale=1.0,
        lr=3e-3,
        batch_size=64,
        buffer_min=256,
        buffer_max=1024,
        step_size=1.0,
        diag_samples=2000,
    )
    m = FAB(ct, cfg, torch.device("cpu"), torch.Generator().manual_seed(0))
    ess0 = m.diagnostics()["ess"]
    for _ in range(300):
        m.train_step()
    d = m.diagnostics()
    assert ess0 < 0.5 < d["ess"]
    assert d["log_z"] == pytest.approx(math.log(2 * math.pi * 2.5**2), abs=0.1)


def test_stale_buffer_point_with_overflowing_log_q_is_dropped_not_fatal() -> None:
    # a buffer point where log q_θ overflows to −inf must not turn the whole gradient into NaN
    m, _ = _make("gmm40")
    m.train_step()
    buf = m.buffer
    assert buf is not None
    i = 0
    buf.x[i] = torch.tensor([1e308, -1e308], dtype=buf.x.dtype)
    buf.log_w[i] = 1e3  # certain to be drawn
    buf.log_q_old[i] = 0.0
    before = _params(m)
    m.train_step()
    assert m.n_skipped == 0
    assert not torch.equal(_params(m), before) and m.parameters_finite()
    assert math.isinf(float(buf.log_w[i])) and float(buf.log_w[i]) < 0


def _first_param(m: FAB) -> torch.nn.Parameter:
    return next(m.flow.parameters())


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e4])
def test_optimiser_step_equals_plain_norm_clipping(scale: float) -> None:
    # the overflow-safe clipping is exactly torch's clip_grad_norm_ on the unscaled loss
    a, _ = _make("gmm40", seed=4)
    b, _ = _make("gmm40", seed=4)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10
    assert a._optimise(-scale * a.flow.log_prob(x).mean())[1]
    b.optimizer.zero_grad()
    (-scale * b.flow.log_prob(x).mean()).backward()
    torch.nn.utils.clip_grad_norm_(b.flow.parameters(), b.config.grad_clip)
    b.optimizer.step()
    assert torch.allclose(_params(a), _params(b), rtol=1e-10, atol=1e-14)


def test_optimiser_survives_a_gradient_that_overflows() -> None:
    # loss ≈ 1e300 whose raw gradient (1e310) overflows: the clipped step is still taken
    m, _ = _make("gmm40")
    p = _first_param(m)
    before = _params(m)
    loss = 1e300 * torch.exp(1e10 * (p - p.detach()).sum())
    lv, ok = m._optimise(loss)
    assert ok and math.isfinite(lv)
    assert m.parameters_finite() and not torch.equal(_params(m), before)
