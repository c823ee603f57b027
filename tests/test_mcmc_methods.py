"""The MCMC baselines `mcmc` and `pt`: exact stationary moments, swap invariance, counting, resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import methods
import targets
from harness.budget import CountingTarget
from methods.mcmc import MCMCConfig, PTConfig, _TemperedModel
from targets.base import Target
from targets.mcmc import ReplicaExchange, init_state


class Gauss(Target):
    """N(mu, s²I) in 3-D: E = |x − mu|² / (2 s²)."""

    name = "gauss"
    display_name = "Gauss"

    def __init__(self, mu=(1.0, -2.0, 0.5), s=1.5):
        self.dim = 3
        self.mu = torch.tensor(mu)
        self.s = s

    def _energy(self, x):
        return ((x - self.mu.to(x)) ** 2).sum(-1) / (2 * self.s**2)


def _run(method: str, target, cfg, steps: int, seed: int = 0):
    ct = CountingTarget(target)
    m = methods.get(method)(ct, cfg, torch.device("cpu"), torch.Generator().manual_seed(seed))
    for _ in range(steps):
        m.train_step()
    return m, ct


def test_registered():
    assert {"mcmc", "pt"} <= set(methods.names())
    assert methods.get("mcmc").display_name == "MCMC" and methods.get("pt").display_name == "PT"


@pytest.mark.parametrize("kernel", ["rwm", "mala"])
def test_mcmc_gaussian_moments(kernel):
    """Chains on a Gaussian reach its mean and variance (stationarity of the kernels) within MC error."""
    t = Gauss()
    cfg = MCMCConfig(kernel=kernel, n_chains=2000, step_size=1.2, init="uniform_box", init_scale=4.0)
    m, _ = _run("mcmc", t, cfg, 200)
    x = m.sample(2000).double()
    se_mean = t.s / math.sqrt(2000)
    assert torch.allclose(x.mean(0), t.mu.double(), atol=5 * se_mean)
    # standard error of a sample variance of N Gaussians: s² sqrt(2/N)
    var = torch.full((3,), t.s**2, dtype=torch.float64)
    assert torch.allclose(x.var(0), var, atol=5 * t.s**2 * math.sqrt(2 / 2000))


def test_pt_gaussian_moments_and_swaps():
    """PT returns the T = 1 replicas with the target's moments; swaps are accepted between neighbours."""
    t = Gauss()
    cfg = PTConfig(n_temps=3, t_max=4.0, n_replicas=1500, step_size=1.2, burnin_steps=50, init_scale=4.0)
    m, _ = _run("pt", t, cfg, 200)
    x = m.sample(1500).double()
    assert torch.allclose(x.mean(0), t.mu.double(), atol=5 * t.s / math.sqrt(1500))
    var = torch.full((3,), t.s**2, dtype=torch.float64)
    assert torch.allclose(x.var(0), var, atol=5 * t.s**2 * math.sqrt(2 / 1500))
    d = m.diagnostics()
    assert 0.0 < d["swap_rate_min"] <= 1.0
    with pytest.raises(ValueError, match="n_replicas"):
        m.sample(1501)


def test_swaps_preserve_product_distribution():
    """Exact samples per temperature stay exact after many swap rounds (swaps leave Π_k π_{β_k} invariant)."""
    t = Gauss(mu=(0.0, 0.0, 0.0), s=1.0)
    temps = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    M = 5000
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(M, 3, generator=g, dtype=torch.float64) * T.sqrt() for T in temps])
    ex = ReplicaExchange(1.0 / temps, M)
    st = init_state(t, x, beta=ex.chain_betas(torch.float64), step_size=1.0, with_grad=False)
    for _ in range(20):
        ex.swap(st, g)
    assert float(ex.swap_rates.min()) > 0.1  # swaps did happen
    var = st.x.view(3, M, 3).var(1).mean(-1)
    assert torch.allclose(var, temps, rtol=5 * math.sqrt(2 / (3 * M)))


def test_counting_is_chains_times_steps():
    t = targets.get("dw4")
    cfg = MCMCConfig.for_target("dw4").replace(n_chains=64, warmup_levels=2, warmup_steps_per_level=3)
    m, ct = _run("mcmc", t, cfg, 10)
    # initial evaluation + one resampling per level + one re-initialisation per level change + 10 steps
    n_levels = 2
    expected = 64 * (1 + n_levels + n_levels + 10)
    assert ct.usage.energy_evals == expected
    assert ct.usage.grad_evals == 0  # random-walk Metropolis needs no gradients
    assert m.level == 0  # 2 levels × 3 steps = 6 < 10: in the main phase


