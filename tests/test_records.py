"""Run records: JSON round trip, atomic writes, load_records (tidy rows, corrupt / foreign files skipped)."""

from __future__ import annotations

import json
import math

import pytest
from test_records_synthetic import GRID, make_record, standard_grid

from harness.records import SCHEMA_VERSION, RunRecord, RunSpec, load_records


def test_record_round_trip(tmp_path):
    rec = make_record(tmp_path, "dw4", "alpha", 0, "ok", {"x_w2": 1.5, "e_w2": float("nan")})
    back = RunRecord.read(rec.spec.run_dir(tmp_path) / "record.json")
    assert back.spec == rec.spec
    assert back.evaluations[-1]["metrics"]["x_w2"] == 1.5
    assert math.isnan(back.evaluations[-1]["metrics"]["e_w2"])
    assert back.schema_version == SCHEMA_VERSION
    # no temp files left behind by the atomic write
    assert sorted(p.name for p in rec.spec.run_dir(tmp_path).iterdir()) == ["record.json"]


def test_bad_status_and_unknown_spec_keys_rejected():
    spec = RunSpec(grid="g", target="dw4", method="m")
    with pytest.raises(ValueError, match="status must be one of"):
        RunRecord(spec=spec, status="exploded")
    with pytest.raises(ValueError, match="unknown RunSpec keys"):
        RunSpec.from_dict({**spec.to_dict(), "colour": "red"})


def test_load_records_one_row_per_checkpoint(tmp_path):
    standard_grid(tmp_path)
    df = load_records(tmp_path)
    assert df.attrs["skipped"] == []
    # 7 runs with 3 checkpoints each + 3 runs without evaluations (1 failed, 2 diverged) -> 24 rows
    assert len(df) == 7 * 3 + 3
    assert df["run_id"].nunique() == 10
    final = df[df["is_final"]]
    assert len(final) == 10
    row = final[(final["method"] == "alpha") & (final["target"] == "dw4") & (final["replicate"] == 0)].iloc[0]
    assert row["m_x_w2"] == 1.0 and row["fraction"] == 1.0 and row["u_energy_evals"] == 1_000_000
    assert row["grid"] == GRID and row["protocol"] == "boltzbench" and row["seed"] == 100
    first = df[(df["run_id"] == row["run_id"]) & (df["checkpoint"] == 0)].iloc[0]
    assert first["m_x_w2"] == 3.0  # synthetic curve decays to the final value
    failed = df[df["status"] == "failed"].iloc[0]
    assert failed["checkpoint"] == -1 and failed["error"] == "RuntimeError: boom"


def test_corrupt_and_foreign_files_are_reported_and_skipped(tmp_path):
    standard_grid(tmp_path)
    bad = tmp_path / "broken" / "record.json"
    bad.parent.mkdir()
    bad.write_text('{"spec": {"grid": ')  # truncated JSON
    foreign = tmp_path / "other" / "record.json"
    foreign.parent.mkdir()
    foreign.write_text(json.dumps({"name": "not ours"}))
    future = tmp_path / "future" / "record.json"
    future.parent.mkdir()
    d = json.loads(next(tmp_path.glob(f"{GRID}/dw4/alpha/r0/record.json")).read_text())
    d["schema_version"] = SCHEMA_VERSION + 1
    future.write_text(json.dumps(d))
    with pytest.warns(UserWarning, match="skipping unreadable record") as w:
        df = load_records(tmp_path)
    assert df["run_id"].nunique() == 10
    skipped = dict(df.attrs["skipped"])
    assert set(skipped) == {str(bad), str(foreign), str(future)}
    assert "schema_version" in skipped[str(future)]
    assert any(str(bad) in str(x.message) for x in w)
    with pytest.raises(ValueError, match="broken"):
        load_records(tmp_path / "broken", strict=True)


def test_load_records_empty_or_missing_root(tmp_path):
    assert load_records(tmp_path).empty
    assert load_records(tmp_path / "nope").empty
