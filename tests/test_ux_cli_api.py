"""A researcher's first hour, CLI and API: value ranges checked before submission, --help without repeated
defaults, --dry-run with the resolved executor, totals and unscorable cells, targets taking NumPy arrays."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import methods
import targets
from harness import dispatch, grids
from harness import run as cli
from methods.base import FIELD_RANGES


def _main(args, capsys):
    rc = cli.main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize(
    "override, needle",
    [
        ("idem.lr=-1", "lr > 0"),
        ("idem.batch_size=0", ">= 1"),
        ("nem.n_mc=0", "n_mc >= 1"),
        ("nem.ema_beta=1.5", "ema_beta in [0, 1]"),
        ("pis.ema_decay=1", "ema_decay in [0, 1)"),
        ("fab.target_accept=0", "target_accept in (0, 1)"),
        ("pt.t_max=0.5", "t_max >= 1"),
        ("mcmc.step_size=0", "step_size > 0"),
        ("idem.sigma_max=1e-9", "sigma_min"),
    ],
)
def test_out_of_range_values_exit_2_naming_the_range(override, needle, capsys, tmp_path):
    rc, out, err = _main(["--grid", "smoke", "--set", override, "--results", str(tmp_path), "--dry-run"],
                         capsys)
    assert rc == 2 and needle in err and "error:" in err, err
    assert not any(tmp_path.iterdir())  # nothing written, nothing submitted


def test_every_published_config_and_preset_is_in_range():
    for m in methods.names():
        M = methods.get(m)
        for t in targets.names():
            for g in grids.names():
                grid = grids.GRIDS[g]
                over: dict = {}
                for p in grid.preset_grids or (g,):
                    over.update(M.Config.preset(p, t))
                M.Config.for_target(t, **over).check_ranges()
    assert FIELD_RANGES["lr"].describe() == "> 0" and FIELD_RANGES["n_mc"].describe() == ">= 1"


def test_help_states_each_default_once(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and not re.search(r"\(default:[^)]*\)\s*\(default:", text)
    assert text.count("--wait, --no-wait") == 1 and "--no-wait (SLURM only)" in text
    assert "(default: every registered method)" in text and "BOLTZBENCH_PROGRESS_EVERY" in text


@pytest.mark.parametrize("slurm", [False, True])
def test_dry_run_resolves_the_executor_and_gives_totals(slurm, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(dispatch, "slurm_reachable", lambda timeout=10.0: slurm)
    rc, out, err = _main(["--grid", "smoke", "--methods", "mcmc,idem", "--targets", "dw4",
                          "--results", str(tmp_path), "--dry-run"], capsys)
    assert rc == 0, err
    want = "auto -> slurm (a SLURM controller answers" if slurm else "auto -> local (no SLURM controller"
    assert want in out
    totals = [ln for ln in out.splitlines() if ln.startswith("totals:")]
    assert len(totals) == 1 and "2 cell(s) to run" in totals[0] and "core-hours" in totals[0]
    assert "summed wall-clock caps" in totals[0] and "summed step caps" in totals[0]


def test_dry_run_warns_about_cells_that_cannot_be_scored(capsys, monkeypatch, tmp_path):
    from harness import scoring

    monkeypatch.setattr(scoring, "check_scorable",
                        lambda spec: "boltzbench: lj55 test reference has 2000 samples, the protocol "
                        "needs 5000" if spec.target == "lj55" else None)
    rc, out, _ = _main(["--grid", "cpu", "--methods", "mcmc", "--targets", "dw4,lj55", "--executor", "local",
                        "--results", str(tmp_path), "--dry-run"], capsys)
    assert rc == 0
    warn = out.split("warning: cells that cannot be scored", 1)[1].splitlines()[1]
    assert "3 cell(s) (cpu/lj55/mcmc/r0" in warn and "needs 5000" in warn and "dw4" not in warn


@pytest.mark.parametrize("key", ["gmm40", "dw4", "lj13", "lj55"])
def test_targets_take_numpy_arrays(key):
    t = targets.get(key)
    x32 = t.reference("test", 5).numpy()
    x64 = x32.astype(np.float64)
    e_t = t.energy(torch.from_numpy(x64)).numpy()
    e = t.energy(x64)
    assert isinstance(e, np.ndarray) and e.dtype == np.float64 and e.shape == (5,)
    np.testing.assert_allclose(e, e_t, rtol=1e-12)
    assert t.energy(x32).dtype == np.float32
    assert np.ndim(t.energy(x64[0])) == 0 and float(t.energy(x64[0])) == pytest.approx(e[0], rel=1e-12)
    en, g = t.energy_and_grad(x64)
    assert isinstance(g, np.ndarray) and g.shape == (5, t.dim)
    np.testing.assert_allclose(t.score(x64), -g)
    np.testing.assert_allclose(t.log_prob(x64), -e)
    if t.n_particles:
        d = t.interatomic_distances(x64)
        assert isinstance(d, np.ndarray) and d.shape == (5, t.n_pairs)
    with pytest.raises(ValueError, match="NumPy array of shape"):
        t.energy([[0.0] * t.dim])
    assert isinstance(t.energy(torch.from_numpy(x64)), torch.Tensor)  # tensors stay tensors


def test_ctrl_c_in_the_debug_executor_checkpoints_and_says_so_once(capsys, tmp_path):
    import os
    import signal
    import threading

    from harness import progress as pg

    results = tmp_path / "runs"
    args = ["--grid", "smoke", "--methods", "mcmc", "--targets", "dw4", "--executor", "debug",
            "--results", str(results), "--set", "budget.steps=100000000", "--set", "budget.wall_seconds=120"]
    cell = results / "smoke/dw4/mcmc/r0"

    def interrupt():
        for _ in range(600):
            snap = pg.read_progress(cell)
            if snap and snap.get("step", 0) >= 5:
                break
            threading.Event().wait(0.1)
        os.kill(os.getpid(), signal.SIGINT)

    th = threading.Thread(target=interrupt)
    th.start()
    rc = cli.main(args)
    th.join()
    out = capsys.readouterr()
    assert rc == 130
    lines = [ln for ln in out.err.splitlines() if "interrupted (Ctrl-C)" in ln]
    assert len(lines) == 1, out.err
    assert "1 running cell(s) checkpointed (smoke/dw4/mcmc/r0 at step" in lines[0]
    assert "Traceback" not in out.err + out.out
    assert (cell / "checkpoint.pt").exists() and not (cell / "record.json").exists()


def test_launcher_progress_lines_without_a_terminal():
    import io

    from harness.dispatch import Progress

    buf = io.StringIO()
    p = Progress(3, buf, interactive=False, every_s=1e-9)
    snap = {"cell": "cpu/dw4/idem/r0", "step": 12, "steps_limit": 100, "fraction": 0.12,
            "train_energy_evals": 5000, "metric": ["val_x_w2", 0.5], "metric_at": 0.1, "elapsed_s": 30,
            "eta_s": 220}
    p.last_lines = -1e9
    p.running(1, {"cpu/dw4/idem/r0": snap})
    assert buf.getvalue().startswith("  running [cpu/dw4/idem/r0] step 12/100 12.0% | energy evals 5e+03 | "
                                     "val_x_w2 0.5 @10% | 30s elapsed, eta 3m40s")
