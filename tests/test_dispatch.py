"""Dispatch: cell states and idempotence, preparing re-runs, the debug and local (submitit) executors, jobs
that die without a record, progress lines, plugins."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import pytest

from harness import checkpoint as ck
from harness import dispatch, job
from harness.records import RunSpec

PLUGIN = "tests/conftest.py:register_toy"


def _spec(**kw) -> RunSpec:
    base = dict(grid="t", target="gmm40", method="toy", seed=3, budget={"steps": 4},
                eval_fractions=(0.5, 1.0), n_eval_samples=16)
    base.update(kw)
    return RunSpec(**base)


class _Kill(BaseException):
    pass


def _interrupted(spec, root):
    def kill(step, logs):
        if step == 2:
            raise _Kill()

    with pytest.raises(_Kill):
        job.run_one(spec, root, checkpoint_every_s=0.0, on_step=kill)


def test_cell_states_and_plan(toy_method, fast_metrics, results):
    ok, div, fail, inter, new, running, other = (_spec(replicate=i) for i in range(7))
    job.run_one(ok, results)
    job.run_one(replace(div, config={"diverge_at_step": 2}), results)
    div = replace(div, config={"diverge_at_step": 2})
    fail = replace(fail, config={"fail_at_step": 2})
    job.run_one(fail, results)
    _interrupted(inter, results)
    job.run_one(replace(other, seed=11), results)  # record of a different spec
    lock = ck.CellLock(running.run_dir(results)).acquire()
    try:
        p = dispatch.plan([ok, div, fail, inter, new, running, other], results)
        states = [c.state for c in p.cells]
        assert states == ["ok", "diverged", "failed", "interrupted", "new", "running", "mismatch"]
        assert [c.spec.replicate for c in p.to_run] == [2, 3, 4]
        forced = dispatch.plan([ok, div, fail, inter, new, running, other], results, force=True)
        assert [c.spec.replicate for c in forced.to_run] == [0, 1, 2, 3, 4, 6]
        assert forced.counts()["running"] == 1
    finally:
        lock.release()


def test_prepare_moves_failed_record_aside_and_force_discards(toy_method, fast_metrics, results):
    fail = _spec(config={"fail_at_step": 3})
    job.run_one(fail, results, checkpoint_every_s=0.0)
    d = fail.run_dir(results)
    assert dispatch.prepare(dispatch.cell_state(fail, results), results, force=False)
    assert not (d / "record.json").exists() and (d / "record.prev.json").exists()
    assert (d / ck.CHECKPOINT_NAME).exists()  # kept: the re-run resumes
    ok = _spec(replicate=1)
    job.run_one(ok, results)
    assert dispatch.prepare(dispatch.cell_state(ok, results), results, force=True)
    d = ok.run_dir(results)
    assert not (d / "record.json").exists() and not (d / "samples.npz").exists()
    with ck.CellLock(d):
        assert not dispatch.prepare(dispatch.cell_state(ok, results), results, force=True)


def test_debug_executor_runs_in_process_and_prints_one_line_per_cell(toy_method, fast_metrics, results):
    specs = [_spec(replicate=i) for i in range(2)]
    p = dispatch.plan(specs, results)
    out = io.StringIO()
    launch = dispatch.launch(p.to_run, results, dispatch.DispatchOptions(executor="debug"), stream=out,
                             interactive=False)
    assert launch.outcomes == {s.cell_id: "ok" for s in specs}
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("[1/2] ok") and "steps=4" in lines[0]
    assert dispatch.plan(specs, results).to_run == []


def test_local_executor_runs_cells_in_subprocesses(toy_method, results):
    """Through submitit's LocalExecutor, with the real metrics in the child processes."""
    specs = [_spec(target="gmm40"), _spec(target="dw4", config={"batch_size": 8}), _spec(replicate=1)]
    opts = dispatch.DispatchOptions(executor="local", jobs=2, plugins=(PLUGIN,), poll_s=0.2)
    out = io.StringIO()
    launch = dispatch.launch(dispatch.plan(specs, results).to_run, results, opts,
                             time_limit_min=lambda s: 5, stream=out, interactive=False)
    assert launch.outcomes == {s.cell_id: "ok" for s in specs}, out.getvalue()
    assert launch.folder and "/_submitit/" in launch.folder
    # two worker processes; the first runs cells 0 and 2 one after the other
    assert len(set(launch.job_ids.values())) == 2
    assert launch.job_ids[specs[0].cell_id] == launch.job_ids[specs[2].cell_id]
    assert len(out.getvalue().strip().splitlines()) == 3
    for s in specs:
        rec = json.loads((s.run_dir(results) / "record.json").read_text())
        assert rec["status"] == "ok" and rec["usage"]["steps"] == 4
        batch = s.config.get("batch_size", 32)
        assert rec["usage"]["train_energy_evals"] == 4 * batch
        assert rec["environment"]["torch_threads"] == 1  # 2 cores / 2 jobs
    # a second launch has nothing to do
    assert dispatch.plan(specs, results).to_run == []


