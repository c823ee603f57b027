"""Energy bias of iDEM's DW-4 samples against the reverse-SDE grid (docs/reproduction.md, issue-16 diagnosis).

    python scripts/idem_sde_grid.py [STEPS] [--target dw4] [--grids 100,1000] [--seed 0] [--n 1000]

Trains iDEM with the target's `cpu` preset for STEPS optimiser steps (default 2000), then draws N samples
from the network's reverse SDE on each grid and prints their mean / median energy and the `idem` E-W2²
(W2² of energies) against the first N rows of the val split.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import ot
import torch

import targets
from harness.budget import CountingTarget
from methods.idem import IDEM, Config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("steps", type=int, nargs="?", default=2000)
    ap.add_argument("--target", default="dw4")
    ap.add_argument("--grids", default="100,1000", help="comma-separated reverse-SDE step counts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=1000)
    a = ap.parse_args()
    torch.set_num_threads(1)
    t = targets.get(a.target)
    cfg = Config.for_target(a.target, **Config.preset("cpu", a.target))
    m = IDEM(CountingTarget(t), cfg, "cpu", torch.Generator().manual_seed(a.seed))
    t0 = time.time()
    for _ in range(a.steps):
        m.train_step()
    print(f"trained {a.steps} steps in {time.time() - t0:.0f} s", flush=True)
    ev = t.energy(t.reference("val", a.n).double()).numpy()
    for n_sde in (int(g) for g in a.grids.split(",")):
        m.config = dataclasses.replace(cfg, sde_steps=n_sde)
        t0 = time.time()
        e = t.energy(m.sample(a.n).double()).numpy()
        print(f"sde_steps {n_sde}: mean E {e.mean():.2f} (val {ev.mean():.2f}) median {np.median(e):.2f} "
              f"E-W2^2 {ot.emd2_1d(ev, e):.3f} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
