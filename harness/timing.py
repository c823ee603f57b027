"""Wall-clock comparisons and speed-up tables from the records of one grid.

``python -m harness.timing [--results DIR] [--grid NAME] [--metric x_w2] [--baseline METHOD]
[--threshold FACTOR] [--level VALUE] [--out DIR] [--figures DIR]``

Per target, one table with a row per method:

- ``train s``: training wall-clock (``usage.train_seconds`` at the end of the run), seconds;
- ``sample s``: wall-clock of the final evaluation's sampling pass (the method's ``sample(n)``), seconds;
- ``energy evals`` / ``grad evals``: configurations at which E / ∇E were evaluated over the whole run
  (training and evaluation sampling, as counted by ``CountingTarget``);
- ``network evals``: network forward passes (configurations) as reported by the method, ``—`` when it
  reports none;
- ``s / step``: training wall-clock per optimiser step;
- ``time to level`` and ``evals to level``: training wall-clock and *training* energy evaluations
  (``energy_evals − sample_energy_evals``) at the first evaluation checkpoint at which the metric is ≤ the
  level. The level is ``threshold × best`` where ``best`` is the lowest final value (mean over seeds) of any
  method on that target, unless ``--level`` gives it directly. Lower-is-better metrics only;
- ``speed-up``: the baseline method's time (evaluations) to level divided by this method's: > 1 means this
  method reaches the level faster than the baseline. The ratio is of the means over seeds; the interval in
  brackets is the range of the ratio over every pair (baseline seed, method seed) that reached the level.

Several seeds: mean ± std (sample std) over the runs with status ``ok``. A time to level averaged over the
seeds that reached it says ``(k/n)`` when not all did. A method whose runs all diverged is shown from its
diverged runs with ``*`` after each number; ``—`` marks a missing cell; ``failed`` / ``timeout`` cells say so.

Timings are only comparable within one machine and one launch: the tables say which hosts and devices the
records come from and warn when they differ.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.records import RunRecord

USAGE_KEYS = (
    "energy_evals",
    "grad_evals",
    "steps",
    "train_seconds",
    "sample_seconds",
    "sample_energy_evals",
    "network_evals",
)
METRIC_PREFIX = "metric."
DEFAULT_METRIC = "x_w2"
DEFAULT_THRESHOLD = 1.5
#: preferred default baselines, in order; otherwise the first method alphabetically
DEFAULT_BASELINES = ("idem",)


# ---------------------------------------------------------------------------------------------- loading
def _host(env: dict[str, Any]) -> str | None:
    for k in ("host", "hostname", "node"):
        if env.get(k):
            return str(env[k])
    return None


def _load_per_cpu(env: dict[str, Any]) -> float:
    """1-minute load average per CPU when the record has it (``loadavg``, ``cpu_count``), else NaN."""
    la, n = env.get("loadavg"), env.get("cpu_count")
    try:
        return float(la[0]) / float(n)
    except (TypeError, ValueError, IndexError, ZeroDivisionError):
        return float("nan")


def _device(rec: RunRecord) -> str:
    env = rec.environment or {}
    for k in ("device_name", "gpu", "device"):
        if env.get(k):
            return str(env[k])
    return str(rec.spec.device)


def records_to_frame(records: Sequence[RunRecord]) -> pd.DataFrame:
    """One tidy row per (run, evaluation checkpoint); runs without evaluations get one row with NaN checkpoint
    columns. Columns: grid, target, method, replicate, seed, status, stop_reason, host, device,
    ``run_<usage>`` (usage at the end of the run), ``fraction``, ``step``, the checkpoint's usage keys,
    ``metric.<name>``."""
    rows: list[dict[str, Any]] = []
    for rec in records:
        s = rec.spec
        base: dict[str, Any] = {
            "grid": s.grid,
            "target": s.target,
            "method": s.method,
            "replicate": s.replicate,
            "seed": s.seed,
            "status": rec.status,
            "stop_reason": rec.stop_reason,
            "host": _host(rec.environment or {}),
            "device": _device(rec),
            "threads": (rec.environment or {}).get("torch_threads"),
            "load": _load_per_cpu(rec.environment or {}),
            "n_eval_samples": s.n_eval_samples,
            # interrupted and resumed: training seconds summed over wall-clock segments (environment)
            "resumed": bool((rec.environment or {}).get("resumed", False)),
        }
        for k in USAGE_KEYS:
            base[f"run_{k}"] = float(rec.usage.get(k, np.nan)) if rec.usage else np.nan
        evals = sorted(rec.evaluations, key=lambda e: (e.get("step", 0), e.get("fraction", 0.0)))
        if not evals:
            rows.append({**base, "fraction": np.nan, "step": np.nan})
            continue
        for ev in evals:
            row = dict(base)
            row["fraction"] = float(ev.get("fraction", np.nan))
            row["step"] = float(ev.get("step", np.nan))
            usage = ev.get("usage", {}) or {}
            for k in USAGE_KEYS:
                row[k] = float(usage.get(k, np.nan))
            for name, v in (ev.get("metrics", {}) or {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    row[METRIC_PREFIX + name] = float(v)
            rows.append(row)
    df = pd.DataFrame(rows)
    for k in USAGE_KEYS:
        if k not in df.columns:
            df[k] = np.nan
    return df


def load_runs(root: str | Path, grid: str | None = None) -> pd.DataFrame:
    """Read every ``record.json`` under ``root`` (optionally one grid) into ``records_to_frame``'s frame.

    Unreadable or foreign files are skipped with a warning naming the path."""
    root = Path(root)
    if not root.exists():
        raise ValueError(f"results directory {str(root)!r} does not exist")
    recs: list[RunRecord] = []
    for p in sorted(root.rglob("record.json")):
        try:
            rec = RunRecord.read(p)
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
            warnings.warn(f"skipping unreadable record {p}: {e}", stacklevel=2)
            continue
        if grid is None or rec.spec.grid == grid:
            recs.append(rec)
    return records_to_frame(recs)


def available_metrics(df: pd.DataFrame) -> list[str]:
    return sorted(c[len(METRIC_PREFIX) :] for c in df.columns if c.startswith(METRIC_PREFIX))


# ---------------------------------------------------------------------------------------------- per run
def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float, np.floating)) and math.isfinite(float(x))


def time_to_level(checkpoints: pd.DataFrame, metric: str, level: float) -> dict[str, float] | None:
    """The first checkpoint (in step order) of one run at which ``metric`` ≤ ``level``.

    Returns {"seconds": training wall-clock, "evals": training energy evaluations, "step": optimiser steps,
    "fraction": budget fraction} at that checkpoint, or None if no checkpoint reaches the level (NaN metric
    values never do)."""
    col = METRIC_PREFIX + metric
    if col not in checkpoints.columns or not _finite(level):
        return None
    cp = checkpoints.sort_values(["step", "fraction"], kind="stable")
    for _, r in cp.iterrows():
        v = r[col]
        if _finite(v) and v <= level:
            evals = r["energy_evals"] - (
                0.0 if pd.isna(r["sample_energy_evals"]) else r["sample_energy_evals"]
            )
            return {
                "seconds": float(r["train_seconds"]),
                "evals": float(evals),
                "step": float(r["step"]),
                "fraction": float(r["fraction"]),
            }
    return None


def final_metric(checkpoints: pd.DataFrame, metric: str) -> float:
    """The metric at the run's last evaluation checkpoint (NaN if absent)."""
    col = METRIC_PREFIX + metric
    cp = checkpoints.dropna(subset=["step"])
    if col not in cp.columns or cp.empty:
        return float("nan")
    return float(cp.sort_values(["step", "fraction"], kind="stable")[col].iloc[-1])


