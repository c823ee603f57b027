"""Slow known-answer test: iDEM on GMM-40 under the ``cpu`` preset (iDEM protocol, 1000 vs 1000 samples).

Acceptance of issue 10: x-W2 ≤ 8.0 (published 7.42; exact samples score ≈ 4.16 at this size; here the mean
over five batches of 1000) and at least 36 of the 40 modes hold a sample (of the first 1000) within 3 standard
deviations. Runs the suggested ``cpu`` budget (25 000 steps,
samples from the EMA network): about 10 minutes on one free core.
"""

import math

import numpy as np
import pytest
import torch

import targets
from harness.budget import CountingTarget
from methods.idem import IDEM, Config


def _x_w2(x: torch.Tensor, y: torch.Tensor) -> float:
    """iDEM protocol x-W2: sqrt of exact OT cost with squared-Euclidean ground cost, uniform weights."""
    import ot

    M = (torch.cdist(x.double(), y.double()) ** 2).numpy()
    a = np.full(x.shape[0], 1.0 / x.shape[0])
    b = np.full(y.shape[0], 1.0 / y.shape[0])
    return math.sqrt(ot.emd2(a, b, M, numItermax=int(1e7)))


@pytest.mark.slow
def test_idem_gmm40_cpu_preset_quality():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tgt = targets.get("gmm40")
        cfg = Config.for_target("gmm40", **Config.preset("cpu", "gmm40"))
        m = IDEM(CountingTarget(tgt), cfg, "cpu", torch.Generator().manual_seed(0))
        for _ in range(Config.suggested_budget("cpu", "gmm40")["steps"]):
            m.train_step()
        x = m.sample(5000)
    finally:
        torch.set_num_threads(n)
    # five batches of 1000 against five fresh exact draws of 1000 (the blog-post re-run's "5 batches of
    # 1000"): one 1000-vs-1000 draw of exact samples alone scores between 3.4 and 6.9
    refs = [tgt.sample(1000, torch.Generator().manual_seed(1234 + i)) for i in range(5)]
    w2s = [_x_w2(xb, ref) for xb, ref in zip(x.split(1000), refs)]
    w2 = float(np.mean(w2s))
    covered = int((torch.cdist(tgt.means.float(), x[:1000]).min(1).values < 3 * tgt.std).sum())
    print(f"iDEM GMM-40 cpu preset: x-W2 {w2:.3f} (iDEM protocol, mean of {np.round(w2s, 2).tolist()}), "
          f"{covered}/40 modes within 3 std")
    assert w2 <= 8.0, w2s
    assert covered >= 36, covered
