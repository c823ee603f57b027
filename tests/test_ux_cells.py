"""A researcher's first hour, cell level: a truncated checkpoint never leaves a cell stuck; resumed cells say
so (flag and wall-clock segments); progress inside a cell (log lines, live line, progress.json, callback)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from harness import checkpoint as ck
from harness import job
from harness import progress as pg
from harness.budget import Budget, Usage
from harness.records import RunSpec


def _spec(**kw) -> RunSpec:
    base = dict(grid="test", target="dw4", method="toy", seed=7, config={"batch_size": 16},
                budget={"steps": 8}, eval_fractions=(0.1, 0.3, 1.0), n_eval_samples=32)
    base.update(kw)
    return RunSpec(**base)


class _Kill(BaseException):
    """A process killed right after a checkpoint (no record is written)."""


def _cut(spec, root, at):
    def kill(step, logs):
        if step == at:
            raise _Kill()

    with pytest.raises(_Kill):
        job.run_one(spec, root, checkpoint_every_s=0.0, on_step=kill, progress="off")


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _samples(root, spec):
    with np.load(spec.run_dir(root) / "samples.npz") as f:
        return f["samples"]


def test_truncated_checkpoint_is_set_aside_and_the_previous_one_resumes(toy_method, fast_metrics, tmp_path,
                                                                         capsys):
    spec = _spec()
    ref = job.run_one(spec, tmp_path / "ref", checkpoint_every_s=1e9, progress="off")
    root = tmp_path / "cut"
    _cut(spec, root, 5)
    d = spec.run_dir(root)
    assert (d / ck.PREV_CHECKPOINT_NAME).exists()  # the checkpoint before the last one is kept
    _truncate(d / ck.CHECKPOINT_NAME)
    with pytest.raises(Exception):  # noqa: B017 (torch's error varies: zip archive, EOF, EINVAL)
        ck.load_checkpoint(d)  # what made the cell fail on every re-run before
    rec = job.run_one(spec, root, checkpoint_every_s=0.0, progress="off")
    err = capsys.readouterr().err
    assert rec.status == "ok"
    notes = rec.environment["checkpoint_recovery"]
    assert len(notes) == 1 and notes[0]["file"].endswith("checkpoint.pt")
    assert notes[0]["resumed_from"] == ck.PREV_CHECKPOINT_NAME
    moved = notes[0]["moved_to"]
    assert "checkpoint.corrupt-" in moved and (d / moved.rsplit("/", 1)[-1]).exists()
    assert str(d / ck.CHECKPOINT_NAME) in err and "moved aside" in err  # named on stderr
    # resumed from step 4: the same counts and bitwise the same samples as an uninterrupted run
    assert rec.environment["resumed"] is True and rec.environment["segments"][0]["steps_to"] == 4
    for key in ("steps", "energy_evals", "grad_evals"):
        assert rec.usage[key] == ref.usage[key]
    np.testing.assert_array_equal(_samples(root, spec), _samples(tmp_path / "ref", spec))


def test_no_readable_checkpoint_restarts_from_scratch(toy_method, fast_metrics, tmp_path):
    spec = _spec()
    root = tmp_path / "cut"
    _cut(spec, root, 5)
    d = spec.run_dir(root)
    _truncate(d / ck.CHECKPOINT_NAME)
    (d / ck.PREV_CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    rec = job.run_one(spec, root, progress="off")
    assert rec.status == "ok" and rec.usage["steps"] == 8
    notes = rec.environment["checkpoint_recovery"]
    assert [n["resumed_from"] for n in notes] == ["scratch", "scratch"]
    assert rec.environment["resumed"] is False and len(rec.environment["segments"]) == 1
    assert not ck.has_checkpoint(d)  # done: no resume state left; the damaged files stay set aside
    assert len(list(d.glob("checkpoint.corrupt-*.pt"))) == 2


def test_resumed_cell_records_its_segments(toy_method, fast_metrics, tmp_path):
    spec = _spec()
    fresh = job.run_one(spec, tmp_path / "ref", progress="off")
    assert fresh.environment["resumed"] is False
    assert [(s["steps_from"], s["steps_to"]) for s in fresh.environment["segments"]] == [(0, 8)]
    root = tmp_path / "cut"
    _cut(spec, root, 3)
    rec = job.run_one(spec, root, checkpoint_every_s=0.0, progress="off")
    env = rec.environment
    assert env["resumed"] is True
    segs = env["segments"]
    assert [(s["steps_from"], s["steps_to"]) for s in segs] == [(0, 3), (3, 8)]
    assert sum(s["train_seconds"] for s in segs) == pytest.approx(rec.usage["train_seconds"], rel=1e-9)
    assert all(s["started_at"] <= s["ended_at"] and s["host"] for s in segs)


def test_progress_lines_file_and_callback(toy_method, fast_metrics, results, capsys, monkeypatch):
    monkeypatch.setenv("BOLTZBENCH_PROGRESS_EVERY", "0.000001")
    spec = _spec()
    job.run_one(spec, results, progress="lines")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith(f"[{spec.cell_id}]")]
    assert len(lines) >= 8
    last = lines[-1]
    for part in ("step 8/8", "100.0%", "energy evals", "elapsed", "eta"):
        assert part in last, last
    assert any("x_w2" in ln for ln in lines)  # the latest (val-split) metric once an evaluation scored one
    snap = json.loads((spec.run_dir(results) / pg.PROGRESS_NAME).read_text())
    assert snap["state"] == "ok" and snap["step"] == 8 and snap["fraction"] == pytest.approx(1.0)

    seen = []
    job.run_one(_spec(seed=8), results, progress=seen.append)
    assert [s["step"] for s in seen][-1] == 8 and all(s["cell"] == "test/dw4/toy/r0" for s in seen)
    assert "[test/dw4/toy/r0]" not in capsys.readouterr().err  # a callback replaces the output


def test_live_line_on_a_terminal(tmp_path):
    class Tty:
        def __init__(self):
            self.text = ""

        def isatty(self):
            return True

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    usage = Usage()
    out = Tty()
    p = pg.CellProgress("g/t/m/r0", tmp_path, Budget(steps=10), usage, stream=out)
    assert p.mode == "bar"
    for _ in range(3):
        usage.steps += 1
        p.step({"loss": 1.5})
        p.last_bar = -1e9  # no rate limit in the test
    p.evaluated({"fraction": 0.3, "metrics": {"x_w2": 0.25}})
    assert out.text.count("\r") >= 4 and "step 3/10 30.0%" in out.text and "x_w2 0.25 @30%" in out.text
    assert "loss 1.5" in out.text
    p.close()
    assert out.text.endswith("\r\x1b[K")  # the live line is cleared, not left half-drawn
    assert pg.read_progress(tmp_path)["state"] == "finished"


def test_describe_and_eta():
    snap = {"cell": "a/b/c/r0", "step": 50, "steps_limit": 100, "fraction": 0.5, "train_energy_evals": 1000,
            "energy_limit": None, "metric": ["e_w2", 0.1], "metric_at": 0.3, "loss": None, "elapsed_s": 65,
            "eta_s": 3700}
    line = pg.describe(snap)
    assert line == ("[a/b/c/r0] step 50/100 50.0% | energy evals 1e+03 | e_w2 0.1 @30% | 1m05s elapsed, "
                    "eta 1h01m")


def test_timing_marks_or_excludes_resumed_cells(toy_method, fast_metrics, tmp_path):
    from harness import timing

    root = tmp_path / "runs"
    job.run_one(_spec(replicate=0), root, progress="off")
    resumed = _spec(replicate=1, seed=8)
    _cut(resumed, root, 4)
    job.run_one(resumed, root, checkpoint_every_s=0.0, progress="off")
    df = timing.load_runs(root)
    assert df.groupby("replicate")["resumed"].first().to_dict() == {0: False, 1: True}
    (t,) = timing.timing_report(df, metric="x_w2", baseline=None)
    assert t.rows[0][0].endswith(" †") and t.cells["toy"]["n_resumed"] == 1
    assert any(n.startswith("†: 1 run(s) were interrupted and resumed") for n in t.notes)
    (t,) = timing.timing_report(df, metric="x_w2", baseline=None, exclude_resumed=True)
    assert not t.rows[0][0].endswith(" †") and t.cells["toy"]["n_runs"] == 1
    assert "1 resumed run(s) excluded (--exclude-resumed)." in t.notes
