"""Our EGNN (methods/nets.py) against a straightforward edge-list EGNN written as DEM / en_flows write it
(``egnn_reference.py``: edge index lists, gathers, per-edge concatenation and MLPs, segment sums), with the
same widths and the same parameters, measured in one run and interleaved (edge-list, ours, edge-list, ours…).

Shapes (the published networks): DW-4 3 × 128 (4 particles in 2-D), LJ-13 5 × 128, LJ-55 5 × 128.
- ``sample``: one forward pass without autograd at 1000 configurations (LJ-55: 128), what every reverse-SDE
  step of a buffer refresh / sampling pays;
- ``train``: forward + backward (loss Σ v², parameter gradients) at 512 configurations (LJ-55: 128), the
  network share of an iDEM training step.

Before timing, the two outputs are checked equal (max |Δ| ≤ 1e-5 · max(1, max |v|), float32) with enlarged
coordinate-MLP read-out weights so the check is not trivially passed. pytest-benchmark times *our* call (the
edge-list call runs in the untimed ``setup`` of each round, timed by hand); ``extra_info`` holds both minima
and ``ratio`` = edge-list / ours (> 1: ours faster). Rounds: ``--bench-rounds`` (at most 3), one warm-up
round except for LJ-55. Print the table with ``python scripts/bench_compare.py --extra``.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from egnn_reference import EdgeListEGNN

from methods.nets import EGNN

pytestmark = pytest.mark.bench

# name: (n_particles, spatial_dim, layers, samples for `sample`, batch for `train`)
SHAPES = {"dw4": (4, 2, 3, 1000, 512), "lj13": (13, 3, 5, 1000, 512), "lj55": (55, 3, 5, 128, 128)}


def _nets(name: str, device: torch.device) -> tuple[EGNN, EdgeListEGNN]:
    n, d, layers = SHAPES[name][:3]
    torch.manual_seed(0)
    net = EGNN(n, d, hidden=128, n_layers=layers).to(device)
    with torch.no_grad():
        for layer in net.layers:
            layer.coord_mlp[-1].weight.normal_(0, 0.05)
    return net, EdgeListEGNN(net)


def _inputs(name: str, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    n, d = SHAPES[name][:2]
    g = torch.Generator().manual_seed(1)
    x = 1.5 * torch.randn(rows, n * d, generator=g)
    x = x - x.reshape(rows, n, d).mean(1).repeat(1, n)
    return torch.rand(rows, generator=g).to(device), x.to(device)


@pytest.mark.parametrize("mode", ["sample", "train"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_egnn_vs_edge_list(name: str, mode: str, benchmark: Any, bench_device: torch.device,
                           bench_sync: Any, pytestconfig: pytest.Config) -> None:
    net, ref = _nets(name, bench_device)
    rows = SHAPES[name][3] if mode == "sample" else SHAPES[name][4]
    t, x = _inputs(name, rows, bench_device)
    with torch.no_grad():  # same function (checked on the first 64 rows)
        v_ours, v_ref = net(t[:64], x[:64]), ref(t[:64], x[:64])
    err = float((v_ours - v_ref).abs().max())
    assert err <= 1e-5 * max(1.0, float(v_ref.abs().max())), err

    def call(f: Any) -> Any:
        if mode == "sample":
            def run() -> None:
                with torch.inference_mode():
                    f(t, x)
        else:
            def run() -> None:
                net.zero_grad(set_to_none=True)
                f(t, x).square().sum().backward()
        return run

    ours, edge = call(net), call(ref)
    edge_times: list[float] = []

    def setup() -> None:  # the edge-list call of this round (untimed by pytest-benchmark, timed here)
        bench_sync()
        t0 = time.perf_counter()
        edge()
        bench_sync()
        edge_times.append(time.perf_counter() - t0)

    rounds = min(3, int(pytestconfig.getoption("bench_rounds", default=3)))
    warm = 0 if name == "lj55" else 1  # pedantic calls setup() before warm-up rounds too

    def timed_ours() -> None:
        ours()
        bench_sync()

    benchmark.pedantic(timed_ours, setup=setup, rounds=rounds, iterations=1, warmup_rounds=warm)
    ours_min = float(benchmark.stats.stats.min)
    edge_min = min(edge_times[-rounds:])
    benchmark.extra_info.update({
        "edge_list_min_s": edge_min, "ours_min_s": ours_min, "ratio": edge_min / ours_min,
        "rows": rows, "max_abs_diff": err, "threads": torch.get_num_threads(),
    })
    print(f"\nEGNN {name} {mode}: edge-list {edge_min:.4g} s, ours {ours_min:.4g} s, "
          f"ratio {edge_min / ours_min:.2f}")