def test_tempered_lj_level_keeps_the_oscillator():
    """β·E_model = β·E_LJ + E_osc at a warm-up level (the study tempers only the pair term)."""
    t = targets.get("lj13")
    # well-separated particles (a cubic lattice, jittered): energies O(10), no catastrophic cancellation
    grid = torch.stack(torch.meshgrid(*[torch.arange(3.0, dtype=torch.float64)] * 3, indexing="ij"), -1)
    g = torch.Generator().manual_seed(0)
    jitter = 0.05 * torch.randn(5, t.dim, generator=g, dtype=torch.float64)
    x = grid.reshape(-1, 3)[:13].reshape(1, -1) * 1.1 + jitter
    x = t.center(x)
    beta = 0.4
    p = t.as_particles(x)
    e_osc = 0.5 * ((p - p.mean(-2, keepdim=True)) ** 2).sum((-1, -2))
    e = t.energy(x)
    tm = _TemperedModel(t, beta)
    assert torch.allclose(beta * tm.energy(x), beta * (e - e_osc) + e_osc)
    _, g = tm.energy_and_grad(x)
    xg = x.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(tm.energy(xg).sum(), xg)
    assert torch.allclose(g, ga, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("method", ["mcmc", "pt"])
def test_resume_is_exact(method):
    """state_dict + generator state reproduce an uninterrupted run bit for bit."""
    t = targets.get("dw4")
    cfg = methods.get(method).Config.for_target("dw4", **methods.get(method).Config.preset("smoke", "dw4"))
    a, _ = _run(method, t, cfg, 12, seed=3)

    b, ct = _run(method, t, cfg, 5, seed=3)
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in b.state_dict().items()}
    gstate = b.generator.get_state()
    c = methods.get(method)(CountingTarget(t), cfg, torch.device("cpu"), torch.Generator().manual_seed(99))
    c.load_state_dict(state)
    c.generator.set_state(gstate)
    for _ in range(7):
        c.train_step()
    assert torch.equal(a.state.x, c.state.x)
    assert a.diagnostics()["kernel_steps"] == c.diagnostics()["kernel_steps"] == 12


def test_bad_input():
    t = targets.get("gmm40")
    with pytest.raises(ValueError, match="n_chains"):
        MCMCConfig().replace(n_chains="many")
    with pytest.raises(ValueError, match="valid keys"):
        MCMCConfig().replace(n_chain=3)
    m, _ = _run("mcmc", t, MCMCConfig.for_target("gmm40").replace(n_chains=100), 1)
    with pytest.raises(ValueError, match="n_chains"):
        m.sample(101)


@pytest.mark.slow
def test_cpu_preset_quality():
    """Acceptance of issue 8 under the `cpu` presets (idem protocol, W2² energies / x-W2 at 1000 vs 1000)."""
    import ot

    from targets.reference import load_reference

    dw = targets.get("dw4")
    cfg = MCMCConfig.for_target("dw4", **MCMCConfig.preset("cpu", "dw4"))
    m, ct = _run("mcmc", dw, cfg, 3000)
    ref = load_reference(dw, "val", 1000)
    ew2 = ot.emd2_1d(dw.energy(m.sample(1000)).double().numpy(), dw.energy(ref.double()).double().numpy())
    assert ew2 <= 0.3, ew2
    assert ct.usage.energy_evals < 5.12e10 / 100  # far below iDEM's paper budget

    gmm = targets.get("gmm40")
    cfg = MCMCConfig.for_target("gmm40", **MCMCConfig.preset("cpu", "gmm40"))
    m, ct = _run("mcmc", gmm, cfg, 500)
    # x-W2 at 1000 vs 1000 fluctuates by ±1 even for exact samples: average over 5 reference draws
    w = []
    for r in range(5):
        ref = gmm.sample(1000, torch.Generator().manual_seed(1000 + r)).double().numpy()
        w.append(math.sqrt(ot.emd2([], [], ot.dist(m.sample(1000).double().numpy(), ref), numItermax=10**7)))
    assert np.mean(w) <= 5.0, w


def _chain_sizes(spec) -> tuple[int, int, int]:
    """(energy evaluations per step, chains at T = 1, warm-up steps) of an MCMC / PT cell spec."""
    if spec.method == "mcmc":
        cfg = MCMCConfig.for_target(spec.target, **spec.config)
        return cfg.n_chains, cfg.n_chains, cfg.warmup_levels * cfg.warmup_steps_per_level
    cfg = PTConfig.for_target(spec.target, **spec.config)
    return cfg.n_replicas * cfg.n_temps, cfg.n_replicas, cfg.burnin_steps


@pytest.mark.parametrize("grid", ["cpu", "equal-evals-cpu"])
def test_release_presets_leave_a_main_phase_and_enough_chains(grid):
    """Every MCMC / PT cell of the release grids runs past its warm-up (MCMC's tempered levels, PT's
    step-size burn-in) and has at least as many chains at T = 1 as samples it is scored with. Steps are the
    cell's step budget, or its energy budget over the evaluations per step (chains; replicas × temperatures).
    The LJ-55 presets before the fix (5000 chains × 3000 steps = exactly the warm-up; equal-evals: 396 steps)
    fail this."""
    from harness import grids

    for spec in grids.expand(grid, methods=["mcmc", "pt"]).specs:
        per_step, chains, warm = _chain_sizes(spec)
        caps = [spec.budget[k] for k in ("steps",) if spec.budget.get(k)]
        if spec.budget.get("energy_evals"):
            caps.append(spec.budget["energy_evals"] // per_step)
        steps = min(caps)
        assert steps >= 2 * warm, (spec.cell_id, steps, warm)
        n_scored = spec.n_eval_samples or 5000
        assert chains >= n_scored, (spec.cell_id, chains, n_scored)


def test_cpu_presets_spend_at_least_the_equal_evals_budget():
    """A `cpu` MCMC / PT cell is the best these baselines do in a ~20 CPU-min cell, so it never trains on
    fewer energy evaluations than the same method's `equal-evals-cpu` cell is allowed (EQUAL_EVALS_CPU).
    Evaluations per step: chains (MCMC), replicas × temperatures (PT). The presets before 2026-12-05 (DW-4
    MCMC 10 000 chains × 3000 steps = 3e7, GMM-40 50 000 × 500 = 2.5e7, DW-4 PT 4e7, all < 5e7) fail this."""
    from harness import grids

    for spec in grids.expand("cpu", methods=["mcmc", "pt"]).specs:
        evals = _chain_sizes(spec)[0] * spec.budget["steps"]
        assert evals >= grids.EQUAL_EVALS_CPU[spec.target], (spec.cell_id, evals)
