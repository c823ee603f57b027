"""Reference samples on disk: finding, verifying and loading published splits, exact GMM-40 samples and the
project's own MCMC references (cached + manifest). Generating them is ``targets/reference.py``.

Lookup for ``load_reference(target, split, n)`` (what ``Target.reference`` calls), first match wins:

1. **published** splits of Klein et al. 2023 (as distributed with the iDEM code), e.g.
   ``test_split_DW4.npy``, ``test_split_LJ13-1000.npy``, ``test_split_LJ55-1000-part1.npy``, searched in the
   data directories: ``$BOLTZBENCH_DATA`` if set, else ``<repo>/data`` then ``<repo>/../shared/data``.
   They are validated (2-D, ``dim`` columns, floating dtype, finite) and centred on load.
2. **generated** references ``generated/<target>_<split>.npy`` + ``.json`` manifest in the same directories
   (and always ``<repo>/data/generated``), written by ``python -m targets.reference --target lj13 --n 10000``.
   On load the file's sha256, shape, target, split, passed self-checks and mean energy (recomputed with the
   current energy code) are verified against the manifest.
3. **exact** samples (GMM-40): drawn from the mixture with a fixed seed per split (``EXACT_SEEDS``), 10 000
   rows for test/val and 100 000 for train; identical on every run and machine (CPU generator).

Loaded arrays are cached in memory (keyed by file path, size and mtime); callers get a fresh float32 CPU
tensor each time.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor


class Target(Protocol):
    """What loading a reference needs of a target (``targets.base.Target`` provides it; this module sits
    below ``targets.base``, which calls it, so it names the interface instead of importing the class)."""

    name: str
    dim: int
    splits: tuple[str, ...]

    def energy(self, x: Tensor) -> Tensor: ...


def _is_particle(target: Target) -> bool:
    """Particle targets (``n_particles``, ``center``) are centred on load."""
    return hasattr(target, "n_particles") and callable(getattr(target, "center", None))


REPO = Path(__file__).resolve().parent.parent
DATA_ENV = "BOLTZBENCH_DATA"
MANIFEST_FORMAT = 1

#: published file name per target and split (Klein et al. 2023 via jarridrb/DEM's data/)
PUBLISHED_FILES: dict[str, dict[str, str]] = {
    "dw4": {s: f"{s}_split_DW4.npy" for s in ("test", "val", "train")},
    "lj13": {s: f"{s}_split_LJ13-1000.npy" for s in ("test", "val", "train")},
    "lj55": {s: f"{s}_split_LJ55-1000-part1.npy" for s in ("test", "val", "train")},
}
#: sha256 of the published files we have seen (see ../shared/reference/idem-reference-code.md §3)
PUBLISHED_SHA256: dict[str, str] = {
    "test_split_DW4.npy": "ef4466793b3502b2fe405aad22d3ae43b34827971594c5bab28684771d828244",
    "val_split_DW4.npy": "05683af2442aea8c358d35482a1c6877fc53796e46c9f5335fa92aa4f3670de6",
    "train_split_DW4.npy": "03e4cd085b52bf021cebc7f5f6d05aec0cdccff890a476b36595c2e343b1c58a",
    "test_split_LJ13-1000.npy": "c5064a56282e96441f1ff2f1babb13c241a99cd1077aee3667951d06055a785b",
    "val_split_LJ13-1000.npy": "77a051cd50b16bec41e8fa056f6f77e21804d530a7461369f3a3ee985a576eb7",
}
#: GMM-40 exact samples: seed and size per split
EXACT_SEEDS = {"test": 1000, "val": 1001, "train": 1002}
EXACT_SIZES = {"test": 10_000, "val": 10_000, "train": 100_000}
#: default MCMC seeds per split for generated references
MCMC_SEEDS = {"test": 2000, "val": 2001, "train": 2002}

SOURCES = ("published", "generated", "exact")


class ReferenceError(ValueError):
    """A reference file is malformed, corrupt or does not match its manifest."""


class ReferenceNotFoundError(FileNotFoundError):
    """No reference data for this target and split (the message says how to make them)."""


# ------------------------------------------------------------------------------------------------ locations
def data_dirs() -> list[Path]:
    """Directories searched for reference files, in order."""
    env = os.environ.get(DATA_ENV)
    if env:
        return [Path(env).expanduser()]
    return [REPO / "data", REPO.parent / "shared" / "data"]


def generated_dirs() -> list[Path]:
    """Directories searched for generated references: ``<data dir>/generated``, ``<repo>/data/generated``."""
    dirs = [d / "generated" for d in data_dirs()]
    default = REPO / "data" / "generated"
    return dirs if default in dirs else [*dirs, default]


def default_output_dir() -> Path:
    """Where the CLI writes: ``$BOLTZBENCH_DATA/generated``, else ``<repo>/data/generated``."""
    env = os.environ.get(DATA_ENV)
    return (Path(env).expanduser() if env else REPO / "data") / "generated"


def check_split(target: Target, split: str) -> None:
    """Raise ``ValueError`` naming the valid splits when ``split`` is not one of the target's."""
    if split not in target.splits:
        raise ValueError(
            f"unknown split {split!r} for {target.name}; valid splits: {', '.join(target.splits)}"
        )


