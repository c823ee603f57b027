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
REFERENCE_LABEL = "reference (test)"
REFERENCE_COLOR = "0.15"
#: colour of each built-in method in every figure (tables.METHOD_ORDER); others get the next free colours
#: one colour per built-in method (``harness.display.METHOD_ORDER``, 10 methods: matplotlib's tab10)
_BASE_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#bcbd22", "#7f7f7f",
                 "#e377c2", "#17becf")
_EXTRA_PALETTE = ("#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e7969c", "#31a354")
#: particle histograms: the x-range is the reference's 0.1–99.9 % quantile range widened by this fraction
#: on each side; mass outside goes to the overflow bins at both ends (hatched, with its share in the legend)
HIST_PAD = 0.25
HIST_BINS = 80


def _display(kind: str, key: str) -> str:
    from harness.display import method_display, target_display

    return method_display(key) if kind == "method" else target_display(key)


def method_color(key: str) -> str:
    """The fixed colour of a method (by its key; a variant ``m@x`` and external samplers get their own,
    stable across figures and runs)."""
    from harness.display import METHOD_ORDER

    if key in METHOD_ORDER:
        return _BASE_PALETTE[METHOD_ORDER.index(key) % len(_BASE_PALETTE)]
    import zlib

    return _EXTRA_PALETTE[zlib.crc32(key.encode()) % len(_EXTRA_PALETTE)]


def metric_label(metric: str, protocol: str | None = None) -> str:
    """Axis label of a metric: the tables' display name; E-W2 is a squared W2 under idem/bnem."""
    from harness.display import METRIC_LABELS

    label = METRIC_LABELS.get(metric, metric.replace("_", " "))
    if metric in ("e_w2", "dist_w2") and protocol in ("idem", "bnem"):
        label += "²"
    return label + (f" ({protocol})" if protocol else "")


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
        return target.reference("test").numpy()[:n]  # all of it when the split is smaller than n
    except Exception as e:
        warnings.warn(f"{target.name}: no reference for figures ({e})", UserWarning, stacklevel=2)
        return None


def gmm_samples_figure(samples: dict[str, np.ndarray], path: Path) -> Path | None:
    """One panel per method: samples (in the method's colour) over log-density contours of GMM-40 on
    [−50, 50]²; each panel says how many samples fall outside the plotted box."""
    if not samples:
        return None
    import targets

    t = targets.get("gmm40")
    g = np.linspace(-50, 50, 201)
    X, Y = np.meshgrid(g, g)
    with torch.no_grad():
        lp = t.log_prob(torch.from_numpy(np.stack([X.ravel(), Y.ravel()], 1))).numpy().reshape(X.shape)
    n = len(samples)
    ncol = min(n, 4)
    nrow = -(-n // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.3 * ncol, 3.6 * nrow), squeeze=False,
                             layout="constrained")
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    for ax, (m, x) in zip(axes.ravel(), samples.items()):
        ax.contour(X, Y, np.maximum(lp, -60), levels=20, linewidths=0.5, cmap="Greys", alpha=0.7)
        xs = x[:2000]
        ax.scatter(xs[:, 0], xs[:, 1], s=3, color=method_color(m), alpha=0.6, linewidths=0)
        ax.set_xlim(-50, 50)
        ax.set_ylim(-50, 50)
        ax.set_aspect("equal")
        ax.set_title(_display("method", m), fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])
        outside = int((np.abs(xs) > 50).any(axis=1).sum())
        note = f"{outside} of {len(xs)} outside the box" if outside else f"all {len(xs)} inside the box"
        ax.text(0.5, -0.03, note, transform=ax.transAxes, ha="center", va="top", fontsize=8,
                color="C3" if outside else "0.4")
    fig.suptitle("GMM-40: samples over the target density", fontsize=12)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _hist_range(ref: np.ndarray | None, all_values: list[np.ndarray]) -> tuple[float, float]:
    """The plotted range: the reference's 0.1–99.9 % quantiles widened by ``HIST_PAD``; without a reference
    the pooled values' quantiles."""
    base = ref if ref is not None and len(ref) else np.concatenate(all_values)
    base = base[np.isfinite(base)]
    lo, hi = np.quantile(base, [0.001, 0.999]) if len(base) else (0.0, 1.0)
    w = float(hi - lo) or 1.0
    return float(lo - HIST_PAD * w), float(hi + HIST_PAD * w)


