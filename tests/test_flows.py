"""Flows for FAB: invertibility, exact log-determinants, normalisation, equivariance of the particle flow."""

from __future__ import annotations

import math

import pytest
import torch

from methods.flows import EquivariantCNF, InvertibleLinearLU, MeanFreeGaussian, RealNVP
from methods.nets import EGNN


def _randomise(module: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    """Overwrite all parameters with random values (zero-init last layers would make couplings identities)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def _flow(dim: int, seed: int = 0, n_layers: int = 3, hidden: int = 8) -> RealNVP:
    f = RealNVP(
        dim, n_layers=n_layers, hidden=hidden, base_scale=1.5, generator=torch.Generator().manual_seed(seed)
    )
    _randomise(f, seed + 1)
    return f.double()


@pytest.mark.parametrize("dim", [2, 3, 5])
def test_realnvp_round_trip(dim: int) -> None:
    f = _flow(dim)
    x = 2 * torch.randn(256, dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    z, ld_inv = f.inverse(x)
    x2, ld_fwd = f.forward(z)
    assert torch.allclose(x2, x, atol=1e-5, rtol=0)
    assert torch.allclose(ld_inv, -ld_fwd, atol=1e-8)
    # and in float32
    f32 = _flow(dim).float()
    z32, _ = f32.inverse(x.float())
    assert torch.allclose(f32.forward(z32)[0], x.float(), atol=1e-5 * max(1.0, float(x.abs().max())))


@pytest.mark.parametrize("dim", [2, 3, 4])
def test_realnvp_logdet_matches_autograd_jacobian(dim: int) -> None:
    f = _flow(dim, seed=dim)
    z = torch.randn(6, dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    _, ld = f.forward(z)
    for i in range(z.shape[0]):
        J = torch.autograd.functional.jacobian(lambda v: f.forward(v.unsqueeze(0))[0][0], z[i])
        assert J.shape == (dim, dim)
        assert float(ld[i].detach()) == pytest.approx(float(torch.linalg.slogdet(J)[1]), abs=1e-8)


def test_invertible_linear_is_initially_orthogonal_with_exact_logdet() -> None:
    lin = InvertibleLinearLU(4, torch.Generator().manual_seed(0)).double()
    W = lin.weight()
    assert torch.allclose(W @ W.T, torch.eye(4, dtype=torch.float64), atol=1e-6)  # float32 parameters
    _randomise(lin, 1)
    x = torch.randn(3, 4, dtype=torch.float64)
    y, ld = lin(x)
    assert torch.allclose(lin.inverse(y)[0], x, atol=1e-10)
    assert float(ld[0].detach()) == pytest.approx(
        float(torch.linalg.slogdet(lin.weight().detach())[1]), abs=1e-10
    )


def test_realnvp_density_integrates_to_one_and_matches_samples() -> None:
    f = _flow(2, seed=7)
    # quadrature on a box that holds essentially all the mass
    n = 600
    g = torch.linspace(-14, 14, n, dtype=torch.float64)
    X, Y = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([X.reshape(-1), Y.reshape(-1)], -1)
    with torch.no_grad():
        mass = torch.exp(f.log_prob(pts)).sum() * (g[1] - g[0]) ** 2
    assert float(mass) == pytest.approx(1.0, abs=5e-3)
    # log q returned with samples equals log_prob evaluated at them
    with torch.no_grad():
        x, lq = f.sample_and_log_prob(500, torch.Generator().manual_seed(1))
        assert torch.allclose(lq, f.log_prob(x), atol=1e-8)


def test_realnvp_zero_init_is_the_rotated_base() -> None:
    f = RealNVP(2, n_layers=4, hidden=8, base_scale=3.0, generator=torch.Generator().manual_seed(0)).double()
    x = torch.randn(10, 2, dtype=torch.float64)
    expected = -0.5 * (x**2).sum(-1) / 9.0 - math.log(2 * math.pi * 9.0)
    with torch.no_grad():
        assert torch.allclose(f.log_prob(x), expected, atol=1e-10)


def test_realnvp_bad_arguments() -> None:
    with pytest.raises(ValueError, match="dim >= 2"):
        RealNVP(1)
    with pytest.raises(ValueError, match="base_scale"):
        RealNVP(2, base_scale=0.0)


# ------------------------------------------------------------------------ particle flow


def _cnf(
    n: int = 4, d: int = 2, steps: int = 6, seed: int = 0, divergence: str = "exact", scale: float = 0.3
) -> EquivariantCNF:
    torch.manual_seed(seed)
    field = EGNN(n, d, hidden=16, n_layers=2)
    _randomise(field, seed + 10, scale=scale)
    return EquivariantCNF(field, n, d, n_steps=steps, base_scale=1.0, divergence=divergence).double()


def _random_orthogonal(d: int, seed: int, reflect: bool) -> torch.Tensor:
    q, _ = torch.linalg.qr(
        torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    if (torch.linalg.det(q) < 0) != reflect:
        q[:, 0] = -q[:, 0]
    return q


def test_mean_free_gaussian_normalised_on_subspace() -> None:
    # 2 particles in 1-D: centred configurations are (a, −a); the density over the 1-dof subspace
    # (coordinate u = |x| = a·√2) must integrate to one.
    mf = MeanFreeGaussian(2, 1, scale=1.3)
    a = torch.linspace(-10, 10, 20001, dtype=torch.float64)
    x = torch.stack([a, -a], -1)
    du = (a[1] - a[0]) * math.sqrt(2)
    assert float(torch.exp(mf.log_prob(x)).sum() * du) == pytest.approx(1.0, abs=1e-6)
    s = mf.sample(100, torch.Generator().manual_seed(0), torch.float64, torch.device("cpu"))
    assert torch.allclose(s.reshape(100, 2, 1).sum(1), torch.zeros(100, 1, dtype=torch.float64), atol=1e-12)


def test_cnf_density_invariant_to_rotations_reflections_permutations_translations() -> None:
    n, d = 4, 2
    f = _cnf(n, d)
    x = MeanFreeGaussian(n, d, 1.5).sample(
        8, torch.Generator().manual_seed(2), torch.float64, torch.device("cpu")
    )
    with torch.no_grad():
        lq = f.log_prob(x)
        for k, reflect in enumerate([False, True]):
            R = _random_orthogonal(d, 10 + k, reflect)
            xr = (x.reshape(8, n, d) @ R.T).reshape(8, -1)
            assert torch.allclose(f.log_prob(xr), lq, atol=1e-8)
        perm = torch.tensor([2, 0, 3, 1])
        xp = x.reshape(8, n, d)[:, perm].reshape(8, -1)
        assert torch.allclose(f.log_prob(xp), lq, atol=1e-8)
        # an uncentred input is centred first
        xt = (x.reshape(8, n, d) + torch.tensor([3.0, -1.0], dtype=torch.float64)).reshape(8, -1)
        assert torch.allclose(f.log_prob(xt), lq, atol=1e-8)


def test_cnf_samples_centred_and_round_trip_converges_at_fourth_order() -> None:
    errs = []
    for steps in (8, 16):
        f = _cnf(3, 2, steps=steps, seed=1)
        with torch.no_grad():
            x, lq = f.sample_and_log_prob(6, torch.Generator().manual_seed(0))
            assert torch.allclose(
                x.reshape(6, 3, 2).mean(1), torch.zeros(6, 2, dtype=torch.float64), atol=1e-10
            )
            # backward integration inverts the forward one up to the RK4 error; log q agrees likewise
            z, _ = f._integrate(x, forward=False, create_graph=False)
            x2, _ = f._integrate(z, forward=True, create_graph=False)
            errs.append(((x2 - x).abs().max().item(), (f.log_prob(x) - lq).abs().max().item()))
    assert errs[1][0] < 1e-3 and errs[1][1] < 5e-2
    # halving the step divides the error by ~2^4 (allow 8)
    assert errs[1][0] < errs[0][0] / 8 and errs[1][1] < errs[0][1] / 8


def test_cnf_exact_divergence_matches_jacobian_trace_and_hutchinson_is_unbiased() -> None:
    f = _cnf(3, 2, seed=3)
    x = MeanFreeGaussian(3, 2, 1.0).sample(
        4, torch.Generator().manual_seed(4), torch.float64, torch.device("cpu")
    )
    _, div = f._v_and_div(0.3, x, create_graph=False)
    for i in range(4):
        J = torch.autograd.functional.jacobian(
            lambda v: f.field(torch.full((1,), 0.3, dtype=torch.float64), v.unsqueeze(0))[0], x[i]
        )
        assert float(div[i]) == pytest.approx(float(torch.trace(J)), abs=1e-9)
    fh = _cnf(3, 2, seed=3, divergence="hutchinson")
    fh.set_probe_generator(torch.Generator().manual_seed(0))
    xs = x[:1].expand(4000, -1).contiguous()
    _, dh = fh._v_and_div(0.3, xs, create_graph=False)
    # Rademacher probes projected on the centred subspace: unbiased for the trace on that subspace, which for
    # a centred, translation-invariant field equals the full trace
    assert float(dh.mean()) == pytest.approx(float(div[0]), abs=5 * float(dh.std()) / math.sqrt(4000) + 1e-6)


def test_cnf_log_prob_differentiable_in_x() -> None:
    f = _cnf(3, 2, steps=3, seed=5)
    x = MeanFreeGaussian(3, 2, 1.0).sample(
        2, torch.Generator().manual_seed(6), torch.float64, torch.device("cpu")
    )
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(f.log_prob(x).sum(), x)
    h = 1e-5
    v = MeanFreeGaussian(3, 2, 1.0).sample(
        1, torch.Generator().manual_seed(7), torch.float64, torch.device("cpu")
    )
    with torch.no_grad():
        fd = (f.log_prob(x + h * v) - f.log_prob(x - h * v)) / (2 * h)
    assert torch.allclose((g * v).sum(-1), fd, atol=1e-6)