def summarise_runs(df: pd.DataFrame, metric: str, levels: dict[str, float]) -> pd.DataFrame:
    """One row per run: grid, target, method, replicate, status, host, device, train_s, sample_s,
    energy_evals, grad_evals, network_evals, steps, s_per_step, final (metric), reached, ttl_seconds,
    ttl_evals, ttl_step (NaN when the level is never reached); ``levels``: target -> level."""
    out: list[dict[str, Any]] = []
    keys = ["grid", "target", "method", "replicate"]
    for key, g in df.groupby(keys, sort=True, dropna=False):
        first = g.iloc[0]
        cp = g.dropna(subset=["step"]).sort_values(["step", "fraction"], kind="stable")
        steps = first["run_steps"]
        train_s = first["run_train_seconds"]
        if len(cp) >= 1:
            cum = cp["sample_seconds"].to_numpy(dtype=float)
            sample_s = float(cum[-1] - (cum[-2] if len(cum) >= 2 else 0.0))
        else:
            sample_s = float("nan")
        level = levels.get(first["target"], float("nan"))
        hit = time_to_level(cp, metric, level) if len(cp) else None
        out.append(
            {
                **dict(zip(keys, key)),
                "status": first["status"],
                "stop_reason": first["stop_reason"],
                "host": first["host"],
                "device": first["device"],
                "threads": first["threads"],
                "load": first["load"],
                "n_eval_samples": first["n_eval_samples"],
                "resumed": bool(first["resumed"]) if "resumed" in first.index else False,
                "train_s": train_s,
                "sample_s": sample_s,
                "energy_evals": first["run_energy_evals"],
                "grad_evals": first["run_grad_evals"],
                "network_evals": first["run_network_evals"],
                "steps": steps,
                "s_per_step": train_s / steps if _finite(steps) and steps > 0 else float("nan"),
                "final": final_metric(cp, metric),
                "level": level,
                "reached": hit is not None,
                "ttl_seconds": hit["seconds"] if hit else float("nan"),
                "ttl_evals": hit["evals"] if hit else float("nan"),
                "ttl_step": hit["step"] if hit else float("nan"),
            }
        )
    return pd.DataFrame(out)


