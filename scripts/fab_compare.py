"""Short equal-CPU-time comparison of FAB variants on one thread (issue 21: EACF vs fab@cnf on DW-4).

Each method is trained in turn, in this one process, from the same seed with the same grid presets, for
``--budget`` seconds of process CPU time (the buffer fill included; evaluation time excluded). At each
``--evals`` CPU time it draws ``--n`` samples and scores them under the ``boltzbench`` protocol against the
test split: E-W2, x-W2 and TV, with no bootstrap intervals and no noise floors. It also reports FAB's
diagnostics (ESS, log Z, AIS acceptance). CPU time stands in for wall-clock on a free core: on the shared
machine, wall-clock depends on the load.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/fab_compare.py --target dw4 --methods fab fab@cnf \\
        --budget 300 --evals 100 200 300
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import methods
import targets
from harness.budget import CountingTarget
from harness.grids import config_overrides
from harness.metrics import evaluate


def run(method: str, target: str, grid: str, evals: list[float], n: int, seed: int,
        extra: list[str] | None = None) -> list[dict]:
    """Train ``method`` until the last of ``evals`` CPU seconds; one scored row per evaluation time."""
    M = methods.get(method)
    variant = methods.split_key(method)[1]
    over = dict(M.Config.variant(variant, target)) if variant else {}
    over.update(M.Config.preset(grid, target))
    over.update(config_overrides(M, extra))
    cfg = M.Config.for_target(target, **over)
    t = targets.get(target)
    ct = CountingTarget(t)
    m = M(ct, cfg, torch.device("cpu"), torch.Generator().manual_seed(seed))
    ref = t.reference("test")
    out, cpu, steps, pending = [], 0.0, 0, sorted(evals)
    while pending:
        c0 = time.process_time()
        m.train_step()
        cpu += time.process_time() - c0
        steps += 1
        if cpu >= pending[0]:
            pending.pop(0)
            with torch.no_grad():
                x = m.sample(n)
            met = evaluate(x, ref, t, "boltzbench", n_boot=0, n_boot_ot=0, noise_floor=False, n_aligned=0)
            d = m.diagnostics()
            row = {"method": method, "set": extra or [], "cpu_s": round(cpu, 1), "steps": steps,
                   "s_per_step": round(cpu / steps, 3),
                   **{k: round(float(met[k]), 4) for k in ("e_w2", "x_w2", "tv", "dist_w2") if k in met},
                   **{k: round(float(v), 4) for k, v in d.items() if k in (
                       "ess", "ess_marginal", "log_z", "log_z_marginal", "ais_ess", "ais_accept", "step_size",
                       "skipped_steps")},
                   "mean_energy": round(float(t.energy(x.double()).mean()), 3)}
            print(json.dumps(row), flush=True)
            out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="dw4")
    ap.add_argument("--methods", nargs="+", default=["fab", "fab@cnf"])
    ap.add_argument("--grid", default="cpu")
    ap.add_argument("--budget", type=float, default=300.0, help="CPU seconds of training per method")
    ap.add_argument("--evals", type=float, nargs="*", default=None, help="CPU times to score at")
    ap.add_argument("--n", type=int, default=5000, help="samples scored (boltzbench: 5000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", nargs="*", default=[], help="config overrides key=value, every method")
    a = ap.parse_args()
    torch.set_num_threads(1)
    evals = a.evals or [a.budget]
    t = targets.get(a.target)
    print("reference mean energy (test):", round(float(t.energy(t.reference("test").double()).mean()), 3))
    for m in a.methods:
        run(m, a.target, a.grid, [e for e in evals if e <= a.budget], a.n, a.seed, a.set)


if __name__ == "__main__":
    main()
