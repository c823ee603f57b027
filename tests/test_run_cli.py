"""The CLI ``python -m harness.run``: validation before anything runs (exit 2, valid choices named), dry
runs, idempotent re-launches, --force, spec mismatches."""

from __future__ import annotations

import io

import pytest
import torch

import methods
from harness import run as cli

PLUGIN = "tests/conftest.py:register_toy"


def _main(args, capsys):
    out = io.StringIO()
    rc = cli.main(args, stream=out)
    err = capsys.readouterr().err
    return rc, out.getvalue(), err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--grid", "nope"], "valid grids: smoke, cpu, paper, full, equal-evals"),
        (["--grid", "smoke", "--methods", "nope"], "valid methods: "),
        (["--grid", "smoke", "--targets", "lj7"], "valid targets: dw4, dw4-bnem, gmm40, lj13, lj55"),
        (["--grid", "smoke", "--set", "toy.nope=1"], "valid keys: batch_size"),
        (["--grid", "smoke", "--set", "toy.batch_size=abc"], "expects an int"),
        (["--grid", "smoke", "--set", "oops"], "malformed override"),
        (["--grid", "smoke", "--seeds", "0"], "positive"),
        (["--grid", "smoke", "--jobs", "0"], "--jobs must be a positive integer"),
        (["--grid", "smoke", "--executor", "local", "--no-wait"], "--no-wait needs the slurm executor"),
        (["--grid", "smoke", "--slurm-opt", "account"], "malformed --slurm-opt"),
        (["--grid", "smoke", "--plugin", "no_such_mod_q"], "cannot import plugin"),
    ],
)
def test_bad_input_exits_2_naming_valid_choices(toy_method, tmp_path, capsys, args, message):
    rc, out, err = _main(args + ["--results", str(tmp_path / "r"), "--executor", "local"]
                         if "--executor" not in args else args + ["--results", str(tmp_path / "r")], capsys)
    assert rc == 2 and message in err, err
    assert not (tmp_path / "r").exists()  # nothing written or submitted


@pytest.mark.parametrize("value", ["fast", "gpu"])
def test_argparse_choices_are_listed(capsys, value):
    with pytest.raises(SystemExit) as e:
        cli.main(["--grid", "smoke", "--executor", value])
    assert e.value.code == 2
    assert "choose from 'auto', 'local', 'slurm', 'debug'" in capsys.readouterr().err


def test_cuda_asked_for_but_absent(toy_method, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    rc, _, err = _main(["--grid", "smoke", "--device", "cuda", "--executor", "local",
                        "--results", str(tmp_path)], capsys)
    assert rc == 2 and "CUDA is not available" in err and "valid devices: cpu" in err


def test_unwritable_results_directory(toy_method, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, _, err = _main(["--grid", "smoke", "--methods", "toy", "--executor", "debug",
                        "--results", str(blocker / "runs")], capsys)
    assert rc == 2 and "not writable" in err


def test_dry_run_lists_cells_missing_methods_and_runs_nothing(toy_method, tmp_path, capsys):
    rc, out, _ = _main(["--grid", "smoke", "--dry-run", "--results", str(tmp_path / "r")], capsys)
    assert rc == 0
    missing = [m for m in methods.PLANNED if m not in methods.names()]
    if missing:
        assert "missing methods (planned, not implemented yet): " + ", ".join(missing) in out
    assert "smoke/dw4/toy/r0" in out and "-> run" in out
    assert not (tmp_path / "r").exists()


def test_relaunch_is_idempotent_and_force_reruns(toy_method, fast_metrics, tmp_path, capsys):
    args = ["--grid", "smoke", "--methods", "toy", "--targets", "gmm40,dw4", "--executor", "debug",
            "--results", str(tmp_path)]
    rc, out, _ = _main(args, capsys)
    assert rc == 0 and "done: ok 2" in out
    rc, out, _ = _main(args + ["--dry-run"], capsys)
    assert "2 cells (ok 2)" in out and "would run 0 cell(s)" in out
    rc, out, _ = _main(args, capsys)
    assert rc == 0 and "submitted 0 jobs" in out
    # a changed spec (budget) is refused without --force, then re-run with it
    rc, _, err = _main(args + ["--set", "budget.steps=2"], capsys)
    assert rc == 2 and "different spec" in err
    rc, out, _ = _main(args + ["--set", "budget.steps=2", "--force"], capsys)
    assert rc == 0 and "done: ok 2" in out


def test_failed_cells_make_the_exit_status_1_and_are_rerun(toy_method, fast_metrics, tmp_path, capsys):
    args = ["--grid", "smoke", "--methods", "toy", "--targets", "gmm40", "--executor", "debug",
            "--results", str(tmp_path), "--set", "toy.fail_at_step=2"]
    rc, out, _ = _main(args, capsys)
    assert rc == 1 and "done: failed 1" in out
    rc, out, _ = _main(args + ["--dry-run"], capsys)
    assert "failed" in out and "-> resume" in out


def test_help_documents_every_flag():
    text = cli.build_parser().format_help()
    for flag in ("--grid", "--methods", "--targets", "--seeds", "--executor", "--device", "--partition",
                 "--time", "--gpus-per-task", "--cpus-per-task", "--mem-gb", "--array-parallelism",
                 "--slurm-opt", "--results", "--dry-run", "--force", "--wait", "--no-wait", "--jobs",
                 "--set"):
        assert flag in text, flag


def test_device_and_gpu_resolution():
    assert cli.resolve_device("cpu", "slurm", None) == ("cpu", 0)
    assert cli.resolve_device("cuda", "slurm", None) == ("cuda", 1)  # a GPU is requested for cuda cells
    assert cli.resolve_device("auto", "slurm", 2) == ("cuda", 2)
    assert cli.resolve_device("auto", "slurm", None) == ("cpu", 0)  # no GPU flag unless asked
    with pytest.raises(ValueError, match="slurm only"):
        cli.resolve_device("cpu", "local", 1)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert cli.resolve_device("auto", "local", None) == (expected, 0)


def test_cells_that_cannot_be_scored_are_refused_at_launch_with_nothing_submitted(
    toy_method, tmp_path, capsys, monkeypatch
):
    from harness import metrics

    monkeypatch.setitem(metrics.PROTOCOL_SPECS["boltzbench"].sizes, "dw4", (10**6, 10**6))
    args = ["--grid", "cpu", "--methods", "toy", "--targets", "dw4", "--seeds", "1", "--executor", "local",
            "--results", str(tmp_path / "r"), "--plugin", PLUGIN]
    rc, out, err = _main(args + ["--dry-run"], capsys)
    assert rc == 0 and "cannot be scored" in out and "needs 1000000" in out
    rc, out, err = _main(args, capsys)
    assert rc == 2 and "cannot be scored" in err and "python -m targets.reference" in err
    assert not (tmp_path / "r" / "cpu").exists()
