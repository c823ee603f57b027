"""The training loop run_one: exact counts, evaluation points, records, divergence / failure handling,
checkpoints (safe loading) and bitwise-identical resume, seed reproducibility, the cell lock."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from harness import checkpoint as ck
from harness import job, scoring
from harness.records import RunRecord, RunSpec


def _spec(**kw) -> RunSpec:
    base = dict(grid="test", target="dw4", method="toy", seed=7, config={"batch_size": 16},
                budget={"steps": 10}, eval_fractions=(0.1, 0.3, 1.0), n_eval_samples=32)
    base.update(kw)
    return RunSpec(**base)


def _samples(root, spec):
    with np.load(spec.run_dir(root) / "samples.npz") as f:
        return f["samples"]


def test_counts_evaluation_points_and_record(toy_method, fast_metrics, results):
    spec = _spec()
    rec = job.run_one(spec, results, threads=1)
    assert rec.status == "ok" and rec.stop_reason == "steps"
    u = rec.usage
    # the toy method evaluates energy and gradient once per step on batch_size configurations
    assert u["steps"] == 10 and u["train_energy_evals"] == 10 * 16 and u["grad_evals"] == 10 * 16
    assert u["energy_evals"] == u["train_energy_evals"] + u["sample_energy_evals"]
    # evaluations at 10 %, 30 %, 100 % of a 10-step budget: after steps 1, 3 and 10
    assert [e["step"] for e in rec.evaluations] == [1, 3, 10]
    assert [e["fraction"] for e in rec.evaluations] == [0.1, 0.3, 1.0]
    assert [e["usage"]["steps"] for e in rec.evaluations] == [1, 3, 10]
    assert all(e["n_samples"] == 32 and e["n_nonfinite"] == 0 for e in rec.evaluations)
    assert rec.config["batch_size"] == 16 and rec.config["lr"] == 0.01
    assert rec.environment["versions"]["torch"] == torch.__version__
    assert rec.environment["torch_threads"] == 1
    assert rec.samples_file == "samples.npz"
    x = _samples(results, spec)
    assert x.dtype == np.float32 and x.shape == (32, 8)
    np.testing.assert_allclose(x.reshape(32, 4, 2).mean(1), 0, atol=1e-5)  # centred particles
    on_disk = RunRecord.read(spec.run_dir(results) / "record.json")
    assert on_disk.to_dict() == json.loads(json.dumps(rec.to_dict()))
    assert not (spec.run_dir(results) / ck.CHECKPOINT_NAME).exists()  # removed once done


def test_energy_budget_stops_after_the_crossing_step(toy_method, fast_metrics, results):
    rec = job.run_one(_spec(budget={"energy_evals": 100}, eval_fractions=(1.0,)), results)
    assert rec.stop_reason == "energy_evals"
    assert rec.usage["train_energy_evals"] == 112  # 7 steps x 16: the step that crosses 100 completes
    assert rec.usage["steps"] == 7


def test_same_seed_same_results_other_seed_differs(toy_method, fast_metrics, tmp_path):
    spec = _spec(target="gmm40")
    a = job.run_one(spec, tmp_path / "a")
    b = job.run_one(spec, tmp_path / "b")
    job.run_one(replace(spec, seed=8), tmp_path / "c")
    assert [e["metrics"] for e in a.evaluations] == [e["metrics"] for e in b.evaluations]
    np.testing.assert_array_equal(_samples(tmp_path / "a", spec), _samples(tmp_path / "b", spec))
    assert not np.array_equal(_samples(tmp_path / "a", spec), _samples(tmp_path / "c", spec))


class _Kill(BaseException):
    """Simulates a process killed right after a checkpoint (not an Exception: no record is written)."""


@pytest.mark.parametrize("kill_at", [2, 3, 6])
def test_resume_at_a_checkpoint_is_bitwise_identical(toy_method, fast_metrics, tmp_path, kill_at):
    spec = _spec(budget={"steps": 8})
    ref = job.run_one(spec, tmp_path / "ref", checkpoint_every_s=1e9)

    def kill(step, logs):
        if step == kill_at:
            raise _Kill()

    root = tmp_path / "cut"
    with pytest.raises(_Kill):
        job.run_one(spec, root, checkpoint_every_s=0.0, on_step=kill)
    run_dir = spec.run_dir(root)
    assert not (run_dir / "record.json").exists()
    state = torch.load(run_dir / ck.CHECKPOINT_NAME, weights_only=True)  # safe loading
    assert state["usage"]["steps"] == kill_at
    resumed = job.run_one(spec, root, checkpoint_every_s=0.0)
    for key in ("steps", "energy_evals", "grad_evals", "sample_energy_evals"):
        assert resumed.usage[key] == ref.usage[key]
    assert [e["metrics"] for e in resumed.evaluations] == [e["metrics"] for e in ref.evaluations]
    assert [e["step"] for e in resumed.evaluations] == [e["step"] for e in ref.evaluations]
    np.testing.assert_array_equal(_samples(root, spec), _samples(tmp_path / "ref", spec))
    assert resumed.started_at is not None


def test_divergence_is_recorded_with_step_and_reason(toy_method, fast_metrics, results):
    rec = job.run_one(_spec(config={"diverge_at_step": 4}), results)
    assert rec.status == "diverged"
    assert "non-finite" in rec.stop_reason and "step 4" in rec.stop_reason
    assert rec.usage["steps"] == 4
    rec = job.run_one(_spec(target="gmm40", config={"nan_samples": True}), results)
    assert rec.status == "diverged" and "non-finite samples" in rec.stop_reason
    assert rec.evaluations[0]["n_nonfinite"] == 1


def test_failure_keeps_the_checkpoint_and_a_rerun_resumes(toy_method, fast_metrics, results):
    spec = _spec(config={"fail_at_step": 5})
    rec = job.run_one(spec, results, checkpoint_every_s=0.0)
    assert rec.status == "failed" and "toy failure at step 5" in rec.error and "Traceback" in rec.error
    assert rec.usage["steps"] == 4
    state = ck.load_checkpoint(spec.run_dir(results))
    assert state is not None and state["usage"]["steps"] == 4
    # a failed cell is not "done": run_one runs it again from its checkpoint (here it fails again at once,
    # because the toy's step counter was restored to 4)
    again = job.run_one(spec, results, checkpoint_every_s=0.0)
    assert again.status == "failed" and again.usage["steps"] == 4


def test_done_cell_is_returned_not_rerun(toy_method, fast_metrics, results):
    spec = _spec()
    first = job.run_one(spec, results)
    calls = []
    second = job.run_one(spec, results, on_step=lambda s, logs: calls.append(s))
    assert calls == [] and second.finished_at == first.finished_at


def test_checkpoint_of_another_spec_is_refused(toy_method, fast_metrics, results):
    spec = _spec(budget={"steps": 6})

    def kill(step, logs):
        if step == 2:
            raise _Kill()

    with pytest.raises(_Kill):
        job.run_one(spec, results, checkpoint_every_s=0.0, on_step=kill)
    rec = job.run_one(replace(spec, seed=99), results)
    assert rec.status == "failed" and "different spec" in rec.error


def test_a_locked_cell_is_not_started_twice(toy_method, fast_metrics, results):
    spec = _spec()
    with ck.CellLock(spec.run_dir(results)):
        holder = ck.is_locked(spec.run_dir(results))
        assert holder is not None and holder["pid"] > 0
        with pytest.raises(ck.CellBusyError, match="another process"):
            job.run_one(spec, results)
    assert ck.is_locked(spec.run_dir(results)) is None
    assert job.run_one(spec, results).status == "ok"


def test_missing_reference_skips_metrics_but_trains(toy_method, fast_metrics, results, monkeypatch):
    import targets.base

    def no_reference(self, split="test", n=None):
        raise FileNotFoundError("no reference here")

    monkeypatch.setattr(targets.base.Target, "reference", no_reference)
    rec = job.run_one(_spec(), results)
    assert rec.status == "ok" and rec.usage["steps"] == 10
    assert all(e["metrics"] == {} and "no reference here" in e["reference_error"] for e in rec.evaluations)
    assert "no reference here" in rec.reference["error"]


def test_real_metrics_path(toy_method, results):
    """The loop calls harness.metrics.evaluate (the real module once it exists)."""
    rec = job.run_one(_spec(target="gmm40", budget={"steps": 2}, eval_fractions=(1.0,), n_eval_samples=16),
                      results)
    assert rec.status == "ok", rec.error
    assert {"x_w2", "e_w2"} <= set(rec.evaluations[-1]["metrics"])


def test_bad_device_fails_cleanly(toy_method, fast_metrics, results):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    rec = job.run_one(_spec(device="cuda"), results)
    assert rec.status == "failed" and "CUDA is not available" in rec.error


def test_grid_metric_options_reach_evaluate(toy_method, results, monkeypatch):
    seen = []

    def spy(samples, reference, target, protocol, **opts):
        seen.append((protocol, opts))
        return {}

    monkeypatch.setattr(scoring, "evaluate_metrics", spy)
    job.run_one(_spec(grid="smoke", budget={"steps": 2}, eval_fractions=(1.0,)), results)
    job.run_one(_spec(grid="other", budget={"steps": 2}, eval_fractions=(1.0,)), results)
    smoke = {"n_boot": 0, "n_boot_ot": 0, "noise_floor": False}
    # one call per protocol per run (the single evaluation is selected, so it keeps the grid's options)
    assert seen == [(p, smoke) for p in scoring.SCORE_PROTOCOLS] + [(p, {}) for p in scoring.SCORE_PROTOCOLS]


def test_sigterm_checkpoints_at_the_step_boundary_and_exits(toy_method, fast_metrics, results):
    import os
    import signal

    spec = _spec(budget={"steps": 10})

    def term(step, logs):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    old = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(SystemExit) as e:
            job.run_one(spec, results, checkpoint_every_s=1e9, on_step=term)
    finally:
        signal.signal(signal.SIGTERM, old)
    assert e.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is old  # handlers restored
    assert ck.load_checkpoint(spec.run_dir(results))["usage"]["steps"] == 4
    assert not (spec.run_dir(results) / "record.json").exists()
    assert job.run_one(spec, results).usage["steps"] == 10  # resumes


def test_usr2_goes_to_the_previous_handler_and_timeout_is_recorded(toy_method, fast_metrics, results):
    import os
    import signal

    from submitit.core.utils import UncompletedJobError

    calls = []

    def submitit_like(signum, frame):  # what submitit does when the requeues are used up
        calls.append(signum)
        raise UncompletedJobError("Job not requeued because: timed-out too many times.")

    def usr2(step, logs):
        if step == 3:
            os.kill(os.getpid(), signal.SIGUSR2)

    spec = _spec(budget={"steps": 10})
    old = signal.signal(signal.SIGUSR2, submitit_like)
    try:
        with pytest.raises(UncompletedJobError):
            job.run_one(spec, results, checkpoint_every_s=1e9, on_step=usr2)
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert calls == [signal.SIGUSR2]
    rec = RunRecord.read(spec.run_dir(results) / "record.json")
    assert rec.status == "timeout" and rec.usage["steps"] == 3
    assert ck.load_checkpoint(spec.run_dir(results))["usage"]["steps"] == 3


def test_wall_clock_guard_records_timeout_and_a_larger_guard_resumes(toy_method, fast_metrics, results):
    # 0.05 s steps under a 0.12 s guard: it stops after 3 of 20 counted steps, scored, status timeout
    spec = _spec(config={"step_sleep_s": 0.05}, budget={"steps": 20, "guard_seconds": 0.12},
                 eval_fractions=(0.5, 1.0))
    rec = job.run_one(spec, results)
    assert rec.status == "timeout" and rec.stop_reason == job.GUARD_STOP
    assert rec.usage["steps"] == 3
    assert [e["step"] for e in rec.evaluations] == [3]  # evaluated where it stopped
    assert rec.evaluations[0]["scores"]  # and scored under the protocols
    run_dir = spec.run_dir(results)
    assert (run_dir / ck.CHECKPOINT_NAME).exists()  # kept: a larger guard resumes from the stop
    small = np.load(run_dir / "samples_small.npz")["samples"]
    np.testing.assert_array_equal(small, np.load(run_dir / rec.evaluations[-1]["samples_file"])["samples"])
    # the same guard: finished for this spec, not re-run
    calls = []
    again = job.run_one(spec, results, on_step=lambda s, logs: calls.append(s))
    assert calls == [] and again.finished_at == rec.finished_at
    # the guard is not part of the cell's identity: a larger one resumes at step 3 and finishes the steps
    bigger = replace(spec, budget={"steps": 20, "guard_seconds": 60.0})
    assert job.spec_key(bigger) == job.spec_key(spec)
    done = job.run_one(bigger, results, on_step=lambda s, logs: calls.append(s))
    assert done.status == "ok" and done.stop_reason == "steps" and calls[0] == 4
    assert [e["step"] for e in done.evaluations] == [10, 20]
    assert not (run_dir / ck.CHECKPOINT_NAME).exists()


def test_a_counted_budget_finishing_first_is_never_a_timeout(toy_method, fast_metrics, results):
    rec = job.run_one(_spec(budget={"steps": 4, "guard_seconds": 3600.0}), results)
    assert rec.status == "ok" and rec.stop_reason == "steps"
    rd = _spec().run_dir(results)
    with np.load(rd / "samples_small.npz") as z:
        assert z["samples"].shape == (32, 8)  # fewer rows than release_rows(8) = 1000: all of them
