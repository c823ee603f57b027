"""Interrupts of a real launch (local executor, real worker processes): Ctrl-C in a terminal (a pty) and
SIGTERM to the launcher's process group. Expected: every running cell checkpoints, every worker exits (no
orphan), one clear line says what was checkpointed and how to resume, no traceback; the cells are then
resumable."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import checkpoint as ck
from harness import dispatch, grids
from harness import progress as pg

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux /proc and ptys")

CELLS = ("smoke/dw4/mcmc/r0", "smoke/gmm40/mcmc/r0")


def _cmd(results: Path) -> list[str]:
    return [sys.executable, "-m", "harness.run", "--grid", "smoke", "--methods", "mcmc",
            "--targets", "dw4,gmm40", "--executor", "local", "--jobs", "2", "--results", str(results),
            "--checkpoint-every", "1000",
            "--set", "budget.steps=100000000", "--set", "budget.wall_seconds=300"]


def _env() -> dict[str, str]:
    return {**os.environ, "BOLTZBENCH_PROGRESS_EVERY": "1", "PYTHONUNBUFFERED": "1"}


def _all_running(results: Path, min_step: int = 3) -> bool:
    for cid in CELLS:
        snap = pg.read_progress(results / cid)
        if not snap or snap.get("state") != "running" or snap.get("step", 0) < min_step:
            return False
    return True


def _session_members(sid: int) -> list[str]:
    """Processes (pid and command) of session ``sid`` still alive (zombies excluded)."""
    out = []
    for e in os.listdir("/proc"):
        if not e.isdigit():
            continue
        try:
            stat = Path(f"/proc/{e}/stat").read_text()
            cmd = Path(f"/proc/{e}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(f"{e}: {cmd}")
    return out


def _check_interrupted(results: Path, output: str, name: str) -> None:
    assert "Traceback" not in output, output
    assert "KeyboardInterrupt" not in output, output
    lines = [ln for ln in output.splitlines() if f"interrupted ({name})" in ln]
    assert len(lines) == 1, output
    assert "2 running cell(s) checkpointed" in lines[0] and "Re-run the same command to resume" in lines[0]
    for cid in CELLS:
        d = results / cid
        assert (d / ck.CHECKPOINT_NAME).exists(), cid
        assert not (d / "record.json").exists(), cid  # interrupted, not failed
        snap = json.loads((d / pg.PROGRESS_NAME).read_text())
        assert snap["state"] == "interrupted" and f"{cid} at step {snap['step']}" in lines[0]
        assert ck.load_checkpoint(d)["usage"]["steps"] == snap["step"]
    ex = grids.expand("smoke", methods=["mcmc"], targets=["dw4", "gmm40"],
                      overrides=["budget.steps=100000000", "budget.wall_seconds=300"], device="cpu")
    states = {c.spec.cell_id: c.state for c in dispatch.plan(ex.specs, results).cells}
    assert set(states.values()) == {"interrupted"}, states  # a re-run resumes them


def test_ctrl_c_in_a_terminal(tmp_path):
    results = tmp_path / "runs"
    pid, fd = pty.fork()
    if pid == 0:  # child: session leader with the pty as its controlling terminal
        try:
            os.chdir(REPO)
            # a terminal user's Ctrl-C: SIGINT at its default even when pytest itself was started in the
            # background (`make test &` ignores SIGINT, and an ignored signal stays ignored across exec)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execve(sys.executable, _cmd(results), _env())
        finally:
            os._exit(127)
    buf = bytearray()

    def pump(timeout: float) -> bool:
        """Read what is there; False at EOF."""
        r, _, _ = select.select([fd], [], [], timeout)
        if not r:
            return True
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child side closed
            return False
        buf.extend(chunk)
        return bool(chunk)

    try:
        t0 = time.monotonic()
        while not _all_running(results):
            assert time.monotonic() - t0 < 180, buf.decode(errors="replace")
            pump(0.2)
        os.write(fd, b"\x03")  # Ctrl-C: the terminal sends SIGINT to the whole foreground process group
        t1 = time.monotonic()
        while pump(0.5):
            assert time.monotonic() - t1 < 180, buf.decode(errors="replace")
        _, status = os.waitpid(pid, 0)
    finally:
        with_children = _session_members(pid)
        for line in with_children:
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
        os.close(fd)
    assert not with_children, with_children
    print(buf.decode(errors="replace"))
    assert os.waitstatus_to_exitcode(status) == 130
    _check_interrupted(results, buf.decode(errors="replace"), "Ctrl-C")


def test_sigterm_to_the_process_group_leaves_no_orphan(tmp_path):
    results = tmp_path / "runs"
    p = subprocess.Popen(_cmd(results), cwd=REPO, env=_env(), start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        t0 = time.monotonic()
        while not _all_running(results):
            assert p.poll() is None and time.monotonic() - t0 < 180
            time.sleep(0.2)
        os.killpg(p.pid, signal.SIGTERM)  # what a scheduler or `kill -- -PGID` does
        out, _ = p.communicate(timeout=180)
        left = _session_members(p.pid)
    finally:
        for line in _session_members(p.pid):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
        if p.poll() is None:
            p.kill()
    assert not left, left  # every worker and controller ended with the launcher
    assert p.returncode == 143
    _check_interrupted(results, out.decode(errors="replace"), "SIGTERM")
