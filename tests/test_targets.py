"""Targets: exact energies (closed forms, independent straightforward formulations), gradients, Laplacians,
invariances, batch consistency, dtypes and input validation."""

from __future__ import annotations

import math

import pytest
import torch

import targets
from targets.base import NonFiniteInputError, ParticleTarget
from targets.gmm import gmm40_means

ALL = ["gmm40", "dw4", "lj13", "lj55"]
PARTICLES = ["dw4", "lj13", "lj55"]


def sample_configs(name: str, B: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """Plausible configurations: perturbed lattices for LJ (no overlapping particles), Gaussians otherwise."""
    t = targets.get(name)
    g = torch.Generator().manual_seed(seed)
    if name == "gmm40":
        return 30 * torch.randn(B, 2, generator=g, dtype=dtype)
    if name == "dw4":
        return t.center(2.0 * torch.randn(B, t.dim, generator=g, dtype=dtype))
    n = t.n_particles
    side = math.ceil(n ** (1 / 3))
    axes = [torch.arange(side, dtype=dtype)] * 3
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    idx = torch.rand(B, grid.shape[0], generator=g).argsort(-1)[:, :n]
    x = 1.12 * grid[idx] + 0.08 * torch.randn(B, n, 3, generator=g, dtype=dtype)
    return t.center(x.reshape(B, -1))


# ------------------------------------------------------------------ independent straightforward energies
def naive_energy(name: str, x: torch.Tensor) -> torch.Tensor:
    """The definitions of the issue, written the obvious way (all ordered pairs, sqrt, no tricks)."""
    t = targets.get(name)
    if name == "gmm40":
        mu = gmm40_means().to(x)
        s = math.log1p(math.e)  # softplus(1)
        logn = -((x[:, None, :] - mu) ** 2).sum(-1) / (2 * s * s) - math.log(2 * math.pi * s * s)
        return -(torch.logsumexp(logn, -1) - math.log(40))
    p = x.reshape(x.shape[0], t.n_particles, t.spatial_dim)
    diff = p[:, :, None, :] - p[:, None, :, :]
    mask = ~torch.eye(t.n_particles, dtype=torch.bool)
    if name == "dw4":
        d = diff.pow(2).sum(-1)[:, mask].sqrt()
        return 0.5 * (0.9 * (d - 4) ** 4 - 4 * (d - 4) ** 2).sum(-1)  # ordered pairs / 2
    r = (diff.pow(2).sum(-1)[:, mask] + 1e-6).sqrt()
    lj = (r**-12 - 2 * r**-6).sum(-1)  # ordered pairs = 2 × i<j
    return lj + 0.5 * (p - p.mean(1, keepdim=True)).pow(2).sum((1, 2))


def test_registry_names_and_unknown():
    assert sorted(targets.names()) == sorted(ALL)
    with pytest.raises(KeyError, match="valid targets: ") as err:
        targets.get("lj38")
    assert all(n in str(err.value) for n in ALL)
    for name in ALL:
        t = targets.get(name)
        assert t.name == name and t.dim == {"gmm40": 2, "dw4": 8, "lj13": 39, "lj55": 165}[name]
    assert [targets.get(n).display_name for n in ALL] == ["GMM-40", "DW-4", "LJ-13", "LJ-55"]


# ------------------------------------------------------------------ closed forms
def test_lj_pair_at_unit_distance():
    """Two particles at r = 1, all others 1000 apart: LJ part = 2·(u^-6 − 2u^-3), u = 1 + 1e-6 (≈ −2)."""
    t = targets.get("lj13")
    p = torch.zeros(13, 3, dtype=torch.float64)
    p[1, 0] = 1.0
    for k in range(2, 13):
        p[k] = torch.tensor([1000.0 * k, -700.0 * k, 300.0 * k * (k % 3)])
    x = p.reshape(1, -1)
    osc = 0.5 * (p - p.mean(0)).pow(2).sum()
    u = 1 + 1e-6
    expected = 2 * (u**-6 - 2 * u**-3)
    lj = (t.energy(x) - osc).item()
    assert lj == pytest.approx(expected, abs=1e-7)
    assert lj == pytest.approx(-2.0, abs=1e-5)


def test_lj_minimum_of_pair_is_at_unit_distance():
    t = targets.get("lj13")
    p = torch.zeros(13, 3, dtype=torch.float64)
    for k in range(2, 13):
        p[k] = torch.tensor([1000.0 * k, -700.0 * k, 300.0 * k * (k % 3)])

    def lj_of(r):
        q = p.clone()
        q[1, 0] = r
        return (t.energy(q.reshape(1, -1)) - 0.5 * (q - q.mean(0)).pow(2).sum()).item()

    rs = torch.linspace(0.9, 1.1, 201, dtype=torch.float64)
    vals = torch.tensor([lj_of(r.item()) for r in rs])
    assert abs(rs[vals.argmin()].item() - 1.0) < 1e-3


def test_dw_pair_at_d4_is_zero():
    """Square of side 4: four pairs at d = 4 contribute 0; the diagonals give 2 φ(4√2)."""
    t = targets.get("dw4")
    x = torch.tensor([[0.0, 0.0, 4.0, 0.0, 4.0, 4.0, 0.0, 4.0]], dtype=torch.float64)
    u = 4 * math.sqrt(2) - 4
    assert t.energy(x).item() == pytest.approx(2 * (0.9 * u**4 - 4 * u**2), abs=1e-12)
    # a collinear pair arrangement: particles 0-1 at d = 4 and everything else at the two minima
    dmin = 4 + math.sqrt(4 / 1.8)  # φ'(d) = 0 away from 4
    phi_min = 0.9 * (dmin - 4) ** 4 - 4 * (dmin - 4) ** 2
    assert phi_min == pytest.approx(-4.0**2 / (4 * 0.9))


def test_gmm_means_and_normalisation():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ref = (torch.rand(40, 2) - 0.5) * 2 * 40
    t = targets.get("gmm40")
    assert torch.equal(t.means.float(), ref)
    assert t.std == pytest.approx(math.log1p(math.e))
    h = 0.4  # Riemann sums of Gaussians (s = 1.31) converge spectrally: h = 0.4 is exact to ~1e-12
    ax = torch.arange(-70, 70, h, dtype=torch.float64) + h / 2
    X, Y = torch.meshgrid(ax, ax, indexing="ij")
    pts = torch.stack([X.flatten(), Y.flatten()], -1)
    mass = sum(torch.exp(t.log_prob(c)).sum().item() for c in pts.split(100_000)) * h * h
    assert mass == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------------------------ energies and gradients
@pytest.mark.parametrize("name", ALL)
def test_energy_matches_straightforward_definition(name):
    x = sample_configs(name, 16)
    t = targets.get(name)
    torch.testing.assert_close(t.energy(x), naive_energy(name, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ALL)
def test_energy_and_grad_vs_autograd_of_straightforward(name):
    x = sample_configs(name, 16).requires_grad_(True)
    e_ref = naive_energy(name, x)
    (g_ref,) = torch.autograd.grad(e_ref.sum(), x)
    e, g = targets.get(name).energy_and_grad(x.detach())
    torch.testing.assert_close(e, e_ref.detach(), rtol=1e-6, atol=0)
    rel = (g - g_ref).norm(dim=-1) / g_ref.norm(dim=-1)
    assert rel.max() < 1e-6


@pytest.mark.parametrize("name", ALL)
def test_gradient_vs_finite_differences(name):
    t = targets.get(name)
    x = sample_configs(name, 2)
    _, g = t.energy_and_grad(x)
    h = 1e-6
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        fd = (t.energy(x + h * v) - t.energy(x - h * v)) / (2 * h)
        torch.testing.assert_close((g * v).sum(-1), fd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_differentiable_energy_agrees_with_analytic_gradient(name):
    t = targets.get(name)
    x = sample_configs(name, 8).requires_grad_(True)
    (g,) = torch.autograd.grad(t.energy(x).sum(), x)
    torch.testing.assert_close(g, t.energy_and_grad(x.detach())[1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ALL)
def test_laplacian_vs_autograd_hessian_trace(name):
    t = targets.get(name)
    x = sample_configs(name, 4).requires_grad_(True)
    (g,) = torch.autograd.grad(naive_energy(name, x).sum(), x, create_graph=True)
    tr = sum(torch.autograd.grad(g[:, k].sum(), x, retain_graph=True)[0][:, k] for k in range(x.shape[1]))
    torch.testing.assert_close(t.laplacian(x.detach()), tr.detach(), rtol=1e-8, atol=1e-8)


def test_score_and_log_prob_signs():
    t = targets.get("lj13")
    x = sample_configs("lj13", 3)
    torch.testing.assert_close(t.log_prob(x), -t.energy(x))
    torch.testing.assert_close(t.score(x), -t.energy_and_grad(x)[1])


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_consistency_and_dtype(name, dtype):
    t = targets.get(name)
    x = sample_configs(name, 70, dtype=dtype)  # > LJ-55 chunk size: crosses chunk boundaries
    e = t.energy(x)
    e2, g2 = t.energy_and_grad(x)
    assert e.dtype == dtype and e.shape == (70,) and g2.shape == x.shape and g2.dtype == dtype
    rtol = 1e-6 if dtype == torch.float32 else 1e-12
    for i in (0, 33, 69):
        torch.testing.assert_close(t.energy(x[i : i + 1]), e[i : i + 1], rtol=rtol, atol=0)
        ei, gi = t.energy_and_grad(x[i : i + 1])
        torch.testing.assert_close(ei, e2[i : i + 1], rtol=rtol, atol=0)
        torch.testing.assert_close(gi, g2[i : i + 1], rtol=rtol, atol=rtol)
    torch.testing.assert_close(e, e2, rtol=rtol, atol=0)


@pytest.mark.parametrize("name", PARTICLES)
def test_float32_accuracy_on_physical_configurations(name):
    t = targets.get(name)
    x = sample_configs(name, 64)
    e64, g64 = t.energy_and_grad(x)
    e32, g32 = t.energy_and_grad(x.float())
    # no worse than the straightforward formulation evaluated in float32 (rounding of the pair sum)
    e_naive32 = naive_energy(name, x.float()).double()
    err, err_naive = (e32.double() - e64).abs().max(), (e_naive32 - e64).abs().max()
    assert err <= 4 * err_naive + 1e-6 * e64.abs().max()
    assert ((g32.double() - g64).norm(dim=-1) / g64.norm(dim=-1)).max() < 1e-5


@pytest.mark.parametrize("name", PARTICLES)
def test_particle_invariances(name):
    t: ParticleTarget = targets.get(name)
    x = sample_configs(name, 8)
    gen = torch.Generator().manual_seed(3)
    D, n = t.spatial_dim, t.n_particles
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))  # rotation or reflection
    p = t.as_particles(x)
    e = t.energy(x)
    rot = (p @ Q.T).reshape(x.shape)
    shift = (p + 5 * torch.randn(1, 1, D, generator=gen, dtype=torch.float64)).reshape(x.shape)
    perm = p[:, torch.randperm(n, generator=gen)].reshape(x.shape)
    for y in (rot, shift, perm):
        torch.testing.assert_close(t.energy(y), e, rtol=1e-10, atol=1e-10)
    # gradients are equivariant: ∇E(Qx) = Q ∇E(x)
    g = t.as_particles(t.energy_and_grad(x)[1])
    g_rot = t.as_particles(t.energy_and_grad(rot)[1])
    torch.testing.assert_close(g_rot, g @ Q.T, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", PARTICLES)
def test_interatomic_distances_and_centering(name):
    t = targets.get(name)
    x = sample_configs(name, 5) + 3.0
    d = t.interatomic_distances(x)
    p = t.as_particles(x)
    iu = torch.triu_indices(t.n_particles, t.n_particles, 1)
    ref = torch.cdist(p, p)[:, iu[0], iu[1]]
    assert d.shape == (5, t.n_particles * (t.n_particles - 1) // 2)
    torch.testing.assert_close(d, ref)
    c = t.as_particles(t.center(x))
    assert c.mean(1).abs().max() < 1e-12
    assert t.n_dof == (t.n_particles - 1) * t.spatial_dim


@pytest.mark.parametrize("name", ALL)
def test_bad_input(name):
    t = targets.get(name)
    with pytest.raises(ValueError, match=r"expected shape \[batch, "):
        t.energy(torch.zeros(3, t.dim + 1))
    with pytest.raises(ValueError, match="shape"):
        t.energy(torch.zeros(t.dim))
    with pytest.raises(ValueError, match="floating"):
        t.energy(torch.zeros(2, t.dim, dtype=torch.int64))
    with pytest.raises(ValueError, match="torch.Tensor"):
        t.energy([[0.0] * t.dim])
    x = sample_configs(name, 2)
    x[1, 0] = float("nan")
    with pytest.raises(NonFiniteInputError, match="NaN or inf"):
        t.energy_and_grad(x)
    x[1, 0] = float("inf")
    with pytest.raises(NonFiniteInputError):
        t.energy(x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ALL)
def test_cuda_matches_cpu(name):
    t = targets.get(name)
    x = sample_configs(name, 64)
    e, g = t.energy_and_grad(x)
    ec, gc = t.energy_and_grad(x.cuda())
    torch.testing.assert_close(ec.cpu(), e, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gc.cpu(), g, rtol=1e-9, atol=1e-9)
