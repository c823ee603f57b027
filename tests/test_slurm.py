"""Integration tests through a real SLURM controller (``make slurm-up``; skipped with the reason otherwise):
a grid dispatched as a job array with every record written, a second launch submitting nothing, a task
preempted with USR2 requeued and resumed from its checkpoint, and a task killed with SIGKILL resumed by a
re-launch — each ending with exactly the counts and metrics of an uninterrupted run."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from harness import checkpoint as ck
from harness import dispatch, job
from harness import run as cli
from harness.records import RunSpec

pytestmark = pytest.mark.slurm
PLUGIN = "tests/conftest.py:register_toy"


def _wait_for_checkpoint(spec: RunSpec, root: Path, min_steps: int, timeout: float = 240.0) -> int:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            state = ck.load_checkpoint(spec.run_dir(root))
        except Exception:  # being replaced right now
            state = None
        if state is not None and state["usage"]["steps"] >= min_steps:
            return int(state["usage"]["steps"])
        time.sleep(0.5)
    raise AssertionError(f"no checkpoint with >= {min_steps} steps after {timeout} s")


def _slow_spec(**kw) -> RunSpec:
    base = dict(grid="slurmtest", target="dw4", method="toy", seed=5,
                config={"batch_size": 16, "step_sleep_s": 0.2}, budget={"steps": 24},
                eval_fractions=(0.25, 1.0), n_eval_samples=32)
    base.update(kw)
    return RunSpec(**base)


def _uninterrupted(spec: RunSpec, root: Path):
    old = torch.get_num_threads()
    try:
        return job.run_one(spec, root, threads=1, checkpoint_every_s=1e9)
    finally:
        torch.set_num_threads(old)


def _submit(spec: RunSpec, root: Path) -> dispatch.Launch:
    opts = dispatch.DispatchOptions(executor="slurm", wait=False, plugins=(PLUGIN,), checkpoint_every_s=0.0,
                                    poll_s=1.0, lost_grace_s=5.0)
    return dispatch.launch([dispatch.cell_state(spec, root)], root, opts, time_limit_min=lambda s: 10,
                           stream=io.StringIO())


def _same_outcome(a, b) -> None:
    for key in ("steps", "energy_evals", "grad_evals", "train_energy_evals", "sample_energy_evals"):
        assert a["usage"][key] == b.usage[key], key
    assert [e["metrics"] for e in a["evaluations"]] == [e["metrics"] for e in b.evaluations]
    assert [e["step"] for e in a["evaluations"]] == [e["step"] for e in b.evaluations]


def test_grid_as_job_array_then_nothing_to_submit(slurm, toy_method, tmp_path):
    args = ["--grid", "smoke", "--methods", "toy", "--targets", "gmm40,dw4", "--seeds", "2",
            "--executor", "slurm", "--results", str(tmp_path), "--plugin", PLUGIN]
    out = io.StringIO()
    rc = cli.main(args, stream=out)
    assert rc == 0, out.getvalue()
    text = out.getvalue()
    assert "on the slurm executor" in text and "done: ok 4" in text
    recs = sorted(tmp_path.glob("smoke/*/toy/r*/record.json"))
    assert len(recs) == 4
    array_ids = set()
    for p in recs:
        r = json.loads(p.read_text())
        assert r["status"] == "ok" and r["usage"]["steps"] == 3
        assert r["environment"]["slurm"]["cpus_per_task"] == "1" and r["environment"]["torch_threads"] == 1
        array_ids.add(r["environment"]["slurm"]["array_job_id"])
    assert len(array_ids) == 1  # one array for the one resource shape
    out = io.StringIO()
    assert cli.main(args, stream=out) == 0
    assert "submitted 0 jobs" in out.getvalue()


def test_usr2_preemption_requeues_and_resumes_with_the_same_counts(slurm, toy_method, tmp_path):
    spec = _slow_spec()
    ref = _uninterrupted(spec, tmp_path / "ref")
    root = tmp_path / "slurm"
    launch = _submit(spec, root)
    (jid,) = launch.job_ids.values()
    steps_before = _wait_for_checkpoint(spec, root, 4)
    subprocess.run(["scancel", "--signal=USR2", jid], check=True, timeout=30)
    out = dispatch.wait_slurm(launch.handles, root, dispatch.DispatchOptions(poll_s=1.0, lost_grace_s=30.0),
                              launch, stream=io.StringIO())
    assert out.outcomes == {spec.cell_id: "ok"}
    rec = json.loads((spec.run_dir(root) / "record.json").read_text())
    assert rec["environment"]["slurm"].get("restart_count") == "1"  # it was requeued once
    assert steps_before >= 4
    _same_outcome(rec, ref)


def test_killed_task_resumes_from_its_checkpoint_on_relaunch(slurm, toy_method, tmp_path):
    spec = _slow_spec(seed=6)
    ref = _uninterrupted(spec, tmp_path / "ref")
    root = tmp_path / "slurm"
    launch = _submit(spec, root)
    _wait_for_checkpoint(spec, root, 4)
    holder = ck.read_lock_info(spec.run_dir(root))
    os.kill(int(holder["pid"]), signal.SIGKILL)
    out = dispatch.wait_slurm(launch.handles, root, dispatch.DispatchOptions(poll_s=1.0, lost_grace_s=3.0),
                              launch, stream=io.StringIO())
    assert out.outcomes == {spec.cell_id: "failed"}  # the harness noticed the job vanished without a record
    first = ck.load_checkpoint(spec.run_dir(root))
    assert first is not None and first["usage"]["steps"] >= 4
    # re-launch: the failed cell is re-run and resumes from the checkpoint
    state = dispatch.cell_state(spec, root)
    assert state.state == "failed"
    opts = dispatch.DispatchOptions(executor="slurm", plugins=(PLUGIN,), checkpoint_every_s=0.0, poll_s=1.0)
    again = dispatch.launch([state], root, opts, time_limit_min=lambda s: 10, stream=io.StringIO())
    assert again.outcomes == {spec.cell_id: "ok"}
    rec = json.loads((spec.run_dir(root) / "record.json").read_text())
    assert rec["started_at"] == first["started_at"]  # the resumed run kept the first attempt's start
    _same_outcome(rec, ref)
