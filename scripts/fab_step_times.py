"""Per-step wall-clock of FAB on one thread, for choosing ``cpu`` budgets (docs/fab.md, "cpu presets").

Builds ``fab`` (or ``fab@VARIANT``) with a grid's presets on a counted target and runs the first step, which
fills the buffer (buffer_min / batch_size AIS passes). Then it runs ``--steps`` more and prints:
- the fill time;
- the mean wall-clock and CPU time per optimiser step (AIS amortised over n_updates_per_ais steps; CPU time is
  less sensitive to other processes on a shared machine);
- the energy evaluations per step.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/fab_step_times.py --target dw4 --method fab@cnf --steps 16
"""

from __future__ import annotations

import argparse
import time

import torch

import methods
import targets
from harness.budget import CountingTarget
from harness.grids import config_overrides


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="dw4")
    ap.add_argument("--method", default="fab", help="fab, fab@cnf, fab@published")
    ap.add_argument("--grid", default="cpu", help="whose presets to apply")
    ap.add_argument("--steps", type=int, default=16, help="timed steps after the first (a multiple of 8)")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides key=value (typed)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    M = methods.get(a.method)
    variant = methods.split_key(a.method)[1]
    over = dict(M.Config.variant(variant, a.target)) if variant else {}
    over.update(M.Config.preset(a.grid, a.target))
    over.update(config_overrides(M, a.set))
    cfg = M.Config.for_target(a.target, **over)
    ct = CountingTarget(targets.get(a.target))
    m = M(ct, cfg, torch.device("cpu"), torch.Generator().manual_seed(a.seed))
    t0 = time.perf_counter()
    m.train_step()
    fill = time.perf_counter() - t0
    e0 = ct.usage.energy_evals
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(a.steps):
        logs = m.train_step()
    k = max(a.steps, 1)
    per, cpu = (time.perf_counter() - t0) / k, (time.process_time() - c0) / k
    print(f"{a.method} {a.target} ({a.grid} presets): first step incl. buffer fill {fill:.1f} s; "
          f"{per:.3f} s/step wall, {cpu:.3f} s/step CPU over {a.steps} steps; "
          f"{(ct.usage.energy_evals - e0) / k:.0f} energy evals/step; "
          f"last logs {({key: round(v, 4) for key, v in logs.items()})}")


if __name__ == "__main__":
    main()