def test_local_job_dying_without_record_gets_a_failed_record(toy_method, results):
    spec = _spec(config={"exit_at_step": 3}, budget={"steps": 6})
    never = _spec(replicate=1)  # queued behind it in the same worker: never started
    opts = dispatch.DispatchOptions(executor="local", jobs=1, plugins=(PLUGIN,), poll_s=0.2,
                                    checkpoint_every_s=0.0)
    launch = dispatch.launch([dispatch.cell_state(s, results) for s in (spec, never)], results, opts,
                             time_limit_min=lambda s: 5, stream=io.StringIO(), interactive=False)
    assert launch.outcomes == {spec.cell_id: "failed", never.cell_id: "failed"}
    assert dispatch.cell_state(never, results).state == "failed"  # re-run by the next launch
    rec = json.loads((spec.run_dir(results) / "record.json").read_text())
    assert rec["status"] == "failed" and "exited before this cell wrote its record" in rec["error"]
    assert "resumes from its checkpoint" in rec["error"]
    assert ck.load_checkpoint(spec.run_dir(results))["usage"]["steps"] == 2
    # a re-launch resumes: state "failed" is re-run, from step 2
    assert dispatch.cell_state(spec, results).state == "failed"


def test_plugins_are_validated(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        dispatch.load_plugins(["nowhere/x.py"])
    with pytest.raises(ValueError, match="cannot import"):
        dispatch.load_plugins(["no_such_module_xyz"])
    with pytest.raises(ValueError, match="no callable"):
        dispatch.load_plugins(["json:nope"])
    assert dispatch.absolute_plugins(["tests/conftest.py:f"])[0].startswith("/")


class _FakeJob:
    """Stands in for a submitit SLURM job handle (job id and log paths only)."""

    def __init__(self, job_id, tmp_path):
        self.job_id = job_id
        paths = {"stdout": tmp_path / "none.out", "result_pickle": tmp_path / "none.pkl"}
        self.paths = type("P", (), paths)()


def test_wait_never_hangs_when_squeue_keeps_failing(monkeypatch, results, tmp_path):
    spec = _spec()
    monkeypatch.setattr(dispatch, "squeue_states", lambda ids: None)
    opts = dispatch.DispatchOptions(poll_s=0.05, squeue_give_up_s=0.3)
    out = dispatch.wait_slurm({spec.cell_id: (_FakeJob("41_0", tmp_path), spec)}, results, opts,
                              dispatch.Launch(), stream=io.StringIO())
    assert out.outcomes == {spec.cell_id: "unknown"} and out.n_failed == 1
    assert not (spec.run_dir(results) / "record.json").exists()


def test_job_gone_from_squeue_without_record_is_failed_after_grace(monkeypatch, results, tmp_path):
    spec, alive = _spec(), _spec(replicate=1)
    seen = {"41_0": "RUNNING", "41_1": "RUNNING"}
    calls = []

    def fake_squeue(ids):
        calls.append(1)
        if len(calls) > 2:
            seen.pop("41_0", None)  # task 0 vanishes; task 1 stays running, then writes its record
        if len(calls) > 6 and "41_1" in seen:
            del seen["41_1"]
            from harness.records import RunRecord

            RunRecord(spec=alive, status="ok").write(alive.run_dir(results) / "record.json")
        return dict(seen)

    monkeypatch.setattr(dispatch, "squeue_states", fake_squeue)
    opts = dispatch.DispatchOptions(poll_s=0.05, lost_grace_s=0.2)
    handles = {spec.cell_id: (_FakeJob("41_0", tmp_path), spec),
               alive.cell_id: (_FakeJob("41_1", tmp_path), alive)}
    out = dispatch.wait_slurm(handles, results, opts, dispatch.Launch(), stream=io.StringIO())
    assert out.outcomes == {spec.cell_id: "failed", alive.cell_id: "ok"}
    rec = json.loads((spec.run_dir(results) / "record.json").read_text())
    assert "SLURM job 41_0 left the queue without writing a record" in rec["error"]


def test_checkpoint_of_another_spec_is_a_mismatch(toy_method, fast_metrics, results):
    spec = _spec(budget={"steps": 6})
    _interrupted(spec, results)
    assert dispatch.cell_state(spec, results).state == "interrupted"
    changed = replace(spec, budget={"steps": 8})
    assert dispatch.cell_state(changed, results).state == "mismatch"
    assert dispatch.plan([changed], results).to_run == []
    assert dispatch.prepare(dispatch.cell_state(changed, results), results, force=True)
    assert dispatch.cell_state(changed, results).state == "new"


def test_interactive_progress_bar(results):
    from harness.records import RunRecord

    stream = io.StringIO()
    prog = dispatch.Progress(2, stream, interactive=True)
    assert prog.bar is not None
    prog.running(2)
    s = _spec()
    prog.finished(s, "ok", RunRecord(spec=s, status="ok", usage={"steps": 4, "energy_evals": 10}))
    prog.finished(_spec(replicate=1), "failed", None)
    prog.close()
    text = stream.getvalue()
    assert "2/2" in text and "[1/2] ok" in text and "[2/2] failed" in text and prog.failed == 1
