"""NEM / BNEM: estimators against closed forms, bootstrap schedule against the published counts, energy
networks (score = −∇E, invariance), counting, and exact resume."""

from __future__ import annotations

import math

import pytest
import torch

import methods
import targets
from harness.budget import CountingTarget
from methods.energy_net import EGNNEnergy, MLPEnergy, clip_per_sample, energy_and_score
from methods.nem import (
    BNEM,
    NEM,
    BNEMConfig,
    LJSmoothing,
    NEMConfig,
    bootstrap_noised_energy,
    bootstrap_s,
    bootstrap_time_splits,
    noised_energy_mc,
    particle_energy_columns,
)
from targets.base import Target

torch.set_num_threads(1)


class Gaussian(Target):
    """E(x) = |x|² / (2 v): p = N(0, v I) up to normalisation."""

    name = "gauss"
    display_name = "Gauss"

    def __init__(self, dim: int = 3, var: float = 1.5) -> None:
        self.dim, self.var = dim, var

    def _energy(self, x):
        return (x**2).sum(-1) / (2 * self.var)


def noised_energy_exact(x, var, sigma):
    """−log ∫ exp(−|y|²/2v) N(x − y; 0, σ²) dy = |x|²/(2(v + σ²)) + (d/2) log((v + σ²)/v)."""
    vt = torch.as_tensor(var + sigma**2, dtype=x.dtype)
    return (x**2).sum(-1) / (2 * vt) + 0.5 * x.shape[-1] * torch.log(vt / var)


def mc_standard_error(log_terms):
    """Delta-method standard error of −log mean exp(log_terms) over dim 1."""
    w = torch.exp(log_terms - log_terms.max(1, keepdim=True).values)
    K = log_terms.shape[1]
    return w.std(1) / (w.mean(1) * math.sqrt(K))


# ------------------------------------------------------------------ estimators on a Gaussian target
def test_nem_estimator_matches_noised_energy_and_counts():
    tgt = CountingTarget(Gaussian(3, 1.5))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64) * 2
    sigma = torch.linspace(0.1, 2.0, 8, dtype=torch.float64)
    K = 20_000
    est, log_terms = noised_energy_mc(tgt.energy, x, sigma, K, g)
    exact = noised_energy_exact(x, 1.5, sigma)
    se = mc_standard_error(log_terms)
    assert ((est - exact).abs() < 5 * se + 1e-6).all(), (est - exact, se)
    assert tgt.usage.energy_evals == 8 * K and tgt.usage.grad_evals == 0


def test_nem_estimator_is_biased_upwards_for_small_k():
    """Jensen: E[E_K] ≥ E_t; with K = 2 the mean over many repeats is visibly above the exact value."""
    tgt = Gaussian(2, 1.0)
    g = torch.Generator().manual_seed(1)
    x = torch.full((4000, 2), 1.0, dtype=torch.float64)
    est, _ = noised_energy_mc(tgt.energy, x, 1.5, 2, g)
    exact = noised_energy_exact(x[:1], 1.0, 1.5)
    assert float(est.mean()) > float(exact) + 5 * float(est.std()) / math.sqrt(4000)


