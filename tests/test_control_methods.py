"""Method-level contract tests shared by PIS and DDS (smoke settings; what the harness relies on)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import targets
from harness.budget import CountingTarget
from methods import METHODS
from methods.control import ControlledDiffusionSampler

SMOKE = {"n_steps": 6, "batch_size": 8, "hidden": 16, "n_layers": 1, "emb_size": 8, "time_channels": 8,
         "time_layers": 1, "n_diag_samples": 16}


def make(method: str, target: str, seed: int = 0, **over):
    M = METHODS.get(method)
    ct = CountingTarget(targets.get(target))
    cfg = M.Config.for_target(target, **{**SMOKE, **over})
    return M(ct, cfg, "cpu", torch.Generator().manual_seed(seed)), ct


@pytest.mark.parametrize("method", ["pis", "dds"])
@pytest.mark.parametrize("target", ["gmm40", "dw4", "lj13"])
def test_train_sample_and_count(method: str, target: str) -> None:
    m, ct = make(method, target)
    assert isinstance(m, ControlledDiffusionSampler)
    out = m.train_step()
    assert torch.isfinite(torch.tensor(out["loss"]))
    K, B = m.config.n_steps, m.config.batch_size
    # one score per step (PIS skips step 0 where every path is at the origin) + one terminal energy-and-grad
    per_path = K if method == "pis" else K + 1
    assert ct.usage.energy_evals == ct.usage.grad_evals == B * per_path
    before = ct.usage.energy_evals
    x = m.sample(5)
    assert x.shape == (5, ct.dim) and bool(torch.isfinite(x).all())
    assert ct.usage.energy_evals - before == 5 * per_path  # sampling is counted too (terminal: energy only)
    assert ct.usage.grad_evals - before == 5 * (per_path - 1)
    if ct.n_particles is not None:
        com = ct.as_particles(x).mean(1)
        torch.testing.assert_close(com, torch.zeros(5, ct.spatial_dim), atol=1e-5, rtol=0)
    d = m.diagnostics()
    assert set(d) >= {"log_z", "ess"} and 0.0 < d["ess"] <= 1.0


@pytest.mark.parametrize("method", ["pis", "dds"])
def test_exact_resume_and_seed_reproducibility(method: str) -> None:
    m, _ = make(method, "gmm40", seed=3)
    m.train_step()
    m.train_step()
    state = copy.deepcopy(m.state_dict())
    after = [m.train_step()["loss"] for _ in range(2)]
    x = m.sample(4)
    m2, _ = make(method, "gmm40", seed=99)
    m2.load_state_dict(state)
    assert [m2.train_step()["loss"] for _ in range(2)] == after
    torch.testing.assert_close(m2.sample(4), x, rtol=0, atol=0)
    m3, _ = make(method, "gmm40", seed=3)
    torch.manual_seed(12345)  # the global RNG must not matter (network init comes from the run's generator)
    m4, _ = make(method, "gmm40", seed=3)
    assert [m3.train_step()["loss"] for _ in range(2)] == [m4.train_step()["loss"] for _ in range(2)]
    torch.testing.assert_close(m3.sample(6), m4.sample(6), rtol=0, atol=0)
    assert not torch.equal(m3.sample(6), make(method, "gmm40", seed=4)[0].sample(6))


@pytest.mark.parametrize("method", ["pis", "dds"])
def test_log_variance_loss_trains(method: str) -> None:
    m, _ = make(method, "dw4", loss="lv")
    p0 = [p.detach().clone() for p in m.net.parameters()]
    out = m.train_step()
    assert out["loss"] >= 0 and torch.isfinite(torch.tensor(out["loss"]))
    assert any(not torch.equal(a, b.detach()) for a, b in zip(p0, m.net.parameters()))


@pytest.mark.parametrize("method", ["pis", "dds"])
def test_gradients_flow_through_the_sde(method: str) -> None:
    """Autograd gradient of the KL loss equals a central finite difference along a random parameter direction
    (float64, common random numbers): the loss is differentiated through every SDE step and the terminal cost.
    The Langevin input ∇log p̃(y_k) is a stop-gradient in y (as in the published code), so the check switches
    it off (score_clip = 0) to compare against the exact derivative."""
    m, _ = make(method, "gmm40", dtype="float64", n_steps=20, batch_size=4, score_clip=0.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # un-zero NN₁'s read-out so that every parameter matters
        for p in m.net.base.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    params = list(m.net.parameters())
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]

    def loss(seed: int) -> torch.Tensor:
        m.generator.manual_seed(seed)
        path = m.run_paths(4, detach_path=False)
        return (path.running + m.terminal_cost(path.y, differentiable=True)).mean()

    m.net.zero_grad()
    loss(7).backward()
    ad = sum(float((p.grad * d).sum()) for p, d in zip(params, direction))
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in params)
    h = 1e-6
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(h * d)
        lp = float(loss(7))
        for p, d in zip(params, direction):
            p.sub_(2 * h * d)
        lm = float(loss(7))
    fd = (lp - lm) / (2 * h)
    assert ad == pytest.approx(fd, rel=1e-4, abs=1e-6)
    assert abs(ad) > 1e-3


class _NaNEnergy(targets.get("gmm40").__class__):
    def _energy_and_grad(self, x):
        e, g = super()._energy_and_grad(x)
        return e * float("nan"), g


@pytest.mark.parametrize("method", ["pis", "dds"])
def test_non_finite_loss_is_reported_not_hidden(method: str) -> None:
    M = METHODS.get(method)
    ct = CountingTarget(_NaNEnergy())
    m = M(ct, M.Config.for_target("gmm40", **SMOKE), "cpu", torch.Generator().manual_seed(0))
    out = m.train_step()
    assert out["loss"] != out["loss"]  # NaN surfaces in the dict the harness checks
    assert m.parameters_finite()  # no optimiser step on a non-finite loss


@pytest.mark.parametrize("method", ["pis", "dds"])
def test_non_finite_gradient_is_reported_and_not_applied(method: str) -> None:
    """Finite loss, overflowing parameter gradient (as LJ forces at overlapping particles give): the gradient
    norm is reported non-finite (the harness marks the run diverged) and no optimiser step is taken."""
    M = METHODS.get(method)
    m = M(CountingTarget(targets.get("gmm40")), M.Config.for_target("gmm40", **SMOKE), "cpu",
          torch.Generator().manual_seed(0))
    assert m.config.grad_norm_clip is not None
    first = next(m.net.parameters())
    first.register_hook(lambda g: torch.full_like(g, float("inf")))
    before = [p.detach().clone() for p in m.net.parameters()]
    out = m.train_step()
    assert math.isfinite(out["loss"]) and not math.isfinite(out["grad_norm"])
    assert m.parameters_finite()
    assert all(torch.equal(a, b) for a, b in zip(before, m.net.parameters()))


@pytest.mark.parametrize("method", ["pis", "dds"])
def test_config_validation(method: str) -> None:
    M = METHODS.get(method)
    with pytest.raises(ValueError, match="loss"):
        M.Config.for_target("gmm40", loss="elbo")
    with pytest.raises(ValueError, match="unknown"):
        M.Config.for_target("gmm40", n_step=3)
    with pytest.raises(ValueError, match="particle"):
        make(method, "gmm40", network="egnn")
    with pytest.raises(ValueError, match="batch_size"):
        make(method, "gmm40", batch_size=0)
    for t in ("gmm40", "dw4", "lj13", "lj55"):
        cfg = M.Config.for_target(t, **M.Config.preset("smoke", t))
        assert cfg.network == ("mlp" if t == "gmm40" else "egnn")
    assert M.Config.suggested_budget("paper", "gmm40")["steps"] == 100_000


@pytest.mark.parametrize("method", ["pis", "dds"])
def test_learning_rate_decays_geometrically_to_the_final_factor(method: str) -> None:
    m, _ = make(method, "gmm40", lr=1e-3, lr_final_factor=0.04, lr_decay_steps=4)
    assert m.learning_rate(0) == pytest.approx(1e-3)
    assert m.learning_rate(2) == pytest.approx(1e-3 * 0.2)  # sqrt(0.04): halfway in log-space
    assert m.learning_rate(4) == pytest.approx(4e-5) and m.learning_rate(100) == pytest.approx(4e-5)
    for k in range(3):
        m.train_step()
        assert m.opt.param_groups[0]["lr"] == pytest.approx(m.learning_rate(k))
    const, _ = make(method, "gmm40", lr=1e-3)
    assert const.learning_rate(10**6) == 1e-3
    with pytest.raises(ValueError, match="lr_final_factor"):
        make(method, "gmm40", lr_final_factor=0.0)
    with pytest.raises(ValueError, match="ema_decay"):
        make(method, "gmm40", ema_decay=1.0)


@pytest.mark.parametrize("method", ["pis", "dds"])
def test_ema_network_is_the_moving_average_and_drives_sampling(method: str) -> None:
    beta = 0.75
    m, _ = make(method, "gmm40", seed=5, ema_decay=beta)
    ema = [p.detach().clone() for p in m.net.parameters()]
    for _ in range(3):
        m.train_step()
        ema = [beta * e + (1 - beta) * p.detach() for e, p in zip(ema, m.net.parameters())]
    for e, p in zip(ema, m.ema_net.parameters()):
        torch.testing.assert_close(p, e, rtol=1e-6, atol=1e-7)
    # decay 0: the EMA is the network itself, so runs with and without it sample identically
    a, _ = make(method, "gmm40", seed=5, ema_decay=0.0)
    b, _ = make(method, "gmm40", seed=5)
    for _ in range(3):
        a.train_step()
        b.train_step()
    torch.testing.assert_close(a.sample(7), b.sample(7), rtol=0, atol=0)
    # the EMA network is part of the checkpoint: resume gives the same samples
    state = copy.deepcopy(m.state_dict())
    x = m.sample(5)
    m2, _ = make(method, "gmm40", seed=99, ema_decay=beta)
    m2.load_state_dict(state)
    torch.testing.assert_close(m2.sample(5), x, rtol=0, atol=0)
