"""Environment information for run records, and the CPU-thread count of the current allocation.

``environment_info(device)`` returns a JSON-serialisable dict: package versions, python, platform, host,
device (and GPU name), torch threads, git commit (with a ``dirty`` flag), SLURM job / array ids.

``threads_from_allocation(explicit)`` decides how many torch threads a cell uses: an explicit value, else
``SLURM_CPUS_PER_TASK``, else ``BOLTZBENCH_THREADS``, else None (leave torch's default). Two processes that
each use all cores collapse on a small machine (measured 40x slower), so the dispatcher always sets it.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
_PACKAGES = ("torch", "numpy", "pot", "scipy", "submitit", "pandas")
_SLURM_VARS = {
    "job_id": "SLURM_JOB_ID",
    "array_job_id": "SLURM_ARRAY_JOB_ID",
    "array_task_id": "SLURM_ARRAY_TASK_ID",
    "cpus_per_task": "SLURM_CPUS_PER_TASK",
    "partition": "SLURM_JOB_PARTITION",
    "node": "SLURMD_NODENAME",
    "restart_count": "SLURM_RESTART_COUNT",
}


def threads_from_allocation(explicit: int | None = None) -> int | None:
    """Torch threads for this process: explicit > SLURM_CPUS_PER_TASK > BOLTZBENCH_THREADS > None."""
    if explicit is not None:
        if int(explicit) < 1:
            raise ValueError(f"threads must be >= 1, got {explicit}")
        return int(explicit)
    for var in ("SLURM_CPUS_PER_TASK", "BOLTZBENCH_THREADS"):
        v = os.environ.get(var)
        if v:
            try:
                n = int(v)
            except ValueError:
                continue
            if n >= 1:
                return n
    return None


def apply_threads(n: int | None) -> None:
    """Set torch's intra-op threads (and OMP_NUM_THREADS for child processes) when ``n`` is given."""
    if n is None:
        return
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)


def slurm_info() -> dict[str, str]:
    """The SLURM variables of the current job (empty outside SLURM)."""
    return {k: os.environ[v] for k, v in _SLURM_VARS.items() if os.environ.get(v)}


@lru_cache(maxsize=1)
def git_info() -> dict[str, Any]:
    """Commit of the checkout the code runs from and whether tracked files differ from it (None if no git)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for p in _PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def environment_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Everything a record needs to say where and with what it ran (JSON-serialisable)."""
    try:
        device = torch.device(device)
    except RuntimeError:
        device = torch.device("cpu")
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        # 1/5/15-minute load averages: timing tables flag runs made on an oversubscribed machine
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": package_versions(),
        "git": git_info(),
        "slurm": slurm_info(),
    }
    if device.type == "cuda" and torch.cuda.is_available():
        idx = device.index if device.index is not None else torch.cuda.current_device()
        info["gpu"] = torch.cuda.get_device_name(idx)
        info["cuda"] = torch.version.cuda
    return info
