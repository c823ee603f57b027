"""iDEM: the MC score estimator against closed forms, clipping, counting, equivariance, resume, configs."""

import io
import math

import pytest
import torch

import methods
import targets
from harness.budget import CountingTarget
from methods.idem import IDEM, Config, clip_score, mc_score_estimate


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one thread avoids oversubscription on the shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class _Gaussian:
    """E(x) = |x − μ|² / (2 s²): the noised marginal is N(μ, (s² + σ²) I) with score −(x − μ)/(s² + σ²)."""

    def __init__(self, mu, s):
        self.mu, self.s = mu, s
        self.calls = 0

    def __call__(self, y):
        self.calls += y.shape[0]
        d = y - self.mu
        return (d**2).sum(-1) / (2 * self.s**2), d / self.s**2


def test_estimator_matches_gaussian_convolved_score_and_error_shrinks_with_k():
    torch.manual_seed(0)
    mu, s = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), 1.0
    B = 400
    sigma = torch.rand(B, dtype=torch.float64) * 0.7 + 0.1
    x = mu + (s**2 + sigma**2).sqrt()[:, None] * torch.randn(B, 3, dtype=torch.float64)  # typical x_t
    exact = -(x - mu) / (s**2 + sigma**2)[:, None]
    errs = {}
    for K in (10, 100, 1000):
        est = mc_score_estimate(_Gaussian(mu, s), x, sigma, K, torch.Generator().manual_seed(K))
        errs[K] = float(((est - exact) ** 2).sum(-1).mean().sqrt())
    # MC error ~ 1/sqrt(K): each tenfold K should cut the RMS error by about sqrt(10) ≈ 3.2
    assert errs[10] / errs[100] > 2.5 and errs[100] / errs[1000] > 2.5, errs
    assert errs[1000] < 0.05 * float(exact.norm(dim=-1).mean()), errs
    # unbiased up to O(1/K): the batch-mean error is far below the per-row error
    est = mc_score_estimate(_Gaussian(mu, s), x, sigma, 1000, torch.Generator().manual_seed(1))
    assert float((est - exact).mean(0).abs().max()) < 3 * errs[1000] / math.sqrt(B)


def test_estimator_chunking_counts_and_seed():
    f = _Gaussian(torch.zeros(2, dtype=torch.float64), 1.0)
    x = torch.randn(37, 2, dtype=torch.float64)
    sig = torch.full((37,), 0.5, dtype=torch.float64)
    a = mc_score_estimate(f, x, sig, 16, torch.Generator().manual_seed(0), chunk_rows=10**6)
    assert f.calls == 37 * 16
    b = mc_score_estimate(f, x, sig, 16, torch.Generator().manual_seed(0), chunk_rows=10**6)
    assert torch.equal(a, b)
    c = mc_score_estimate(f, x, sig, 16, torch.Generator().manual_seed(0), chunk_rows=50)  # 3 rows per call
    assert f.calls == 3 * 37 * 16
    assert c.shape == a.shape and torch.isfinite(c).all()


def test_estimator_ignores_non_finite_perturbations():
    def eg(y):
        e = (y**2).sum(-1) / 2
        e[::2] = torch.inf  # half of all perturbations blow up
        return e, y.clone()

    s = mc_score_estimate(eg, torch.zeros(5, 3), torch.ones(5), 8, torch.Generator().manual_seed(0))
    assert torch.isfinite(s).all()


def test_clip_score_per_particle_and_whole_vector():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(50, 12, generator=g) * torch.tensor([0.1, 100.0]).repeat_interleave(6)
    c = clip_score(s, 20.0, spatial_dim=3)
    norms = c.reshape(50, 4, 3).norm(dim=-1)
    assert norms.max() <= 20.0 + 1e-4
    small = s.reshape(50, 4, 3).norm(dim=-1) < 20.0
    torch.testing.assert_close(c.reshape(50, 4, 3)[small], s.reshape(50, 4, 3)[small])  # untouched below
    # directions preserved
    cos = torch.nn.functional.cosine_similarity(c.reshape(-1, 3), s.reshape(-1, 3), dim=-1)
    assert cos.min() > 1 - 1e-5
    w = clip_score(s, 70.0)
    assert w.norm(dim=-1).max() <= 70.0 + 1e-3
    big = s.norm(dim=-1) > 70
    torch.testing.assert_close(w[big].norm(dim=-1), torch.full((int(big.sum()),), 70.0), rtol=1e-5, atol=1e-3)


