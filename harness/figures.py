"""seaborn / matplotlib (Agg) figures from run records (``write_figures``; ``python -m harness.tables``).

- ``<grid>_gmm40_samples.png``: GMM-40 samples of each method over the density contours;
- ``<grid>_<target>_energy_hist.png`` / ``_distance_hist.png``: energy and interatomic-distance histograms of
  each method against the reference test split, per particle target;
- ``<grid>_<protocol>_<target>_curves.png``: each metric versus energy evaluations and versus training
  wall-clock from the evaluation checkpoints (one line per method, mean over seeds).
Samples come from each run's ``samples.npz`` (key ``samples``, float32 [N, dim]; record field
``samples_file``), first replicate with status ok (or diverged with finite rows).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402

from harness.records import METRIC_PREFIX  # noqa: E402

MAX_HIST_SAMPLES = 5000


def _display(kind: str, key: str) -> str:
    from harness.tables import method_display, target_display

    return method_display(key) if kind == "method" else target_display(key)


def load_samples(path: str | Path) -> np.ndarray | None:
    """The ``samples`` array of a samples.npz [N, dim] (float32), or None (reported) if unreadable."""
    try:
        with np.load(path) as z:
            x = np.asarray(z["samples"], dtype=np.float32)
        if x.ndim != 2:
            raise ValueError(f"samples has shape {x.shape}, expected [N, dim]")
        return x
    except Exception as e:
        warnings.warn(f"skipping samples {path}: {type(e).__name__}: {e}", UserWarning, stacklevel=2)
        return None


def _per_method_samples(fin: pd.DataFrame, target: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    sub = (
        fin[(fin["target"] == target) & fin["samples_path"].notna()]
        if "samples_path" in fin
        else fin.iloc[:0]
    )
    for m, g in sub.sort_values("replicate").groupby("method", sort=True):
        for _, row in g.iterrows():
            if row["status"] not in ("ok", "diverged"):
                continue
            x = load_samples(row["samples_path"])
            if x is None:
                continue
            x = x[np.isfinite(x).all(1)]
            if len(x):
                out[m] = x
                break
    return out


def _reference(target: Any, n: int) -> np.ndarray | None:
    try:
        return target.reference("test", n).numpy()
    except Exception as e:
        warnings.warn(f"{target.name}: no reference for figures ({e})", UserWarning, stacklevel=2)
        return None


def gmm_samples_figure(samples: dict[str, np.ndarray], path: Path) -> Path | None:
    """One panel per method: samples over log-density contours of GMM-40 on [−50, 50]²."""
    if not samples:
        return None
    import targets

    t = targets.get("gmm40")
    g = np.linspace(-50, 50, 201)
    X, Y = np.meshgrid(g, g)
    with torch.no_grad():
        lp = t.log_prob(torch.from_numpy(np.stack([X.ravel(), Y.ravel()], 1))).numpy().reshape(X.shape)
    n = len(samples)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.3), squeeze=False)
    for ax, (m, x) in zip(axes[0], samples.items()):
        ax.contour(X, Y, np.maximum(lp, -60), levels=20, linewidths=0.5, cmap="viridis")
        xs = x[:2000]
        ax.scatter(xs[:, 0], xs[:, 1], s=2, c="C3", alpha=0.6)
        ax.set_xlim(-50, 50)
        ax.set_ylim(-50, 50)
        ax.set_aspect("equal")
        ax.set_title(_display("method", m))
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def particle_histograms(
    target_key: str, samples: dict[str, np.ndarray], path_e: Path, path_d: Path
) -> list[Path]:
    """Energy and interatomic-distance histograms of each method against the reference test split."""
    import targets

    t = targets.get(target_key)
    ref = _reference(t, MAX_HIST_SAMPLES)
    sets = ({"reference": ref} if ref is not None else {}) | samples
    if not samples:
        return []
    e_rows, d_rows = [], []
    with torch.no_grad():
        for name, x in sets.items():
            xt = torch.from_numpy(np.ascontiguousarray(x[:MAX_HIST_SAMPLES], dtype=np.float64))
            e = t.energy(xt).numpy()
            d = t.interatomic_distances(xt).numpy().ravel()
            label = "reference (test)" if name == "reference" else _display("method", name)
            e_rows.append(pd.DataFrame({"energy": e, "set": label}))
            d_rows.append(pd.DataFrame({"distance": d, "set": label}))
    out = []
    E = pd.concat(e_rows, ignore_index=True)
    if ref is not None:  # clip the x-range to the reference's range widened by its spread
        e_ref = E[E["set"] == "reference (test)"]["energy"]
        lo, hi = e_ref.quantile(0.001), e_ref.quantile(0.999)
        w = hi - lo
        E = E[(E["energy"] > lo - w) & (E["energy"] < hi + w)]
    for df, col, path, xl in (
        (E, "energy", path_e, "energy E(x)"),
        (pd.concat(d_rows, ignore_index=True), "distance", path_d, "interatomic distance"),
    ):
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        sns.histplot(
            df,
            x=col,
            hue="set",
            element="step",
            fill=False,
            stat="density",
            common_norm=False,
            bins=100,
            ax=ax,
        )
        ax.set_xlabel(xl)
        ax.set_title(_display("target", target_key))
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    return out


def curves_figure(df: pd.DataFrame, target_key: str, metrics: list[str], path: Path) -> Path | None:
    """Metric vs energy evaluations (top) and vs training wall-clock (bottom), one line per method."""
    sub = df[(df["target"] == target_key) & (df["checkpoint"] >= 0)]
    metrics = [
        m for m in metrics if METRIC_PREFIX + m in sub.columns and sub[METRIC_PREFIX + m].notna().any()
    ]
    have_x = [c for c in ("u_energy_evals", "u_train_seconds") if c in sub.columns]
    if sub.empty or not metrics or not have_x:
        return None
    sub = sub.assign(method_name=sub["method"].map(lambda k: _display("method", k)))
    fig, axes = plt.subplots(
        len(have_x), len(metrics), figsize=(3.6 * len(metrics), 3.0 * len(have_x)), squeeze=False
    )
    for i, xc in enumerate(have_x):
        for j, m in enumerate(metrics):
            ax = axes[i][j]
            d = sub[[xc, METRIC_PREFIX + m, "method_name"]].dropna()
            d = d[np.isfinite(d[METRIC_PREFIX + m].astype(float))]
            if len(d):
                sns.lineplot(
                    d,
                    x=xc,
                    y=METRIC_PREFIX + m,
                    hue="method_name",
                    marker="o",
                    ax=ax,
                    errorbar=("sd", 1) if len(d) > 1 else None,
                    legend=(i == 0 and j == 0),
                )
                if (d[xc] > 0).all():
                    ax.set_xscale("log")
                y = d[METRIC_PREFIX + m].astype(float)
                if (y > 0).all() and y.max() > 100 * y.min():
                    ax.set_yscale("log")
                if ax.get_legend() is not None:
                    ax.get_legend().set_title("method")
            ax.set_xlabel("energy evaluations" if xc == "u_energy_evals" else "training wall-clock [s]")
            ax.set_ylabel(m)
    fig.suptitle(_display("target", target_key))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_figures(
    df: pd.DataFrame, out: Path, grid: str | None = None, protocol: str | None = None
) -> list[Path]:
    """All figures for every grid (and protocol, for the curves) in ``df``; returns the written paths.
    Figures that need data that are absent (no samples, no checkpoints) are skipped, never an error."""
    from harness.tables import TABLE_METRICS

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if df.empty:
        return written
    for g in sorted(df["grid"].unique()):
        if grid and g != grid:
            continue
        dg = df[df["grid"] == g]
        fin = dg[dg["is_final"].astype(bool)]
        if "primary_protocol" in fin.columns:  # one row per run: records hold a row per protocol block
            fin = fin[(fin["protocol"] == fin["primary_protocol"]) | fin["primary_protocol"].isna()]
        for t in sorted(dg["target"].unique()):
            samples = _per_method_samples(fin, t)
            try:
                if t == "gmm40":
                    p = gmm_samples_figure(samples, out / f"{g}_gmm40_samples.png")
                    written += [p] if p else []
                elif t in ("dw4", "lj13", "lj55"):
                    written += particle_histograms(
                        t, samples, out / f"{g}_{t}_energy_hist.png", out / f"{g}_{t}_distance_hist.png"
                    )
            except Exception as e:  # a figure is never fatal for make tables
                warnings.warn(
                    f"figure for {g}/{t} failed: {type(e).__name__}: {e}", UserWarning, stacklevel=2
                )
            for pr in sorted(dg["protocol"].unique()):
                if (protocol and pr != protocol) or pr not in TABLE_METRICS:
                    continue
                try:
                    p = curves_figure(
                        dg[dg["protocol"] == pr], t, list(TABLE_METRICS[pr]), out / f"{g}_{pr}_{t}_curves.png"
                    )
                    written += [p] if p else []
                except Exception as e:
                    warnings.warn(
                        f"curves for {g}/{pr}/{t} failed: {type(e).__name__}: {e}", UserWarning, stacklevel=2
                    )
    return written