def _share(frac: float) -> str:
    return f"{100 * frac:.0f}%" if frac >= 0.005 else "<1%"


def _overflow_hist(ax: Any, sets: dict[str, tuple[np.ndarray, str, str]], lo: float, hi: float,
                   xlabel: str) -> dict[str, tuple[float, float]]:
    """Step histograms (density over *all* values, so a set's visible area is its in-range share) on
    [lo, hi], and a grey overflow zone on each side in which every set with mass outside has its own bar,
    as tall as its share of the tallest in-range bin (100 % = the top of the axis); every set appears in the
    legend with its out-of-range shares. Returns {label: (fraction below, fraction above)}."""
    edges = np.linspace(lo, hi, HIST_BINS + 1)
    w = edges[1] - edges[0]
    zone = 10 * w
    shares: dict[str, tuple[float, float]] = {}
    dens_all: dict[str, np.ndarray] = {}
    for label, (v, _c, _s) in sets.items():
        v = v[np.isfinite(v)]
        n = max(len(v), 1)
        shares[label] = (float((v < lo).sum() / n), float((v > hi).sum() / n))
        dens_all[label] = np.histogram(v, bins=edges)[0] / (n * w)
    top = max([float(d.max()) for d in dens_all.values() if len(d)] + [1e-12]) * 1.05
    k = max(1, len(sets))
    for i, (label, (_v, color, style)) in enumerate(sets.items()):
        below, above = shares[label]
        out = [f"{_share(below)} below"] if below else []
        out += [f"{_share(above)} above"] if above else []
        full = label + (f" ({', '.join(out)} range)" if out else "")
        lw = 2.0 if label == REFERENCE_LABEL else 1.4
        ax.stairs(dens_all[label], edges, color=color, linestyle=style, linewidth=lw, label=full)
        for frac, x0 in ((below, lo - zone), (above, hi)):
            if frac:
                ax.bar(x0 + (i + 0.1) * zone / k, frac * top, width=0.8 * zone / k, align="edge",
                       color=color, alpha=0.85, hatch="///", edgecolor="white", linewidth=0)
    ax.axvspan(lo - zone, lo, color="0.93", zorder=0)
    ax.axvspan(hi, hi + zone, color="0.93", zorder=0)
    ax.set_xlim(lo - zone, hi + zone)
    ax.set_ylim(0, top)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    import matplotlib.transforms as mtransforms

    tr = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
    for x, txt in ((lo - zone / 2, f"< {lo:.3g}"), (hi + zone / 2, f"> {hi:.3g}")):
        ax.text(x, -0.01, txt, transform=tr, ha="center", va="top", fontsize=6.5, color="0.35")
        ax.text(x, 0.99, "share\noutside", transform=tr, ha="center", va="top", fontsize=6, color="0.45")
    return shares


def particle_histograms(
    target_key: str, samples: dict[str, np.ndarray], path_e: Path, path_d: Path
) -> list[Path]:
    """Energy and interatomic-distance histograms of each method against the reference test split: the
    x-range is the reference's (``_hist_range``), mass outside goes to hatched overflow bins and is stated in
    the legend, so no method disappears (a method whose samples all left the range is still listed)."""
    import targets

    if not samples:
        return []
    t = targets.get(target_key)
    ref = _reference(t, MAX_HIST_SAMPLES)
    sets = ({"reference": ref} if ref is not None else {}) | samples
    e_vals: dict[str, np.ndarray] = {}
    d_vals: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for name, x in sets.items():
            xt = torch.from_numpy(np.ascontiguousarray(x[:MAX_HIST_SAMPLES], dtype=np.float64))
            e_vals[name] = t.energy(xt).numpy()
            d_vals[name] = t.interatomic_distances(xt).numpy().ravel()
    out = []
    for vals, path, xl, what in ((e_vals, path_e, "energy E(x)", "energy"),
                                 (d_vals, path_d, "interatomic distance", "interatomic distances")):
        lo, hi = _hist_range(vals.get("reference"), list(vals.values()))
        styled = {}
        for name, v in vals.items():
            if name == "reference":
                styled[REFERENCE_LABEL] = (v, REFERENCE_COLOR, "-")
            else:
                styled[_display("method", name)] = (v, method_color(name), "-")
        fig, ax = plt.subplots(figsize=(7.8, 3.9), layout="constrained")
        _overflow_hist(ax, styled, lo, hi, xl)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
        ax.set_title(f"{_display('target', target_key)}: {what} (x-range: the reference's; grey: outside)",
                     fontsize=10)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    return out


