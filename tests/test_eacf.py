"""The SE(3)-equivariant augmented coupling flow (``methods.eacf``), its splines (``methods.splines``) and its
use in FAB. Everything is float64 with small flows and batches.

- splines: round trip, log-derivative against autograd, identity at zero parameters, boundary conditions;
- the flow:
  - SE(3) equivariance of the sampling map;
  - invariance of log q to rotations, translations and permutations, to 1e-5 (it is not reflection-invariant:
    SE(3), as published);
  - exact invertibility;
  - log|det| of each coupling and of the whole flow against autograd Jacobians (on the centred-x slice);
  - consistency of the K-sample marginal estimator as K grows;
- FAB with the flow: the joint target and its counting, importance weights exact when q = p, x-only samples.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from harness.budget import CountingTarget
from methods.eacf import AugmentedTarget, EACFFlow
from methods.fab import FAB, FABConfig
from methods.splines import rq_knots, rq_spline
from targets.base import ParticleTarget

D64 = torch.float64


def _flow(n: int, d: int, seed: int = 0, scale: float = 0.4, **kw: int) -> EACFFlow:
    """A small flow whose zero-initialised spline heads are set to random values (not the identity)."""
    torch.manual_seed(seed)
    sizes = {"n_blocks": 2, "egnn_layers": 2, "width": 16, "n_features": 16, "n_bins": 4, **kw}
    f = EACFFlow(n, d, **sizes).to(D64)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in f.named_parameters():
            if "head.out" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=D64) * scale)
    return f


def _rotation(d: int, g: torch.Generator) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=D64))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _transform(f: EACFFlow, v: Tensor, rot: Tensor, shift: Tensor, perm: Tensor) -> Tensor:
    z = f._to_joint(v) @ rot.T + shift
    return f._to_flat(z[:, perm])


LAYOUTS = [(4, 2), (4, 3)]


# ------------------------------------------------------------------------------------------------ splines
@pytest.mark.parametrize("boundary,lo,hi", [("unconstrained", 0.0, 10.0), ("circular", -math.pi, math.pi)])
def test_spline_round_trip_logdet_identity_and_tails(boundary: str, lo: float, hi: float) -> None:
    g = torch.Generator().manual_seed(0)
    params = torch.randn(6, 5, 25, generator=g, dtype=D64) * 1.5
    knots = rq_knots(params, lo, hi, boundary)  # type: ignore[arg-type]
    x = lo + (hi - lo) * (torch.rand(6, 5, generator=g, dtype=D64) * 1.4 - 0.2)  # 20 % outside on each side
    y, ld = rq_spline(x, knots)
    xb, ldi = rq_spline(y, knots, inverse=True)
    torch.testing.assert_close(xb, x, atol=1e-9, rtol=0)
    torch.testing.assert_close(ld, -ldi, atol=1e-9, rtol=0)
    xg = x.clone().requires_grad_(True)
    (dy,) = torch.autograd.grad(rq_spline(xg, knots)[0].sum(), xg)
    torch.testing.assert_close(ld, dy.log(), atol=1e-10, rtol=0)
    # end knots fixed, linear tails with the end slopes, monotone
    assert torch.equal(knots.y[..., 0], knots.x[..., 0])
    assert torch.allclose(knots.y[..., -1], knots.x[..., -1])
    out = x > hi
    torch.testing.assert_close(y[out], hi + (x[out] - hi) * knots.slope[..., -1][out])
    xs = torch.linspace(lo, hi, 200, dtype=D64).expand(6, 5, 200).permute(2, 0, 1)
    ys = torch.stack([rq_spline(r, knots)[0] for r in xs])
    assert bool((ys.diff(dim=0) > 0).all())
    if boundary == "circular":
        assert torch.equal(knots.slope[..., 0], knots.slope[..., -1])
    y0, l0 = rq_spline(x, rq_knots(torch.zeros_like(params), lo, hi, boundary))  # type: ignore[arg-type]
    torch.testing.assert_close(y0, x, atol=1e-12, rtol=0)
    assert float(l0.abs().max()) < 1e-12


# --------------------------------------------------------------------------------------------------- the flow
@pytest.mark.parametrize("n,d", LAYOUTS)
def test_log_q_invariant_and_sampling_map_equivariant(n: int, d: int) -> None:
    f = _flow(n, d)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        v, lq = f.sample_and_log_prob(16, g)
        torch.testing.assert_close(f.log_prob(v), lq, atol=1e-9, rtol=0)
    for _ in range(3):
        rot, perm = _rotation(d, g), torch.randperm(n, generator=g)
        shift = torch.randn(1, 1, 1, d, generator=g, dtype=D64) * 3
        torch.testing.assert_close(f.log_prob(_transform(f, v, rot, shift, perm)), lq, atol=1e-5, rtol=1e-7)
    # reflections are not symmetries of the published (SE(3)) flow
    refl = torch.eye(d, dtype=D64)
    refl[0, 0] = -1
    ident = torch.arange(n)
    reflected = f.log_prob(_transform(f, v, refl, torch.zeros(d, dtype=D64), ident)).detach()
    assert float((reflected - lq).abs().max()) > 1e-3
    # the map base -> data commutes with rotations and permutations of the base sample; x stays centred
    z0 = f._to_joint(v)
    rot, perm = _rotation(d, g), torch.randperm(n, generator=g)

    def push(z: Tensor) -> Tensor:
        for layer in f.layers:
            z = layer(z)[0]
        return z

    torch.testing.assert_close(push((z0 @ rot.T)[:, perm]), (push(z0) @ rot.T)[:, perm], atol=1e-8, rtol=1e-8)
    x = f.split(v)[0].reshape(-1, n, d)
    assert float(x.mean(1).abs().max()) < 1e-12


@pytest.mark.parametrize("n,d", LAYOUTS)
def test_exactly_invertible(n: int, d: int) -> None:
    f = _flow(n, d)
    with torch.no_grad():
        v, _ = f.sample_and_log_prob(32, torch.Generator().manual_seed(1))
    z = z0 = f._to_joint(v)
    ld_inv = torch.zeros(32, dtype=D64)
    for layer in reversed(f.layers):
        z, ld, _ = layer(z, inverse=True)
        ld_inv = ld_inv + ld
    base = z
    ld_fwd = torch.zeros(32, dtype=D64)
    for layer in f.layers:
        z, ld, _ = layer(z)
        ld_fwd = ld_fwd + ld
    torch.testing.assert_close(z, z0, atol=1e-10, rtol=0)
    torch.testing.assert_close(ld_fwd, -ld_inv, atol=1e-9, rtol=0)
    assert float((base - z0).detach().abs().max()) > 1e-2  # not the identity


def _slice_coords(z: Tensor) -> Tensor:
    """Coordinates of the centred-x slice: x of the first n − 1 particles and all of a (z [n, 2, d])."""
    return torch.cat([z[:-1, 0].reshape(-1), z[:, 1].reshape(-1)])


def _from_slice(u: Tensor, n: int, d: int) -> Tensor:
    x = u[: (n - 1) * d].reshape(n - 1, d)
    x = torch.cat([x, -x.sum(0, keepdim=True)])
    return torch.stack([x, u[(n - 1) * d :].reshape(n, d)], dim=1)


@pytest.mark.parametrize("n,d", [(3, 2), (3, 3)])
def test_log_det_matches_autograd_jacobian(n: int, d: int) -> None:
    f = _flow(n, d, n_blocks=1)
    v, lq = f.sample_and_log_prob(3, torch.Generator().manual_seed(2))
    zb = f._to_joint(v)
    for i in range(3):
        for layer in f.layers:  # each coupling (a | x and x | a) as a map of the slice to itself
            z = zb[i]
            J = torch.autograd.functional.jacobian(
                lambda u, lay=layer: _slice_coords(lay(_from_slice(u, n, d).unsqueeze(0))[0][0]),
                _slice_coords(z),
            )
            ld = layer(z.unsqueeze(0))[1][0]
            torch.testing.assert_close(torch.linalg.slogdet(J)[1], ld, atol=1e-9, rtol=0)
        # whole flow: log q(v) = log q0(f⁻¹(v)) + log|det ∂f⁻¹/∂v| on the slice
        def inv(u: Tensor) -> Tensor:
            z = _from_slice(u, n, d).unsqueeze(0)
            for layer in reversed(f.layers):
                z = layer(z, inverse=True)[0]
            return _slice_coords(z[0])

        u = _slice_coords(zb[i])
        ldj = torch.linalg.slogdet(torch.autograd.functional.jacobian(inv, u))[1]
        zbase = _from_slice(inv(u), n, d).unsqueeze(0)
        torch.testing.assert_close(f.base_log_prob(zbase)[0] + ldj, lq[i], atol=1e-8, rtol=0)


def test_base_normalised_on_the_slice() -> None:
    # q0(x, a) over the (n−1)d + nd dimensional slice: the x part's log-density at x = 0, a = x is that of a
    # standard normal in (n−1)d dimensions times N(0, 0.1² I) in nd dimensions
    f = _flow(4, 2)
    z = torch.zeros(1, 4, 2, 2, dtype=D64)
    expect = -0.5 * 6 * math.log(2 * math.pi) - 8 * math.log(0.1) - 0.5 * 8 * math.log(2 * math.pi)
    assert float(f.base_log_prob(z)[0]) == pytest.approx(expect, abs=1e-12)


def test_marginal_estimator_consistent_as_k_grows() -> None:
    # identity flow: q(x, a) = q0(x) π(a|x), so every K gives log q0(x) exactly
    torch.manual_seed(0)
    f0 = EACFFlow(4, 2, n_blocks=1, egnn_layers=1, width=8, n_features=8, n_bins=3).to(D64)
    g = torch.Generator().manual_seed(5)
    v, lq = f0.sample_and_log_prob(8, g)
    x, a = f0.split(v)
    exact = lq - f0.aux_log_prob(x, a)
    for k in (1, 7):
        torch.testing.assert_close(f0.marginal_log_prob(x, k, g), exact, atol=1e-10, rtol=0)
    # a flow whose q(a | x) differs from π(a | x): the estimate is biased low, its bias and spread shrink as
    # K grows, and the averages of q̂ (not log q̂) over replicates agree with q for every K (unbiasedness)
    f = _flow(4, 2, scale=0.05, n_blocks=1)
    v, _ = f.sample_and_log_prob(2, g)
    x = f.split(v)[0]
    reps, ks = 32, (1, 4, 16, 64)
    with torch.no_grad():
        ref = f.marginal_log_prob(x, 1000, g)
        est = {k: f.marginal_log_prob(x.repeat(reps, 1), k, g).view(reps, 2) for k in ks}
    bias = [float((est[k].mean(0) - ref).mean()) for k in ks]
    spread = [float(est[k].std(0).mean()) for k in ks]
    assert bias[0] < bias[1] < bias[2] < 0.02 and abs(bias[3]) < 0.05 and bias[0] < -0.1
    assert spread[0] > spread[1] > spread[2] > spread[3]
    for k in ks[1:]:
        lme = torch.logsumexp(est[k], 0) - math.log(reps)
        assert float((lme - ref).abs().max()) < 0.2, k


# -------------------------------------------------------------------------------------------------- with FAB
class CoGGaussian(ParticleTarget):
    """E(x) = |x − x̄|²/2: the x part of the EACF base (4 particles in 2-D); log Z = (n−1)d/2 · log 2π."""

    name = "coggauss"
    display_name = "CoG Gaussian"
    n_particles, spatial_dim = 4, 2

    def _energy(self, x: Tensor) -> Tensor:
        return 0.5 * (self.center(x) ** 2).sum(-1)


def test_augmented_target_energy_gradient_and_counting() -> None:
    ct = CountingTarget(CoGGaussian())
    f = _flow(4, 2)
    at = AugmentedTarget(ct, f)
    v = f.sample(5, torch.Generator().manual_seed(0))
    e, gr = at.energy_and_grad(v)
    vg = v.clone().requires_grad_(True)
    x, a = f.split(vg)
    e_ref = 0.5 * (CoGGaussian().center(x) ** 2).sum(-1) - f.aux_log_prob(x, a)
    (g_ref,) = torch.autograd.grad(e_ref.sum(), vg)
    torch.testing.assert_close(e, e_ref.detach())
    torch.testing.assert_close(gr, g_ref)
    assert (ct.usage.energy_evals, ct.usage.grad_evals) == (5, 5)
    torch.testing.assert_close(at.energy(vg), e)  # no graph: one more evaluation per row, no gradient counted
    assert (ct.usage.energy_evals, ct.usage.grad_evals) == (10, 5)


def _fab(**over: object) -> tuple[FAB, CountingTarget]:
    ct = CountingTarget(CoGGaussian())
    base = {**FABConfig.PER_TARGET["dw4"], "dtype": "float64", "eacf_blocks": 1, "eacf_egnn_layers": 1,
            "eacf_hidden": 8, "eacf_features": 8, "spline_bins": 3, "batch_size": 16, "buffer_min": 32,
            "buffer_max": 128, "diag_samples": 64, "marginal_k": 3, "diag_marginal_samples": 16}
    cfg = FABConfig(**{**base, **over})  # type: ignore[arg-type]
    return FAB(ct, cfg, torch.device("cpu"), torch.Generator().manual_seed(0)), ct


def test_fab_weights_exact_when_flow_equals_target_and_samples_are_x_only() -> None:
    # the identity-initialised EACF is q0(x) π(a|x) and p(x)π(a|x) has the same shape: joint and marginal
    # weights are constant (ESS 1) and both log Z estimates are exact
    m, ct = _fab()
    d = m.diagnostics()
    log_z = 0.5 * 6 * math.log(2 * math.pi)
    assert d["ess"] == pytest.approx(1.0, abs=1e-10) and d["ess_marginal"] == pytest.approx(1.0, abs=1e-10)
    assert d["log_z"] == pytest.approx(log_z, abs=1e-9)
    assert d["log_z_marginal"] == pytest.approx(log_z, abs=1e-9)
    assert ct.usage.energy_evals == 64  # the marginal weights reuse the joint evaluations
    for _ in range(3):
        m.train_step()
    assert m.buffer is not None and m.buffer.x.shape[1] == 16  # joint (x, a) in the buffer
    x = m.sample(10)
    assert x.shape == (10, 8)
    torch.testing.assert_close(x.reshape(10, 4, 2).mean(1), torch.zeros(10, 2), atol=1e-6, rtol=0)
    # AIS keeps x centred in the joint chains (projected momenta)
    xb = m.buffer.x[: m.buffer.length, :8].reshape(-1, 4, 2)
    assert float(xb.mean(1).abs().max()) < 1e-10


def test_lr_schedule_and_dynamic_clipping() -> None:
    m, _ = _fab(lr_warmup_steps=10, lr_total_steps=30)
    c = m.config
    lrs = []
    for t in (0, 5, 10, 20, 30, 40):
        m.n_opt_steps = t
        lrs.append(m._lr())
    assert lrs[0] == pytest.approx(c.lr_init) and lrs[1] == pytest.approx((c.lr_init + c.lr) / 2)
    assert lrs[2] == pytest.approx(c.lr) and lrs[3] == pytest.approx((c.lr + c.lr_end) / 2)
    assert lrs[4] == pytest.approx(c.lr_end) and lrs[5] == pytest.approx(c.lr_end)
    m.n_opt_steps = 0
    # a window with median 1: a gradient of norm 5 is clipped to 2, one of norm 20 is skipped (10 × median)
    p = next(m.flow.parameters())
    for norm, taken in ((5.0, True), (20.0, False)):
        m.grad_norms = torch.ones(c.dyn_window, dtype=D64)
        before = [q.detach().clone() for q in m.flow.parameters()]
        direction = torch.randn(p.shape, generator=torch.Generator().manual_seed(0), dtype=D64)
        direction = direction / direction.norm()
        loss = (p * direction).sum() * norm  # gradient norm `norm` (loss small: no rescaling)
        _, ok = m._optimise(loss * 1e-3 / 1e-3)
        assert ok is taken and float(m.grad_norms[-1]) == pytest.approx(norm)
        moved = any(not torch.equal(q, b) for q, b in zip(m.flow.parameters(), before))
        assert moved is taken
    # the clipped step: Adam's first step moves each coordinate by lr·sign(g) regardless of the scale, so
    # check the gradient Adam saw instead
    m2, _ = _fab()
    m2.grad_norms = torch.ones(c.dyn_window, dtype=D64)
    p2 = next(m2.flow.parameters())
    seen: list[float] = []
    m2.optimizer.step = lambda *a, **k: seen.append(float(p2.grad.norm()))  # type: ignore[method-assign]
    m2._optimise((p2 * direction).sum() * 5.0)
    assert seen[0] == pytest.approx(2.0)
