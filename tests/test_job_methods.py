"""Contract of every registered method with the harness loop: a cell interrupted right after a checkpoint and
resumed ends with the same counts and bitwise the same samples and metrics as an uninterrupted run (CPU),
and its checkpoint loads with ``torch.load(weights_only=True)``. Uses each method's ``smoke`` presets."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import methods
from harness import checkpoint as ck
from harness import grids, job, scoring

REGISTERED = [m for m in methods.names() if m != "toy"]


def _fast_metrics(samples, reference, target, protocol, **opts):
    s = samples[torch.isfinite(samples).all(1)].double()
    return {f"mean_{i}": float(v) for i, v in enumerate(s.mean(0))} | {"second_moment": float((s**2).mean())}


class _Kill(BaseException):
    pass


@pytest.mark.parametrize("method", REGISTERED)
# GMM-40 in the default suite; DW-4 (minutes for some methods' smoke configs on 2 cores) under -m slow
@pytest.mark.parametrize("target", ["gmm40", pytest.param("dw4", marks=pytest.mark.slow)])
def test_resume_is_bitwise_identical(method, target, tmp_path, monkeypatch):
    monkeypatch.setattr(scoring, "evaluate_metrics", _fast_metrics)
    base = grids.expand("smoke", methods=[method], targets=[target]).specs[0]
    spec = replace(base, budget={"steps": 4}, eval_fractions=(0.5, 1.0), n_eval_samples=16)
    ref = job.run_one(spec, tmp_path / "ref", threads=1, checkpoint_every_s=1e9)
    assert ref.status == "ok", ref.error or ref.stop_reason

    def kill(step, logs):
        if step == 3:
            raise _Kill()

    with pytest.raises(_Kill):
        job.run_one(spec, tmp_path / "cut", threads=1, checkpoint_every_s=0.0, on_step=kill)
    state = torch.load(spec.run_dir(tmp_path / "cut") / ck.CHECKPOINT_NAME, weights_only=True)
    assert state["usage"]["steps"] == 3
    resumed = job.run_one(spec, tmp_path / "cut", threads=1, checkpoint_every_s=0.0)
    assert resumed.status == "ok", resumed.error or resumed.stop_reason
    for key in ("steps", "energy_evals", "grad_evals", "sample_energy_evals", "network_evals"):
        assert resumed.usage[key] == ref.usage[key], key
    assert [e["metrics"] for e in resumed.evaluations] == [e["metrics"] for e in ref.evaluations]
    with np.load(spec.run_dir(tmp_path / "ref") / "samples.npz") as a, \
            np.load(spec.run_dir(tmp_path / "cut") / "samples.npz") as b:
        np.testing.assert_array_equal(a["samples"], b["samples"])
