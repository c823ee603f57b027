"""Score any sampler's saved samples exactly as the benchmark scores its runs: ``python -m harness.score``.

    python -m harness.score FILE [FILE ...] --target NAME [--protocol idem|bnem|boltzbench|asbs|all] [--json]
                            [--key NAME] [--n N] [--drop-nonfinite] [--grid NAME]
                            [--add-to RESULTS --name LABEL [--replicate R] [--force]
                             [--energy-evals N] [--train-seconds S]]

Reads ``.npy`` (``allow_pickle=False``), ``.npz`` (one array, or ``--key``; ``allow_pickle=False``),
``.pt`` / ``.pth`` (a tensor, or a dict of tensors with ``--key``; ``torch.load(weights_only=True)``),
``.csv`` (comma-separated) and ``.txt`` (whitespace-separated; a header line is skipped, ``#`` comments
too). Samples are ``[N, dim]`` or, for particle targets, ``[N, n_particles, spatial_dim]``; several files
are concatenated in the order given. Particle samples are centred (``evaluate`` centres them too).

Scoring is ``harness.metrics.evaluate(samples, target.reference("test", n_ref), target, protocol, **opts)``
with the sizes of ``harness.metrics.eval_sizes(protocol, target)`` — what ``harness.job`` does for the
built-in methods — and ``opts`` the ``--grid``'s metric options (default grid ``cpu``: none). More rows
than a protocol needs: the first ``n_generated`` are used (said in the output). Fewer: an error naming how
many are needed; ``--n N`` scores the first N rows against N reference rows instead (as a grid's
``n_eval_samples`` does; marked as non-standard sizes).

``--add-to RESULTS --name LABEL`` writes ``RESULTS/<grid>/<target>/external-<LABEL>/r<R>/record.json`` (and
``samples.npz``): a run record with method ``external:LABEL`` whose evaluation holds ``metrics`` (the
``boltzbench`` block, else the first protocol scored) and ``scores`` (one block per protocol), so
``make tables``, the figures and ``make timing`` show the sampler beside the built-in methods, marked
external. An existing record of the same label is kept unless ``--force``.

Bad input (unknown target, protocol or grid, wrong shape, a pickle or other unsupported format, a missing or
ambiguous key, an empty file, too few samples, non-finite rows without ``--drop-nonfinite``) is a
``ScoreError``; the command prints one line naming what is valid and exits with status 2, scoring and
writing nothing.

Python: ``score(samples_or_paths, target, protocol="all", ...) -> ScoreResult`` (``.metrics``,
``.table()``, ``.to_dict()``, ``.add_to(results, name)``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import hashlib
import io
import json
import math
import re
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "EXTERNAL_PREFIX",
    "VALID_EXTENSIONS",
    "ScoreError",
    "ScoreResult",
    "add_to_results",
    "external_run_dir",
    "load_file",
    "main",
    "score",
]

#: file formats read (everything else, pickles in particular, is refused)
VALID_EXTENSIONS = (".npy", ".npz", ".pt", ".pth", ".csv", ".txt")
#: method key prefix of external samplers in run records
EXTERNAL_PREFIX = "external:"
LABEL_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
#: smallest sample size ``--n`` accepts (half-sampling intervals need 4 rows)
MIN_N = 4
DEFAULT_GRID = "cpu"
MAX_SAVED_SAMPLES = 10_000
_PICKLE_EXTENSIONS = (".pkl", ".pickle", ".joblib", ".dill", ".sav", ".p")
_FORMATS = (".npy, .npz (one array, or --key), .pt/.pth (a tensor, or a dict of tensors with --key), "
            ".csv, .txt")
#: metrics shown in the printed table, in order
_SHOWN = ("x_w2", "x_w2_aligned", "e_w2", "tv", "dist_w2")
_LABELS = {"x_w2": "x-W2", "x_w2_aligned": "x-W2 (aligned)", "e_w2": "E-W2", "tv": "TV", "dist_w2": "dist-W2"}


class ScoreError(ValueError):
    """Bad input to the scorer; the message names what is valid (the CLI prints it and exits 2)."""


# ====================================================================================== reading files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pick(named: dict[str, Any], key: str | None, path: Path, what: str) -> tuple[Any, str]:
    """One entry of a .npz / dict-of-tensors file: ``key``, or the only one."""
    names = list(named)
    if key is not None:
        if key not in named:
            raise ScoreError(f"{path}: no {what} named {key!r}; {what}s in the file: "
                             f"{', '.join(map(str, names)) or '(none)'}")
        return named[key], key
    if not names:
        raise ScoreError(f"{path}: the file holds no {what}s")
    if len(names) > 1:
        raise ScoreError(f"{path}: ambiguous, the file holds {len(names)} {what}s "
                         f"({', '.join(map(str, names))}); pass --key NAME with one of them")
    return named[names[0]], names[0]


def _load_numpy(path: Path, key: str | None) -> tuple[Any, str | None]:
    try:
        obj = np.load(path, allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise ScoreError(f"{path}: holds pickled data or object arrays, which are refused (unpickling "
                             f"can run arbitrary code); save a numeric array with np.save / np.savez") from e
        raise ScoreError(f"{path}: not a readable NumPy file ({e}); valid formats: {_FORMATS}") from e
    except (OSError, EOFError) as e:
        raise ScoreError(f"{path}: not a readable NumPy file ({e}); valid formats: {_FORMATS}") from e
    if isinstance(obj, np.lib.npyio.NpzFile):
        with obj:
            try:
                arr, used = _pick({k: None for k in obj.files}, key, path, "array")
                return np.asarray(obj[used]), used
            except ValueError as e:
                if isinstance(e, ScoreError):
                    raise
                raise ScoreError(f"{path}: array {key!r} holds pickled objects, which are refused; "
                                 "save numeric arrays") from e
    if key is not None:
        raise ScoreError(f"{path}: a .npy file holds one array; --key applies to .npz and .pt/.pth files "
                         "only")
    return obj, None


def _load_torch(path: Path, key: str | None) -> tuple[Any, str | None]:
    import pickle

    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ScoreError(f"{path}: refused by torch.load(weights_only=True): it holds objects other than "
                         f"tensors (unpickling them can run arbitrary code); save a tensor or a dict of "
                         f"tensors with torch.save") from e
    except Exception as e:  # not a torch file at all (bad zip, truncated, ...)
        raise ScoreError(f"{path}: not a readable torch file ({type(e).__name__}: {str(e)[:200]}); "
                         f"valid formats: {_FORMATS}") from e
    if isinstance(obj, torch.Tensor):
        if key is not None:
            raise ScoreError(f"{path}: holds a single tensor; --key applies to a dict of tensors only")
        return obj, None
    if isinstance(obj, dict):
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if key is not None and key in obj and not isinstance(obj[key], torch.Tensor):
            raise ScoreError(f"{path}: entry {key!r} is a {type(obj[key]).__name__}, not a tensor; tensors "
                             f"in the file: {', '.join(tensors) or '(none)'}")
        return _pick(tensors, key, path, "tensor")
    raise ScoreError(f"{path}: holds a {type(obj).__name__}; expected a tensor or a dict of tensors "
                     "(with --key)")


def _load_text(path: Path, key: str | None) -> tuple[Any, str | None]:
    if key is not None:
        raise ScoreError(f"{path}: --key applies to .npz and .pt/.pth files only")
    delim = "," if path.suffix.lower() == ".csv" else None
    last: Exception | None = None
    for skip in (0, 1):  # a header line is allowed
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "input contained no data": reported below as empty
                return np.loadtxt(path, delimiter=delim, ndmin=2, dtype=np.float64, skiprows=skip), None
        except ValueError as e:
            last = e
    sep = "commas" if delim else "whitespace"
    raise ScoreError(f"{path}: not a table of numbers separated by {sep} ({last})")


def load_file(path: str | Path, key: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """One samples file as a numeric array (as stored: any shape) and its provenance
    (``path``, ``sha256``, ``format``, ``key``, ``shape``). Refuses pickles and unknown formats."""
    p = Path(path)
    ext = p.suffix.lower()
    if ext not in VALID_EXTENSIONS:
        if ext in _PICKLE_EXTENSIONS:
            raise ScoreError(f"{p}: pickle files are refused (unpickling can run arbitrary code); valid "
                             f"formats: {_FORMATS}")
        raise ScoreError(f"{p}: unsupported format {ext or '(no extension)'!r}; valid formats: {_FORMATS}")
    if not p.exists():
        raise ScoreError(f"{p}: no such file")
    if not p.is_file():
        raise ScoreError(f"{p}: not a file")
    if p.stat().st_size == 0:
        raise ScoreError(f"{p}: empty file (0 bytes)")
    if ext in (".npy", ".npz"):
        obj, used = _load_numpy(p, key)
    elif ext in (".pt", ".pth"):
        obj, used = _load_torch(p, key)
    else:
        obj, used = _load_text(p, key)
    if hasattr(obj, "detach"):  # torch tensor
        if obj.is_complex():
            raise ScoreError(f"{p}: complex tensor; samples must be real numbers")
        import torch

        obj = obj.detach().cpu()
        obj = obj.numpy() if obj.dtype in (torch.float32, torch.float64) or not obj.dtype.is_floating_point \
            else obj.double().numpy()
    arr = np.asarray(obj)
    if arr.dtype.kind not in "fiu":
        raise ScoreError(f"{p}: samples have dtype {arr.dtype}; expected real numbers (float or int)")
    if arr.size == 0 or (arr.ndim >= 1 and arr.shape[0] == 0):
        raise ScoreError(f"{p}: no samples (array of shape {list(arr.shape)})")
    info = {"path": str(p.resolve()), "sha256": _sha256(p), "format": ext.lstrip("."), "key": used,
            "shape": list(arr.shape)}
    return arr, info


# ====================================================================================== checks


def _target(name: Any) -> Any:
    import targets

    if not isinstance(name, str):
        return name  # a target instance
    if name not in targets.names():
        raise ScoreError(f"unknown target {name!r}; valid targets: {', '.join(targets.names())}")
    return targets.get(name)


def _protocols(protocol: str | Sequence[str]) -> list[str]:
    from harness import metrics as hm

    valid = f"{', '.join(hm.PROTOCOLS)}, all (or a comma-separated list)"
    names = protocol.split(",") if isinstance(protocol, str) else list(protocol)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ScoreError(f"no protocol given; valid protocols: {valid}")
    out: list[str] = []
    for n in names:
        if n == "all":
            out += list(hm.PROTOCOLS)
        elif n in hm.PROTOCOLS:
            out.append(n)
        else:
            raise ScoreError(f"unknown protocol {n!r}; valid protocols: {valid}")
    return list(dict.fromkeys(out))


def _grid_opts(grid: str) -> dict[str, Any]:
    from harness import grids

    if grid not in grids.GRIDS:
        raise ScoreError(f"unknown grid {grid!r}; valid grids: {', '.join(grids.GRIDS)}")
    return dict(grids.GRIDS[grid].metric_opts)


def _shape_text(t: Any) -> str:
    s = f"[N, {t.dim}]"
    if getattr(t, "n_particles", None):
        s += f" or [N, {t.n_particles}, {t.spatial_dim}]"
    return s


def _as_rows(arr: np.ndarray, t: Any, where: str) -> np.ndarray:
    """``[N, dim]`` (a particle ``[N, n, d]`` array flattened particle-major), else a ScoreError."""
    npart, sd = getattr(t, "n_particles", None), getattr(t, "spatial_dim", None)
    if arr.ndim == 2 and arr.shape[1] == t.dim:
        return arr
    if arr.ndim == 3 and npart and tuple(arr.shape[1:]) == (npart, sd):
        return arr.reshape(arr.shape[0], t.dim)
    raise ScoreError(f"{where}: shape {list(arr.shape)} does not fit {t.display_name} ({t.name}): expected "
                     f"{_shape_text(t)}")


def _center(x: np.ndarray, t: Any) -> np.ndarray:
    if not getattr(t, "n_particles", None):
        return x
    p = x.reshape(x.shape[0], t.n_particles, t.spatial_dim)
    return (p - p.mean(1, keepdims=True)).reshape(x.shape)


# ====================================================================================== result


def _finite_or_none(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite_or_none(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite_or_none(x) for x in v]
    return v


def _fmt(v: Any) -> str:
    if v is None or not isinstance(v, (int, float)) or not math.isfinite(v):
        return "—"
    if v == 0:
        return "0"
    mag = math.floor(math.log10(abs(v)))
    if mag >= 6 or mag <= -5:
        return f"{v:.3e}"
    return f"{v:.{max(0, 3 - mag)}f}"


@dataclass
class ScoreResult:
    """Scores of one sample set: ``metrics[protocol]`` is ``evaluate``'s dict; ``blocks[protocol]`` adds
    the sizes, reference provenance and timing; ``files`` the inputs (path, sha256, ...)."""

    target: str
    protocols: list[str]
    metrics: dict[str, dict[str, float]]
    blocks: dict[str, dict[str, Any]]
    files: list[dict[str, Any]]
    n_rows: int  # rows read (all files)
    n_dropped_nonfinite: int
    grid: str
    n: int | None  # --n (non-standard sizes), or None
    samples: np.ndarray = field(repr=False)  # the scored rows (finite, centred), the largest protocol's
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN and inf as null): target, files, counts, and one block per protocol."""
        d = {
            "target": self.target,
            "grid": self.grid,
            "files": self.files,
            "n_rows": self.n_rows,
            "n_dropped_nonfinite": self.n_dropped_nonfinite,
            "n": self.n,
            "notes": self.notes,
            "protocols": {p: self.blocks[p] for p in self.protocols},
        }
        return _finite_or_none(json.loads(json.dumps(d, default=_json_default)))

    def table(self) -> str:
        """The human-readable report: inputs, then per protocol value / noise floor / CI / split."""
        from tabulate import tabulate


        t = _target(self.target)
        lines = [f"Target {t.display_name} ({self.target}), {self.n_rows} rows read"
                 + (f", {self.n_dropped_nonfinite} non-finite rows dropped" if self.n_dropped_nonfinite
                    else "") + "."]
        for f in self.files:
            lines.append(f"  file {f['path']} ({f['format']}{', key ' + f['key'] if f['key'] else ''}, shape "
                         f"{f['shape']}) sha256 {f['sha256']}")
        lines += [f"  note: {n}" for n in self.notes]
        for p in self.protocols:
            b, m = self.blocks[p], self.metrics[p]
            sz = b["sizes"]
            std = sz["standard"]
            head = (f"\n{p} protocol: {sz['n_generated']} generated vs {sz['n_reference']} reference"
                    + ("" if not sz["non_standard"] else
                       f" (NON-STANDARD sizes: the protocol uses {std[0]} vs {std[1]})")
                    + f"; {b['seconds']:.1f} s")
            lines.append(head)
            rows = []
            for k in _SHOWN:
                if k not in m:
                    continue
                lo, hi = m.get(f"{k}_ci_lo"), m.get(f"{k}_ci_hi")
                ci = f"[{_fmt(lo)}, {_fmt(hi)}]" if lo is not None and hi is not None else "—"
                split = b["splits"].get(k, "test")
                rows.append([_LABELS[k], _fmt(m[k]), _fmt(m.get(f"{k}_floor")), ci, split])
            lines.append(tabulate(rows, headers=["metric", "value", "noise floor", "95% CI", "vs split"],
                                  tablefmt="github", disable_numparse=True))
            if "n_dropped_e100" in m:
                lines.append(f"  samples with E > 100 dropped before x-W2: {int(m['n_dropped_e100'])}")
            if m.get("val_fallback"):
                lines.append("  the val split was unavailable: val metrics use the test split, no floors")
            for split, info in b["reference"].items():
                if "error" in info:
                    lines.append(f"  reference {split}: unavailable ({info['error']})")
                else:
                    where = f" {info['file']}" if info.get("file") else ""
                    sha = info.get("sha256")
                    lines.append(f"  reference {split}: {info.get('source')}{where} sha256 {sha}")
        return "\n".join(lines) + "\n"

    def add_to(self, results: str | Path, name: str, **kw: Any) -> Path:
        """``add_to_results(self, results, name, **kw)``: write the external run record; returns its path."""
        return add_to_results(self, results, name, **kw)


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