def test_bootstrap_with_exact_teacher_reproduces_noised_energy():
    var, st, ss = 1.5, 1.2, 0.7
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64) * 2
    M = 20_000

    def teacher(s, y):  # the exact noised energy at level s (s carries σ_s here)
        assert torch.allclose(s, torch.full_like(s, 0.3))
        return noised_energy_exact(y, var, ss)

    est = bootstrap_noised_energy(teacher, x, st, ss, 0.3, M, g)
    exact = noised_energy_exact(x, var, st)
    # standard error from the teacher terms themselves
    eps = torch.randn(6, M, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    terms = -noised_energy_exact(x[:, None] + math.sqrt(st**2 - ss**2) * eps, var, ss)
    se = mc_standard_error(terms)
    assert ((est - exact).abs() < 5 * se + 1e-6).all(), (est - exact, se)


def test_bootstrap_mixture_with_exact_terms_is_consistent():
    """80 teacher terms + 20 resampled exact terms (the published mixture) still estimate E_t."""
    var, st, ss = 1.0, 1.0, 0.5
    tgt = Gaussian(2, var)
    g = torch.Generator().manual_seed(4)
    x = torch.zeros(3000, 2, dtype=torch.float64)
    _, log_terms = noised_energy_mc(tgt.energy, x, st, 100, g)
    est = bootstrap_noised_energy(
        lambda s, y: noised_energy_exact(y, var, ss), x, st, ss, 0.1, 80, g, exact_log_terms=log_terms, K=100
    )
    exact = float(noised_energy_exact(x[:1], var, st))
    # K = 100 log-mean-exp is biased upwards by ≈ Var(w)/(2K mean(w)²) ≈ 0.01 here; allow that
    assert abs(float(est.mean()) - exact) < 0.03
    with pytest.raises(ValueError, match="K > M"):
        bootstrap_noised_energy(
            lambda s, y: y.sum(-1), x, st, ss, 0.1, 80, g, exact_log_terms=log_terms, K=80
        )


def test_bootstrap_rejects_s_above_t():
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="sigma_s <= sigma_t"):
        bootstrap_noised_energy(lambda s, y: y.sum(-1), x, 0.5, 0.6, 0.1, 4)


# ------------------------------------------------------------------ bootstrap schedule
@pytest.mark.parametrize(
    "smin,smax,var,count,first",
    [
        (1e-3, 1.0, 0.1, 11, 0.834),
        (1e-4, 3.0, 0.1, 69, 0.782),
        (1e-4, 6.0, 0.1, 130, 0.733),
        (0.5, 4.0, 0.6, 27, 0.295),
        (1e-3, 6.0, 0.1, 151, None),
    ],
)
def test_bootstrap_splits_match_published_counts(smin, smax, var, count, first):
    sp = bootstrap_time_splits(smin, smax, var)
    assert len(sp) == count
    assert sp[0] == 0 and sp[-1] == 1 and bool((sp[1:] > sp[:-1]).all())
    if first is not None:
        assert abs(float(sp[1]) - first) < 2e-3


def test_bootstrap_s_lies_in_previous_interval():
    sp = bootstrap_time_splits(1e-3, 1.0, 0.1)
    g = torch.Generator().manual_seed(0)
    assert bootstrap_s(0.5, sp, g) is None  # first interval: plain NEM
    for t in (0.85, 0.9, 0.95, 0.999):
        k = int((sp <= t).sum()) - 1
        for _ in range(20):
            s = bootstrap_s(t, sp, g)
            assert float(sp[k - 1]) <= s <= float(sp[k]) < t


# ------------------------------------------------------------------ networks
def test_mlp_energy_gradient_is_the_sampler_score():
    torch.manual_seed(0)
    net = MLPEnergy(2, hidden=16, n_blocks=1, emb_size=8).double()
    x = torch.randn(5, 2, dtype=torch.float64)
    t = torch.rand(5, dtype=torch.float64)
    e, s = energy_and_score(net, t, x)
    eps = 1e-6
    fd = torch.stack(
        [
            (
                net(t, x + eps * torch.eye(2, dtype=torch.float64)[i])
                - net(t, x - eps * torch.eye(2, dtype=torch.float64)[i])
            )
            / (2 * eps)
            for i in range(2)
        ],
        -1,
    )
    assert torch.allclose(s, -fd, atol=1e-6)
    assert torch.allclose(e, net(t, x))
    # the method's sampler uses exactly this score (unclipped below max_score_norm)
    m = NEM(
        CountingTarget(targets.get("gmm40")),
        NEMConfig.for_target("gmm40", **NEMConfig.preset("smoke", "gmm40")),
        "cpu",
        torch.Generator().manual_seed(0),
    )
    y = torch.randn(7, 2)
    tt = torch.full((7,), 0.4)
    e_m, s_m = energy_and_score(m.net, tt, y)
    y_req = y.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(m.net(tt, y_req).sum(), y_req)
    assert torch.allclose(m.score_fn(m.net)(tt, y), -grad, atol=1e-5)


def test_score_clipping_per_sample():
    v = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    c = clip_per_sample(v, 1.0)
    assert torch.allclose(c.norm(dim=-1), torch.tensor([1.0, 0.5]), atol=1e-5)
    assert torch.allclose(c[0] / c[0].norm(), v[0] / 5)


