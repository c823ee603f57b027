"""PIS / DDS quality run on GMM-40 outside the harness (BNEM protocol), with mode-weight diagnostics.

    python scripts/control_quality.py pis --steps 4000 --eval-every 1000 [--set lr=0.002 ...]

Config: the published GMM-40 settings, the ``--preset`` (default ``cpu``), ``--set key=value``
overrides (typed by the Config fields).
Every ``--eval-every`` steps it draws three batches of 1000 samples and prints one ``EVAL {json}`` line: per
batch the BNEM-protocol x-W2 and E-W2 (``harness.metrics.evaluate(..., protocol="bnem")``; that protocol
scores both against the **val** split, as BNEM's test loop does, so every batch meets the same first 1000 val
rows), log Z and normalised ESS of the batch's importance weights; over
all 3000 samples the number of modes hit (nearest mean) and the smallest / largest count per mode (75
expected).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

import targets
from harness.budget import CountingTarget
from harness.grids import config_overrides
from harness.metrics import evaluate
from methods import METHODS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=["pis", "dds"])
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="torch.save the method state here at every evaluation")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    M = METHODS.get(a.method)
    over = M.Config.preset(a.preset, "gmm40")
    over.update(config_overrides(M, a.set))
    tgt = targets.get("gmm40")
    ct = CountingTarget(tgt)
    cfg = M.Config.for_target("gmm40", **over)
    print("config", json.dumps(cfg.to_dict()), flush=True)
    m = M(ct, cfg, "cpu", torch.Generator().manual_seed(a.seed))
    ref = tgt.reference("test")
    val = tgt.reference("val", 1000)  # what the bnem protocol scores x-W2 and E-W2 against
    train_s = 0.0
    for i in range(1, a.steps + 1):
        t0 = time.time()
        out = m.train_step()
        train_s += time.time() - t0
        if not math.isfinite(out["loss"]):
            print("DIVERGED", i, json.dumps(out), flush=True)
            break
        if i % 200 == 0:
            logs = {k: round(v, 3) for k, v in out.items()}
            print(i, f"train_s={train_s:.0f}", json.dumps(logs), flush=True)
        if i % a.eval_every == 0 or i == a.steps:
            res: dict = {"step": i, "train_s": round(train_s, 1), "xw": [], "ew": [], "logz": [], "ess": []}
            xs = []
            for b in range(3):
                with ct.sampling():
                    x = m.sample(1000)
                xs.append(x)
                d = m.diagnostics()
                e = evaluate(x, {"test": ref[1000 * b : 1000 * (b + 1)], "val": val}, tgt, protocol="bnem")
                res["xw"].append(round(e["x_w2"], 3))
                res["ew"].append(round(e["e_w2"], 2))
                res["logz"].append(round(d["log_z"], 3))
                res["ess"].append(round(d["ess"], 4))
            x = torch.cat(xs).double()
            k = ((x[:, None, :] - tgt.means[None].double()) ** 2).sum(-1).argmin(1)
            cnt = torch.bincount(k, minlength=tgt.means.shape[0])
            res.update(modes=int((cnt > 0).sum()), cnt_min_max=[int(cnt.min()), int(cnt.max())],
                       xw_mean=round(float(np.mean(res["xw"])), 3), energy_evals=ct.usage.energy_evals)
            print("EVAL", json.dumps(res), flush=True)
            if a.out:
                torch.save(m.state_dict(), a.out)


if __name__ == "__main__":
    main()
