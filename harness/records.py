"""Run specifications and run records (JSON, schema-versioned, written atomically).

Layout under a results root (default ``results/runs``)::

    <root>/<grid>/<target>/<method>/r<replicate>/record.json     the record (see results/README.md)
    <root>/<grid>/<target>/<method>/r<replicate>/samples.npz     generated samples (subsampled)
    <root>/<grid>/<target>/<method>/r<replicate>/checkpoint.pt   resume state while running
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
STATUSES = ("ok", "diverged", "failed", "timeout")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False, default=_json_default) + "\n").encode())


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


@dataclass(frozen=True)
class RunSpec:
    """One cell of a grid: (method, target, replicate) with its config overrides, budget and protocol."""

    grid: str
    target: str
    method: str
    replicate: int = 0
    seed: int = 0  # derived from (grid seed, target, method, replicate) by harness.grids
    config: dict[str, Any] = field(default_factory=dict)  # overrides of the method's per-target Config
    budget: dict[str, Any] = field(default_factory=dict)  # harness.budget.Budget fields
    protocol: str = "boltzbench"
    eval_fractions: tuple[float, ...] = (0.1, 0.3, 1.0)
    n_eval_samples: int | None = None  # None: the protocol's size for the target
    device: str = "cpu"

    @property
    def cell_id(self) -> str:
        return f"{self.grid}/{self.target}/{self.method}/r{self.replicate}"

    def run_dir(self, root: str | Path) -> Path:
        return Path(root) / self.grid / self.target / self.method / f"r{self.replicate}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eval_fractions"] = list(self.eval_fractions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown RunSpec keys {sorted(unknown)}; valid: {sorted(names)}")
        d = dict(d)
        if "eval_fractions" in d:
            d["eval_fractions"] = tuple(d["eval_fractions"])
        return cls(**d)


@dataclass
class RunRecord:
    """The outcome of one run. ``evaluations``: one dict per evaluation checkpoint with keys
    ``fraction``, ``step``, ``usage`` (a Usage dict) and ``metrics`` (name -> float)."""

    spec: RunSpec
    status: str
    stop_reason: str | None = None  # which budget limit was exhausted, or the divergence reason
    usage: dict[str, Any] = field(default_factory=dict)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)  # the full resolved method config
    reference: dict[str, Any] = field(default_factory=dict)  # provenance of the reference split(s)
    environment: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    samples_file: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spec"] = self.spec.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunRecord:
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"unsupported record schema_version {d.get('schema_version')!r}")
        d = dict(d)
        d["spec"] = RunSpec.from_dict(d["spec"])
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def write(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def read(cls, path: str | Path) -> RunRecord:
        with open(path) as f:
            return cls.from_dict(json.load(f))
