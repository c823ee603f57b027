"""Cell checkpoints (resume state) and the per-cell lock.

Checkpoint file ``<run_dir>/checkpoint.pt``: written atomically (temp file + fsync + rename), loadable with
``torch.load(path, weights_only=True)``: only tensors, numbers, strings, lists and dicts. It holds the
method's ``state_dict()``, the method generator's state, torch's global CPU (and CUDA) RNG states, numpy's and
Python's RNG states (as tensors / lists), the usage counters, the evaluations so far and the spec (as JSON, to
refuse resuming a different spec).

The checkpoint written before the current one is kept as ``<run_dir>/checkpoint.prev.pt`` (a hard link made
before the atomic replace, so ``checkpoint.pt`` itself is never missing). ``load_checkpoint_recovering`` never
leaves a cell stuck on a damaged file: an unreadable checkpoint (truncated by a full disk or a copy, a
foreign format) is moved aside as ``checkpoint.corrupt-<time>.pt``, named on stderr and in the returned notes
(which the run's record keeps), and the previous checkpoint is tried, else the cell starts from scratch.

Lock file ``<run_dir>/lock``: a cell is run only while its process holds an exclusive ``fcntl.flock`` on it.
The kernel releases the lock when the process exits in any way (crash, SIGKILL, node reboot for local
disks), so a stale lock cannot block a cell; a second process finds the lock held and does not start the
cell. The file's content (JSON: host, pid, SLURM job id, start time) says who holds it. The file is never
deleted (deleting lock files reintroduces races). On NFS, Linux maps ``flock`` to POSIX byte-range locks
held by the NFS lock manager, so it also works across nodes of a cluster with a shared results directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import random
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.env import slurm_info
from harness.records import atomic_write_bytes

CHECKPOINT_NAME = "checkpoint.pt"
PREV_CHECKPOINT_NAME = "checkpoint.prev.pt"
LOCK_NAME = "lock"
FORMAT = 1


# ------------------------------------------------------------------------------------------------ RNG
def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Global torch (CPU, CUDA), numpy and python RNG states, plus ``generator``'s, as safe types."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        out["generator"] = generator.get_state()
    return out


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and python from one integer."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# ------------------------------------------------------------------------------------------------ files
def save_checkpoint(run_dir: str | Path, state: dict[str, Any], keep_previous: bool = True) -> Path:
    """Atomically write ``state`` (safe types only) to ``run_dir/checkpoint.pt``; the checkpoint it replaces
    is kept as ``checkpoint.prev.pt`` (unless ``keep_previous`` is False)."""
    path = Path(run_dir) / CHECKPOINT_NAME
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    if keep_previous and path.exists():
        prev = path.with_name(PREV_CHECKPOINT_NAME)
        tmp = path.with_name(f".{PREV_CHECKPOINT_NAME}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        try:
            os.link(path, tmp)  # the old inode survives the rename below under the new name
            os.replace(tmp, prev)
        except OSError:  # a filesystem without hard links: no previous checkpoint kept
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _read_checkpoint(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: unsupported checkpoint format {got!r} (expected {FORMAT})")
    return state


def load_checkpoint(run_dir: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The checkpoint of a cell, or None if there is none. Loaded with ``weights_only=True``; an unreadable
    file raises (``load_checkpoint_recovering`` sets it aside instead)."""
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.exists():
        return None
    return _read_checkpoint(path, map_location)


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether the cell has resume state (the current or the previous checkpoint)."""
    d = Path(run_dir)
    return (d / CHECKPOINT_NAME).exists() or (d / PREV_CHECKPOINT_NAME).exists()


def load_checkpoint_recovering(
    run_dir: str | Path, map_location: str | torch.device = "cpu", stream: Any = None
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(state, notes): the newest readable checkpoint of a cell (``checkpoint.pt``, else
    ``checkpoint.prev.pt``), or None (start from scratch). Each unreadable file is renamed to
    ``checkpoint.corrupt-<time>[-prev].pt``, reported on ``stream`` (stderr) and described in ``notes``
    (``file``, ``moved_to``, ``error``, and ``resumed_from``: the file used, or "scratch")."""
    d = Path(run_dir)
    notes: list[dict[str, Any]] = []
    for name in (CHECKPOINT_NAME, PREV_CHECKPOINT_NAME):
        path = d / name
        if not path.exists():
            continue
        try:
            state = _read_checkpoint(path, map_location)
        except Exception as e:  # truncated zip, foreign pickle, wrong format: never fatal
            stamp = time.strftime("%Y%m%d-%H%M%S")
            aside = d / f"checkpoint.corrupt-{stamp}{'-prev' if name != CHECKPOINT_NAME else ''}.pt"
            n = 1
            while aside.exists():
                aside = aside.with_name(f"{aside.stem}-{n}.pt")
                n += 1
            os.replace(path, aside)
            err = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            notes.append({"file": str(path), "moved_to": str(aside), "error": err})
            continue
        if notes:
            for nt in notes:
                nt["resumed_from"] = name
        _report(notes, stream)
        return state, notes
    for nt in notes:
        nt["resumed_from"] = "scratch"
    _report(notes, stream)
    return None, notes


def _report(notes: list[dict[str, Any]], stream: Any) -> None:
    for nt in notes:
        how = ("restarting from scratch" if nt["resumed_from"] == "scratch"
               else f"resuming from {nt['resumed_from']} (the checkpoint before it)")
        print(f"warning: checkpoint {nt['file']} is unreadable ({nt['error']}); moved aside to "
              f"{nt['moved_to']}; {how}", file=stream or sys.stderr, flush=True)


def remove_checkpoint(run_dir: str | Path) -> None:
    for name in (CHECKPOINT_NAME, PREV_CHECKPOINT_NAME):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(Path(run_dir) / name)


# ------------------------------------------------------------------------------------------------ lock
class CellBusyError(RuntimeError):
    """The cell's lock is held by another process (it is running elsewhere)."""

    def __init__(self, run_dir: Path, holder: dict[str, Any]):
        self.run_dir = run_dir
        self.holder = holder
        keys = ("host", "pid", "slurm_job_id", "since")
        who = ", ".join(f"{k}={v}" for k, v in holder.items() if k in keys)
        super().__init__(f"{run_dir} is being run by another process ({who or 'unknown holder'})")


class CellLock:
    """Exclusive, non-blocking lock of a run directory (see the module docstring). Use as a context manager;
    raises ``CellBusyError`` if another process holds it."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> CellLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise CellBusyError(self.run_dir, read_lock_info(self.run_dir)) from None
            raise
        self._fd = fd
        slurm = slurm_info()
        job = slurm.get("job_id")
        if slurm.get("array_job_id") and slurm.get("array_task_id"):
            job = f"{slurm['array_job_id']}_{slurm['array_task_id']}"
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": job,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> CellLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_lock_info(run_dir: str | Path) -> dict[str, Any]:
    try:
        with open(Path(run_dir) / LOCK_NAME) as f:
            return json.loads(f.read() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


def is_locked(run_dir: str | Path) -> dict[str, Any] | None:
    """The holder info if another process holds the cell's lock now, else None (does not create files)."""
    path = Path(run_dir) / LOCK_NAME
    if not path.exists():
        return None
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return read_lock_info(run_dir) or {"holder": "unknown"}
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    return None