@pytest.mark.parametrize("n,d", [(4, 2), (5, 3)])
def test_egnn_energy_is_invariant(n, d):
    torch.manual_seed(1)
    net = EGNNEnergy(n, d, hidden=16, n_layers=2).double()
    B = 6
    x = torch.randn(B, n * d, dtype=torch.float64)
    t = torch.rand(B, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))  # rotation or reflection
    shift = torch.randn(1, 1, d, dtype=torch.float64)
    perm = torch.randperm(n)
    p = x.reshape(B, n, d)
    y = ((p @ Q.T + shift)[:, perm]).reshape(B, n * d)
    e_x, e_y = net(t, x), net(t, y)
    assert torch.allclose(e_x, e_y, atol=1e-8)
    assert torch.allclose(net.per_particle(t, x)[:, perm], net.per_particle(t, y), atol=1e-8)
    # and the score is equivariant: s(Qx + b) = Q s(x) (permuted)
    _, s_x = energy_and_score(net, t, x)
    _, s_y = energy_and_score(net, t, y)
    assert torch.allclose((s_x.reshape(B, n, d) @ Q.T)[:, perm].reshape(B, -1), s_y, atol=1e-7)


# ------------------------------------------------------------------ training energies
def _lattice(tgt, B, spacing=1.1, noise=0.05, seed=0):
    """B centred configurations on a cubic/square lattice (min distance > spacing − 4·noise)."""
    g = torch.Generator().manual_seed(seed)
    n, d = tgt.n_particles, tgt.spatial_dim
    side = math.ceil(n ** (1 / d))
    grid = torch.stack(torch.meshgrid(*[torch.arange(side)] * d, indexing="ij"), -1).reshape(-1, d)[:n]
    x = spacing * grid.double() + noise * torch.randn(B, n, d, generator=g, dtype=torch.float64).clamp(-2, 2)
    return tgt.center(x.reshape(B, n * d))


def test_lj_smoothing_only_below_cutoff_and_continuous():
    tgt = targets.get("lj13")
    from targets import lennard_jones

    sm = LJSmoothing(tgt, lennard_jones.PAIR_FACTOR, lennard_jones.EPS2)
    r = torch.tensor([0.65], dtype=torch.float64)
    assert abs(float(sm.spline(r)) - float(r**-12 - 2 * r**-6)) < 1e-3  # interpolates at the knot
    x = _lattice(tgt, 16)
    assert float(tgt.interatomic_distances(x).min()) > 0.66
    assert torch.allclose(sm.correction(x), torch.zeros(16, dtype=torch.float64))
    close = x.clone()
    close[:, 3:6] = close[:, 0:3] + torch.tensor([0.3, 0.0, 0.0], dtype=torch.float64)
    corr = sm.correction(close)
    assert (corr < 0).all() and torch.isfinite(tgt.energy(close) + corr).all()


@pytest.mark.parametrize("name", ["dw4", "lj13"])
def test_particle_columns_sum_to_energy(name):
    tgt = targets.get(name)
    x = _lattice(tgt, 32, spacing=1.5 if name == "dw4" else 1.1, noise=0.3)
    cols = particle_energy_columns(tgt, x)
    assert cols.shape == (32, tgt.n_particles)
    assert torch.allclose(cols.sum(-1), tgt.energy(x), atol=1e-8)


# ------------------------------------------------------------------ methods: counting, configs, resume
def _make(cls, name, **over):
    ct = CountingTarget(targets.get(name))
    cfg = cls.Config.for_target(name, **{**cls.Config.preset("smoke", name), **over})
    return cls(ct, cfg, "cpu", torch.Generator().manual_seed(0)), ct


def test_registry_and_published_defaults():
    assert methods.get("nem") is NEM and methods.get("bnem") is BNEM
    b = BNEMConfig.for_target("lj55")
    assert (b.n_mc, b.bootstrap_mc, b.t0_weight, b.batch_size, b.diffusion_scale) == (
        1000,
        500,
        0.0,
        128,
        0.5,
    )
    n = NEMConfig.for_target("gmm40")
    assert (n.n_mc, n.sde_steps, n.t0_weight, n.per_particle) == (100, 100, 0.0, False)
    assert BNEMConfig.for_target("dw4").n_mc == 100 and NEMConfig.for_target("dw4").n_mc == 1000


