"""torch.compile (inductor) on the EGNN forward without autograd (a reverse-SDE step's network call): compile
time, equality with eager, and eager vs compiled CPU seconds, interleaved in one process.

Usage: ``OMP_NUM_THREADS=1 python scripts/bench_egnn_compile.py dw4`` (or ``lj13``). Inductor needs a C++
compiler at run time; nothing in the methods uses torch.compile (off by default: see docs/timing.md).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from methods.nets import EGNN  # noqa: E402

SHAPES = {"dw4": (4, 2, 3, 1000), "lj13": (13, 3, 5, 1000)}  # particles, dim, layers, samples


def cpu_seconds(f: Callable[[], object], reps: int = 7) -> tuple[float, float]:
    """(min, median) process CPU seconds of f() over ``reps`` calls."""
    ts = []
    for _ in range(reps):
        c0 = time.process_time()
        f()
        ts.append(time.process_time() - c0)
    ts.sort()
    return ts[0], ts[len(ts) // 2]


def main(name: str) -> None:
    torch.set_num_threads(1)
    n, d, layers, rows = SHAPES[name]
    torch.manual_seed(0)
    net = EGNN(n, d, hidden=128, n_layers=layers).eval()
    x, t = torch.randn(rows, n * d), torch.full((rows,), 0.5)
    with torch.no_grad():
        ref = net(t, x)
        t0 = time.perf_counter()
        cnet = torch.compile(net, dynamic=False)
        out = cnet(t, x)
        print(f"{name}: compile {time.perf_counter() - t0:.1f} s wall, max |compiled − eager| "
              f"{float((out - ref).abs().max()):.3g} (max |v| {float(ref.abs().max()):.3g})", flush=True)
        for _ in range(2):
            e, c = cpu_seconds(lambda: net(t, x)), cpu_seconds(lambda: cnet(t, x))
            print(f"{name}: eager min/med {e[0]:.4f}/{e[1]:.4f} s, compiled {c[0]:.4f}/{c[1]:.4f} s, "
                  f"ratio of minima {e[0] / c[0]:.2f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "dw4")
