"""Shared networks: embeddings (closed forms), TimeMLP shapes, EGNN E(n) × S_n equivariance to 1e-5."""

import math

import pytest
import torch

from methods.nets import EGNN, FourierTimeEmbedding, SinusoidalEmbedding, TimeMLP


def test_sinusoidal_embedding_closed_form():
    emb = SinusoidalEmbedding(8, scale=25.0)
    v = torch.tensor([0.0, 0.3])
    out = emb(v)
    f = torch.tensor([10000 ** (-k / 3) for k in range(4)])
    ref = torch.cat([torch.sin(25 * v[:, None] * f), torch.cos(25 * v[:, None] * f)], -1)
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError):
        SinusoidalEmbedding(7)


def test_fourier_time_embedding():
    e = FourierTimeEmbedding()
    t = torch.tensor([0.5, 1.0])
    out = e(t)
    c = torch.linspace(0.1, 100, 64)
    assert out.shape == (2, 128)
    torch.testing.assert_close(out[:, :64], torch.sin(c * t[:, None]))
    torch.testing.assert_close(out[:, 64:], torch.cos(c * t[:, None]))


def test_time_mlp_shapes_and_time_dependence():
    torch.manual_seed(0)
    net = TimeMLP(dim=2)
    x = torch.randn(5, 2)
    out = net(torch.rand(5), x)
    assert out.shape == (5, 2)
    assert not torch.allclose(net(0.1, x), net(0.9, x))
    assert TimeMLP(3, out_dim=1)(0.5, torch.randn(4, 3)).shape == (4, 1)
    with pytest.raises(ValueError, match="shape"):
        net(0.5, torch.randn(5, 3))


def _random_orthogonal(d, g):
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    q[:, 0] = -q[:, 0]  # include a reflection: E(n), not only SO(n)
    return q


def _make_egnn(n, d, layers, seed):
    torch.manual_seed(seed)
    net = EGNN(n, d, hidden=32, n_layers=layers, out_node_features=2).double()
    with torch.no_grad():  # make the coordinate updates large so the test is not trivially passed
        for layer in net.layers:
            layer.coord_mlp[-1].weight.normal_(0, 1.0)
    return net


@pytest.mark.parametrize("n,d,layers", [(4, 2, 3), (13, 3, 5)])
def test_egnn_equivariance(n, d, layers):
    net = _make_egnn(n, d, layers, 0)
    g = torch.Generator().manual_seed(1)
    B = 6
    x = torch.randn(B, n * d, generator=g, dtype=torch.float64) * 1.5
    t = torch.rand(B, generator=g, dtype=torch.float64)
    vel, h = net.forward_with_features(t, x)
    assert vel.shape == (B, n * d) and h.shape == (B, n, 2)
    assert vel.abs().max() > 1e-2  # non-trivial output
    assert vel.reshape(B, n, d).mean(1).abs().max() < 1e-10  # mean removed
    # rotation / reflection
    Q = _random_orthogonal(d, g)
    xr = (x.reshape(B, n, d) @ Q.T).reshape(B, n * d)
    vr, hr = net.forward_with_features(t, xr)
    torch.testing.assert_close(vr, (vel.reshape(B, n, d) @ Q.T).reshape(B, n * d), atol=1e-5, rtol=0)
    torch.testing.assert_close(hr, h, atol=1e-5, rtol=0)
    # translation: output invariant
    shift = torch.randn(1, d, generator=g, dtype=torch.float64).repeat(1, n)
    vt, ht = net.forward_with_features(t, x + shift)
    torch.testing.assert_close(vt, vel, atol=1e-5, rtol=0)
    torch.testing.assert_close(ht, h, atol=1e-5, rtol=0)
    # permutation of particles
    perm = torch.randperm(n, generator=g)
    xp = x.reshape(B, n, d)[:, perm].reshape(B, n * d)
    vp, hp = net.forward_with_features(t, xp)
    torch.testing.assert_close(vp, vel.reshape(B, n, d)[:, perm].reshape(B, n * d), atol=1e-5, rtol=0)
    torch.testing.assert_close(hp, h[:, perm], atol=1e-5, rtol=0)


def test_egnn_float32_equivariance_and_batch_independence():
    torch.manual_seed(0)
    net = EGNN(4, 2, hidden=64, n_layers=3)
    x = torch.randn(5, 8)
    t = torch.rand(5)
    v = net(t, x)
    theta = 0.7
    R = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    vr = net(t, (x.reshape(5, 4, 2) @ R.T).reshape(5, 8))
    torch.testing.assert_close(vr, (v.reshape(5, 4, 2) @ R.T).reshape(5, 8), atol=1e-5, rtol=0)
    # rows are processed independently
    torch.testing.assert_close(net(t[:2], x[:2]), v[:2], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="shape"):
        net(t, torch.randn(5, 9))