def test_nem_counts_energy_not_gradients():
    m, ct = _make(NEM, "gmm40", steps_per_epoch=1000)
    c = m.config
    start = ct.usage.energy_evals
    assert start == c.n_init  # buffer insertion energies
    net0 = ct.usage.network_evals
    m.train_step()
    assert ct.usage.energy_evals - start == c.batch_size * c.n_mc
    assert ct.usage.grad_evals == 0
    assert ct.usage.network_evals - net0 == c.batch_size


def test_bnem_bootstrap_stage_counts_and_teacher_is_network():
    m, ct = _make(BNEM, "gmm40", bootstrap_start_step=0, steps_per_epoch=1000)
    c = m.config
    seen = False
    for _ in range(40):
        e0, n0 = ct.usage.energy_evals, ct.usage.network_evals
        logs = m.train_step()
        if "s" in logs:  # bootstrapped batch: t- and u-level MC estimates
            seen = True
            assert ct.usage.energy_evals - e0 == 2 * c.batch_size * c.n_mc
            n_acc = round(logs["bootstrap_accept_rate"] * c.batch_size)
            # student + acceptance test (2 B) + teacher (accepted · M) + t0 term (B)
            assert ct.usage.network_evals - n0 == 4 * c.batch_size + n_acc * c.bootstrap_mc
        else:
            assert ct.usage.energy_evals - e0 == c.batch_size * c.n_mc
    assert seen and ct.usage.grad_evals == 0


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="particle target"):
        _make(NEM, "gmm40", per_particle=True)
    with pytest.raises(ValueError, match="lj13/lj55"):
        _make(NEM, "dw4", lj_smooth=True)
    with pytest.raises(ValueError, match="n_mc > bootstrap_mc"):
        _make(BNEM, "gmm40", n_mc=4, bootstrap_mc=4)
    with pytest.raises(ValueError, match="unknown"):
        NEMConfig.for_target("gmm40", bootstrap_mc=3)


@pytest.mark.parametrize(
    "cls,name,over",
    [(NEM, "gmm40", {}), (BNEM, "dw4", {"bootstrap_start_step": 2}), (NEM, "dw4", {"per_particle": True})],
)
def test_seed_reproducibility_and_exact_resume(cls, name, over):
    a, _ = _make(cls, name, **over)
    b, _ = _make(cls, name, **over)
    logs_a = [a.train_step()["loss"] for _ in range(3)]
    logs_b = [b.train_step()["loss"] for _ in range(3)]
    assert logs_a == logs_b
    state = a.state_dict()
    cont_a = [a.train_step()["loss"] for _ in range(4)]
    c, _ = _make(cls, name, **over)
    c.load_state_dict(state)
    cont_c = [c.train_step()["loss"] for _ in range(4)]
    assert cont_a == cont_c
    assert torch.equal(a.sample(4), c.sample(4))


@pytest.mark.parametrize("name", ["gmm40", "dw4", "lj13", "lj55"])
@pytest.mark.parametrize("cls", [NEM, BNEM])
def test_smoke_cells_run(cls, name):
    m, ct = _make(cls, name, bootstrap_start_step=1) if cls is BNEM else _make(cls, name)
    for _ in range(4):
        logs = m.train_step()
        assert math.isfinite(logs["loss"])
    x = m.sample(3)
    assert x.shape == (3, ct.dim) and torch.isfinite(x).all()
    if ct.n_particles is not None:
        assert torch.allclose(ct.as_particles(x).mean(1), torch.zeros(3, ct.spatial_dim), atol=1e-4)


def test_buffer_max_energy_filters_generated_samples():
    m, ct = _make(NEM, "gmm40", buffer_max_energy=-1e9)  # nothing passes
    n0 = len(m.buffer)
    for _ in range(m.config.steps_per_epoch):
        m.train_step()
    assert len(m.buffer) == n0 and m.diagnostics()["buffer_rejected"] == m.config.n_new_per_epoch
    m2, _ = _make(NEM, "gmm40")
    for _ in range(m2.config.steps_per_epoch):
        m2.train_step()
    assert len(m2.buffer) == n0 + m2.config.n_new_per_epoch