# ====================================================================================== scoring


def _collect(samples: Any, key: str | None, t: Any) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Rows [N, dim] from arrays / tensors / paths (one or a list), and per-file provenance."""
    items = samples if isinstance(samples, (list, tuple)) else [samples]
    if not items:
        raise ScoreError("no samples given")
    parts, files = [], []
    for i, it in enumerate(items):
        if isinstance(it, (str, Path)):
            arr, info = load_file(it, key)
            where = str(it)
        else:
            if hasattr(it, "detach"):
                it = it.detach().cpu().numpy()
            arr = np.asarray(it)
            if arr.dtype.kind not in "fiu":
                raise ScoreError(f"samples #{i}: dtype {arr.dtype}; expected real numbers")
            if arr.size == 0 or (arr.ndim >= 1 and arr.shape[0] == 0):
                raise ScoreError(f"samples #{i}: no samples (shape {list(arr.shape)})")
            h = hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()
            info = {"path": None, "sha256": h, "format": "array", "key": None, "shape": list(arr.shape),
                    "sha256_of": "the array's bytes (C order)"}
            where = f"samples #{i}"
        rows = _as_rows(arr, t, where)
        info["n_rows"] = int(rows.shape[0])
        parts.append(rows)
        files.append(info)
    x = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    return x, files


def _references_used(t: Any, protocol: str, noise_floor: bool) -> dict[str, Any]:
    """split -> provenance and the metrics computed against it (``harness.metrics.references_used``)."""
    from harness import metrics as hm

    f = getattr(hm, "references_used", None)
    return f(t, protocol, noise_floor) if f is not None else {}


def _reference_info(t: Any, split: str) -> dict[str, Any]:
    try:
        return dict(t.reference_info(split))
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


def score(
    samples: Any,
    target: Any,
    protocol: str | Sequence[str] = "all",
    *,
    key: str | None = None,
    n: int | None = None,
    drop_nonfinite: bool = False,
    grid: str = DEFAULT_GRID,
    metric_opts: dict[str, Any] | None = None,
) -> ScoreResult:
    """Score ``samples`` (an array / tensor ``[N, dim]`` or ``[N, n_particles, spatial_dim]``, a file path,
    or a list of either, concatenated) on ``target`` (key or instance) under ``protocol`` ("all", one name,
    or a list / comma-separated names) exactly as ``harness.job`` scores a run of ``grid``.

    ``n``: score the first ``n`` rows against ``n`` reference rows (non-standard sizes) instead of the
    protocol's sizes. ``drop_nonfinite``: score the finite rows only (else non-finite rows are refused).
    ``metric_opts``: extra ``evaluate`` options over the grid's (e.g. ``n_boot=0``; the record then no longer
    matches the grid's built-in runs). Raises ``ScoreError`` on bad input, before scoring anything."""
    from harness import metrics as hm

    t = _target(target)
    protos = _protocols(protocol)
    opts = {**_grid_opts(grid), **(metric_opts or {})}
    if n is not None and (not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < MIN_N):
        raise ScoreError(f"--n must be an integer ≥ {MIN_N}, got {n!r}")
    x, files = _collect(samples, key, t)
    n_rows = int(x.shape[0])
    finite = np.isfinite(x).all(axis=1)
    n_bad = int((~finite).sum())
    notes: list[str] = []
    if n_bad:
        if not drop_nonfinite:
            raise ScoreError(f"{n_bad} of {n_rows} rows contain NaN or inf; refusing to score them (pass "
                             f"--drop-nonfinite to score the {n_rows - n_bad} finite rows only, reported)")
        x = x[finite]
        notes.append(f"{n_bad} of {n_rows} rows contained NaN or inf and were dropped (--drop-nonfinite)")
        if x.shape[0] == 0:
            raise ScoreError(f"all {n_rows} rows contain NaN or inf: nothing to score")
    avail = int(x.shape[0])
    # sizes per protocol, checked for every protocol before anything is scored
    plan: dict[str, tuple[int, int, tuple[int, int]]] = {}
    short = []
    for p in protos:
        try:
            std = tuple(int(v) for v in hm.eval_sizes(p, t.name))
        except ValueError as e:
            raise ScoreError(str(e)) from e
        if n is not None:
            if n > avail:
                raise ScoreError(f"--n {n} is more than the {avail} usable rows; pass --n {avail} or less")
            plan[p] = (int(n), int(n), std)
        else:
            if avail < std[0]:
                short.append((p, std[0]))
            plan[p] = (std[0], std[1], std)
    if short:
        need = "; ".join(f"{p} needs {k}" for p, k in short)
        ok = [p for p in protos if p not in dict(short)]
        raise ScoreError(
            f"too few samples for {t.name}: {avail} usable rows, but {need} (the protocol's sample size); "
            f"give more samples, or pass --n {avail} to score at non-standard sizes"
            + (f", or --protocol {','.join(ok)}" if ok else "")
        )
    # reference splits, loaded before scoring so that a missing one stops everything
    refs: dict[str, Any] = {}
    for p, (_, n_ref, _) in plan.items():
        try:  # both splits, as harness.scoring passes them (an absent val: evaluate's val_fallback)
            refs[p] = {"test": t.reference("test", n_ref)}
            with contextlib.suppress(FileNotFoundError, ValueError):
                refs[p]["val"] = t.reference("val", n_ref)
        except (FileNotFoundError, ValueError) as e:
            raise ScoreError(f"{t.name}: reference test split unavailable for {p} at {n_ref} samples ({e}); "
                             f"generate it (data/README.md, make references) or pass a smaller --n") from e
    prov = {"test": _reference_info(t, "test"), "val": _reference_info(t, "val")}
    metrics: dict[str, dict[str, float]] = {}
    blocks: dict[str, dict[str, Any]] = {}
    if n is not None:
        notes.append(f"--n {n}: the first {n} of {avail} usable rows against {n} reference rows "
                     "(non-standard sizes where the protocol uses others)")
    for p, (n_gen, n_ref, std) in plan.items():
        gen = x[:n_gen]
        if avail > n_gen and n is None:
            notes.append(f"{p}: scored the first {n_gen} of {avail} usable rows (the protocol's size)")
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                m = dict(hm.evaluate(gen, refs[p], t, p, **opts))
            except ValueError as e:  # e.g. a reference split of another origin: nothing is reported
                raise ScoreError(f"{p}: {e}") from e
        m = {k: float(v) for k, v in m.items()}
        used = (int(m.get("n_generated", n_gen)), int(m.get("n_reference", n_ref)))
        n_al = None
        if p == "boltzbench" and getattr(t, "n_particles", None):
            n_al = opts.get("n_aligned")
            n_al = hm.PROTOCOL_SPECS[p].aligned_sizes.get(t.name, 0) if n_al is None else int(n_al)
            n_al = min(n_al, *used)
        metrics[p] = m
        blocks[p] = {
            "metrics": m,
            "sizes": {"n_generated": used[0], "n_reference": used[1], "standard": list(std),
                      "non_standard": used != std, "x_w2_aligned": n_al},
            "splits": {k: hm.metric_split(p, k, t.name) for k in ("x_w2", "e_w2", "tv", "dist_w2")},
            "reference": prov,
            "references_used": _references_used(t, p, bool(opts.get("noise_floor", True))),
            "options": opts,
            "warnings": [str(w.message) for w in caught],
            "seconds": time.perf_counter() - t0,
        }
    n_keep = max(v[0] for v in plan.values())
    return ScoreResult(
        target=t.name, protocols=protos, metrics=metrics, blocks=blocks, files=files, n_rows=n_rows,
        n_dropped_nonfinite=n_bad, grid=grid, n=None if n is None else int(n),
        samples=_center(np.asarray(x[:n_keep], dtype=np.float64), t), notes=notes,
    )


