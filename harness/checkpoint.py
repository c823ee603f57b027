"""Cell checkpoints (resume state) and the per-cell lock.

Checkpoint file ``<run_dir>/checkpoint.pt``: written atomically (temp file + fsync + rename), loadable with
``torch.load(path, weights_only=True)``: only tensors, numbers, strings, lists and dicts. It holds the
method's ``state_dict()``, the method generator's state, torch's global CPU (and CUDA) RNG states, numpy's and
Python's RNG states (as tensors / lists), the usage counters, the evaluations so far and the spec (as JSON, to
refuse resuming a different spec).

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
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.env import slurm_info
from harness.records import atomic_write_bytes

CHECKPOINT_NAME = "checkpoint.pt"
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
def save_checkpoint(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` (safe types only) to ``run_dir/checkpoint.pt``."""
    path = Path(run_dir) / CHECKPOINT_NAME
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_checkpoint(run_dir: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The checkpoint of a cell, or None if there is none. Loaded with ``weights_only=True``."""
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.exists():
        return None
    state = torch.load(path, map_location=map_location, weights_only=True)
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported checkpoint format {state.get('format')!r} (expected {FORMAT})")
    return state


def remove_checkpoint(run_dir: str | Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(Path(run_dir) / CHECKPOINT_NAME)


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