# ------------------------------------------------------------------ denoiser clip (sampler option, issue 5)
def test_denoiser_clip_is_a_no_op_on_exact_scores_of_a_target_inside_the_box():
    """Tweedie: for p = mixture of point masses at μ_k ∈ [−0.8, 0.8]², the noised score is (Σ w_k μ_k − y)/h,
    whose denoiser Σ w_k μ_k lies in the box — the clip must leave it unchanged, at every noise level."""
    from methods.energy_net import clip_denoised

    g = torch.Generator().manual_seed(0)
    mu = (torch.rand(40, 2, generator=g, dtype=torch.float64) - 0.5) * 1.6
    y = torch.randn(500, 2, generator=g, dtype=torch.float64) * 3
    for h in (1e-6, 1e-2, 1.0):
        w = torch.softmax(-0.5 * ((y.unsqueeze(1) - mu) ** 2).sum(-1) / h, -1)
        score = (w @ mu - y) / h
        assert torch.equal(clip_denoised(y, score, torch.full((500,), h, dtype=torch.float64), 1.0), score)


def test_denoiser_clip_projects_spurious_scores_into_the_box():
    from methods.energy_net import clip_denoised

    g = torch.Generator().manual_seed(1)
    y = torch.randn(300, 2, generator=g) * 2
    h = torch.rand(300, generator=g) + 0.01
    bad = 40.0 * y  # outward-pointing (energy decreasing away from the data)
    s = clip_denoised(y, bad, h, 1.0)
    x0 = y + h.unsqueeze(-1) * s
    assert (x0.abs() <= 1.0 + 1e-5).all()
    outside = y.abs() > 1.0
    assert outside.any() and ((s * y)[outside] < 0).all()  # coordinates beyond the box are pulled inwards
    with pytest.raises(ValueError, match="> 0"):
        clip_denoised(y, bad, h, 0.0)


class _Repulsive(torch.nn.Module):
    """E(y, t) = −20 |y|²: a spurious learned energy whose score pushes samples outwards."""

    def forward(self, t, y):
        return -20.0 * (y**2).sum(-1)


def test_denoiser_clip_keeps_the_gmm_sampler_in_the_data_box():
    """With a repulsive network the reverse SDE throws samples far out; with the clip they end in the box
    (plus the last steps' small noise)."""
    outs = {}
    for dc in (None, 1.0):
        m, ct = _make(NEM, "gmm40", sde_steps=100, denoiser_clip=dc)
        m.net = _Repulsive()
        outs[dc] = m.sample(200) / ct.length_scale
    assert outs[None].abs().max() > 10.0
    assert outs[1.0].abs().max() < 1.1
    with pytest.raises(ValueError, match="denoiser_clip"):
        _make(NEM, "gmm40", denoiser_clip=-1.0)


def test_eval_grid_and_ema_options_of_sample():
    """sample() integrates on eval_sde_steps (one network evaluation per sample and step) from the EMA net
    when eval_from_ema; the training buffer keeps sde_steps."""
    m, ct = _make(NEM, "gmm40", sde_steps=5, eval_sde_steps=7)
    n0 = ct.usage.network_evals
    m.sample(11)
    assert ct.usage.network_evals - n0 == 11 * 7
    n0 = ct.usage.network_evals
    m._end_epoch()
    assert ct.usage.network_evals - n0 == m.config.n_new_per_epoch * 5
    a, _ = _make(NEM, "gmm40", eval_from_ema=True)
    with torch.no_grad():
        for p in a.net.parameters():
            p.add_(1.0)  # raw net now differs from its EMA copy
    st = a.generator.get_state()
    x = a.sample(5)
    outs = []
    for net in (a.ema.model, a.net):
        a.generator.set_state(st)
        outs.append(a._generate(net, 5) * a.scale)
    assert torch.equal(x, outs[0]) and not torch.equal(x, outs[1])
    with pytest.raises(ValueError, match="eval_sde_steps"):
        _make(NEM, "gmm40", eval_sde_steps=0)