def quality_levels(
    df: pd.DataFrame, metric: str, threshold: float = DEFAULT_THRESHOLD, level: float | None = None
) -> dict[str, float]:
    """Per target the quality level: ``level`` if given, else ``threshold`` × the lowest (over methods) mean
    (over ``ok`` seeds) final value of ``metric``. NaN for a target where no ok run has a finite value."""
    if threshold <= 0:
        raise ValueError(f"threshold must be a positive factor, got {threshold}")
    out: dict[str, float] = {}
    runs = summarise_runs(df, metric, {}) if len(df) else pd.DataFrame()
    for t in sorted(df["target"].unique()) if len(df) else []:
        if level is not None:
            out[t] = float(level)
            continue
        r = runs[(runs["target"] == t) & (runs["status"] == "ok")]
        r = r[np.isfinite(r["final"].astype(float))]
        if r.empty:
            out[t] = float("nan")
            continue
        best = r.groupby("method")["final"].mean().min()
        out[t] = float(threshold * best)
    return out


# ---------------------------------------------------------------------------------------------- tables
def _fmt(x: float, count: bool = False) -> str:
    if not _finite(x):
        return "nan"
    x = float(x)
    if count:
        return f"{x:,.0f}" if abs(x) < 1e6 else f"{x:.3g}"
    if x == 0:
        return "0"
    if abs(x) >= 1e5 or abs(x) < 1e-3:
        return f"{x:.2e}"
    return f"{x:.3g}"


def _mean_std(vals: Sequence[float], count: bool = False, pm: str = "±") -> str:
    v = np.asarray([float(x) for x in vals if _finite(x)], dtype=float)
    if v.size == 0:
        return "—"
    if v.size == 1:
        return _fmt(v[0], count)
    return f"{_fmt(v.mean(), count)} {pm} {_fmt(v.std(ddof=1), count)}"


def _ratio(num: float, den: float) -> float:
    if _finite(num) and _finite(den) and den > 0:
        return float(num) / float(den)
    return float("nan")


#: method keys of samplers scored from saved samples by ``harness.score`` (as in harness.tables)
EXTERNAL_PREFIX = "external:"


