"""The reorganised EGNN (methods/nets.py) computes the same function as a straightforward edge-list EGNN
with the same parameters (tests/bench/egnn_reference.py, written as DEM / en_flows write it): outputs,
parameter and input gradients, and gradients of gradients (energy-network scores, flow divergences), in
float64 to ~1e-12 and float32 to 1e-5; the no-autograd, autograd and create_graph paths agree; chunk
boundaries do not matter; the state_dict layout is the straightforward layer's."""

import importlib.util
from pathlib import Path

import pytest
import torch

from methods import nets
from methods.nets import EGNN

_spec = importlib.util.spec_from_file_location(
    "egnn_reference", Path(__file__).parent / "bench" / "egnn_reference.py"
)
assert _spec is not None and _spec.loader is not None
egnn_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(egnn_reference)
EdgeListEGNN = egnn_reference.EdgeListEGNN

CASES = [  # n, d, layers, out_node_features, attention, agg, tanh
    (4, 2, 3, 0, True, "sum", True),
    (13, 3, 2, 1, True, "sum", True),
    (5, 3, 2, 2, False, "mean", True),
    (3, 3, 2, 1, True, "sum", False),
]


def _net(n, d, layers, onf, att, agg, tanh, dtype, seed=0, hidden=16):
    torch.manual_seed(seed)
    net = EGNN(n, d, hidden=hidden, n_layers=layers, out_node_features=onf, attention=att, agg=agg, tanh=tanh)
    with torch.no_grad():  # large coordinate updates: the test is not passed trivially
        for layer in net.layers:
            layer.coord_mlp[-1].weight.normal_(0, 0.3)
    return net.to(dtype)


def _inputs(n, d, dtype, B=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, generator=g, dtype=dtype), 1.3 * torch.randn(B, n * d, generator=g, dtype=dtype))


@pytest.fixture(params=["function", "stored"])
def edge_path(request, monkeypatch):
    """Differentiated forwards through the recomputing Function (pair rows above ``STORE_MAX_ROWS``, the
    large-batch path) or the plain graph with stored activations (small batches)."""
    monkeypatch.setattr(nets, "STORE_MAX_ROWS", 0 if request.param == "function" else 10**9)
    return request.param


def _tol(dtype):
    return {"atol": 1e-11, "rtol": 1e-9} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-4}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_forward_equals_edge_list(case, dtype):
    net = _net(*case, dtype)
    ref = EdgeListEGNN(net)
    t, x = _inputs(case[0], case[1], dtype)
    with torch.no_grad():
        v_ref, h_ref = ref.forward_with_features(t, x)
        v, h = net.forward_with_features(t, x)
    assert v.abs().max() > 1e-3
    torch.testing.assert_close(v, v_ref, **_tol(dtype))
    torch.testing.assert_close(h, h_ref, **_tol(dtype))
    with torch.inference_mode():
        v2, h2 = net.forward_with_features(t, x)
    torch.testing.assert_close(v2, v_ref, **_tol(dtype))
    v3, h3 = net.forward_with_features(t, x)  # autograd path (parameters require grad)
    assert v3.requires_grad
    torch.testing.assert_close(v3.detach(), v_ref, **_tol(dtype))
    torch.testing.assert_close(h3.detach(), h_ref, **_tol(dtype))