def curves_figure(df: pd.DataFrame, target_key: str, metrics: list[str], path: Path,
                  protocol: str | None = None) -> Path | None:
    """Metric vs energy evaluations (top) and vs training wall-clock (bottom), one line per method in its
    fixed colour (mean ± sd over seeds), display names on the axes, one legend outside the panels."""
    from matplotlib.ticker import LogLocator, NullFormatter

    sub = df[(df["target"] == target_key) & (df["checkpoint"] >= 0)]
    metrics = [
        m for m in metrics if METRIC_PREFIX + m in sub.columns and sub[METRIC_PREFIX + m].notna().any()
    ]
    have_x = [c for c in ("u_energy_evals", "u_train_seconds") if c in sub.columns]
    if sub.empty or not metrics or not have_x:
        return None
    if protocol is None and "protocol" in sub.columns and sub["protocol"].nunique() == 1:
        protocol = str(sub["protocol"].iloc[0])
    keys = list(dict.fromkeys(sub["method"]))
    names = {k: _display("method", k) for k in keys}
    palette = {names[k]: method_color(k) for k in keys}
    order = [names[k] for k in keys]
    sub = sub.assign(method_name=sub["method"].map(names))
    fig, axes = plt.subplots(
        len(have_x), len(metrics), figsize=(3.7 * len(metrics) + 1.8, 3.1 * len(have_x)), squeeze=False,
        layout="constrained",
    )
    for i, xc in enumerate(have_x):
        for j, m in enumerate(metrics):
            ax = axes[i][j]
            d = sub[[xc, METRIC_PREFIX + m, "method_name"]].dropna()
            d = d[np.isfinite(d[METRIC_PREFIX + m].astype(float))]
            if len(d):
                sns.lineplot(
                    d, x=xc, y=METRIC_PREFIX + m, hue="method_name", hue_order=order, palette=palette,
                    marker="o", ax=ax, errorbar=("sd", 1) if len(d) > 1 else None, legend=False,
                )
                if (d[xc] > 0).all():
                    ax.set_xscale("log")
                    ax.xaxis.set_major_locator(LogLocator(base=10, numticks=4))
                    ax.xaxis.set_minor_formatter(NullFormatter())
                y = d[METRIC_PREFIX + m].astype(float)
                if (y > 0).all() and y.max() > 100 * y.min():
                    ax.set_yscale("log")
                    ax.yaxis.set_major_locator(LogLocator(base=10, numticks=5))
                    ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("energy evaluations" if xc == "u_energy_evals" else "training wall-clock [s]")
            ax.set_ylabel(metric_label(m, protocol))
            ax.tick_params(labelsize=8)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=palette[n], marker="o", label=n) for n in order]
    fig.legend(handles=handles, title="method", loc="outside right upper", fontsize=8, frameon=False)
    fig.suptitle(_display("target", target_key) + (f" — {protocol} protocol" if protocol else ""))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_figures(
    df: pd.DataFrame, out: Path, grid: str | None = None, protocol: str | None = None
) -> list[Path]:
    """All figures for every grid (and protocol, for the curves) in ``df``; returns the written paths.
    Figures that need data that are absent (no samples, no checkpoints) are skipped, never an error."""
    from harness.display import TABLE_METRICS

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
                    p = curves_figure(dg[dg["protocol"] == pr], t, list(TABLE_METRICS[pr]),
                                      out / f"{g}_{pr}_{t}_curves.png", protocol=pr)
                    written += [p] if p else []
                except Exception as e:
                    warnings.warn(
                        f"curves for {g}/{pr}/{t} failed: {type(e).__name__}: {e}", UserWarning, stacklevel=2
                    )
    return written
