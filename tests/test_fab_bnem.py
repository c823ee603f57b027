"""The variant ``fab@bnem`` (FAB as BNEM's code ran it): config resolution, the fab-torch Metropolis options
(ladder, per-update adaptation, overflow rejection), the CNF options it uses, and seeded reproducibility."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import targets
from harness import grids
from harness.budget import CountingTarget
from methods.ais import ChainState, Metropolis, _Evaluator
from methods.fab import FAB, FABConfig, _BNEMReplayBuffer
from methods.flows import EquivariantCNF
from methods.nets import EGNN

# ------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("target_name", ["gmm40", "dw4", "dw4-bnem"])
def test_variant_resolves_and_validates(target_name: str) -> None:
    over = FABConfig.variant("bnem", target_name)
    c = FABConfig.for_target(target_name, **over)
    assert (c.flow, c.cnf_divergence, c.cnf_steps, c.cnf_sample_steps) == ("cnf", "hutchinson", 24, 1)
    assert (c.transition, c.n_intermediate, c.n_inner, c.adapt_per_update, c.step_adapt_factor) == (
        "metropolis", 5, 10, True, 1.05,
    )
    assert (c.batch_size, c.ais_batch_size, c.n_updates_per_ais, c.buffer_max, c.buffer_min) == (
        512, 1024, 100, 10_000, 1_000,
    )
    assert (c.lr, c.grad_clip_mode, c.grad_clip, c.w_adjust_max_clip, c.dtype) == (
        1e-3, "fixed", 0.5, 1e3, "float32",
    )
    assert c.max_log_ratio == pytest.approx(88.7228, abs=1e-3)
    if target_name == "gmm40":  # flow on x/50: BNEM's steps 5 -> 0.1 are 250 -> 5 in raw units
        assert (c.cnf_coord_scale, c.base_scale, c.step_size, c.min_step_size) == (50.0, 1.0, 250.0, 5.0)
    else:
        assert (c.cnf_coord_scale, c.base_scale, c.step_size, c.min_step_size) == (1.0, 3.0, 5.0, 0.1)
        assert not c.centre_chains
    assert c.buffer_rule == "bnem" and c.init_from_base and c.init_log_q_negated
    for grid in ("smoke", "cpu"):
        FABConfig.for_target(target_name, **{**over, **FABConfig.preset(grid, target_name)})


def test_variant_through_the_paper_grid() -> None:
    exp = grids.expand("paper", methods=["fab@bnem"], targets=["gmm40", "dw4-bnem"])
    by_target = {s.target: s for s in exp.specs}
    assert set(by_target) == {"gmm40", "dw4-bnem"}
    assert by_target["gmm40"].config["cnf_coord_scale"] == 50.0
    assert by_target["dw4-bnem"].config["flow"] == "cnf"
    assert all(s.method == "fab@bnem" for s in exp.specs)
    # and the whole paper grid resolves (the variant leaves LJ-13 / LJ-55 on the default FAB)
    assert grids.expand("paper", methods=["fab@bnem"]).specs


# ----------------------------------------------------------------------------------- Metropolis kernel


class _Gauss1D:
    """E(x) = (x − m)²/(2s²) on R (a counted-target stand-in with ``energy``)."""

    def __init__(self, m: float, s: float) -> None:
        self.m, self.s = m, s

    def energy(self, x: Tensor) -> Tensor:
        return ((x - self.m) ** 2).sum(-1) / (2 * self.s**2)


class _FlatFlow:
    def log_prob(self, x: Tensor) -> Tensor:
        return torch.zeros(x.shape[0], dtype=x.dtype)


def _chains(x: Tensor, ev: _Evaluator) -> ChainState:
    return ev(x)


@pytest.mark.parametrize("adapt", [False, True])
def test_ladder_metropolis_leaves_the_target_invariant(adapt: bool) -> None:
    """α = 1, β = 1: π = p = N(1, 2²). Exact draws stay distributed as p after 30 ladder passes (with and
    without per-update adaptation, which changes steps between exact updates), and an off-target start
    converges to p."""
    gen = torch.Generator().manual_seed(0)
    tgt = _Gauss1D(1.0, 2.0)
    ev = _Evaluator(_FlatFlow(), tgt, with_grad=False)
    kern = Metropolis(1, step_size=8.0, n_steps=10, adapt=adapt, adapt_factor=1.05, min_step_size=0.5,
                      adapt_per_update=True)
    n = 40_000
    s = _chains(1.0 + 2.0 * torch.randn(n, 1, generator=gen, dtype=torch.float64), ev)
    far = _chains(torch.full((n, 1), 15.0, dtype=torch.float64), ev)
    for _ in range(30):
        s = kern.transition(s, 0, 1.0, 1.0, ev, gen, None)
        far = kern.transition(far, 0, 1.0, 1.0, ev, gen, None)
    for st in (s, far):
        assert float(st.x.mean()) == pytest.approx(1.0, abs=0.06)
        assert float(st.x.var()) == pytest.approx(4.0, rel=0.05)


def test_ladder_and_per_update_adaptation() -> None:
    kern = Metropolis(3, step_size=5.0, n_steps=10, adapt=True, adapt_factor=1.05, min_step_size=0.1,
                      adapt_per_update=True)
    ladder = torch.linspace(5.0, 0.1, 10, dtype=torch.float64)
    assert kern.step_sizes.shape == (3, 10) and torch.allclose(kern.step_sizes[2], ladder)
    gen = torch.Generator().manual_seed(1)
    ev = _Evaluator(_FlatFlow(), _Gauss1D(0.0, 1.0), with_grad=False)
    s = ev(torch.randn(256, 1, generator=gen, dtype=torch.float64))
    kern.transition(s, 1, 1.0, 1.0, ev, gen, None)
    ratio = kern.step_sizes[1] / ladder
    # every update of intermediate 1 moved by exactly ×1.05 or ÷1.05; the others did not move
    assert torch.allclose(torch.minimum((ratio - 1.05).abs(), (ratio - 1 / 1.05).abs()),
                          torch.zeros(10, dtype=torch.float64), atol=1e-12)
    assert float(ratio[0]) == pytest.approx(1 / 1.05)  # step 5 on N(0, 1): acceptance well below 0.65
    assert torch.equal(kern.step_sizes[0], ladder) and torch.equal(kern.step_sizes[2], ladder)
    st = kern.state_dict()
    k2 = Metropolis(3, step_size=5.0, n_steps=10, min_step_size=0.1)
    k2.load_state_dict(st)
    assert torch.equal(k2.step_sizes, kern.step_sizes)


def test_max_log_ratio_rejects_large_uphill_moves() -> None:
    """A chain at x = 40 on N(0, 1): a move towards 0 has log ratio ≈ 800 (> 88.7), so fab-torch's float32
    exp overflow rejects it; without the rule it is accepted."""
    ev = _Evaluator(_FlatFlow(), _Gauss1D(0.0, 1.0), with_grad=False)
    x0 = torch.full((64, 1), 40.0, dtype=torch.float64)
    for limit, moved in ((None, True), (math.log(torch.finfo(torch.float32).max), False)):
        kern = Metropolis(1, step_size=40.0, n_steps=1, min_step_size=40.0, max_log_ratio=limit)
        gen = torch.Generator().manual_seed(2)
        s = kern.transition(ev(x0), 0, 1.0, 1.0, ev, gen, None)
        # |x| < 20 means a log ratio above (40² − 20²)/2 = 600
        assert bool((s.x.abs() < 20.0).any()) is moved


# ---------------------------------------------------------------------------------------- CNF options


class _Zero(nn.Module):
    """v = 0 (its one parameter fixes the dtype the flow samples in)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return x * self.w  # zero, but with a graph to x (the divergence is taken by autograd)