def test_estimator_equivariance_on_dw4():
    tgt = targets.get("dw4")
    g = torch.Generator().manual_seed(0)
    x = tgt.center(torch.randn(3, 8, generator=g, dtype=torch.float64) * 2)
    sig = torch.full((3,), 0.8, dtype=torch.float64)
    # translation: the same noise gives exactly the same estimate (E is translation invariant)
    a = mc_score_estimate(tgt.energy_and_grad, x, sig, 64, torch.Generator().manual_seed(1))
    b = mc_score_estimate(tgt.energy_and_grad, x + 3.0, sig, 64, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-8)
    # rotation and permutation: equal in distribution -> compare means over many draws
    th = 0.9
    R = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]], dtype=torch.float64)
    perm = torch.tensor([2, 0, 3, 1])

    def rot(v):
        return (v.reshape(-1, 4, 2) @ R.T).reshape(-1, 8)

    def per(v):
        return v.reshape(-1, 4, 2)[:, perm].reshape(-1, 8)

    reps, K = 40, 2000
    xs = x.repeat(reps, 1)
    ss = sig.repeat(reps)
    base = mc_score_estimate(tgt.energy_and_grad, xs, ss, K, torch.Generator().manual_seed(2))
    rotd = mc_score_estimate(tgt.energy_and_grad, rot(xs), ss, K, torch.Generator().manual_seed(3))
    perd = mc_score_estimate(tgt.energy_and_grad, per(xs), ss, K, torch.Generator().manual_seed(4))
    m0 = base.reshape(reps, 3, 8)
    se = m0.std(0) / math.sqrt(reps) * math.sqrt(2) + 1e-3
    assert ((rotd.reshape(reps, 3, 8).mean(0) - rot(m0.mean(0))).abs() / se).max() < 5
    assert ((perd.reshape(reps, 3, 8).mean(0) - per(m0.mean(0))).abs() / se).max() < 5


def _make(name, seed=0, **over):
    cfg = Config.for_target(name, **{**Config.preset("smoke", name), **over})
    ct = CountingTarget(targets.get(name))
    return IDEM(ct, cfg, "cpu", torch.Generator().manual_seed(seed)), ct


def test_one_step_costs_b_times_k_energy_and_gradient_evaluations():
    m, ct = _make("dw4", batch_size=12, num_mc_samples=7, num_init_samples=20)
    m.train_step()  # buffer init from the prior (energies only) + one step
    assert ct.usage.grad_evals == 12 * 7
    assert ct.usage.energy_evals == 20 + 12 * 7
    m.train_step()
    assert ct.usage.grad_evals == 2 * 12 * 7
    assert ct.usage.network_evals == 2 * 12
    # GMM: the initial buffer comes from the estimator-driven SDE: N_init · K · steps evaluations
    g, cg = _make("gmm40", batch_size=10, num_mc_samples=5, num_init_samples=8, init_sde_steps=6)
    g.train_step()
    assert cg.usage.grad_evals == 8 * 5 * 6 + 10 * 5
    assert cg.usage.energy_evals == 8 * 5 * 6 + 8 + 10 * 5


def test_buffer_refresh_every_epoch():
    m, ct = _make("dw4", steps_per_epoch=3, num_samples_per_epoch=5, num_init_samples=4, sde_steps=4)
    for _ in range(3):
        logs = m.train_step()
    assert len(m.buffer) == 4 + 5 and logs["buffer_size"] == 9
    assert m.buffer.x.reshape(-1, 4, 2).mean(1).abs().max() < 1e-5  # centred


def test_pdem_switch_uses_no_buffer():
    m, _ = _make("dw4", use_buffer=False, steps_per_epoch=2)
    for _ in range(4):
        m.train_step()
    assert len(m.buffer) == 0


def _params(m):
    return torch.cat([p.detach().flatten() for p in m.net.parameters()])