def _data_key(target: Target) -> str:
    """The key of the reference files a target uses: its own, or its base's (``dw4-bnem`` -> ``dw4``)."""
    return getattr(target, "data_key", None) or target.name


def _published_path(target: Target, split: str) -> Path | None:
    name = PUBLISHED_FILES.get(_data_key(target), {}).get(split)
    if name is None:
        return None
    for d in data_dirs():
        if (d / name).is_file():
            return d / name
    return None


def _generated_paths(target: Target, split: str) -> tuple[Path, Path] | None:
    for d in generated_dirs():
        f = d / f"{_data_key(target)}_{split}.npy"
        if f.is_file():
            return f, f.with_suffix(".json")
    return None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ loading
_CACHE: dict[tuple[Any, ...], tuple[Tensor, dict[str, Any]]] = {}


def clear_cache() -> None:
    """Forget every array loaded so far (tests that rewrite files call this)."""
    _CACHE.clear()


def _read_npy(target: Target, path: Path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001  (any unreadable file is reported the same way)
        raise ReferenceError(f"{path}: not a readable .npy array ({type(err).__name__}: {err})") from None
    if arr.ndim != 2 or arr.shape[1] != target.dim or arr.shape[0] < 1:
        raise ReferenceError(
            f"{path}: expected an array of shape [N, {target.dim}] for {target.name}, got {list(arr.shape)}"
        )
    if arr.dtype not in (np.float32, np.float64):
        raise ReferenceError(f"{path}: expected float32 or float64 values, got dtype {arr.dtype}")
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise ReferenceError(
            f"{path}: {int(bad.sum())} rows contain NaN or inf (first: row {int(bad.argmax())})"
        )
    return arr


def _to_tensor(target: Target, arr: np.ndarray) -> Tensor:
    x = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float64)
    if _is_particle(target):
        x = target.center(x)
    return x.to(torch.float32)


