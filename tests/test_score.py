"""harness.score: every input format, every bad input, equality with ``harness.metrics.evaluate``, external
records in the generated tables and timing report, and the README's example run as a new user would."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import targets
from harness import metrics as hm
from harness import score as sc
from harness import tables, timing
from harness.records import RunRecord

REPO = Path(__file__).resolve().parent.parent
N = 40  # small --n: every protocol in well under a second per call


@pytest.fixture(scope="module")
def dw4():
    return targets.get("dw4")


@pytest.fixture(scope="module")
def gmm():
    return targets.get("gmm40")


@pytest.fixture(scope="module")
def x3() -> np.ndarray:
    """60 DW-4 configurations [60, 4, 2] (float64), not centred."""
    return np.random.default_rng(3).normal(1.0, 1.5, size=(60, 4, 2))


def _same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        va, vb = float(a[k]), float(b[k])
        assert (math.isnan(va) and math.isnan(vb)) or va == vb, (k, va, vb)


def _direct(x2: np.ndarray, target, protocol: str, n: int) -> dict:
    """What harness.job computes for a run with n_eval_samples = n."""
    return hm.evaluate(x2[:n], target.reference("test", n), target, protocol)


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = sc.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------------------------------- formats


def test_every_format_gives_the_scores_of_evaluate(tmp_path, dw4, x3):
    flat = x3.reshape(60, 8)
    want = _direct(flat, dw4, "idem", N)
    files: list[tuple[Path, str | None]] = []
    p = tmp_path / "a.npy"
    np.save(p, x3)  # [N, n_particles, spatial_dim]
    files.append((p, None))
    p = tmp_path / "flat.npy"
    np.save(p, flat)
    files.append((p, None))
    p = tmp_path / "one.npz"
    np.savez(p, whatever=x3)
    files.append((p, None))
    p = tmp_path / "many.npz"
    np.savez(p, samples=flat, energies=np.zeros(60))
    files.append((p, "samples"))
    p = tmp_path / "t.pt"
    torch.save(torch.from_numpy(x3), p)
    files.append((p, None))
    p = tmp_path / "d.pth"
    torch.save({"x": torch.from_numpy(flat), "logw": torch.zeros(60)}, p)
    files.append((p, "x"))
    p = tmp_path / "s.csv"
    np.savetxt(p, flat, delimiter=",", fmt="%.17g", header=",".join(f"c{i}" for i in range(8)), comments="")
    files.append((p, None))
    p = tmp_path / "s.txt"
    np.savetxt(p, flat, fmt="%.17g")
    files.append((p, None))
    for path, key in files:
        res = sc.score(path, "dw4", "idem", key=key, n=N)
        _same(res.metrics["idem"], want)
        f = res.files[0]
        assert f["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert f["key"] == (key if key else (None if path.suffix not in (".npz",) else "whatever"))
        assert res.blocks["idem"]["sizes"]["non_standard"] is True


def test_all_protocols_equal_evaluate_and_particles_are_centred(dw4, x3):
    flat = x3.reshape(60, 8)
    res = sc.score(x3, "dw4", "all", n=N)
    assert res.protocols == list(hm.PROTOCOLS)
    for p in hm.PROTOCOLS:
        _same(res.metrics[p], _direct(flat, dw4, p, N))
        info = res.blocks[p]["reference"]["test"]
        assert info["sha256"] == dw4.reference_info("test")["sha256"] and info["source"]
    assert "x_w2_ci_lo" in res.metrics["boltzbench"] and "x_w2_floor" in res.metrics["idem"]
    c = res.samples.reshape(-1, 4, 2).mean(1)
    assert np.abs(c).max() < 1e-12


def test_tensor_list_of_files_and_gmm(tmp_path, gmm):
    x = np.random.default_rng(0).normal(0, 20, size=(50, 2)).astype(np.float32)
    np.save(tmp_path / "a.npy", x[:20])
    np.save(tmp_path / "b.npy", x[20:])
    res = sc.score([tmp_path / "a.npy", tmp_path / "b.npy"], "gmm40", "bnem,idem", n=N)
    assert res.protocols == ["bnem", "idem"] and res.n_rows == 50 and len(res.files) == 2
    for p in ("bnem", "idem"):
        _same(res.metrics[p], _direct(x, gmm, p, N))
    _same(sc.score(torch.from_numpy(x), "gmm40", "idem", n=N).metrics["idem"], res.metrics["idem"])


def test_standard_sizes_use_the_first_rows(gmm):
    x = np.random.default_rng(1).normal(0, 20, size=(1100, 2))
    res = sc.score(x, "gmm40", "idem")
    sizes = res.blocks["idem"]["sizes"]
    assert (sizes["n_generated"], sizes["n_reference"], sizes["non_standard"]) == (1000, 1000, False)
    assert any("first 1000 of 1100" in n for n in res.notes)
    _same(res.metrics["idem"], hm.evaluate(x[:1000], gmm.reference("test", 1000), gmm, "idem"))


def test_drop_nonfinite_scores_the_finite_rows_and_reports(capsys, tmp_path, dw4, x3):
    flat = x3.reshape(60, 8).copy()
    flat[[3, 10]] = np.nan
    flat[20, 5] = np.inf
    np.save(tmp_path / "bad.npy", flat)
    rc, out, err = _cli(capsys, tmp_path / "bad.npy", "--target", "dw4", "--protocol", "idem", "--n", N)
    assert rc == 2 and "3 of 60 rows contain NaN or inf" in err and "--drop-nonfinite" in err and not out
    rc, out, err = _cli(capsys, tmp_path / "bad.npy", "--target", "dw4", "--protocol", "idem", "--n", N,
                        "--drop-nonfinite", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["n_dropped_nonfinite"] == 3 and d["n_rows"] == 60
    finite = flat[np.isfinite(flat).all(1)]
    want = _direct(finite, dw4, "idem", N)
    got = d["protocols"]["idem"]["metrics"]
    for k, v in want.items():
        assert (got[k] is None and not math.isfinite(v)) or got[k] == v, k


def test_json_is_one_strict_object_with_a_block_per_protocol(capsys, tmp_path, x3):
    np.save(tmp_path / "s.npy", x3)
    rc, out, err = _cli(capsys, tmp_path / "s.npy", "--target", "dw4", "--n", N, "--json")
    assert rc == 0, err

    def no_nan(c):
        raise AssertionError(f"non-standard JSON constant {c}")

    d = json.loads(out, parse_constant=no_nan)
    assert set(d["protocols"]) == set(hm.PROTOCOLS)
    for b in d["protocols"].values():
        assert b["reference"]["test"]["sha256"] and b["reference"]["val"]["sha256"]
        assert b["sizes"]["n_generated"] == N and b["sizes"]["non_standard"] is True
    assert d["files"][0]["sha256"] == hashlib.sha256((tmp_path / "s.npy").read_bytes()).hexdigest()


def test_table_output_lists_values_floors_cis_sizes_and_references(capsys, tmp_path, dw4, x3):
    np.save(tmp_path / "s.npy", x3)
    rc, out, err = _cli(capsys, tmp_path / "s.npy", "--target", "dw4", "--protocol", "boltzbench", "--n", N)
    assert rc == 0, err
    assert "noise floor" in out and "95% CI" in out and "x-W2 (aligned)" in out
    assert f"{N} generated vs {N} reference" in out and "NON-STANDARD" in out
    assert dw4.reference_info("test")["sha256"] in out and dw4.reference_info("val")["sha256"] in out
    assert hashlib.sha256((tmp_path / "s.npy").read_bytes()).hexdigest() in out


# ---------------------------------------------------------------------------------------------- bad input


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _bad_inputs(tmp_path: Path, x3: np.ndarray) -> list[tuple[list, str]]:
    """(argv, words the one-line error must contain)."""
    ok = tmp_path / "ok.npy"
    np.save(ok, x3)
    (tmp_path / "empty.npy").write_bytes(b"")
    np.save(tmp_path / "zero.npy", np.zeros((0, 8)))
    (tmp_path / "hdr.csv").write_text("a,b,c,d,e,f,g,h\n")
    with open(tmp_path / "s.pkl", "wb") as f:
        pickle.dump(x3, f)
    with open(tmp_path / "pickled.npy", "wb") as f:
        pickle.dump(_Evil(), f)
    np.save(tmp_path / "objects.npy", np.array([x3, None], dtype=object), allow_pickle=True)
    torch.save({"x": _Evil()}, tmp_path / "evil.pt")
    np.savez(tmp_path / "two.npz", a=x3, b=x3)
    torch.save({"a": torch.zeros(3, 8), "b": torch.zeros(3, 8)}, tmp_path / "two.pt")
    np.save(tmp_path / "wrongdim.npy", np.zeros((50, 9)))
    np.save(tmp_path / "wrong3d.npy", np.zeros((50, 3, 3)))
    np.save(tmp_path / "one_d.npy", np.zeros(80))
    np.save(tmp_path / "strings.npy", np.array([["a"] * 8] * 50))
    (tmp_path / "s.h5").write_bytes(b"\x89HDF")
    (tmp_path / "junk.csv").write_text("1,2,x\n3,4,y\n5,6,z\n")
    t = ["--target", "dw4"]
    return [
        ([ok, "--target", "dw5"], "unknown target 'dw5'; valid targets: "),
        ([ok, *t, "--protocol", "dem"], "unknown protocol 'dem'; valid protocols: "),
        ([ok, *t, "--grid", "huge"], "unknown grid 'huge'; valid grids: "),
        ([tmp_path / "wrongdim.npy", *t], "shape [50, 9] does not fit DW-4 (dw4): expected [N, 8] or [N, 4"),
        ([tmp_path / "wrong3d.npy", *t], "expected [N, 8] or [N, 4, 2]"),
        ([tmp_path / "one_d.npy", *t], "shape [80] does not fit"),
        ([tmp_path / "s.pkl", *t], "pickle files are refused"),
        ([tmp_path / "pickled.npy", *t], "pickled data or object arrays, which are refused"),
        ([tmp_path / "objects.npy", *t], "pickled data or object arrays, which are refused"),
        ([tmp_path / "evil.pt", *t], "refused by torch.load(weights_only=True)"),
        ([tmp_path / "s.h5", *t], "unsupported format '.h5'; valid formats: .npy, .npz"),
        ([tmp_path / "two.npz", *t], "ambiguous, the file holds 2 arrays (a, b); pass --key NAME"),
        ([tmp_path / "two.npz", *t, "--key", "c"], "no array named 'c'; arrays in the file: a, b"),
        ([tmp_path / "two.pt", *t], "ambiguous, the file holds 2 tensors (a, b); pass --key NAME"),
        ([tmp_path / "two.pt", *t, "--key", "z"], "no tensor named 'z'; tensors in the file: a, b"),
        ([ok, *t, "--key", "x"], "--key applies to .npz and .pt/.pth files only"),
        ([tmp_path / "empty.npy", *t], "empty file (0 bytes)"),
        ([tmp_path / "zero.npy", *t], "no samples (array of shape [0, 8])"),
        ([tmp_path / "hdr.csv", *t], "no samples"),
        ([tmp_path / "junk.csv", *t], "not a table of numbers separated by commas"),
        ([tmp_path / "strings.npy", *t], "expected real numbers"),
        ([tmp_path / "missing.npy", *t], "no such file"),
        ([ok, *t, "--protocol", "idem"], "idem needs 1000 (the protocol's sample size); give more "
                                         "samples, or pass --n 60"),
        ([ok, *t], "boltzbench needs 5000"),
        ([ok, *t, "--n", "61"], "--n 61 is more than the 60 usable rows"),
        ([ok, *t, "--n", "2"], "--n must be an integer ≥ 4"),
        ([ok, *t, "--n", "10", "--add-to", tmp_path / "res"], "--add-to RESULTS and --name LABEL go"),
        ([ok, *t, "--n", "10", "--add-to", tmp_path / "res", "--name", "my/label"], "invalid --name"),
        ([ok, *t, "--n", "10", "--force"], "apply with --add-to only"),
    ]


def test_bad_inputs_exit_2_with_one_line_naming_what_is_valid_and_write_nothing(capsys, tmp_path, x3):
    cases = _bad_inputs(tmp_path, x3)
    valid = {"target": targets.names(), "protocol": [*hm.PROTOCOLS, "all"], "grid": ["smoke", "cpu"]}
    for argv, words in cases:
        rc, out, err = _cli(capsys, *argv)
        assert rc == 2, (argv, err)
        assert words in err, (argv, err)
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert not out
        for what, names in valid.items():
            if f"valid {what}s: " in words:
                assert all(n in err.split(f"valid {what}s: ")[1] for n in names), err
    assert not (tmp_path / "res").exists()


def test_python_entry_raises_score_error(x3):
    with pytest.raises(sc.ScoreError, match="valid protocols"):
        sc.score(x3, "dw4", "nope")
    with pytest.raises(sc.ScoreError, match="valid targets"):
        sc.score(x3, "nope")
    with pytest.raises(sc.ScoreError, match="NaN or inf"):
        sc.score(np.full((10, 8), np.nan), "dw4", "idem", n=5)
    with pytest.raises(sc.ScoreError, match="all 10 rows contain NaN"):
        sc.score(np.full((10, 8), np.nan), "dw4", "idem", n=5, drop_nonfinite=True)


# ---------------------------------------------------------------------------------------------- records


def test_add_to_writes_an_external_record_that_the_tables_and_timing_show(capsys, tmp_path, x3):
    f = tmp_path / "mine.npy"
    np.save(f, x3)
    res = tmp_path / "runs"
    argv = [f, "--target", "dw4", "--n", N, "--add-to", res, "--name", "my-sampler_1.0",
            "--energy-evals", 12345]
    rc, out, err = _cli(capsys, *argv)
    assert rc == 0, err
    path = res / "cpu" / "dw4" / "external-my-sampler_1.0" / "r0" / "record.json"
    assert str(path) in out
    rec = RunRecord.read(path)
    assert rec.spec.method == "external:my-sampler_1.0" and rec.spec.grid == "cpu" and rec.status == "ok"
    assert rec.spec.protocol == "boltzbench" and rec.spec.n_eval_samples == N
    ev = rec.evaluations[0]
    assert ev["fraction"] == 1.0 and set(ev["scores"]) == set(hm.PROTOCOLS)
    _same(ev["metrics"], ev["scores"]["boltzbench"])
    _same(ev["scores"]["idem"], _direct(x3.reshape(60, 8), targets.get("dw4"), "idem", N))
    ext = rec.diagnostics["external"]
    assert ext["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest() and ext["n_rows"] == 60
    assert rec.reference["sha256"] == targets.get("dw4").reference_info("test")["sha256"]
    assert rec.usage == {"energy_evals": 12345} and (path.parent / "samples.npz").exists()
    if hasattr(rec, "scoring"):  # schema 2: per-protocol reference provenance, as harness.scoring writes it
        assert set(rec.scoring["protocols"]) == set(hm.PROTOCOLS)
        assert rec.scoring["test_reference"]["sha256"] == rec.reference["sha256"]
    # the same label again: refused unless --force
    rc, out, err = _cli(capsys, *argv)
    assert rc == 2 and "exists" in err and "--force" in err
    rc, out, err = _cli(capsys, *argv, "--force")
    assert rc == 0, err
    # make tables: the external row is in the cpu-grid boltzbench table, marked, with the footnote
    out_dir = tmp_path / "tables"
    assert tables.main(["--results", str(res), "--out", str(out_dir), "--no-figures"]) == 0
    capsys.readouterr()
    md = (out_dir / "cpu_boltzbench.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| my-sampler_1.0 (external)"))
    assert tables.fmt_num(ev["metrics"]["x_w2"]) in row
    assert "`(external)`: a sampler scored from its saved samples" in md
    assert "Plus 1 external sampler run (not grid cells)" in md and "0 ok" in md
    assert "my-sampler\\_1.0 (external)" in (out_dir / "cpu_boltzbench.tex").read_text()
    # the timing report lists it too
    tt = timing.timing_report(timing.load_runs(res, "cpu"), "x_w2")
    rows = [r for t in tt for r in t.rows if r[0].startswith("my-sampler_1.0 (external)")]
    assert rows and any("(external)" in n for t in tt for n in t.notes)


def test_external_row_beside_builtin_methods(tmp_path, x3):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_records_synthetic import make_record

    make_record(tmp_path, "dw4", "idem", 0, "ok", {"x_w2": 1.5, "e_w2": 0.3, "tv": 0.1, "x_w2_aligned": 0.5},
                grid="cpu")
    sc.score(x3, "dw4", "boltzbench", n=N).add_to(tmp_path, "ext")
    from harness.records import load_records

    tb = tables.make_table(load_records(tmp_path), "cpu", "boltzbench")
    assert tb.methods[-1] == "external:ext" and "idem" in tb.methods
    assert tb.text[("idem", "dw4", "x_w2")] == "1.500 (1/3)"  # built-ins still count the grid's seeds
    assert "(1/" not in tb.text[("external:ext", "dw4", "x_w2")]
    assert tb.rank[("idem", "dw4", "x_w2")] == 1 and tb.rank[("external:ext", "dw4", "x_w2")] == 2
    assert "1 ok" in tb.coverage and "Plus 1 external sampler run" in tb.coverage


# ---------------------------------------------------------------------------------------------- new user


def _readme_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Scoring your own samples")
    return text[start : text.index("\n## ", start + 10)]


def test_readme_example_as_a_new_user(tmp_path):
    """The README's first example, run as written (from a fresh directory, each line its own process):
    NumPy writes the samples, harness.score scores them."""
    sec = _readme_section()
    bash = re.search(r"```bash\n(.*?)```", sec, re.S).group(1)
    py = sys.executable
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the installed package only
    lines = [ln for ln in bash.splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0].startswith(".venv/bin/python -c") and "np.save" in lines[0]
    outs = []
    for ln in lines:
        r = subprocess.run(ln.replace(".venv/bin/python", py), shell=True, cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (ln, r.stderr)
        outs.append(r.stdout)
    sha = hashlib.sha256((tmp_path / "my_dw4.npy").read_bytes()).hexdigest()
    assert "x-W2" in outs[1] and sha in outs[1] and "1000 generated vs 1000 reference" in outs[1]
    d = json.loads((tmp_path / "my_dw4_scores.json").read_text())
    assert d["protocols"]["idem"]["sizes"]["n_generated"] == 1000


def test_readme_python_example_as_a_new_user(tmp_path):
    """The README's notebook example, run as written in a fresh process and directory."""
    sec = _readme_section()
    py = sys.executable
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = re.search(r"```python\n(.*?)```", sec, re.S).group(1)
    r = subprocess.run([py, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "idem protocol" in r.stdout
    assert (tmp_path / "results/runs/cpu/dw4/external-mysampler/r0/record.json").exists()