@pytest.mark.parametrize("name", ["gmm40", "dw4"])
def test_resume_gives_same_parameters_as_uninterrupted_run(name):
    over = dict(steps_per_epoch=3, num_samples_per_epoch=8, num_init_samples=16, sde_steps=5,
                init_sde_steps=5)
    a, _ = _make(name, seed=7, **over)
    for _ in range(8):
        a.train_step()
    b, _ = _make(name, seed=7, **over)
    for _ in range(4):
        b.train_step()
    buf = io.BytesIO()
    torch.save(b.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    c, _ = _make(name, seed=999, **over)  # a different seed: everything must come from the checkpoint
    c.load_state_dict(state)
    for _ in range(4):
        c.train_step()
    assert torch.equal(_params(a), _params(c))
    assert torch.equal(a.buffer.x, c.buffer.x)


def test_same_seed_same_run_and_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, _ = _make("dw4", seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    b, _ = _make("dw4", seed=3)
    for _ in range(3):
        a.train_step()
        b.train_step()
    assert torch.equal(_params(a), _params(b))
    assert torch.equal(a.sample(10), b.sample(10))


def test_gmm_works_in_normalised_coordinates_and_returns_target_coordinates():
    m, _ = _make("gmm40")
    y = torch.randn(6, 2)
    e, g = m._energy_and_grad(y)
    e_ref, g_ref = targets.get("gmm40").energy_and_grad(50 * y)
    torch.testing.assert_close(e, e_ref)
    torch.testing.assert_close(g, 50 * g_ref)
    with torch.no_grad():  # a zero score: the reverse SDE only adds Gaussian noise to the prior sample
        m.net.net[-1].weight.zero_()
        m.net.net[-1].bias.zero_()
    x = m.sample(2000)
    assert x.shape == (2000, 2)
    n = m.config.sde_steps
    t_k = torch.linspace(1, 0, n + 1, dtype=torch.float64)[:-1]
    var = float(m.schedule.h(1.0)) + float((m.schedule.g(t_k) ** 2).sum()) / n  # prior + Σ g(t_k)² dt
    expected = 50 * math.sqrt(var)  # returned in target units (× length_scale)
    assert abs(float(x.std()) / expected - 1) < 0.06


def test_samples_centred_and_negative_time_moves_downhill():
    m, ct = _make("lj13", negative_time_steps=3)
    x = m.sample(6)
    assert x.shape == (6, 39) and x.reshape(6, 13, 3).mean(1).abs().max() < 1e-5
    y = m.prior.sample(4, torch.Generator().manual_seed(0)) * 0.5
    n0 = ct.usage.grad_evals
    z = m._negative_time(y)
    assert ct.usage.grad_evals - n0 == 3 * 4
    step = (z - y).reshape(4, -1).norm(dim=-1)
    assert step.max() <= 3 * 1e-4 * 20 + 1e-6  # at most dt·clip per step
    e = targets.get("lj13").energy
    assert (e(z) <= e(y) + 1e-3).all()


def test_published_per_target_settings_and_validation():
    want = {"gmm40": (500, 512), "dw4": (1000, 512), "lj13": (1000, 512), "lj55": (100, 128)}
    for name, (K, B) in want.items():
        c = Config.for_target(name)
        assert (c.num_mc_samples, c.batch_size, c.grad_clip) == (K, B, 0.5)
    assert Config.for_target("gmm40").lr == 5e-4 and Config.for_target("lj55").diffusion_scale == 0.5
    assert methods.get("idem") is IDEM and IDEM.display_name == "iDEM"
    with pytest.raises(ValueError, match="valid keys"):
        Config.for_target("dw4", nonsense=1)
    with pytest.raises(ValueError, match="sigma_min"):
        Config.for_target("dw4", sigma_min=5.0)
    with pytest.raises(ValueError, match="egnn"):
        IDEM(CountingTarget(targets.get("gmm40")), Config.for_target("gmm40", net="egnn"), "cpu",
             torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["gmm40", "dw4", "lj13", "lj55"])
def test_smoke_preset_runs_end_to_end(name):
    m, ct = _make(name, hidden=16)
    for _ in range(Config.suggested_budget("smoke", name)["steps"]):
        logs = m.train_step()
    assert math.isfinite(logs["loss"]) and m.parameters_finite()
    x = m.sample(8)
    assert x.shape == (8, ct.dim) and torch.isfinite(x).all()


def test_ema_network_is_the_moving_average_and_drives_sampling():
    over = dict(steps_per_epoch=2, num_samples_per_epoch=6, num_init_samples=8, sde_steps=4, init_sde_steps=4)
    beta = 0.6
    m, _ = _make("gmm40", seed=2, ema_decay=beta, **over)
    ema = [p.detach().clone() for p in m.net.parameters()]
    for _ in range(3):
        m.train_step()
        ema = [beta * e + (1 - beta) * p.detach() for e, p in zip(ema, m.net.parameters())]
    for e, p in zip(ema, m.ema_net.parameters()):
        torch.testing.assert_close(p, e, rtol=1e-6, atol=1e-7)
    # decay 0: the EMA equals the network, so the whole run (buffer refreshes included) and its samples
    # are identical to a run without EMA
    a, _ = _make("gmm40", seed=2, ema_decay=0.0, **over)
    b, _ = _make("gmm40", seed=2, **over)
    for _ in range(5):
        a.train_step()
        b.train_step()
    assert torch.equal(a.buffer.x, b.buffer.x)
    assert torch.equal(a.sample(9), b.sample(9))
    # resume restores the EMA network too
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    c, _ = _make("gmm40", seed=77, ema_decay=beta, **over)
    c.load_state_dict(torch.load(buf, weights_only=True))
    for p, q in zip(m.ema_net.parameters(), c.ema_net.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="ema_decay"):
        Config.for_target("gmm40", ema_decay=1.5)


def test_lr_plateau_cuts_the_rate_after_patience_checks_on_the_val_loss(monkeypatch):
    """DEM's ReduceLROnPlateau: the DEM loss on val-split rows, checked every ``plateau_check_steps``."""
    m, ct = _make("dw4", lr=1e-3, lr_plateau=True, plateau_factor=0.5, plateau_patience=1,
                  plateau_check_steps=2, plateau_val_size=8, steps_per_epoch=100)
    splits = []
    real = ct.target.reference

    def spy(split="test", n=None, source=None):
        splits.append(split)
        return real(split, n, source)

    monkeypatch.setattr(ct.target, "reference", spy)
    losses = iter([3.0, 2.0, 2.5, 2.5, 2.5, 2.5])
    real_val = m.val_loss
    monkeypatch.setattr(m, "val_loss", lambda: (real_val(), next(losses))[1])
    lrs = []
    for _ in range(12):
        logs = m.train_step()
        if "lr" in logs:
            lrs.append(logs["lr"])
    # improvements at checks 1-2; 2.5 is worse: after 1 more bad check (patience 1) the rate halves, again
    assert lrs == [1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4]
    assert splits and set(splits) == {"val"}  # never the test split
    # the scheduler's state is part of the checkpoint
    s = m.state_dict()
    m2, _ = _make("dw4", seed=5, lr_plateau=True, plateau_factor=0.5, plateau_patience=1,
                  plateau_check_steps=2, plateau_val_size=8)
    m2.load_state_dict(s)
    assert m2.plateau.state_dict() == m.plateau.state_dict()


def test_lr_plateau_off_leaves_a_seeded_run_unchanged_and_val_loss_counts_evaluations():
    a, _ = _make("dw4", seed=3)
    b, ct = _make("dw4", seed=3, lr_plateau=True, plateau_check_steps=10**6)
    for _ in range(3):
        a.train_step()
        b.train_step()
    assert torch.equal(_params(a), _params(b))
    before = ct.usage.grad_evals
    v = b.val_loss()
    assert math.isfinite(v) and ct.usage.grad_evals - before == b.config.plateau_val_size * 8  # B·K (K=8)
    with pytest.raises(ValueError, match="plateau_factor"):
        Config.for_target("dw4", plateau_factor=1.5)
    assert Config.preset("paper", "dw4")["lr_plateau"]
    assert Config.preset("paper", "lj55")["plateau_check_steps"] == 500