# ====================================================================================== records


def _check_label(name: str) -> str:
    if not isinstance(name, str) or not LABEL_RE.match(name):
        raise ScoreError(f"invalid --name {name!r}: use letters, digits, '_', '.', '-' only")
    return name


def external_run_dir(results: str | Path, grid: str, target: str, name: str, replicate: int = 0) -> Path:
    """``RESULTS/<grid>/<target>/external-<name>/r<replicate>``."""
    return Path(results) / grid / target / f"external-{_check_label(name)}" / f"r{int(replicate)}"


def _check_destination(results: str | Path, grid: str, target: str, name: str, replicate: int,
                       force: bool) -> Path:
    _grid_opts(grid)
    if not isinstance(replicate, int) or replicate < 0:
        raise ScoreError(f"--replicate must be a non-negative integer, got {replicate!r}")
    d = external_run_dir(results, grid, target, name, replicate)
    if (d / "record.json").exists() and not force:
        raise ScoreError(f"{d / 'record.json'} exists (external {name!r}, {target}, replicate {replicate}); "
                         "pass --force to replace it, or another --name / --replicate")
    return d


def add_to_results(
    result: ScoreResult,
    results: str | Path,
    name: str,
    *,
    replicate: int = 0,
    force: bool = False,
    energy_evals: int | None = None,
    train_seconds: float | None = None,
) -> Path:
    """Write ``result`` as the run record of method ``external:<name>`` (grid ``result.grid``) under
    ``results``; returns the record's path. ``energy_evals`` / ``train_seconds``: the sampler's own cost, as
    reported by its author (shown in the cost and timing tables; not verified)."""
    from harness.env import environment_info
    from harness.records import RunRecord, RunSpec, atomic_write_bytes

    d = _check_destination(results, result.grid, result.target, name, replicate, force)
    usage: dict[str, Any] = {}
    if energy_evals is not None:
        if int(energy_evals) < 0:
            raise ScoreError(f"--energy-evals must be ≥ 0, got {energy_evals}")
        usage["energy_evals"] = int(energy_evals)
    if train_seconds is not None:
        if not (float(train_seconds) >= 0):
            raise ScoreError(f"--train-seconds must be ≥ 0, got {train_seconds}")
        usage["train_seconds"] = float(train_seconds)
    primary = "boltzbench" if "boltzbench" in result.protocols else result.protocols[0]
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    spec = RunSpec(grid=result.grid, target=result.target, method=f"{EXTERNAL_PREFIX}{name}",
                   replicate=int(replicate), seed=0, protocol=primary, eval_fractions=(1.0,),
                   n_eval_samples=result.n, device="cpu")
    external = {
        "label": name,
        "files": result.files,
        "sha256": (result.files[0]["sha256"] if len(result.files) == 1
                   else [f["sha256"] for f in result.files]),
        "n_rows": result.n_rows,
        "n_dropped_nonfinite": result.n_dropped_nonfinite,
        "n": result.n,
        "protocols": result.protocols,
        "sizes": {p: result.blocks[p]["sizes"] for p in result.protocols},
        "cost_self_reported": sorted(usage),
        "scored_by": "harness.score",
    }
    entry = {
        "fraction": 1.0,
        "step": 0,  # no training here; 0 (not null) keeps per-checkpoint tools working
        "usage": dict(usage),
        "metrics": dict(result.metrics[primary]),
        "scores": {p: dict(result.metrics[p]) for p in result.protocols},
        "n_samples": int(result.blocks[primary]["sizes"]["n_generated"]),
        "n_nonfinite": 0,
        "n_dropped_nonfinite": result.n_dropped_nonfinite,
        "eval_seconds": sum(result.blocks[p]["seconds"] for p in result.protocols),
    }
    test = result.blocks[primary]["reference"]["test"]
    reference = {**test, "splits": result.blocks[primary]["reference"]}
    # where it was *scored*: no host / load / threads, which the timing report would read as where the
    # sampler ran (its cost, if given, was measured elsewhere)
    env = environment_info("cpu")
    external["scored_on"] = {k: env.pop(k, None) for k in ("host", "pid", "loadavg", "torch_threads",
                                                           "cpu_count")}
    env["external"] = True
    buf = io.BytesIO()
    np.savez(buf, samples=result.samples[:MAX_SAVED_SAMPLES].astype(np.float32))
    extra: dict[str, Any] = {}
    if "scoring" in {f.name for f in dataclasses.fields(RunRecord)}:  # schema 2: as harness.scoring writes
        extra["scoring"] = {
            "scored_at": now,
            "protocols": {p: {"references": result.blocks[p]["references_used"],
                              "sizes": [result.blocks[p]["sizes"]["n_generated"],
                                        result.blocks[p]["sizes"]["n_reference"]]}
                          for p in result.protocols},
            "test_reference": test,
            "splits": result.blocks[primary]["reference"],
        }
    rec = RunRecord(
        spec=spec, status="ok", stop_reason="external samples", usage=usage, evaluations=[entry],
        config={"external": True, "label": name}, reference=reference,
        environment=env,
        diagnostics={"external": external}, samples_file="samples.npz", started_at=now, finished_at=now,
        **extra,
    )
    atomic_write_bytes(d / "samples.npz", buf.getvalue())
    rec.write(d / "record.json")
    return d / "record.json"