# ------------------------------------------------------------------ published variants
def test_plateau_switch_starts_bootstrapping_after_patience_checks_without_improvement(monkeypatch):
    """bnem@published: MultiEarlyStopping on the training energy loss (mean over each check window)."""
    m, _ = _make(BNEM, "dw4", bootstrap_switch="plateau", switch_patience=1, switch_check_steps=2)
    losses = iter([3.0, 3.0, 2.0, 2.0, 2.5, 2.5, 9.0, 9.0])
    real = NEM.train_step

    def fake(self):
        logs = real(self)
        logs["energy_loss"] = next(losses)
        return logs

    monkeypatch.setattr(NEM, "train_step", fake)
    stages = []
    for _ in range(8):
        m.train_step()
        stages.append(m.stage)
    # checks at steps 2 (3.0, best), 4 (2.0, best), 6 (2.5: one bad check = patience 1 -> switch)
    assert stages == [0, 0, 0, 0, 0, 1, 1, 1] and m.switch_step == 6
    assert m.diagnostics()["bootstrap_switch_step"] == 6.0
    m2, _ = _make(BNEM, "dw4", bootstrap_switch="plateau", switch_patience=1, switch_check_steps=2)
    m2.load_state_dict(m.state_dict())
    assert m2.switch_step == 6 and m2.stage == 1 and m2.plateau_best == 2.0


def test_per_particle_variant_is_the_published_factorised_formula():
    """nem@published's target Σ_i −log mean_k exp(−E_i(x_k)) against a direct implementation."""
    tgt = targets.get("lj13")
    x = _lattice(tgt, 4, spacing=1.1, noise=0.2)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    K, sigma = 64, 0.05
    est, _ = noised_energy_mc(lambda y: particle_energy_columns(tgt, y), x, sigma, K, g1)
    eps = torch.randn(4, K, tgt.dim, generator=g2, dtype=x.dtype)
    direct = torch.zeros(4, tgt.n_particles, dtype=x.dtype)
    for b in range(4):
        y = x[b] + sigma * eps[b]  # [K, dim]
        p = y.view(K, tgt.n_particles, 3)
        for i in range(tgt.n_particles):
            e_i = 0.5 * ((p[:, i] - p.mean(1)) ** 2).sum(-1)
            for j in range(tgt.n_particles):
                if j != i:
                    r2 = ((p[:, i] - p[:, j]) ** 2).sum(-1) + 1e-6
                    e_i = e_i + (r2 ** -6 - 2 * r2 ** -3)  # column i counts each of its pairs once (BNEM)
            direct[b, i] = -(torch.logsumexp(-e_i, 0) - math.log(K))
    assert torch.allclose(est, direct, rtol=1e-9, atol=1e-9)
    # the factorised target differs from the paper's total-energy estimator on the same draws
    tot, _ = noised_energy_mc(tgt.energy, x, sigma, K, torch.Generator().manual_seed(5))
    assert not torch.allclose(est.sum(-1), tot)


def test_variants_are_named_configs_with_sources():
    from harness import grids

    assert set(methods.variants()) >= {"nem@published", "bnem@published", "nem@poster", "bnem@poster"}
    for key in methods.variants():
        base, v = methods.split_key(key)
        spec = methods.get(base).Config.VARIANTS[v]
        assert spec["description"] and spec["source"]
    e = grids.expand("paper", methods=["bnem@published"], targets=["dw4"])
    c = BNEMConfig.for_target("dw4", **e.specs[0].config)
    assert (c.per_particle, c.bootstrap_switch, c.switch_patience) == (True, "plateau", 5)
    assert e.specs[0].cell_id == "paper/dw4/bnem@published/r0"
    # the cpu grid's cost presets still apply over a variant
    spec = grids.expand("cpu", methods=["bnem@poster"], targets=["dw4"]).specs[0]
    c = BNEMConfig.for_target("dw4", **spec.config)
    assert c.n_mc == 100 and c.sigma_min == 1e-3 and c.hidden == 32
    with pytest.raises(ValueError, match="valid variants"):
        grids.expand("cpu", methods=["bnem@nope"], targets=["dw4"])
    with pytest.raises(KeyError, match="variants of nem"):
        methods.get("nem@nope")
