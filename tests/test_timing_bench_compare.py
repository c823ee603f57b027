"""scripts/bench_compare.py on synthetic pytest-benchmark JSON files: ratios, regression flags, new / gone
benchmarks, within-file ratios, machine mismatch warnings, bad input."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

_PATH = Path(__file__).resolve().parent.parent / "scripts" / "bench_compare.py"
_spec = importlib.util.spec_from_file_location("bench_compare", _PATH)
assert _spec is not None and _spec.loader is not None
bc = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("bench_compare", bc)  # dataclasses look the module up while defining
_spec.loader.exec_module(bc)


def bench_json(times: dict[str, float], node: str = "vm", threads: int = 2) -> dict[str, Any]:
    """A minimal pytest-benchmark JSON; every statistic of a benchmark equals its time (s)."""
    return {
        "machine_info": {
            "node": node,
            "cpu": {"brand_raw": "Xeon"},
            "torch": "2.13.0",
            "torch_threads": threads,
        },
        "benchmarks": [
            {
                "name": n.split("::")[-1],
                "fullname": n,
                "stats": {s: t for s in ("min", "median", "mean", "max")},
            }
            for n, t in times.items()
        ],
    }


def write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_ratios_and_verdicts() -> None:
    base = bench_json({"a": 1.0, "b": 2.0, "c": 4.0, "gone": 1.0})
    cur = bench_json({"a": 1.2, "b": 4.0, "c": 1.0, "new": 3.0})
    rows = {r.name: r for r in bc.compare(cur, base, factor=1.5)}
    assert rows["a"].ratio == pytest.approx(1.2) and rows["a"].verdict == "ok"
    assert rows["b"].ratio == pytest.approx(2.0) and rows["b"].verdict == "REGRESSION"
    assert rows["c"].ratio == pytest.approx(0.25) and rows["c"].verdict == "faster"
    assert rows["new"].verdict == "new" and math.isnan(rows["new"].ratio)
    assert rows["gone"].verdict == "gone" and math.isnan(rows["gone"].current)
    # identical files: every ratio exactly 1
    assert all(r.ratio == 1.0 for r in bc.compare(base, base))


def test_stat_choice_and_bad_arguments() -> None:
    base, cur = bench_json({"a": 1.0}), bench_json({"a": 1.0})
    cur["benchmarks"][0]["stats"]["min"] = 3.0
    assert bc.compare(cur, base, stat="min")[0].verdict == "REGRESSION"
    assert bc.compare(cur, base, stat="median")[0].verdict == "ok"
    with pytest.raises(ValueError, match="valid: min, median, mean, max"):
        bc.times(cur, "p99")
    with pytest.raises(ValueError, match="factor must be > 1"):
        bc.compare(cur, base, factor=1.0)


def test_within_file_ratio() -> None:
    data = bench_json({"x::test_lj55[naive]": 2.0, "x::test_lj55[fast]": 0.1, "x::other": 1.0})
    a, b, r = bc.within_ratio(data, "[naive]", "[fast]")
    assert (a, b) == ("x::test_lj55[naive]", "x::test_lj55[fast]") and r == pytest.approx(20.0)
    with pytest.raises(ValueError, match="matches 2 benchmarks"):
        bc.within_ratio(data, "lj55", "other")


def test_machine_differences() -> None:
    assert bc.machine_differences(bench_json({}), bench_json({})) == []
    diffs = bc.machine_differences(bench_json({}, node="gpu1", threads=1), bench_json({}))
    assert diffs == ["node: vm -> gpu1", "torch_threads: 2 -> 1"]


def test_cli_exit_codes_and_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = write(tmp_path / "base.json", bench_json({"a": 1.0, "b": 1.0}))
    cur = write(tmp_path / "cur.json", bench_json({"a": 1.0, "b": 3.0}, node="other"))
    assert bc.main([str(cur), str(base)]) == 0
    out = capsys.readouterr().out
    assert "WARNING: different machine" in out and "REGRESSION" in out and "3.00" in out
    assert bc.main([str(cur), str(base), "--fail"]) == 1
    assert bc.main([str(cur), str(base), "--fail", "--factor", "4"]) == 0
    capsys.readouterr()
    assert bc.main([str(cur), str(tmp_path / "nope.json"), "--ratio", "b", "a"]) == 0
    assert "= 3.00" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text('{"x": 1}')
    assert bc.main([str(bad), str(base)]) == 2
    assert "not a pytest-benchmark JSON" in capsys.readouterr().err
