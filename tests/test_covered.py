"""equal-evals-cpu: step caps from the cpu grid, and cells reused from the cpu run they would repeat."""

from __future__ import annotations

import io
import json

import pytest

from harness import covered, dispatch, grids
from harness import run as cli
from harness.records import RunRecord

E_DW4 = grids.EQUAL_EVALS_CPU["dw4"]


def _spec(method: str = "fab", target: str = "dw4"):
    return grids.expand("equal-evals-cpu", [method], [target], 1, [], "cpu").specs[0]


def _write_source(root, spec, change: dict | None = None) -> RunRecord:
    """A finished cpu-grid record of the run the equal-evals cell would repeat (``change`` alters it)."""
    src = covered.source_spec(spec, "cpu")
    usage = {"steps": src.budget["steps"], "train_energy_evals": 180_000, "energy_evals": 200_000}
    rec = RunRecord(spec=src, status="ok", stop_reason="steps", usage=usage,
                    evaluations=[{"fraction": 1.0, "step": src.budget["steps"], "metrics": {"x_w2": 1.5}}])
    d = rec.to_dict()
    for k, v in (change or {}).items():
        if k == "spec":
            d["spec"].update(v)
        elif k == "usage":
            d["usage"].update(v)
        else:
            d[k] = v
    rec = RunRecord.from_dict(d)
    run_dir = rec.spec.run_dir(root)
    run_dir.mkdir(parents=True)
    rec.write(run_dir / "record.json")
    (run_dir / "samples_small.npz").write_bytes(b"small")
    return rec


def test_neural_cells_are_capped_at_their_cpu_steps_and_mcmc_is_not():
    ex = grids.expand("equal-evals-cpu", ["fab", "idem", "mcmc", "pt"], ["dw4"], 1, [], "cpu")
    by = {s.method: s.budget for s in ex.specs}
    cpu = grids.expand("cpu", ["fab", "idem"], ["dw4"], 1, [], "cpu")
    for s in cpu.specs:
        assert by[s.method]["steps"] == s.budget["steps"]
        assert by[s.method]["energy_evals"] == E_DW4
    for m in ("mcmc", "pt"):
        assert "steps" not in by[m] and by[m]["energy_evals"] == E_DW4


def test_a_cpu_run_within_the_energy_budget_covers_the_cell(tmp_path):
    spec = _spec()
    assert dispatch.cell_state(spec, tmp_path).state == "new"
    src = _write_source(tmp_path, spec)
    state = dispatch.cell_state(spec, tmp_path)
    assert state.state == "covered" and src.spec.cell_id in state.detail
    assert state not in dispatch.plan([spec], tmp_path).to_run
    assert dispatch.write_covered([state], tmp_path) == [spec.cell_id]
    d = json.loads((spec.run_dir(tmp_path) / "record.json").read_text())
    assert d["spec"] == spec.to_dict()  # the cell's own spec: tables file it under equal-evals-cpu
    assert d["covered_by"]["cell"] == "cpu/dw4/fab/r0"
    assert d["covered_by"]["train_energy_evals"] == 180_000 <= d["covered_by"]["energy_evals_limit"] == E_DW4
    assert d["evaluations"] == src.to_dict()["evaluations"] and d["status"] == "ok"
    assert (spec.run_dir(tmp_path) / "samples_small.npz").read_bytes() == b"small"
    assert dispatch.cell_state(spec, tmp_path).state == "ok"  # done: a re-run skips it


@pytest.mark.parametrize(
    "change",
    [
        {"usage": {"train_energy_evals": E_DW4 + 1}},  # spent more than the cell may
        {"spec": {"seed": 12345}},  # another run
        {"spec": {"config": {"batch_size": 7}}},
        {"stop_reason": "guard_seconds", "status": "timeout"},  # stopped by the clock, not its steps
        {"status": "failed", "stop_reason": None},
    ],
)
def test_other_runs_do_not_cover_the_cell(tmp_path, change):
    spec = _spec()
    _write_source(tmp_path, spec, change)
    assert dispatch.cell_state(spec, tmp_path).state == "new"


def test_a_diverged_cpu_run_covers_the_cell(tmp_path):
    spec = _spec()
    _write_source(tmp_path, spec, {"status": "diverged", "stop_reason": "non-finite loss"})
    assert dispatch.cell_state(spec, tmp_path).state == "covered"


def test_the_cli_reuses_covered_cells_and_the_dry_run_writes_nothing(tmp_path):
    spec = _spec()
    _write_source(tmp_path, spec)
    args = ["--grid", "equal-evals-cpu", "--methods", "fab", "--targets", "dw4", "--seeds", "1",
            "--results", str(tmp_path), "--executor", "debug"]
    out = io.StringIO()
    assert cli.main([*args, "--dry-run"], stream=out) == 0
    assert "covered" in out.getvalue() and not spec.run_dir(tmp_path).exists()
    out = io.StringIO()
    assert cli.main(args, stream=out) == 0
    assert "reused the record of the same run in grid cpu" in out.getvalue()
    assert "nothing to do" in out.getvalue()
    assert RunRecord.read(spec.run_dir(tmp_path) / "record.json").covered_by["cell"] == "cpu/dw4/fab/r0"
