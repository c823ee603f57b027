"""The fast iDEM estimator (cache-sized sub-blocks, coordinate-plane kernels, finite-sum gate) against a
direct, obviously-correct implementation: S_K(x, t) = ∇_x log (1/K) Σ_k exp(−E(x + σ ε_k)) by autograd
through ``logsumexp`` of energies written the plain way (DEM's ``estimate_grad_Rt``), on the same noise draws;
plus the non-finite fallback, counting, layouts and a seeded short iDEM run with the direct estimator swapped
in."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import methods.idem as idem_mod
import targets
from harness.budget import CountingTarget
from methods.idem import IDEM, Config, mc_score_estimate
from targets.gmm import gmm40_means

ALL = ("gmm40", "dw4", "lj13", "lj55")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def plain_energy(name: str, x: Tensor) -> Tensor:
    """E(x) [N] for x [N, D], written directly from the definitions (all ordered pairs, no tricks)."""
    if name == "gmm40":
        mu = gmm40_means().to(x)
        s = math.log1p(math.e)  # softplus(1)
        logn = -((x[:, None, :] - mu) ** 2).sum(-1) / (2 * s * s) - math.log(2 * math.pi * s * s)
        return -(torch.logsumexp(logn, -1) - math.log(40))
    t = targets.get(name)
    p = x.reshape(x.shape[0], t.n_particles, t.spatial_dim)
    diff = p[:, :, None, :] - p[:, None, :, :]
    mask = ~torch.eye(t.n_particles, dtype=torch.bool)
    if name == "dw4":
        d = diff.pow(2).sum(-1)[:, mask].sqrt()
        return 0.5 * (0.9 * (d - 4) ** 4 - 4 * (d - 4) ** 2).sum(-1)
    r = (diff.pow(2).sum(-1)[:, mask] + 1e-6).sqrt()
    c = p - p.mean(1, keepdim=True)
    return (r**-12 - 2 * r**-6).sum(-1) + 0.5 * c.pow(2).sum((-1, -2))


def direct_estimate(name: str, x: Tensor, sigma: Tensor, K: int, gen: torch.Generator,
                    chunk_rows: int = 131_072) -> Tensor:
    """The published estimator, one row at a time: ∇_x [logsumexp_k(−E(x + σ ε_k)) − log K], with the noise
    drawn as the method draws it (blocks of ``chunk_rows // K`` rows, ε [rows, K, D])."""
    B, D = x.shape
    rows = max(1, chunk_rows // K)
    out = []
    for i in range(0, B, rows):
        eps = torch.randn(min(rows, B - i), K, D, generator=gen, dtype=x.dtype)
        for b in range(eps.shape[0]):
            xb = x[i + b].detach().clone().requires_grad_(True)
            y = xb + sigma[i + b] * eps[b]
            lse = torch.logsumexp(-plain_energy(name, y), 0) - math.log(K)
            (g,) = torch.autograd.grad(lse, xb)
            out.append(g)
    return torch.stack(out)


def _inputs(name: str, B: int, dtype: torch.dtype, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Noised configurations x_t [B, D] (near typical iDEM inputs) and noise levels σ [B]."""
    t = targets.get(name)
    g = torch.Generator().manual_seed(seed)
    if name == "gmm40":
        x = 30 * torch.randn(B, 2, generator=g, dtype=dtype)
        return x, 5 * torch.rand(B, generator=g, dtype=dtype) + 0.5
    if name == "dw4":
        x = t.center(2.0 * torch.randn(B, t.dim, generator=g, dtype=dtype))
        return x, 0.8 * torch.rand(B, generator=g, dtype=dtype) + 0.1
    n = t.n_particles
    side = math.ceil(n ** (1 / 3))
    axes = [torch.arange(side, dtype=dtype)] * 3
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)[:n]
    x = 1.12 * grid + 0.05 * torch.randn(B, n, 3, generator=g, dtype=dtype)
    return t.center(x.reshape(B, -1)), 0.02 * torch.rand(B, generator=g, dtype=dtype) + 0.01


def _fast(name: str, x: Tensor, sigma: Tensor, K: int, gen: torch.Generator, **kw) -> Tensor:
    t = targets.get(name)
    kw.setdefault("sub_rows", getattr(t, "kernel_chunk", 8192))
    kw.setdefault("planar", getattr(t, "planar_kernel", False))
    return mc_score_estimate(t.energy_and_grad, x, sigma, K, gen, **kw)


@pytest.mark.parametrize("name", ALL)
def test_fast_estimator_equals_direct_autograd_estimator_float64(name):
    K = 48 if name != "lj55" else 12
    x, sigma = _inputs(name, 7, torch.float64)
    # chunk_rows 3·K: several noise blocks, the last one short; sub-blocks of 2 rows inside each
    a = _fast(name, x, sigma, K, torch.Generator().manual_seed(3), chunk_rows=3 * K, sub_rows=2 * K)
    b = direct_estimate(name, x, sigma, K, torch.Generator().manual_seed(3), chunk_rows=3 * K)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * float(b.abs().max()))


@pytest.mark.parametrize("name", ALL)
def test_fast_estimator_float32_within_rounding_of_the_float64_direct_one(name):
    K = 64 if name != "lj55" else 16
    x, sigma = _inputs(name, 9, torch.float64, seed=1)
    a = _fast(name, x.float(), sigma.float(), K, torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    # the float32 noise, evaluated in float64: only the arithmetic differs
    eps = torch.randn(9, K, x.shape[1], generator=gen)
    y = (x.float()[:, None] + sigma.float()[:, None, None] * eps).double()
    e = plain_energy(name, y.reshape(-1, x.shape[1])).reshape(9, K)
    yy = y.reshape(-1, x.shape[1]).requires_grad_(True)
    (g,) = torch.autograd.grad(plain_energy(name, yy).sum(), yy)
    b = -(torch.softmax(-e, 1)[..., None] * g.reshape(9, K, -1)).sum(1)
    scale = float(b.norm(dim=-1).max())
    assert float((a.double() - b).norm(dim=-1).max()) < 2e-4 * scale


@pytest.mark.parametrize("name", ["gmm40", "dw4"])
def test_sub_block_size_and_layout_do_not_change_the_result(name):
    K = 40
    x, sigma = _inputs(name, 11, torch.float32, seed=2)
    ref = _fast(name, x, sigma, K, torch.Generator().manual_seed(5), sub_rows=10**9, planar=False)
    for sub in (K, 3 * K, 8192):
        for planar in (False, True):
            got = _fast(name, x, sigma, K, torch.Generator().manual_seed(5), sub_rows=sub, planar=planar)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_non_finite_perturbations_take_the_masked_path_only_where_needed():
    """Rows with an infinite energy or a NaN gradient among their K perturbations: those perturbations get
    weight 0; other sub-blocks keep the fast path; the answer equals the masked formula everywhere."""
    K, D = 6, 3
    x = torch.randn(8, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((8,), 0.7, dtype=torch.float64)

    def eg(y: Tensor) -> tuple[Tensor, Tensor]:
        e = (y**2).sum(-1) / 2
        g = y.clone()
        bad = y[:, 0] > 1.2  # data-dependent: some perturbations of some rows only
        e[bad] = torch.inf
        g[(y[:, 1] > 1.5) & ~bad] = torch.nan
        return e, g

    got = mc_score_estimate(eg, x, sigma, K, torch.Generator().manual_seed(1), sub_rows=2 * K)
    eps = torch.randn(8, K, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = x[:, None] + sigma[:, None, None] * eps
    e, g = eg(y.reshape(-1, D))
    e, g = e.reshape(8, K), g.reshape(8, K, D)
    ok = torch.isfinite(e) & torch.isfinite(g).all(-1)
    assert not ok.all() and ok.any(1).all()  # the case is exercised
    w = torch.softmax(torch.where(ok, -e, -torch.inf), 1)
    want = -(w[..., None] * torch.where(ok[..., None], g, 0.0)).sum(1)
    torch.testing.assert_close(got, want)


def test_counts_b_times_k_through_the_counting_target_on_the_planar_path():
    ct = CountingTarget(targets.get("dw4"))
    x, sigma = _inputs("dw4", 13, torch.float32)
    mc_score_estimate(ct.energy_and_grad, x, sigma, 100, torch.Generator().manual_seed(0), chunk_rows=500,
                      sub_rows=300, planar=True)
    assert ct.usage.grad_evals == ct.usage.energy_evals == 13 * 100


def test_planar_kernel_outputs_follow_the_input_layout():
    for name in ("gmm40", "dw4"):
        t = targets.get(name)
        x, _ = _inputs(name, 50, torch.float32)
        e, g = t.energy_and_grad(x)
        ep, gp = t.energy_and_grad(x.t().contiguous().t())
        assert g.is_contiguous() and gp.t().is_contiguous()
        assert torch.equal(e, ep) and torch.equal(g, gp)


@pytest.mark.parametrize("name", ["gmm40", "dw4"])
def test_seeded_short_run_with_the_direct_estimator_swapped_in_is_unchanged(name, monkeypatch):
    """Three optimiser steps of a small iDEM on the same seed, once as shipped and once with the estimator
    replaced by the direct implementation above (same float32 draws): losses and network agree to rounding."""

    def run() -> tuple[list[float], Tensor]:
        cfg = Config.for_target(name).replace(hidden=16, n_layers=2, num_mc_samples=32, batch_size=24,
                                              init_from_prior=True, num_init_samples=64)
        m = IDEM(CountingTarget(targets.get(name)), cfg, "cpu", torch.Generator().manual_seed(7))
        losses = [m.train_step()["loss"] for _ in range(3)]
        return losses, torch.cat([p.detach().reshape(-1) for p in m.net.parameters()])

    fast_losses, fast_params = run()

    # the direct estimator on the method's float32 draws (ε drawn as the method draws it), in float64
    def direct32(energy_and_grad, x_t, sigma, n_samples, generator=None, chunk_rows=131_072, *args, **kw):
        scale = targets.get(name).length_scale if name == "gmm40" else 1.0
        B, D = x_t.shape
        rows = max(1, chunk_rows // n_samples)
        out = []
        for i in range(0, B, rows):
            eps = torch.randn(min(rows, B - i), n_samples, D, generator=generator, dtype=x_t.dtype)
            for b in range(eps.shape[0]):
                with torch.enable_grad():  # the method calls the estimator under no_grad
                    xb = x_t[i + b].double().clone().requires_grad_(True)
                    y = (xb + sigma[i + b].double() * eps[b].double()) * scale
                    lse = torch.logsumexp(-plain_energy(name, y), 0)
                    out.append(torch.autograd.grad(lse, xb)[0])
        return torch.stack(out).to(x_t.dtype)

    monkeypatch.setattr(idem_mod, "mc_score_estimate", direct32)
    ref_losses, ref_params = run()
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fast_params, ref_params, rtol=1e-4, atol=1e-6)


def test_check_input_finiteness_gate_is_exact():
    """The one-pass sum gate of ``check_input``: any NaN/inf raises (rows or planes), huge finite values whose
    sum overflows do not."""
    t = targets.get("dw4")
    x = torch.randn(40, 8)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for layout in (x, x.t().contiguous().t()):
            y = layout.clone() if layout.is_contiguous() else layout.t().clone().t()
            y[17, 3] = bad
            with pytest.raises(targets.NonFiniteInputError):
                t.energy_and_grad(y)
    big = torch.full((4, 8), 3e38)  # the sum overflows to inf; every entry is finite
    assert t.check_input(big) is big
