"""Run specifications and run records (JSON, schema-versioned, written atomically).

Layout under a results root (default ``results/runs``)::

    <root>/<grid>/<target>/<method>/r<replicate>/record.json     the record (see results/README.md)
    <root>/<grid>/<target>/<method>/r<replicate>/samples.npz     generated samples of the last evaluation
    <root>/<grid>/<target>/<method>/r<replicate>/samples_small.npz   its first ``release_rows(dim)`` rows
    <root>/<grid>/<target>/<method>/r<replicate>/checkpoint.pt   resume state while running

``record.json`` and ``samples_small.npz`` are what the results release commits (``results/runs/cpu``,
``results/runs/equal-evals-cpu``); tables and figures read only those, so they regenerate byte for byte from a
clean checkout.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

#: 2 adds ``selection``, ``scoring`` and per-evaluation ``scores`` / ``val`` blocks; version 1 is still read
SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)
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
    text = json.dumps(obj, indent=1, sort_keys=False, default=_json_default) + "\n"
    atomic_write_bytes(path, text.encode())


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
    #: evaluation index per selection rule (harness.scoring.select): {"index": {"last": k, "idem": k, ...}}
    selection: dict[str, Any] = field(default_factory=dict)
    #: when and against which reference files (source, sha256) the evaluations were scored, per protocol
    scoring: dict[str, Any] = field(default_factory=dict)
    #: set when the record is a finished run of another grid standing for this cell (harness.covered)
    covered_by: dict[str, Any] | None = None
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
        if not isinstance(d, dict) or d.get("schema_version") not in READABLE_SCHEMAS:
            raise ValueError(f"unsupported record schema_version {d.get('schema_version')!r}")
        d = dict(d)
        if not isinstance(d.get("spec"), dict):
            raise ValueError("record has no 'spec' object")
        d["spec"] = RunSpec.from_dict(d["spec"])
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def write(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def read(cls, path: str | Path) -> RunRecord:
        with open(path) as f:
            return cls.from_dict(json.load(f))


# ====================================================================================== loading

RECORD_NAME = "record.json"
SAMPLES_NAME = "samples.npz"
#: the committed subsample of the last evaluation's samples (figures read it; see ``release_rows``)
RELEASE_SAMPLES_NAME = "samples_small.npz"
#: the committed subsample's size: about 160 kB of float32 per cell (1000 rows up to dim 40; LJ-55: 242)
RELEASE_BYTES = 160_000


def release_rows(dim: int) -> int:
    """Rows of ``samples_small.npz`` for samples of dimension ``dim``: min(1000, RELEASE_BYTES / (4 dim))."""
    return max(1, min(1000, RELEASE_BYTES // (4 * int(dim))))
#: metric columns of ``load_records`` carry this prefix (``m_x_w2``, ``m_e_w2_floor``, ...)
METRIC_PREFIX = "m_"
#: per-checkpoint usage columns carry this prefix (``u_energy_evals``, ``u_train_seconds``, ...)
USAGE_PREFIX = "u_"
#: val-split selection metrics (``v_val_x_w2``, ``v_val_e_w2``); diagnostics (``d_log_z``, ``d_ess``, ...)
VAL_PREFIX = "v_"
DIAG_PREFIX = "d_"
#: ``sel_<rule>``: whether the evaluation is the one selection rule <rule> picks (harness.scoring)
SELECTED_PREFIX = "sel_"
SELECTION_RULE_NAMES = ("last", "idem", "bnem")
#: the rule each protocol's paper applied (``is_selected`` follows it); mirrors harness.scoring.PROTOCOL_RULE
#: (asbs: the AS / ASBS code evaluates the model it has at each eval epoch and keeps no selection; which
#: evaluation the papers' tables report is not in the code, so the last one)
PROTOCOL_RULE = {"idem": "idem", "bnem": "bnem", "boltzbench": "last", "asbs": "last"}


def iter_record_paths(root: str | Path) -> list[Path]:
    """Every ``record.json`` under ``root`` (sorted), or ``[root]`` when ``root`` is a record file."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.exists():
        return []
    return sorted(p for p in root.rglob(RECORD_NAME) if p.is_file())