def _pair_range(base: Sequence[float], other: Sequence[float]) -> tuple[float, float] | None:
    """The speed-up's interval over seeds: min and max of base_i / other_j over every pair of runs (baseline
    seed i, method seed j) that reached the level; None with fewer than two pairs."""
    r = [_ratio(b, o) for b in base for o in other]
    r = [x for x in r if _finite(x)]
    return (min(r), max(r)) if len(r) >= 2 else None


def _display_name(kind: str, key: str) -> str:
    if kind == "method" and str(key).startswith(EXTERNAL_PREFIX):
        return str(key)[len(EXTERNAL_PREFIX):] + " (external)"
    try:
        if kind == "method":
            import methods

            return methods.get(key).display_name if key in methods.names() else key
        import targets

        return targets.TARGETS.get(key).display_name if key in targets.names() else key
    except Exception:  # noqa: BLE001 - display names are cosmetic; never fail a table on them
        return key


def _registered(key: str) -> bool:
    try:
        import methods

        return key in methods.names()
    except Exception:  # noqa: BLE001
        return False


@dataclass
class TimingTable:
    """The timing table of one target: ``cells`` (method -> column -> numbers, raw), ``columns``, ``rows``
    (rendered strings, one list per method) and ``notes`` (footnotes)."""

    grid: str
    target: str
    metric: str
    level: float
    baseline: str | None
    columns: list[str]
    rows: list[list[str]]
    cells: dict[str, dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        from tabulate import tabulate

        title = f"### {_display_name('target', self.target)} — grid `{self.grid}`, metric `{self.metric}`"
        body = tabulate(self.rows, headers=self.columns, tablefmt="pipe", disable_numparse=True)
        return "\n".join([title, "", body, ""] + [f"- {n}" for n in self.notes]) + "\n"

    def latex(self) -> str:
        def esc(s: str) -> str:
            s = s.replace("\\", "\\textbackslash{}").replace("`", "")
            for a, b in (("&", "\\&"), ("%", "\\%"), ("_", "\\_"), ("#", "\\#"), ("$", "\\$")):
                s = s.replace(a, b)
            for a, b in (
                ("±", "$\\pm$"),
                ("—", "---"),
                ("≤", "$\\le$"),
                ("×", "$\\times$"),
                ("÷", "/"),
                (">", "$>$"),
            ):
                s = s.replace(a, b)
            return s

        lines = [
            "\\begin{table}[t]",
            "\\centering",
            "\\small",
            f"\\caption{{Timing on {esc(_display_name('target', self.target))} (grid {esc(self.grid)}, "
            f"metric {esc(self.metric)}).}}",
            "\\begin{tabular}{l" + "r" * (len(self.columns) - 1) + "}",
            "\\toprule",
            " & ".join(esc(c) for c in self.columns) + " \\\\",
            "\\midrule",
        ]
        lines += [" & ".join(esc(c) for c in row) + " \\\\" for row in self.rows]
        lines += ["\\bottomrule", "\\end{tabular}"]
        if self.notes:
            lines.append("\\par\\footnotesize " + " ".join(esc(n) for n in self.notes))
        lines += ["\\end{table}", ""]
        return "\n".join(lines)


def _status_summary(statuses: Sequence[str]) -> str:
    counts = pd.Series(list(statuses)).value_counts()
    order = ["ok", "diverged", "failed", "timeout"]
    return ", ".join(f"{int(counts[s])} {s}" for s in order if s in counts)


def timing_table(
    runs: pd.DataFrame,
    target: str,
    metric: str,
    level: float,
    baseline: str | None = None,
    methods_expected: Sequence[str] | None = None,
    threshold: float | None = DEFAULT_THRESHOLD,
) -> TimingTable:
    """Build the table of one target from ``summarise_runs`` output (all runs of one grid)."""
    tr = runs[runs["target"] == target]
    grids = sorted(tr["grid"].unique()) if len(tr) else []
    if len(grids) > 1:
        raise ValueError(f"timing tables compare runs of one grid; target {target!r} has runs of {grids}")
    grid = grids[0] if grids else "?"
    # the caller's order (the grid's: registry order), then any other method in the records alphabetically
    methods_all = list(dict.fromkeys([*(methods_expected or []), *sorted(set(tr["method"]))]))
    if baseline is not None and baseline not in methods_all:
        raise ValueError(
            f"baseline method {baseline!r} has no runs on {target}; methods: {', '.join(methods_all)}"
        )
    bname = _display_name("method", baseline) if baseline else None

    columns = [
        "method",
        "runs",
        "train s",
        "sample s",
        "energy evals",
        "grad evals",
        "network evals",
        "s / step",
        f"final {metric}",
        "time to level (s)",
        "evals to level",
    ]
    if baseline:
        columns += [f"speed-up vs {bname} (wall)", f"speed-up vs {bname} (evals)"]

    cells: dict[str, dict[str, Any]] = {}
    for m in methods_all:
        r = tr[tr["method"] == m]
        ok = r[r["status"] == "ok"]
        div = r[r["status"] == "diverged"]
        use, mark = (ok, "") if len(ok) else ((div, "*") if len(div) else (r.iloc[0:0], ""))
        reached = use[use["reached"]]
        cells[m] = {
            "n_runs": len(r),
            "statuses": list(r["status"]),
            "used": len(use),
            "mark": mark,
            "train_s": list(use["train_s"]),
            "sample_s": list(use["sample_s"]),
            "energy_evals": list(use["energy_evals"]),
            "grad_evals": list(use["grad_evals"]),
            "network_evals": list(use["network_evals"]),
            "s_per_step": list(use["s_per_step"]),
            "final": list(use["final"]),
            "n_reached": len(reached),
            "n_resumed": int(use["resumed"].astype(bool).sum()) if "resumed" in use.columns else 0,
            "ttl_seconds": list(reached["ttl_seconds"]),
            "ttl_evals": list(reached["ttl_evals"]),
            "ttl_seconds_mean": float(reached["ttl_seconds"].mean()) if len(reached) else float("nan"),
            "ttl_evals_mean": float(reached["ttl_evals"].mean()) if len(reached) else float("nan"),
        }
    for c in cells.values():
        b = cells.get(baseline) if baseline else None
        c["speedup_wall"] = _ratio(b["ttl_seconds_mean"], c["ttl_seconds_mean"]) if b else float("nan")
        c["speedup_evals"] = _ratio(b["ttl_evals_mean"], c["ttl_evals_mean"]) if b else float("nan")
        c["speedup_wall_range"] = _pair_range(b["ttl_seconds"], c["ttl_seconds"]) if b else None
        c["speedup_evals_range"] = _pair_range(b["ttl_evals"], c["ttl_evals"]) if b else None

    rows: list[list[str]] = []
    for m in methods_all:
        c = cells[m]
        name = _display_name("method", m) + (" (baseline)" if m == baseline else "")
        if c.get("n_resumed"):
            name += " †"  # includes resumed runs (see the notes)
        if c["n_runs"] == 0:
            why = "missing" if _registered(m) else "missing (not registered)"
            rows.append([name, why] + ["—"] * (len(columns) - 2))
            continue
        runs_txt = _status_summary(c["statuses"])
        if c["used"] == 0:  # only failed / timeout runs
            word = sorted(set(c["statuses"]))[0]
            rows.append([name, runs_txt] + [word] * (len(columns) - 2))
            continue
        mk = c["mark"]

        def ms(key: str, count: bool = False, mk: str = mk, c: dict[str, Any] = c) -> str:
            s = _mean_std(c[key], count)
            return s + mk if s != "—" else s

        net = ms("network_evals", True) if any(_finite(v) and v > 0 for v in c["network_evals"]) else "—"
        if not _finite(level):
            ttl_s = ttl_e = "no level"
        elif c["n_reached"] == 0:
            ttl_s = ttl_e = "not reached"
        else:
            frac = "" if c["n_reached"] == c["used"] else f" ({c['n_reached']}/{c['used']})"
            ttl_s = ms("ttl_seconds") + frac
            ttl_e = ms("ttl_evals", True) + frac
        row = [
            name,
            runs_txt,
            ms("train_s"),
            ms("sample_s"),
            ms("energy_evals", True),
            ms("grad_evals", True),
            net,
            ms("s_per_step"),
            ms("final"),
            ttl_s,
            ttl_e,
        ]
        if baseline:
            b = cells[baseline]
            for key in ("speedup_wall", "speedup_evals"):
                if not _finite(level):
                    row.append("no level")
                elif c["n_reached"] == 0:
                    row.append("not reached")
                elif b["n_reached"] == 0:
                    row.append("baseline not reached")
                elif not _finite(c[key]):  # e.g. an external sampler without a (self-reported) cost
                    row.append("—")
                else:
                    rng = c.get(f"{key}_range")
                    row.append(f"{c[key]:.2f}×" + mk + (f" [{rng[0]:.2f}, {rng[1]:.2f}]" if rng else ""))
        rows.append(row)

    notes = _notes(tr, grid, metric, level, threshold, baseline)
    return TimingTable(grid, target, metric, level, baseline, columns, rows, cells, notes)


def _notes(
    tr: pd.DataFrame, grid: str, metric: str, level: float, threshold: float | None, baseline: str | None
) -> list[str]:
    notes = []
    if _finite(level):
        how = f"{threshold} × the best method's final {metric}" if threshold else "given with --level"
        notes.append(
            f"Quality level: {metric} ≤ {_fmt(level)} ({how}); time / evals to level: training "
            "wall-clock and training energy evaluations at the first evaluation checkpoint at or below "
            "it (resolution: the grid's evaluation fractions)."
        )
    else:
        notes.append(f"No quality level: no ok run has a finite final {metric}.")
    if baseline:
        notes.append(
            f"Speed-up: {_display_name('method', baseline)}'s time (evals) to level ÷ the method's; "
            "> 1 is faster than the baseline."
        )
    notes.append(
        "Mean ± std over ok seeds; `*` diverged (numbers from the diverged runs); `—` missing or not "
        "reported; network evals are as reported by each method."
    )
    if len(tr) and tr["method"].astype(str).str.startswith(EXTERNAL_PREFIX).any():
        notes.append(
            "`(external)`: a sampler scored from its saved samples with `python -m harness.score`; its "
            "training time and energy evaluations are self-reported (`—` when not given) and were measured "
            "elsewhere, so they are not comparable with the other rows' wall-clock."
        )

    if "resumed" in tr.columns and tr["resumed"].astype(bool).any():
        n = int(tr["resumed"].astype(bool).sum())
        notes.append(
            f"†: {n} run(s) were interrupted and resumed from a checkpoint; their training wall-clock is the "
            "sum over the segments they ran in (each segment's seconds are in the record's "
            "`environment.segments`) and may differ from an uninterrupted run (warm-up, other load): "
            "`--exclude-resumed` leaves them out."
        )

    def distinct(col: str) -> list[str]:
        return sorted({str(v) for v in tr[col].dropna()}) if len(tr) and col in tr.columns else []

    hosts, devices, threads = distinct("host"), distinct("device"), distinct("threads")
    where = (
        f"hosts: {', '.join(hosts) or 'unknown'}; devices: {', '.join(devices) or 'unknown'}; "
        f"torch threads: {', '.join(threads) or 'unknown'}"
    )
    if len(hosts) > 1 or len(devices) > 1 or len(threads) > 1:
        notes.append(
            f"WARNING: runs come from different machines or set-ups ({where}): wall-clock columns are not "
            "comparable across them."
        )
    else:
        notes.append(f"Measured on {where}.")
    if "load" in tr.columns and (tr["load"].astype(float) > 1.0).any():
        worst = float(tr["load"].astype(float).max())
        notes.append(
            f"WARNING: the machine was oversubscribed while some runs ran (1-min load average up to "
            f"{worst:.1f} per CPU): their wall-clock numbers are inflated."
        )
    return notes


# ---------------------------------------------------------------------------------------------- figures
def _tick_label(v: float, _pos: Any = None) -> str:
    """Plain numbers below 10^4, ``2e5``-style above."""
    if v >= 1e4:
        m, e = f"{v:.0e}".split("e")
        return f"{m}e{int(e)}"
    return f"{v:g}"


def _log_axis(axis: Any, set_scale: Any, values: np.ndarray) -> None:
    """Log scale with labelled ticks at 1, 2, 5 × 10^k over short ranges (≤ 2 decades), 10^k otherwise."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    set_scale("log")
    decades = math.log10(values.max() / values.min()) if values.min() > 0 else 0.0
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 2 else (1.0,)))
    axis.set_major_formatter(FuncFormatter(_tick_label))
    axis.set_minor_formatter(NullFormatter())


def plot_target(df: pd.DataFrame, target: str, metric: str, level: float, path: str | Path) -> Path | None:
    """Metric vs training wall-clock and vs training energy evaluations (log x), one line per run, coloured by
    method, with the quality level dashed. Returns the written path, or None if there is nothing to plot."""
    col = METRIC_PREFIX + metric
    d = df[(df["target"] == target)].dropna(subset=["step"])
    if col not in d.columns:
        return None
    d = d[np.isfinite(d[col].astype(float))].copy()
    if d.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    d["training energy evals"] = d["energy_evals"] - d["sample_energy_evals"].fillna(0)
    d["training wall-clock (s)"] = d["train_seconds"]
    from harness.figures import method_color, metric_label

    palette = {_display_name("method", m): method_color(m) for m in d["method"].unique()}  # as every figure
    d["method"] = [_display_name("method", m) for m in d["method"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True, layout="constrained")
    for ax, x in zip(axes, ["training wall-clock (s)", "training energy evals"]):
        sns.lineplot(
            data=d,
            x=x,
            y=col,
            hue="method",
            hue_order=sorted(d["method"].unique()),
            palette=palette,
            units="replicate",
            estimator=None,
            marker="o",
            ax=ax,
            legend=False,
        )
        if (d[x] > 0).all():
            _log_axis(ax.xaxis, ax.set_xscale, d[x].to_numpy(dtype=float))
        if _finite(level):
            ax.axhline(level, ls="--", c="grey", lw=1)
        ax.set_ylabel(metric_label(metric))
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=palette[n], marker="o", label=n) for n in sorted(palette)]
    fig.legend(handles=handles, title="method", loc="outside right upper", fontsize=8, frameon=False)
    yv = d[col].to_numpy(dtype=float)
    if (yv > 0).all() and yv.max() / yv.min() > 100:  # metrics spanning decades: log scale, shared y
        _log_axis(axes[0].yaxis, axes[0].set_yscale, yv)
    fig.suptitle(f"{_display_name('target', target)}: {metric_label(metric)} vs cost "
                 f"(dashed: level {_fmt(level)})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- driver
def default_baseline(methods_present: Sequence[str]) -> str | None:
    for b in DEFAULT_BASELINES:
        if b in methods_present:
            return b
    return sorted(methods_present)[0] if methods_present else None


def timing_report(
    df: pd.DataFrame,
    metric: str = DEFAULT_METRIC,
    threshold: float = DEFAULT_THRESHOLD,
    level: float | None = None,
    baseline: str | None = None,
    methods_expected: Sequence[str] | None = None,
    exclude_resumed: bool = False,
) -> list[TimingTable]:
    """All targets' tables for the runs in ``df`` (one grid). ``exclude_resumed``: leave out runs that were
    interrupted and resumed (otherwise they are marked † and counted in a note)."""
    n_excluded = 0
    if exclude_resumed and "resumed" in df.columns:
        keep = ~df["resumed"].astype(bool)
        n_excluded = int(df.loc[~keep].groupby(["target", "method", "replicate"]).ngroups)
        df = df[keep]
    if df.empty:
        return []
    grids = sorted(df["grid"].unique())
    if len(grids) > 1:
        raise ValueError(f"runs of several grids {grids}: pass one grid (--grid NAME)")
    have = available_metrics(df)
    if metric not in have:
        raise ValueError(
            f"metric {metric!r} not in the records; available metrics: {', '.join(have) or '(none)'}"
        )
    levels = quality_levels(df, metric, threshold, level)
    runs = summarise_runs(df, metric, levels)
    present = list(dict.fromkeys([*(methods_expected or []), *sorted(set(runs["method"]))]))
    if baseline is None:
        baseline = default_baseline(sorted(set(runs["method"])))
    elif baseline not in present:
        raise ValueError(
            f"unknown baseline method {baseline!r}; methods in the records: {', '.join(present)}"
        )
    tables = [
        timing_table(
            runs,
            t,
            metric,
            levels[t],
            baseline,
            present,
            None if level is not None else threshold,
        )
        for t in sorted(runs["target"].unique())
    ]
    if n_excluded:
        for t in tables:
            t.notes.append(f"{n_excluded} resumed run(s) excluded (--exclude-resumed).")
    return tables


def grid_methods(grid: str) -> list[str] | None:
    """Every method the named grid covers (registered and planned), or None for an unknown grid."""
    try:
        from harness import grids

        exp = grids.expand(grid)
    except Exception:  # noqa: BLE001 - an unknown or foreign grid name: fall back to the records' methods
        return None
    return list(dict.fromkeys([*(s.method for s in exp.specs), *exp.missing_methods]))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.timing", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="results/runs", help="records root (default results/runs)")
    p.add_argument("--grid", default=None, help="grid name (default: every grid found, one report each)")
    p.add_argument("--metric", default=DEFAULT_METRIC, help="lower-is-better metric (default x_w2)")
    p.add_argument(
        "--baseline", default=None, help="method key for speed-up ratios (default idem if present)"
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help="level = FACTOR × best method's final metric (default 1.5)",
    )
    p.add_argument("--level", type=float, default=None, help="absolute quality level (overrides --threshold)")
    p.add_argument(
        "--methods", default=None, help="comma-separated methods expected (missing ones shown as —)"
    )
    p.add_argument("--out", default="results/tables", help="tables directory (default results/tables)")
    p.add_argument("--figures", default="results/figures", help="figures directory (default results/figures)")
    p.add_argument("--no-figures", action="store_true", help="skip the plots")
    p.add_argument("--exclude-resumed", action="store_true",
                   help="leave out runs that were interrupted and resumed (default: keep them, marked †)")
    a = p.parse_args(argv)
    try:
        df = load_runs(a.results, a.grid)
        if df.empty:
            print(f"no records under {a.results}" + (f" for grid {a.grid!r}" if a.grid else ""))
            return 0
        expected = [m.strip() for m in a.methods.split(",")] if a.methods else None
        out, figs = Path(a.out), Path(a.figures)
        out.mkdir(parents=True, exist_ok=True)
        for grid in sorted(df["grid"].unique()):
            exp = expected if expected is not None else grid_methods(grid)
            tables = timing_report(df[df["grid"] == grid], a.metric, a.threshold, a.level, a.baseline, exp,
                                   exclude_resumed=a.exclude_resumed)
            md = [f"## Timing — grid `{grid}`\n"]
            tex = []
            for t in tables:
                md.append(t.markdown())
                tex.append(t.latex())
                (out / f"timing_{grid}_{t.target}.md").write_text(t.markdown())
                (out / f"timing_{grid}_{t.target}.tex").write_text(t.latex())
                if not a.no_figures:
                    fp = plot_target(
                        df[df["grid"] == grid],
                        t.target,
                        a.metric,
                        t.level,
                        figs / f"timing_{grid}_{t.target}_{a.metric}.png",
                    )
                    if fp is not None:
                        md.append(f"![{t.target}]({os.path.relpath(fp, out)})\n")
            (out / f"timing_{grid}.md").write_text("\n".join(md))
            (out / f"timing_{grid}.tex").write_text("\n".join(tex))
            print("\n".join(md))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