# ====================================================================================== CLI


def _parser() -> argparse.ArgumentParser:
    from harness import metrics as hm

    ap = argparse.ArgumentParser(
        prog="python -m harness.score",
        description="Score saved samples of any sampler exactly as boltzbench scores its own runs.",
    )
    ap.add_argument("files", nargs="+", metavar="FILE",
                    help=f"samples ({', '.join(VALID_EXTENSIONS)}); several files are concatenated")
    ap.add_argument("--target", required=True, help="target key (gmm40, dw4, lj13, lj55)")
    ap.add_argument("--protocol", default="all",
                    help=f"{'|'.join(hm.PROTOCOLS)}|all or a comma-separated list (default all)")
    ap.add_argument("--json", action="store_true", help="print one JSON object (a block per protocol)")
    ap.add_argument("--key", default=None, help="array name in a .npz / tensor name in a .pt dict")
    ap.add_argument("--n", type=int, default=None,
                    help="score the first N rows against N reference rows (non-standard sizes)")
    ap.add_argument("--drop-nonfinite", action="store_true",
                    help="drop rows with NaN/inf and score the rest (the count is reported)")
    ap.add_argument("--grid", default=DEFAULT_GRID,
                    help=f"grid whose metric options apply and whose tables the record joins (default "
                         f"{DEFAULT_GRID})")
    ap.add_argument("--add-to", default=None, metavar="RESULTS", help="write a run record under RESULTS")
    ap.add_argument("--name", default=None, metavar="LABEL", help="label of the external sampler (--add-to)")
    ap.add_argument("--replicate", type=int, default=0, help="replicate index of the record (default 0)")
    ap.add_argument("--force", action="store_true", help="replace an existing record of the same label")
    ap.add_argument("--energy-evals", type=int, default=None,
                    help="the sampler's own energy evaluations (self-reported; cost/timing tables)")
    ap.add_argument("--train-seconds", type=float, default=None,
                    help="the sampler's own training wall-clock (self-reported; timing tables)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        if (a.add_to is None) != (a.name is None):
            raise ScoreError("--add-to RESULTS and --name LABEL go together")
        if a.add_to is None and (a.force or a.energy_evals is not None or a.train_seconds is not None):
            raise ScoreError("--force, --energy-evals and --train-seconds apply with --add-to only")
        if a.add_to is not None:  # check the destination before spending time on scoring
            _check_label(a.name)
            _check_destination(a.add_to, a.grid, _target(a.target).name, a.name, a.replicate, a.force)
        res = score(a.files, a.target, a.protocol, key=a.key, n=a.n, drop_nonfinite=a.drop_nonfinite,
                    grid=a.grid)
        path = None
        if a.add_to is not None:
            path = res.add_to(a.add_to, a.name, replicate=a.replicate, force=a.force,
                              energy_evals=a.energy_evals, train_seconds=a.train_seconds)
    except ScoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        d = res.to_dict()
        if path is not None:
            d["record"] = str(path)
        print(json.dumps(d, indent=1))
    else:
        print(res.table(), end="")
        if path is not None:
            print(f"\nwrote {path} (method {EXTERNAL_PREFIX}{a.name}, grid {a.grid}); `make tables` shows it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