def _load_published(target: Target, split: str, path: Path) -> tuple[Tensor, dict[str, Any]]:
    st = path.stat()
    key = ("published", str(path), st.st_size, st.st_mtime_ns, target.name)
    if key not in _CACHE:
        arr = _read_npy(target, path)
        sha = sha256_file(path)
        known = PUBLISHED_SHA256.get(path.name)
        info = {
            "source": "published",
            "file": str(path),
            "sha256": sha,
            "matches_published_sha256": None if known is None else (sha == known),
            "n": int(arr.shape[0]),
            "origin": "Klein, Krämer & Noé 2023 (Equivariant Flow Matching) MCMC, as distributed with iDEM",
            "centred_on_load": _is_particle(target),
        }
        _CACHE[key] = (_to_tensor(target, arr), info)
    return _CACHE[key]


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ReferenceError(f"{path}: manifest missing (every generated reference needs one)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ReferenceError(f"{path}: manifest is not valid JSON ({err})") from None


def verify_generated(target: Target, split: str, npy: Path, manifest_path: Path) -> tuple[np.ndarray, dict]:
    """Load a generated reference and verify it against its manifest; raises ``ReferenceError``."""
    man = read_manifest(manifest_path)
    for k in ("target", "split", "sha256", "shape", "checks", "summary"):
        if k not in man:
            raise ReferenceError(f"{manifest_path}: manifest lacks the field {k!r}")
    if man["target"] != _data_key(target) or man["split"] != split:
        raise ReferenceError(
            f"{manifest_path}: manifest is for target {man['target']!r} split {man['split']!r}, "
            f"expected {_data_key(target)!r} split {split!r}"
        )
    sha = sha256_file(npy)
    if sha != man["sha256"]:
        raise ReferenceError(
            f"{npy}: sha256 {sha[:16]}… does not match the manifest's {str(man['sha256'])[:16]}… "
            "(file changed or corrupt; regenerate with python -m targets.reference)"
        )
    arr = _read_npy(target, npy)
    if list(arr.shape) != list(man["shape"]):
        raise ReferenceError(f"{npy}: shape {list(arr.shape)} differs from the manifest's {man['shape']}")
    if not man["checks"].get("passed", False):
        raise ReferenceError(f"{manifest_path}: this reference failed its self-checks: {man['checks']}")
    # the energy definition must not have changed since generation
    from targets.registry import TARGETS

    # the energy of the target the reference was generated for (a variant target uses its base's files)
    base = target if _data_key(target) == target.name else TARGETS.get(_data_key(target))()
    e = base.energy(torch.from_numpy(arr).double()).mean().item()
    e0 = float(man["summary"]["energy_mean"])
    if not abs(e - e0) <= 1e-6 * max(1.0, abs(e0)):
        raise ReferenceError(
            f"{npy}: mean energy under the current {target.name} energy is {e:.6f}, "
            f"the manifest says {e0:.6f} "
            "(energy definition changed? regenerate the reference)"
        )
    return arr, man


def _load_generated(target: Target, split: str, paths: tuple[Path, Path]) -> tuple[Tensor, dict[str, Any]]:
    npy, manp = paths
    st = npy.stat()
    mst = manp.stat() if manp.exists() else None
    key = ("generated", str(npy), st.st_size, st.st_mtime_ns, mst and mst.st_mtime_ns, target.name)
    if key not in _CACHE:
        arr, man = verify_generated(target, split, npy, manp)
        info = {
            "source": "generated",
            "file": str(npy),
            "sha256": man["sha256"],
            "manifest": str(manp),
            "n": int(arr.shape[0]),
            "seed": man.get("seed"),
            "sampler": man.get("sampler"),
            "checks": man["checks"],
        }
        _CACHE[key] = (_to_tensor(target, arr), info)
    return _CACHE[key]


def _load_exact(target: Target, split: str) -> tuple[Tensor, dict[str, Any]]:
    key = ("exact", target.name, split)
    if key not in _CACHE:
        seed = EXACT_SEEDS[split]
        x = target.sample(EXACT_SIZES[split], generator=torch.Generator().manual_seed(seed))  # type: ignore[attr-defined]
        x = x.to(torch.float32).contiguous()
        info = {
            "source": "exact",
            "file": None,
            "sha256": hashlib.sha256(x.numpy().tobytes()).hexdigest(),
            "n": int(x.shape[0]),
            "seed": seed,
            "sampler": "exact mixture sampling (component uniform, then Gaussian), CPU torch.Generator",
        }
        _CACHE[key] = (x, info)
    return _CACHE[key]


def _resolve(target: Target, split: str, source: str | None) -> tuple[Tensor, dict[str, Any]]:
    check_split(target, split)
    if source is not None and source not in SOURCES:
        raise ValueError(f"unknown reference source {source!r}; valid sources: {', '.join(SOURCES)}")
    if hasattr(target, "sample") and source in (None, "exact"):
        return _load_exact(target, split)
    if source in (None, "published"):
        p = _published_path(target, split)
        if p is not None:
            return _load_published(target, split, p)
    if source in (None, "generated"):
        g = _generated_paths(target, split)
        if g is not None:
            return _load_generated(target, split, g)
    searched = ", ".join(str(d) for d in data_dirs())
    pub = PUBLISHED_FILES.get(target.name, {}).get(split)
    raise ReferenceNotFoundError(
        f"no {source + ' ' if source else ''}reference for {target.name} split {split!r}: "
        + (f"published file {pub!r} not found in {searched}; " if pub and source != "generated" else "")
        + f"no generated/{target.name}_{split}.npy in {', '.join(str(d) for d in generated_dirs())}. "
        f"Generate it with: python -m targets.reference --target {target.name} --splits {split} --n 10000 "
        f"(or set {DATA_ENV} to a directory holding the published files)"
    )


def load_reference(
    target: Target, split: str = "test", n: int | None = None, source: str | None = None
) -> Tensor:
    """Reference samples [N, dim] (float32, CPU, centred for particle targets); ``n`` takes the first n rows.

    ``source`` forces one of "published", "generated", "exact" (default: the first available, in that order).
    """
    x, info = _resolve(target, split, source)
    if n is not None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if n > x.shape[0]:
            raise ValueError(f"{target.name} {split} reference has {x.shape[0]} samples, {n} requested")
        x = x[:n]
    return x.clone()


def reference_info(target: Target, split: str = "test", source: str | None = None) -> dict[str, Any]:
    """Provenance: source (published / generated / exact), file, sha256, n (+ sampler/checks if generated)."""
    _, info = _resolve(target, split, source)
    return {"target": target.name, "split": split, **info}