def record_rows(rec: RunRecord, path: str | Path | None = None) -> list[dict[str, Any]]:
    """The tidy rows of one record: one per evaluation checkpoint (``checkpoint`` 0, 1, ...; ``is_final`` on
    the last), or a single row with ``checkpoint`` = -1 and no metrics when the run has none."""
    s = rec.spec
    base: dict[str, Any] = {
        "run_id": s.cell_id, "grid": s.grid, "target": s.target, "method": s.method,
        "replicate": s.replicate, "seed": s.seed, "protocol": s.protocol, "device": s.device,
        "status": rec.status, "stop_reason": rec.stop_reason, "error": rec.error,
        "reference_source": rec.reference.get("source"), "reference_sha256": rec.reference.get("sha256"),
        "reference_file": rec.reference.get("file"),
        "started_at": rec.started_at, "finished_at": rec.finished_at, "schema_version": rec.schema_version,
        "path": str(path) if path is not None else None,
        "samples_path": None,
    }
    if path is not None:  # the committed subsample first, so figures do not depend on what else is on disk
        small = Path(path).parent / RELEASE_SAMPLES_NAME
        sp = small if small.exists() else (Path(path).parent / rec.samples_file if rec.samples_file else None)
        base["samples_path"] = str(sp) if sp is not None and sp.exists() else None
    for k, v in rec.usage.items():
        base[f"total_{k}"] = v
    base["primary_protocol"] = s.protocol
    env = rec.environment if isinstance(rec.environment, dict) else {}
    base["resumed"] = bool(env.get("resumed", False))
    base["n_segments"] = len(env.get("segments") or []) or (1 if rec.started_at else 0)
    base["checkpoint_recovered"] = bool(env.get("checkpoint_recovery"))
    if not rec.evaluations:
        return [{**base, "checkpoint": -1, "is_final": True, "is_selected": True, "fraction": float("nan"),
                 "step": None}]
    picked = (rec.selection or {}).get("index") or {}
    last = len(rec.evaluations) - 1
    rows = []
    for i, ev in enumerate(rec.evaluations):
        row = {**base, "checkpoint": i, "is_final": i == last,
               "fraction": ev.get("fraction"), "step": ev.get("step")}
        for rule in SELECTION_RULE_NAMES:
            row[f"{SELECTED_PREFIX}{rule}"] = picked.get(rule, last) == i
        for k, v in (ev.get("usage") or {}).items():
            row[f"{USAGE_PREFIX}{k}"] = v
        for k, v in (ev.get("val") or {}).items():
            row[f"{VAL_PREFIX}{k}"] = _float(v)
        for k, v in (ev.get("diagnostics") or {}).items():
            row[f"{DIAG_PREFIX}{k}"] = _float(v)
        blocks = {p: b for p, b in (ev.get("scores") or {}).items() if isinstance(b, dict)}
        if not blocks:  # schema 1, or no scores: the run's own protocol's metrics
            blocks = {s.protocol: ev.get("metrics") or {}}
        for protocol, block in blocks.items():
            prow = {**row, "protocol": protocol,
                    "is_selected": row[f"{SELECTED_PREFIX}{PROTOCOL_RULE.get(protocol, 'last')}"]}
            for k, v in block.items():
                prow[f"{METRIC_PREFIX}{k}"] = _float(v)
            rows.append(prow)
    return rows


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def load_records(root: str | Path = "results/runs", strict: bool = False) -> Any:
    """All records under ``root`` as a tidy ``pandas.DataFrame``: one row per (run, evaluation checkpoint);
    columns in results/README.md (metrics ``m_<name>``, usage at the checkpoint ``u_<name>``, run totals
    ``total_<name>``). A file that cannot be read as a record (corrupt JSON, foreign schema, unknown schema
    version) is reported with its path as a ``UserWarning`` and skipped (``strict=True`` raises instead);
    the skipped paths and reasons are in ``df.attrs["skipped"]``. An empty or missing root gives an empty
    frame with the base columns."""
    import pandas as pd

    rows: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    for p in iter_record_paths(root):
        try:
            with open(p) as f:
                d = json.load(f)
            if not isinstance(d, dict) or "spec" not in d:
                raise ValueError("not a boltzbench run record (no 'spec')")
            rec = RunRecord.from_dict(d)
            rows.extend(record_rows(rec, p))
        except Exception as e:
            if strict:
                raise ValueError(f"{p}: {type(e).__name__}: {e}") from e
            reason = f"{type(e).__name__}: {e}"
            skipped.append((str(p), reason))
            warnings.warn(f"skipping unreadable record {p}: {reason}", UserWarning, stacklevel=2)
    cols = ["run_id", "grid", "target", "method", "replicate", "seed", "protocol", "status", "checkpoint",
            "is_final", "fraction", "step"]
    df = pd.DataFrame(rows) if rows else pd.DataFrame(columns=cols)
    df.attrs["skipped"] = skipped
    return df


def protocol_rows(df: Any, protocol: str) -> Any:
    """The rows of ``df`` (``load_records``) under ``protocol``, plus one row per run that has no evaluation
    at all (``checkpoint`` -1: e.g. diverged at step 1), relabelled to ``protocol``: such a run has no metric
    under any protocol, but every protocol's table must still count it (as diverged, not as missing)."""
    if df.empty:
        return df
    own = df["protocol"] == protocol
    bare = (df["checkpoint"] == -1) & ~own
    out = df[own | bare].copy()
    out.loc[bare[own | bare], "protocol"] = protocol
    return out
