"""NEM / BNEM quality run outside the harness: one `cpu`-preset cell, as tests/test_nem_quality.py trains it.

    python scripts/nem_quality.py gmm40 bnem --steps 20000 --eval-every 2500 [--seed 0] [--set key=value ...]

Config: the published per-target settings, the ``--preset`` (default ``cpu``), ``--set key=value``
overrides (typed by the Config fields).
Every ``--eval-every`` steps it draws 1000 samples and prints one ``EVAL {json}`` line with the BNEM-protocol
metrics (``harness.metrics.evaluate(..., protocol="bnem")`` against 1000 rows of the test and val
references), the number of samples with E > 30 and the largest energy. The generator state is restored after
each intermediate evaluation, so the final numbers are those of an uninterrupted run (the slow test's).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import targets
from harness.budget import CountingTarget
from harness.grids import config_overrides
from harness.metrics import evaluate
from methods.nem import BNEM, NEM


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", choices=["gmm40", "dw4", "lj13", "lj55"])
    p.add_argument("method", choices=["nem", "bnem"])
    p.add_argument("--steps", type=int, default=None, help="default: the preset's suggested budget")
    p.add_argument("--eval-every", type=int, default=2500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    M = {"nem": NEM, "bnem": BNEM}[a.method]
    over = M.Config.preset(a.preset, a.target)
    over.update(config_overrides(M, a.set))
    steps = a.steps or M.Config.suggested_budget(a.preset, a.target)["steps"]
    tgt = targets.get(a.target)
    ct = CountingTarget(tgt)
    cfg = M.Config.for_target(a.target, **over)
    print("config", json.dumps(cfg.to_dict()), flush=True)
    m = M(ct, cfg, "cpu", torch.Generator().manual_seed(a.seed))
    ref = {"test": tgt.reference("test", 1000), "val": tgt.reference("val", 1000)}
    train_s = 0.0
    for i in range(1, steps + 1):
        t0 = time.time()
        logs = m.train_step()
        train_s += time.time() - t0
        if i % 500 == 0:
            print(i, round(train_s, 1), json.dumps({k: round(v, 3) for k, v in logs.items()}), flush=True)
        if i % a.eval_every == 0 or i == steps:
            state = m.generator.get_state()
            t0 = time.time()
            x = m.sample(1000)
            sample_s = time.time() - t0
            out = evaluate(x, ref, tgt, protocol="bnem", noise_floor=False)
            e = tgt.energy(x)
            res = {"step": i, "train_s": round(train_s, 1), "sample_s": round(sample_s, 2),
                   **{k: round(v, 4) for k, v in out.items()}, "E>30": int((e > 30).sum()),
                   "E_max": float(e.max()), "energy_evals": ct.usage.energy_evals,
                   "grad_evals": ct.usage.grad_evals, "network_evals": ct.usage.network_evals}
            if i != steps:
                m.generator.set_state(state)
            print("EVAL", json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
