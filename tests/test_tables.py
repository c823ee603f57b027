"""Tables from synthetic records: golden files, ranking with ties, missing / diverged cells, LaTeX."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd
import pytest
from test_records_synthetic import GRID, make_record, standard_grid

from harness import tables
from harness.records import load_records

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("BOLTZBENCH_UPDATE_GOLDEN") == "1"


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"golden file {path} missing (run with BOLTZBENCH_UPDATE_GOLDEN=1)"
    assert text == path.read_text()


@pytest.fixture
def grid_df(tmp_path) -> pd.DataFrame:
    standard_grid(tmp_path)
    return load_records(tmp_path)


def test_golden_markdown_and_latex(grid_df):
    tb = tables.make_table(grid_df, GRID, "boltzbench")
    _check_golden("testgrid_boltzbench.md", tables.render_markdown(tb))
    _check_golden("testgrid_boltzbench.tex", tables.render_latex(tb))


def test_ranking_ties_missing_and_diverged(grid_df):
    tb = tables.make_table(grid_df, GRID, "boltzbench")
    assert tb.methods == ["alpha", "beta", "gamma"]
    # x-W2 on DW-4: alpha 1.1 best, beta 2.1 second, gamma third
    assert tb.rank[("alpha", "dw4", "x_w2")] == 1
    assert tb.rank[("beta", "dw4", "x_w2")] == 2
    assert tb.rank[("gamma", "dw4", "x_w2")] == 3
    # E-W2 on DW-4: beta and gamma tie at 0.5 -> both best; alpha (1.0) second
    assert tb.rank[("beta", "dw4", "e_w2")] == tb.rank[("gamma", "dw4", "e_w2")] == 1
    assert tb.rank[("alpha", "dw4", "e_w2")] == 2
    assert tb.text[("alpha", "gmm40", "x_w2")] == tables.DIVERGED
    assert tb.text[("gamma", "gmm40", "x_w2")] == tables.MISSING
    assert tb.text[("gamma", "dw4", "x_w2")] == "3.000 (1/2)"
    assert tb.text[("alpha", "dw4", "x_w2")] == "1.100 ± 0.14"
    assert ("alpha", "gmm40", "x_w2") not in tb.rank
    assert "12 expected" in tb.coverage and "7 ok, 2 diverged, 1 failed/timeout, 2 missing" in tb.coverage
    # GMM has no aligned x-W2 column
    assert ("gmm40", "x_w2_aligned") not in tb.columns and ("dw4", "x_w2_aligned") in tb.columns
    md = tables.render_markdown(tb)
    assert "**1.100 ± 0.14**" in md and "<u>2.100 ± 0.14</u>" in md


def test_latex_is_structurally_sound(grid_df):
    tex = tables.render_latex(tables.make_table(grid_df, GRID, "boltzbench"))
    for a, b in (("{", "}"), ("\\begin{", "\\end{")):
        assert tex.count(a) == tex.count(b)
    assert tex.index("\\toprule") < tex.index("\\midrule") < tex.index("\\bottomrule")
    body = tex[tex.index("\\midrule") : tex.index("\\bottomrule")]
    ncols = re.search(r"\\begin\{tabular\}\{(l c*)\}".replace(" ", ""), tex).group(1)
    for line in body.splitlines()[1:]:
        assert line.endswith("\\\\")
        assert line.count(" & ") == len(ncols) - 1
    assert "±" not in tex and "$\\pm$" in tex and "\\textbf{" in tex and "\\underline{" in tex


def test_fmt_num():
    assert tables.fmt_num(11.69) == "11.69"
    assert tables.fmt_num(0.701) == "0.7010"
    assert tables.fmt_num(562.7) == "562.7"
    assert tables.fmt_num(float("nan")) == tables.MISSING
    assert tables.fmt_num(1.5e9) == "1.500e+09"


def test_reproduction_table_ratio(tmp_path):
    make_record(tmp_path, "dw4", "bnem", 0, "ok", {"x_w2": 0.934, "e_w2": 0.458, "tv": 0.2}, protocol="bnem")
    make_record(tmp_path, "dw4", "pis", 0, "diverged", None, protocol="bnem")
    df = load_records(tmp_path)
    rows = {(r["method"], r["target"], r["metric"]): r for r in tables.reproduction_rows(df, GRID, "bnem")}
    r = rows[("bnem", "dw4", "x_w2")]
    assert r["published"] == "0.4670" and r["ours"] == "0.9340" and r["ratio"] == "2.00"
    assert rows[("bnem", "dw4", "e_w2")]["ratio"] == "1.00"
    assert rows[("pis", "dw4", "x_w2")]["published"] == tables.DIVERGED
    assert rows[("pis", "dw4", "x_w2")]["ours"] == tables.DIVERGED
    assert rows[("dds", "gmm40", "x_w2")]["ours"] == tables.MISSING


def test_asbs_protocol_table_and_reproduction(tmp_path):
    metrics = {"x_w2": 0.86, "e_w2": 0.4, "dist_w2": 0.01}
    make_record(tmp_path, "dw4", "asbs", 0, "ok", metrics, protocol="asbs")
    make_record(tmp_path, "gmm40", "as", 0, "ok", {"x_w2": 5.0, "e_w2": 1.0}, protocol="asbs")
    df = load_records(tmp_path)
    rows = {(r["method"], r["target"], r["metric"]): r for r in tables.reproduction_rows(df, GRID, "asbs")}
    r = rows[("asbs", "dw4", "x_w2")]
    assert r["published"] == "0.4300 ± 0.050" and r["ours"] == "0.8600" and r["ratio"] == "2.00"
    assert r["source"].startswith("ASBS") and r["selection"] == "last"
    assert rows[("as", "lj55", "e_w2")]["published"] == "30.83 ± 8.2"
    assert {m for m, _, _ in rows} == {"as", "asbs", "pis", "dds", "idem"}
    tb = tables.make_table(df, GRID, "asbs")
    assert ("gmm40", "dist_w2") not in tb.columns and ("dw4", "dist_w2") in tb.columns
    assert tb.selection == "last" and any("eq_w2" in n for n in tb.footnotes)


def test_cli_on_empty_partial_and_corrupt_dirs(tmp_path, capsys):
    out = tmp_path / "tables"
    assert tables.main(["--results", str(tmp_path / "runs"), "--out", str(out), "--no-figures"]) == 0
    assert (out / "README.md").exists()
    runs = tmp_path / "runs"
    make_record(runs, "dw4", "alpha", 0, "ok", {"x_w2": 1.0, "e_w2": 0.1, "tv": 0.1}, protocol="idem")
    (runs / "x").mkdir()
    (runs / "x" / "record.json").write_text("garbage")
    with pytest.warns(UserWarning):
        assert tables.main(["--results", str(runs), "--out", str(out), "--no-figures"]) == 0
    err = capsys.readouterr().err
    assert "skipped" in err and "record.json" in err
    for name in ("testgrid_idem.md", "testgrid_idem.tex", "testgrid_idem_reproduction.md",
                 "testgrid_idem_reproduction.tex"):
        assert (out / name).stat().st_size > 0
    with pytest.raises(SystemExit):
        tables.main(["--results", str(runs), "--protocol", "nope"])


def test_cost_cells_mean_over_usable_seeds():
    """The cost table averages whole-run energy / gradient counts over ok and diverged seeds only."""
    import pandas as pd

    fin = pd.DataFrame(
        {
            "target": ["dw4", "dw4", "dw4", "gmm40"],
            "method": ["mcmc", "mcmc", "mcmc", "idem"],
            "status": ["ok", "diverged", "failed", "ok"],
            "total_energy_evals": [1000.0, 3000.0, 99.0, 2.5e7],
            "total_grad_evals": [0.0, 0.0, 0.0, 2.4e7],
        }
    )
    cost = tables.cost_cells(fin, ["gmm40", "dw4"], ["idem", "mcmc"])
    assert cost[("mcmc", "dw4")] == "2,000"  # (1000 + 3000) / 2; the failed run is excluded
    assert cost[("idem", "gmm40")] == "2.50e+07 (2.40e+07 grad)"
    assert cost[("idem", "dw4")] == tables.MISSING and cost[("mcmc", "gmm40")] == tables.MISSING


def test_named_variant_runs_are_rows_but_not_grid_cells(tmp_path):
    """A variant (``alpha@v``) is shown after its method but is not one of the grid's expected cells."""
    standard_grid(tmp_path)
    before = tables.make_table(load_records(tmp_path), GRID, "boltzbench")
    make_record(tmp_path, "dw4", "alpha@v", 0, "ok", {"x_w2": 0.5, "e_w2": 0.5, "tv": 0.1})
    tb = tables.make_table(load_records(tmp_path), GRID, "boltzbench")
    assert tb.methods == ["alpha", "alpha@v", "beta", "gamma"]
    assert tb.text[("alpha@v", "dw4", "x_w2")] == "0.5000 (1/2)"
    assert tb.coverage.startswith(before.coverage)  # the grid's cells are counted as before
    assert tb.coverage.endswith("Plus 1 named-variant run (not grid cells).")


def test_run_without_evaluations_counts_as_diverged_under_every_protocol(tmp_path):
    """A run that diverged before its first evaluation (a record with no metrics, written under its own
    protocol) is a diverged cell in every protocol's table, not a missing one."""
    make_record(tmp_path, "dw4", "alpha", 0, "ok", {"x_w2": 1.0, "e_w2": 0.1, "tv": 0.1}, protocol="idem")
    make_record(tmp_path, "dw4", "beta", 0, "diverged", None, protocol="boltzbench")
    df = load_records(tmp_path)
    for protocol in ("idem", "boltzbench"):
        tb = tables.make_table(df, GRID, protocol)
        assert tb.text[("beta", "dw4", "x_w2")] == tables.DIVERGED, protocol
        assert "1 diverged" in tb.coverage, (protocol, tb.coverage)
    assert list(df["protocol"]).count("boltzbench") == 1  # load_records itself is unchanged
