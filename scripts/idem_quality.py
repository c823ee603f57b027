"""iDEM quality run outside the harness: train one cell, evaluate the iDEM protocol along the way.

    python scripts/idem_quality.py --target gmm40 --steps 25000 --eval-every 2500 [--set ema_decay=0.999]

Config: the published per-target settings, the ``--preset`` (default ``cpu``), ``--set key=value``
overrides (typed by the Config fields).
Every ``--eval-every`` steps it draws ``--n-eval`` samples and prints one ``EVAL {json}`` line: x-W2 (sqrt of
``ot.emd2`` with a squared-Euclidean cost, no alignment), E-W2² (``ot.emd2_1d`` of energies, W2² as DEM
reports it), GMM-40 modes holding a sample within 3 std, particle TV of interatomic distances (200 bins).
References: GMM-40 fresh exact samples (seed 1234), particles ``--n-eval`` rows of the test split.
Note that evaluating draws from the run's generator, so a run with other ``--eval-every`` takes another path.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import ot
import torch

import targets
from harness.budget import CountingTarget
from harness.grids import config_overrides
from methods.idem import IDEM, Config


def evaluate(m: IDEM, tgt, ref: torch.Tensor, n: int) -> tuple[dict[str, float], torch.Tensor]:
    x = m.sample(n)
    cost = (torch.cdist(x.double(), ref.double()) ** 2).numpy()
    w = np.full(n, 1.0 / n)
    out = {"x_w2": math.sqrt(ot.emd2(w, np.full(len(ref), 1.0 / len(ref)), cost, numItermax=int(1e7)))}
    with torch.no_grad():
        eg, er = tgt.energy(x.double()), tgt.energy(ref.double())
    out["e_w2sq"] = float(ot.emd2_1d(er.numpy(), eg.numpy()))
    out["e_mean"] = float(eg.mean())
    if tgt.n_particles is None:
        d = torch.cdist(tgt.means.float(), x.float())
        out["modes3std"] = int((d.min(1).values < 3 * tgt.std).sum())
    else:
        dr = tgt.interatomic_distances(ref).flatten().numpy()
        dg = tgt.interatomic_distances(x).flatten().numpy()
        hd, edges = np.histogram(dr, bins=200)
        hg, _ = np.histogram(dg, bins=edges)
        out["tv"] = float(0.5 * np.abs(hd / hd.sum() - hg / max(hg.sum(), 1)).sum())
    return out, x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="gmm40")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON")
    p.add_argument("--n-eval", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="torch.save the last samples and all evaluations here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    over = Config.preset(a.preset, a.target)
    over.update(config_overrides(IDEM, a.set))
    tgt = targets.get(a.target)
    ct = CountingTarget(tgt)
    cfg = Config.for_target(a.target, **over)
    print("config", json.dumps(cfg.to_dict()), flush=True)
    m = IDEM(ct, cfg, "cpu", torch.Generator().manual_seed(a.seed))
    if tgt.n_particles is None:
        ref = tgt.sample(a.n_eval, torch.Generator().manual_seed(1234))
    else:
        ref = tgt.reference("test")
        ref = ref[torch.randperm(ref.shape[0], generator=torch.Generator().manual_seed(1234))[: a.n_eval]]
    train_s, res, x = 0.0, [], None
    for s in range(1, a.steps + 1):
        t0 = time.time()
        logs = m.train_step()
        train_s += time.time() - t0
        if s % 100 == 0:
            print(f"step {s} train_s={train_s:.0f} loss={logs['loss']:.4g}", flush=True)
        if s % a.eval_every == 0 or s == a.steps:
            ev, x = evaluate(m, tgt, ref, a.n_eval)
            ev.update(step=s, train_s=round(train_s, 1), energy_evals=ct.usage.energy_evals)
            print("EVAL", json.dumps(ev), flush=True)
            res.append(ev)
    if a.out:
        torch.save({"samples": x, "evals": res, "config": cfg.to_dict()}, a.out)


if __name__ == "__main__":
    main()
