"""methods.lr.plateau_update against torch's own ReduceLROnPlateau on the same sequence of checks."""

from __future__ import annotations

import math

import torch

from methods.lr import plateau_update


def test_plateau_update_reduces_when_torchs_scheduler_does():
    values = [5.0, 4.0, 4.0, 3.9999, 4.1, math.nan, 4.2, 3.0, 3.0, 3.0, 3.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=2)
    best, bad, lr = math.inf, 0, 1.0
    for v in values:
        sched.step(v)
        best, bad, reduce = plateau_update(best, bad, v, patience=2)
        lr *= 0.5 if reduce else 1.0
        assert lr == opt.param_groups[0]["lr"], v
    assert lr < 1.0  # the sequence does reduce
