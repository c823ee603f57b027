"""harness.timing on synthetic records: time to a quality level, speed-up ratios, cells that never reach the
level, several seeds, missing / diverged / failed cells, the CLI's files."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from harness import timing
from harness.records import RunRecord, RunSpec

GRID = "synthetic"


def make_record(
    target: str,
    method: str,
    checkpoints: list[tuple[int, float, int, float]],
    replicate: int = 0,
    status: str = "ok",
    host: str = "hostA",
    sample_seconds_each: float = 0.5,
    sample_evals_each: int = 100,
    network_evals: int = 0,
    grid: str = GRID,
) -> RunRecord:
    """``checkpoints``: (step, train_seconds, training energy evals, x_w2) in order. Sampling at each
    checkpoint adds ``sample_evals_each`` evaluations and ``sample_seconds_each`` s (cumulative)."""
    evals = []
    n = len(checkpoints)
    for i, (step, secs, tr_evals, w2) in enumerate(checkpoints, start=1):
        usage = {
            "energy_evals": tr_evals + i * sample_evals_each,
            "grad_evals": tr_evals,
            "steps": step,
            "train_seconds": secs,
            "sample_seconds": i * sample_seconds_each,
            "sample_energy_evals": i * sample_evals_each,
            "network_evals": network_evals * step,
        }
        evals.append(
            {"fraction": i / n, "step": step, "usage": usage, "metrics": {"x_w2": w2, "e_w2": 2 * w2}}
        )
    final = dict(evals[-1]["usage"]) if evals else {}
    spec = RunSpec(grid=grid, target=target, method=method, replicate=replicate, seed=replicate)
    return RunRecord(
        spec=spec, status=status, usage=final, evaluations=evals, environment={"host": host, "device": "cpu"}
    )


def write_all(root: Path, recs: list[RunRecord]) -> Path:
    for r in recs:
        r.write(r.spec.run_dir(root) / "record.json")
    return root


def cells_of(tables: list[timing.TimingTable], target: str) -> timing.TimingTable:
    (t,) = [t for t in tables if t.target == target]
    return t


def row_of(table: timing.TimingTable, method_display: str) -> dict[str, str]:
    for r in table.rows:
        if r[0].split(" (")[0] == method_display:
            return dict(zip(table.columns, r))
    raise KeyError(method_display)


# ------------------------------------------------------------------------------------------- time to level
def test_time_to_level_first_checkpoint_at_or_below_level(tmp_path: Path) -> None:
    rec = make_record("dw4", "alpha", [(10, 1.0, 1000, 5.0), (20, 3.0, 2000, 2.0), (30, 10.0, 3000, 1.0)])
    df = timing.records_to_frame([rec])
    hit = timing.time_to_level(df, "x_w2", 2.0)  # equal to the level counts as reached
    assert hit == {"seconds": 3.0, "evals": 2000.0, "step": 20.0, "fraction": pytest.approx(2 / 3)}
    hit = timing.time_to_level(df, "x_w2", 1.5)
    assert hit is not None and hit["seconds"] == 10.0 and hit["evals"] == 3000.0
    assert timing.time_to_level(df, "x_w2", 0.5) is None
    assert timing.time_to_level(df, "x_w2", float("nan")) is None
    assert timing.time_to_level(df, "no_such_metric", 10.0) is None


def test_time_to_level_uses_step_order_and_ignores_nan() -> None:
    rec = make_record(
        "dw4", "alpha", [(10, 1.0, 100, float("nan")), (20, 2.0, 200, 0.9), (30, 3.0, 300, 0.1)]
    )
    rec.evaluations = rec.evaluations[::-1]  # stored out of order: still judged in step order
    df = timing.records_to_frame([rec])
    hit = timing.time_to_level(df, "x_w2", 1.0)
    assert hit is not None and hit["step"] == 20.0
    # the metric at the last checkpoint in step order, not in storage order
    assert timing.final_metric(df, "x_w2") == 0.1


def test_quality_level_is_threshold_times_best_mean_final_of_ok_runs() -> None:
    recs = [
        make_record("dw4", "alpha", [(10, 1.0, 100, 3.0), (20, 2.0, 200, 1.0)], replicate=0),
        make_record("dw4", "alpha", [(10, 1.0, 100, 3.0), (20, 2.0, 200, 3.0)], replicate=1),  # mean final 2
        make_record("dw4", "beta", [(10, 1.0, 100, 3.0), (20, 2.0, 200, 4.0)]),
        make_record("dw4", "gamma", [(10, 1.0, 100, 0.01)], status="diverged"),  # never sets the level
        make_record("gmm40", "beta", [(10, 1.0, 100, 7.0)]),
    ]
    df = timing.records_to_frame(recs)
    levels = timing.quality_levels(df, "x_w2", threshold=1.5)
    assert levels["dw4"] == pytest.approx(3.0)
    assert levels["gmm40"] == pytest.approx(10.5)
    assert timing.quality_levels(df, "x_w2", level=0.7) == {"dw4": 0.7, "gmm40": 0.7}
    with pytest.raises(ValueError, match="positive"):
        timing.quality_levels(df, "x_w2", threshold=0)


# ------------------------------------------------------------------------------------------- tables
def _two_method_records() -> list[RunRecord]:
    # baseline "slow" reaches 1.5 (=1.5 × best final 1.0) at 10 s / 1000 evals; "fast" at 2 s / 4000 evals
    return [
        make_record("dw4", "slow", [(10, 5.0, 500, 4.0), (20, 10.0, 1000, 1.2), (40, 20.0, 2000, 1.1)]),
        make_record("dw4", "fast", [(10, 2.0, 4000, 1.4), (20, 4.0, 8000, 1.0)]),
        make_record("dw4", "never", [(10, 1.0, 10, 9.0), (20, 2.0, 20, 8.0)]),
    ]


def test_speedup_ratios_against_baseline() -> None:
    df = timing.records_to_frame(_two_method_records())
    (t,) = timing.timing_report(df, "x_w2", threshold=1.5, baseline="slow")
    assert t.level == pytest.approx(1.5)
    c = t.cells
    assert c["fast"]["ttl_seconds_mean"] == 2.0 and c["fast"]["ttl_evals_mean"] == 4000.0
    assert c["slow"]["ttl_seconds_mean"] == 10.0 and c["slow"]["ttl_evals_mean"] == 1000.0
    assert c["fast"]["speedup_wall"] == pytest.approx(5.0)
    assert c["fast"]["speedup_evals"] == pytest.approx(0.25)
    assert c["slow"]["speedup_wall"] == pytest.approx(1.0)
    fast = row_of(t, "fast")
    assert fast["speed-up vs slow (wall)"] == "5.00×"
    assert fast["speed-up vs slow (evals)"] == "0.25×"
    assert fast["time to level (s)"] == "2"
    assert fast["evals to level"] == "4,000"
    assert row_of(t, "slow")["s / step"] == "0.5"  # 20 s / 40 steps


def test_speedup_invariant_to_a_common_clock_scale() -> None:
    recs = _two_method_records()
    (t1,) = timing.timing_report(timing.records_to_frame(recs), baseline="slow")
    for r in recs:  # a machine 3× slower on everything
        r.usage["train_seconds"] *= 3
        for ev in r.evaluations:
            ev["usage"]["train_seconds"] *= 3
    (t3,) = timing.timing_report(timing.records_to_frame(recs), baseline="slow")
    for m in ("slow", "fast"):
        assert t3.cells[m]["speedup_wall"] == pytest.approx(t1.cells[m]["speedup_wall"])
        assert t3.cells[m]["ttl_seconds_mean"] == pytest.approx(3 * t1.cells[m]["ttl_seconds_mean"])


def test_cells_that_never_reach_the_level_say_so() -> None:
    df = timing.records_to_frame(_two_method_records())
    (t,) = timing.timing_report(df, baseline="slow")
    never = row_of(t, "never")
    assert never["time to level (s)"] == "not reached"
    assert never["evals to level"] == "not reached"
    assert never["speed-up vs slow (wall)"] == "not reached"
    assert math.isnan(t.cells["never"]["speedup_wall"])
    # with a baseline that never reaches it, the others' ratios are undefined and say why
    (t2,) = timing.timing_report(df, baseline="never")
    assert row_of(t2, "fast")["speed-up vs never (wall)"] == "baseline not reached"


def test_several_seeds_mean_std_and_partial_reach() -> None:
    recs = [
        make_record("dw4", "alpha", [(10, 4.0, 100, 1.0), (20, 10.0, 200, 1.0)], replicate=0),
        make_record("dw4", "alpha", [(10, 6.0, 100, 1.0), (20, 14.0, 200, 1.0)], replicate=1),
        make_record("dw4", "alpha", [(10, 2.0, 100, 9.0), (20, 12.0, 200, 9.0)], replicate=2),
    ]
    df = timing.records_to_frame(recs)
    (t,) = timing.timing_report(df, level=2.0)
    row = row_of(t, "alpha")
    assert row["runs"] == "3 ok"
    assert row["train s"] == "12 ± 2"  # 10, 14, 12 -> mean 12, sample std 2
    # reached by seeds 0 and 1 at 4 s and 6 s; seed 2 never
    assert row["time to level (s)"] == "5 ± 1.41 (2/3)"
    assert t.cells["alpha"]["n_reached"] == 2
    assert "given with --level" in " ".join(t.notes)


def test_missing_diverged_and_failed_cells() -> None:
    recs = [
        make_record("dw4", "alpha", [(10, 1.0, 100, 1.0)]),
        make_record("dw4", "boom", [(10, 3.0, 100, 0.5)], status="diverged"),
        make_record("dw4", "boom", [(10, 5.0, 100, 0.5)], replicate=1, status="diverged"),
        make_record("dw4", "crash", [], status="failed"),
        make_record("gmm40", "gone", [(10, 1.0, 100, 1.0)]),  # "gone" has no dw4 run: missing there
    ]
    df = timing.records_to_frame(recs)
    tables = timing.timing_report(df, baseline="alpha")
    t = cells_of(tables, "dw4")
    boom, crash, gone = row_of(t, "boom"), row_of(t, "crash"), row_of(t, "gone")
    assert boom["runs"] == "2 diverged"
    assert boom["train s"] == "4 ± 1.41*"
    assert boom["time to level (s)"].endswith("*")  # reached before diverging, flagged
    assert t.level == pytest.approx(1.5)  # the diverged 0.5 does not set the level
    assert crash["runs"] == "1 failed" and crash["train s"] == "failed"
    assert gone["runs"] == "missing (not registered)" and set(list(gone.values())[2:]) == {"—"}
    # a method expected by the caller but absent everywhere is shown as missing too
    tables = timing.timing_report(
        df, baseline="alpha", methods_expected=["alpha", "boom", "crash", "gone", "x"]
    )
    assert row_of(cells_of(tables, "gmm40"), "x")["runs"].startswith("missing")
    # rows follow the expected order (the grid's), then other methods in the records alphabetically
    tables = timing.timing_report(df, baseline="alpha", methods_expected=["crash", "alpha"])
    assert [r[0].split(" (")[0] for r in cells_of(tables, "dw4").rows] == ["crash", "alpha", "boom", "gone"]


def test_network_evals_dash_when_not_reported_and_sampling_time_of_final_pass() -> None:
    recs = [
        make_record("dw4", "alpha", [(10, 1.0, 100, 1.0), (20, 2.0, 200, 1.0)], sample_seconds_each=0.25),
        make_record("dw4", "beta", [(10, 1.0, 100, 1.0)], network_evals=64),
    ]
    (t,) = timing.timing_report(timing.records_to_frame(recs))
    assert row_of(t, "alpha")["network evals"] == "—"
    assert row_of(t, "beta")["network evals"] == "640"
    assert row_of(t, "alpha")["sample s"] == "0.25"  # cumulative 0.5 minus 0.25 at the previous checkpoint


def test_errors_name_valid_choices() -> None:
    df = timing.records_to_frame(_two_method_records())
    with pytest.raises(ValueError, match="available metrics: e_w2, x_w2"):
        timing.timing_report(df, metric="tv")
    with pytest.raises(ValueError, match="methods in the records: fast, never, slow"):
        timing.timing_report(df, baseline="nope")
    other = make_record("dw4", "slow", [(10, 1.0, 1, 1.0)], grid="other")
    with pytest.raises(ValueError, match="one grid"):
        timing.timing_report(timing.records_to_frame([*_two_method_records(), other]))


def test_machine_mismatch_is_flagged() -> None:
    recs = _two_method_records()
    recs[1].environment["host"] = "hostB"
    (t,) = timing.timing_report(timing.records_to_frame(recs))
    assert any(n.startswith("WARNING: runs come from different machines or set-ups") for n in t.notes)
    (t,) = timing.timing_report(timing.records_to_frame(_two_method_records()))
    assert not any("WARNING" in n for n in t.notes)
    recs = _two_method_records()
    for i, r in enumerate(recs):  # same host, different torch thread counts
        r.environment["torch_threads"] = 1 + (i == 0)
    (t,) = timing.timing_report(timing.records_to_frame(recs))
    assert any("WARNING" in n and "torch threads: 1, 2" in n for n in t.notes)


def test_oversubscribed_machine_is_flagged() -> None:
    recs = _two_method_records()
    recs[0].environment.update({"loadavg": [6.0, 5.0, 4.0], "cpu_count": 2})
    (t,) = timing.timing_report(timing.records_to_frame(recs))
    assert any("oversubscribed" in n and "3.0 per CPU" in n for n in t.notes)
    recs[0].environment["loadavg"] = [1.0, 1.0, 1.0]
    (t,) = timing.timing_report(timing.records_to_frame(recs))
    assert not any("oversubscribed" in n for n in t.notes)


def test_no_level_when_no_ok_run_has_the_metric() -> None:
    recs = _two_method_records()
    for r in recs:
        for ev in r.evaluations:
            ev["metrics"]["x_w2"] = float("nan")
    (t,) = timing.timing_report(timing.records_to_frame(recs), baseline="slow")
    assert math.isnan(t.level)
    row = row_of(t, "fast")
    assert row["time to level (s)"] == "no level" and row["speed-up vs slow (wall)"] == "no level"
    assert row["final x_w2"] == "—"


def test_latex_escapes_and_has_one_row_per_method() -> None:
    (t,) = timing.timing_report(timing.records_to_frame(_two_method_records()), baseline="slow")
    tex = t.latex()
    assert "\\begin{tabular}" in tex and "±" not in tex and "×" not in tex
    body = tex.split("\\midrule")[1].split("\\bottomrule")[0].strip().splitlines()
    assert len(body) == 3


# ------------------------------------------------------------------------------------------- files / CLI
def test_load_runs_skips_corrupt_files_and_filters_grid(tmp_path: Path) -> None:
    write_all(tmp_path, [*_two_method_records(), make_record("dw4", "x", [(1, 1.0, 1, 1.0)], grid="other")])
    bad = tmp_path / GRID / "dw4" / "bad" / "r0" / "record.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    with pytest.warns(UserWarning, match="skipping unreadable record"):
        df = timing.load_runs(tmp_path, GRID)
    assert set(df["method"]) == {"slow", "fast", "never"}
    with pytest.raises(ValueError, match="does not exist"):
        timing.load_runs(tmp_path / "nope")


def test_cli_writes_tables_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_all(tmp_path / "runs", _two_method_records())
    out, figs = tmp_path / "tables", tmp_path / "figures"
    rc = timing.main(
        [
            "--results",
            str(root),
            "--grid",
            GRID,
            "--baseline",
            "slow",
            "--out",
            str(out),
            "--figures",
            str(figs),
        ]
    )
    assert rc == 0
    md = (out / f"timing_{GRID}_dw4.md").read_text()
    assert "5.00×" in md and "not reached" in md
    assert (out / f"timing_{GRID}_dw4.tex").read_text().startswith("\\begin{table}")
    png = figs / f"timing_{GRID}_dw4_x_w2.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "speed-up vs slow" in capsys.readouterr().out
    assert timing.main(["--results", str(root), "--metric", "tv", "--out", str(out), "--no-figures"]) == 2
    assert "available metrics" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert timing.main(["--results", str(empty), "--out", str(out)]) == 0


def test_frame_has_one_row_per_checkpoint_and_run_without_evaluations() -> None:
    recs = [*_two_method_records(), make_record("dw4", "crash", [], status="failed")]
    df = timing.records_to_frame(recs)
    assert len(df) == 3 + 2 + 2 + 1
    assert isinstance(df, pd.DataFrame) and df[df["method"] == "crash"]["step"].isna().all()


def test_speedup_interval_is_the_range_over_seed_pairs() -> None:
    # baseline reaches the level at 10 s and 20 s (two seeds), "fast" at 2 s and 4 s: pair ratios
    # 10/2, 10/4, 20/2, 20/4 -> [2.5, 10]; the ratio of the means is 15 / 3 = 5
    recs = [
        make_record("dw4", "slow", [(10, 10.0, 1000, 1.0)], replicate=0),
        make_record("dw4", "slow", [(10, 20.0, 1000, 1.0)], replicate=1),
        make_record("dw4", "fast", [(10, 2.0, 1000, 1.0)], replicate=0),
        make_record("dw4", "fast", [(10, 4.0, 1000, 1.0)], replicate=1),
    ]
    (t,) = timing.timing_report(timing.records_to_frame(recs), "x_w2", threshold=1.5, baseline="slow")
    assert t.cells["fast"]["speedup_wall"] == pytest.approx(5.0)
    assert t.cells["fast"]["speedup_wall_range"] == pytest.approx((2.5, 10.0))
    assert row_of(t, "fast")["speed-up vs slow (wall)"] == "5.00× [2.50, 10.00]"
    assert row_of(t, "fast")["speed-up vs slow (evals)"] == "1.00× [1.00, 1.00]"