def _grads(fn, net, t, x, wv, wh):
    net.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_(True)
    v, h = fn(t, xx)
    ((v * wv).sum() + (h * wh).sum()).backward()
    return xx.grad, {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_gradients_equal_edge_list(case, dtype, edge_path):
    net = _net(*case, dtype)
    ref = EdgeListEGNN(net)
    t, x = _inputs(case[0], case[1], dtype)
    g = torch.Generator().manual_seed(3)
    wv = torch.randn(x.shape, generator=g, dtype=dtype)
    wh = torch.randn(x.shape[0], case[0], case[3], generator=g, dtype=dtype)
    gx_ref, gp_ref = _grads(ref.forward_with_features, net, t, x, wv, wh)
    gx, gp = _grads(net.forward_with_features, net, t, x, wv, wh)
    torch.testing.assert_close(gx, gx_ref, **_tol(dtype))
    assert gp.keys() == gp_ref.keys()
    for k in gp_ref:
        scale = gp_ref[k].abs().max().clamp_min(1e-30)
        torch.testing.assert_close(gp[k] / scale, gp_ref[k] / scale, **_tol(dtype), msg=k)


@pytest.mark.parametrize("case", CASES[:3])
def test_second_order_gradients_equal_edge_list(case, edge_path):
    """Energy-network training differentiates a score −∇_x E_θ w.r.t. θ (create_graph)."""
    dtype = torch.float64
    net = _net(*case, dtype)
    ref = EdgeListEGNN(net)
    t, x = _inputs(case[0], case[1], dtype)
    out = []
    for fn in (ref.forward_with_features, net.forward_with_features):
        net.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        v, h = fn(t, xx)
        e = (v.square().sum(-1) + h.sum((-1, -2))).sum()
        (score,) = torch.autograd.grad(e, xx, create_graph=True)
        (score.square().sum() + (score * xx).sum()).backward()
        out.append((score.detach(), xx.grad, {k: p.grad.clone() for k, p in net.named_parameters()
                                              if p.grad is not None}))
    (s_ref, gx_ref, gp_ref), (s, gx, gp) = out
    torch.testing.assert_close(s, s_ref, **_tol(dtype))
    torch.testing.assert_close(gx, gx_ref, **_tol(dtype))
    assert gp.keys() == gp_ref.keys()
    for k in gp_ref:
        scale = gp_ref[k].abs().max().clamp_min(1e-30)
        torch.testing.assert_close(gp[k] / scale, gp_ref[k] / scale, **_tol(dtype), msg=k)


def test_edge_function_gradcheck():
    torch.manual_seed(0)
    B, n, H, d = 3, 3, 4, 2
    dt = torch.float64
    jidx = EGNN(n, d, hidden=4, n_layers=1).jidx
    for att in (True, False):
        spec = nets._EdgeSpec(jidx, att, True, 2.0, True, 2)  # chunks of 2 configurations
        inputs = [torch.randn(B, n, H, dtype=dt), torch.randn(B, n, H, dtype=dt),
                  torch.randn(B, n, n - 1, d, dtype=dt), torch.rand(B, n, n - 1, dtype=dt),
                  torch.randn(H, dtype=dt), torch.randn(H, dtype=dt), torch.randn(H, H, dtype=dt),
                  torch.randn(H, dtype=dt), torch.randn(H + att, H, dtype=dt), torch.randn(H, dtype=dt),
                  torch.randn(1, dtype=dt) if att else None, torch.randn(H, dtype=dt)]
        inputs = [v.requires_grad_(True) if v is not None else None for v in inputs]

        def fn(*a, spec=spec):
            return nets._EdgeAggregate.apply(*a, spec)

        assert torch.autograd.gradcheck(fn, tuple(inputs), fast_mode=True)
        assert torch.autograd.gradgradcheck(fn, tuple(inputs), fast_mode=True)


def test_chunking_does_not_change_results(monkeypatch):
    monkeypatch.setattr(nets, "STORE_MAX_ROWS", 0)  # the chunked Function path
    net = _net(5, 3, 2, 1, True, "sum", True, torch.float64)
    t, x = _inputs(5, 3, torch.float64, B=7)
    outs = []
    for rows in (20, 40, 10**6):  # 1, 2 and all configurations per chunk (7 is not a multiple of 2)
        monkeypatch.setattr(nets, "EDGE_CHUNK_ROWS", rows)
        gx, gp = _grads(net.forward_with_features, net, t, x, torch.ones_like(x), torch.ones(7, 5, 1,
                                                                                           dtype=x.dtype))
        with torch.no_grad():
            v, _ = net.forward_with_features(t, x)
        outs.append((v, gx, gp))
    for v, gx, gp in outs[1:]:
        torch.testing.assert_close(v, outs[0][0], atol=1e-13, rtol=0)
        torch.testing.assert_close(gx, outs[0][1], atol=1e-13, rtol=0)
        for k in gp:
            torch.testing.assert_close(gp[k], outs[0][2][k], atol=1e-12, rtol=1e-12)


def test_state_dict_layout_is_the_straightforward_layers():
    net = EGNN(4, 2, hidden=8, n_layers=2, out_node_features=1)
    keys = set(net.state_dict())
    per_layer = ["edge_in.weight", "edge_in.bias", "edge_mlp.1.weight", "edge_mlp.1.bias", "att.weight",
                 "att.bias", "coord_mlp.0.weight", "coord_mlp.0.bias", "coord_mlp.2.weight",
                 "node_mlp.0.weight", "node_mlp.0.bias", "node_mlp.2.weight", "node_mlp.2.bias"]
    expected = {"embedding.weight", "embedding.bias", "embedding_out.weight", "embedding_out.bias"}
    expected |= {f"layers.{i}.{k}" for i in range(2) for k in per_layer}
    assert keys == expected
    assert net.layers[0].edge_in.weight.shape == (8, 2 * 8 + 2)


def _saved_sizes(net, t, x):
    sizes = []

    def pack(v):
        sizes.append(v.numel())
        return v

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
        net(t, x.requires_grad_(True)).sum()
    return sizes


def test_training_keeps_no_pair_activations():
    """Above ``STORE_MAX_ROWS`` pair rows the autograd path stores node-sized tensors only: the saved
    activations of a forward grow with B·n·H (and B·n²·d for the pair differences), not with B·n²·H; at or
    below it the plain graph stores the pair activations (faster at small batches)."""
    net = EGNN(13, 3, hidden=64, n_layers=2)
    B = nets.STORE_MAX_ROWS // (13 * 12) + 1  # the smallest batch above the threshold
    t, x = _inputs(13, 3, torch.float32, B=B)
    pair_hidden = B * 13 * 12 * 64
    assert max(_saved_sizes(net, t, x)) < pair_hidden / 4
    B = nets.STORE_MAX_ROWS // (13 * 12)  # the largest batch at or below it
    t, x = _inputs(13, 3, torch.float32, B=B)
    assert max(_saved_sizes(net, t, x)) >= B * 13 * 12 * 64