def test_cnf_coord_scale_and_uncentred_density() -> None:
    # a zero field: q is the base mapped by x = s·y, i.e. N(0, (s·σ)² I)
    flow = EquivariantCNF(_Zero(), None, 2, n_steps=2, base_scale=1.5, divergence="exact", coord_scale=50.0)
    x = torch.randn(5, 2, dtype=torch.float64) * 40
    sd = 75.0
    want = -0.5 * (x**2).sum(-1) / sd**2 - math.log(2 * math.pi * sd**2)
    torch.testing.assert_close(flow.log_prob(x), want)
    xs, lq = flow.sample_and_log_prob(7, torch.Generator().manual_seed(0))
    torch.testing.assert_close(lq, flow.log_prob(xs))
    # uncentred particle density: log q(x + c) = log q(x) − n|c|²/(2σ²) for an equivariant field
    torch.manual_seed(0)
    field = EGNN(4, 2, hidden=8, n_layers=1).double()
    f_c = EquivariantCNF(field, 4, 2, n_steps=2, base_scale=3.0, divergence="exact")
    f_u = EquivariantCNF(field, 4, 2, n_steps=2, base_scale=3.0, divergence="exact", centre=False)
    x = f_c.base.center(torch.randn(3, 8, dtype=torch.float64))
    c = torch.tensor([0.7, -1.2], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(f_u.log_prob(x), f_c.log_prob(x))
        shifted = f_u.log_prob(x + c.repeat(4))
        torch.testing.assert_close(shifted, f_c.log_prob(x) - 4 * (c**2).sum() / (2 * 9.0))


# --------------------------------------------------------------------------------------------- runs


def _make(target_name: str, seed: int, **over: object) -> FAB:
    ct = CountingTarget(targets.get(target_name))
    cfg = FABConfig.for_target(
        target_name, **{**FABConfig.variant("bnem", target_name), **FABConfig.preset("smoke", target_name),
                        **over}
    )
    return FAB(ct, cfg, torch.device("cpu"), torch.Generator().manual_seed(seed))


def _params(m: FAB) -> Tensor:
    return torch.cat([p.detach().flatten() for p in m.flow.parameters()])


@pytest.mark.parametrize("target_name", ["gmm40", "dw4-bnem"])
def test_seeded_short_run_is_reproducible(target_name: str) -> None:
    tiny = {"n_intermediate": 2, "n_inner": 3, "cnf_steps": 1, "batch_size": 8, "buffer_min": 8,
            "buffer_max": 64, "diag_samples": 8, "hidden": 8, "n_layers": 1}
    runs = []
    for seed in (0, 0, 1):
        m = _make(target_name, seed, **tiny)
        for _ in range(3):
            m.train_step()
        assert m.flow.sample_steps is None  # the one-step draws are the AIS's only (BNEM training mode)
        runs.append((_params(m), m.sample(4), m.ais.transition.step_sizes.clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert torch.equal(runs[0][2], runs[1][2])
    assert runs[0][2].shape == (2, 3)  # the per-update ladder
    assert not torch.equal(runs[0][0], runs[2][0])


def test_first_fill_from_the_base_with_negated_log_q() -> None:
    """BNEM's setup: the first AIS chains start at base samples and the buffer stores −log q for them."""
    m = _make("dw4-bnem", 0, n_intermediate=1, n_inner=1, cnf_steps=1, batch_size=8, buffer_min=8,
              buffer_max=64, hidden=8, n_layers=1, cnf_divergence="exact", adapt_step_size=False,
              dtype="float64")
    m._fill_buffer()
    assert m.n_ais_batches == 1
    b = m.buffer
    assert b is not None
    with torch.no_grad():
        lq = m.flow.log_prob(b.x[:8])
    ok = torch.isfinite(b.log_w[:8])
    torch.testing.assert_close(b.log_q_old[:8][ok], -lq[ok])


def test_bnem_buffer_draw_rule_clamps_log_w_and_draws_empty_slots() -> None:
    gen = torch.Generator().manual_seed(3)
    buf = _BNEMReplayBuffer(1, 10, 2, "cpu", torch.float64)
    buf.add(torch.tensor([[1.0], [2.0]], dtype=torch.float64), torch.tensor([30.0, 1000.0]),
            torch.zeros(2, dtype=torch.float64))
    # both clamp to log w 20: equally likely; the 8 empty slots (weight 1 each) almost never win
    hits = torch.zeros(10)
    for _ in range(2000):
        hits[buf.sample(1, gen)[3]] += 1
    assert float(hits[:2].sum()) >= 1995 and abs(float(hits[0] - hits[1])) < 200
    # entries with log w −50: the empty slots (x = 0, log w = 0) are drawn instead, and can be adjusted
    buf2 = _BNEMReplayBuffer(1, 10, 2, "cpu", torch.float64)
    zeros2 = torch.zeros(2, dtype=torch.float64)
    buf2.add(torch.ones(2, 1, dtype=torch.float64), torch.full((2,), -50.0), zeros2)
    x, log_w, log_q, idx = buf2.sample(3, gen)
    assert bool((idx >= 2).all()) and torch.equal(x, torch.zeros(3, 1, dtype=torch.float64))
    assert torch.equal(log_w, torch.zeros(3, dtype=torch.float64))
    buf2.adjust(idx, torch.full((3,), -1.0), torch.full((3,), 0.5, dtype=torch.float64))
    assert torch.equal(buf2.log_w[idx], torch.full((3,), -1.0, dtype=torch.float64))


def test_ais_at_epoch_end_and_the_plateau_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    """BNEM's order: the setup fill, then an AIS pass after every n_updates_per_ais-th step; DW-4's
    ReduceLROnPlateau on the val E-W2 of the last AIS samples (val rows counted once)."""
    m = _make("dw4-bnem", 0, n_intermediate=1, n_inner=1, cnf_steps=1, batch_size=8, buffer_min=8,
              buffer_max=64, hidden=8, n_layers=1, ais_batch_size=8, n_updates_per_ais=2,
              plateau_check_steps=2, plateau_ref_size=16)
    assert m.config.lr_plateau and m.config.ais_at_epoch_end
    batches = []
    for _ in range(4):
        logs = m.train_step()
        batches.append(m.n_ais_batches)
    assert batches == [1, 2, 2, 3]
    assert math.isfinite(logs["val_energy_w2"]) and logs["lr"] == pytest.approx(1e-3)
    # 3 AIS passes of 8 chains at 1 + 1 evaluations each, plus the 16 val rows once (two checks)
    assert m.target.usage.energy_evals == 3 * 8 * 2 + 16
    # the plateau rule: patience 1, a constant metric: the lr drops ×0.1 at the third check
    monkeypatch.setattr(m, "_val_energy_w2", lambda: 5.0)
    m.plateau = [float("inf"), 0.0, 1.0]
    object.__setattr__(m.config, "plateau_patience", 1)
    factors = []
    for _ in range(4):
        m._plateau_check()
        factors.append(m.plateau[2])
    assert factors == [1.0, 1.0, pytest.approx(0.1), pytest.approx(0.1)]
    assert m._lr() == pytest.approx(1e-4)


@pytest.mark.parametrize("target_name", ["gmm40", "dw4-bnem"])
def test_resume_is_exact(target_name: str) -> None:
    import io

    tiny = {"n_intermediate": 1, "n_inner": 2, "cnf_steps": 1, "batch_size": 8, "buffer_min": 8,
            "buffer_max": 32, "hidden": 8, "n_layers": 1, "ais_batch_size": 8, "n_updates_per_ais": 2,
            "plateau_check_steps": 2, "plateau_ref_size": 8}
    m = _make(target_name, 3, **tiny)
    for _ in range(3):
        m.train_step()
    buf = io.BytesIO()
    torch.save({"method": m.state_dict(), "rng": m.generator.get_state()}, buf)
    for _ in range(3):
        m.train_step()
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m2 = _make(target_name, 99, **tiny)
    m2.load_state_dict(ck["method"])
    m2.generator.set_state(ck["rng"])
    for _ in range(3):
        m2.train_step()
    assert torch.equal(_params(m2), _params(m))
    assert torch.equal(m2.ais.transition.step_sizes, m.ais.transition.step_sizes)
    assert m2.plateau[:2] == m.plateau[:2]
    if target_name == "dw4-bnem":  # the plateau's val energies travel with the checkpoint (counted once)
        assert m2._ref_energy is not None and m._ref_energy is not None
        assert torch.equal(m2._ref_energy, m._ref_energy)


def test_stale_reference_breaks_invariance_as_in_fab_torch() -> None:
    """fab-torch compares every update with π at the transition's start: from exact N(0, 1) draws, one
    transition of 10 unit-step updates inflates the variance (≈ 1.17); the exact kernel keeps it at 1."""
    ev = _Evaluator(_FlatFlow(), _Gauss1D(0.0, 1.0), with_grad=False)
    var = {}
    for stale in (False, True):
        gen = torch.Generator().manual_seed(0)
        kern = Metropolis(1, step_size=1.0, n_steps=10, min_step_size=1.0, stale_reference=stale)
        s = kern.transition(ev(torch.randn(40_000, 1, generator=gen, dtype=torch.float64)), 0, 1.0, 1.0, ev,
                            gen, None)
        var[stale] = float(s.x.var())
    assert var[False] == pytest.approx(1.0, abs=0.04)
    assert var[True] > 1.1
    assert FABConfig.for_target("dw4", **FABConfig.variant("bnem", "dw4")).stale_reference


class _Linear(nn.Module):
    """v(t, x) = a·x: the flow maps z to z·e^a, so q = N(0, (σ e^a)² I)."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return self.a * x


def test_cnf_three_eighths_rule_and_fixed_gaussian_probe() -> None:
    a, sd0, dim = 0.7, 1.3, 3
    x = torch.randn(4, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sd = sd0 * math.exp(a)
    exact = -0.5 * (x**2).sum(-1) / sd**2 - 0.5 * dim * math.log(2 * math.pi * sd**2)
    errs = []
    with torch.no_grad():
        for n in (2, 4):
            f = EquivariantCNF(_Linear(a), None, dim, n_steps=n, base_scale=sd0, divergence="exact", rk="3/8")
            errs.append(float((f.log_prob(x) - exact).abs().max()))
    assert errs[1] < 1e-3 and errs[0] / errs[1] > 12  # 4th order
    # one N(0, I) probe per integration: unbiased for the divergence a·dim, noisy per call
    f = EquivariantCNF(_Linear(a), None, dim, n_steps=2, base_scale=sd0, divergence="hutchinson", rk="3/8",
                       probe="gaussian_fixed")
    f.set_probe_generator(torch.Generator().manual_seed(1))
    with torch.no_grad():
        draws = f.log_prob(x.repeat(4000, 1)).reshape(4000, 4)  # one probe per row and integration
    ref = EquivariantCNF(_Linear(a), None, dim, n_steps=2, base_scale=sd0, divergence="exact", rk="3/8")
    with torch.no_grad():
        torch.testing.assert_close(draws.mean(0), ref.log_prob(x), atol=0.05, rtol=0)
    assert float(draws.std(0).min()) > 0.1
