"""Paper-shaped tables (Markdown + LaTeX) and figures from run records: ``python -m harness.tables``.

    python -m harness.tables [--results results/runs] [--out results/tables] [--figures results/figures]
                             [--grid NAME] [--protocol NAME] [--no-figures]

Per (grid, protocol) found in the records: ``<grid>_<protocol>.md`` / ``.tex`` — methods as rows, targets ×
metrics as columns, mean ± std over seeds of the evaluation the selection rule picks (``--selection``),
best **bold** and second underlined per column (ties share a rank), ``*`` = every seed diverged, ``—`` =
missing (no record, failed, timed out or no metric), ``(k/n)`` = only k of n seeds usable; a coverage line
and footnotes (selection rule, protocol, sample sizes, reference provenance, noise floors). For the
``idem`` and ``bnem`` protocols also
``<grid>_<protocol>_reproduction.md`` / ``.tex``: our numbers beside the published ones with the ratio, and
``reproduction_<protocol>.md`` / ``.tex``: each cell from ``paper`` records where they exist, else ``cpu``.
Works on an empty or partial results directory.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tabulate import tabulate

from harness import metrics as hm
from harness.display import (  # noqa: F401  (re-exported: tables.METHOD_ORDER, tables.method_display, ...)
    EXTERNAL_MARK,
    EXTERNAL_PREFIX,
    METHOD_ORDER,
    METRIC_LABELS,
    METRIC_LATEX,
    TABLE_METRICS,
    TARGET_ORDER,
    is_external,
    method_display,
    target_display,
)
from harness.published import published_for
from harness.records import METRIC_PREFIX, PROTOCOL_RULE, SELECTION_RULE_NAMES, load_records, protocol_rows
from harness.scoring import SELECTION_RULES, method_trains

MISSING = "—"
DIVERGED = "*"

def _metric_defined(protocol: str, target: str, metric: str) -> bool:
    if target == "gmm40" and metric in ("x_w2_aligned", "dist_w2"):
        return False
    return not (target == "gmm40" and metric == "tv" and protocol == "idem")


def _order(keys: Sequence[str], order: Sequence[str]) -> list[str]:
    return sorted(keys, key=lambda k: (order.index(k) if k in order else len(order), k))


# ---------------------------------------------------------------------------------------- cells


@dataclass
class Cell:
    """One (method, target, metric) cell aggregated over seeds."""

    values: list[float]  # final-evaluation values of usable seeds
    n_runs: int  # records found
    n_diverged: int
    n_expected: int

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else float("nan")

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else float("nan")


def fmt_num(v: float, sig: int = 4) -> str:
    """4 significant digits, no exponent for ordinary magnitudes (11.69, 0.701, 109.8, 562.7)."""
    if v is None or not math.isfinite(v):
        return MISSING
    if v == 0:
        return "0"
    mag = math.floor(math.log10(abs(v)))
    if mag >= 6 or mag <= -5:
        return f"{v:.{sig - 1}e}"
    dec = max(0, sig - 1 - mag)
    return f"{v:.{dec}f}"


#: which evaluation of each run a table shows (``harness.scoring``): ``paper`` = the rule of the table's
#: protocol's paper (idem: best val x-W2; bnem: val E-W2 early stopping; boltzbench: last), or one rule
SELECTIONS: tuple[str, ...] = ("paper", *SELECTION_RULE_NAMES)


def selection_rule(selection: str, protocol: str) -> str:
    """The concrete rule (last / idem / bnem) a table of ``protocol`` shows under ``selection``."""
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; valid: {', '.join(SELECTIONS)}")
    return PROTOCOL_RULE.get(protocol, "last") if selection == "paper" else selection


def final_rows(df: pd.DataFrame, rule: str = "last") -> pd.DataFrame:
    """The row of each run that selection ``rule`` (last / idem / bnem) picks (runs without evaluations keep
    their single row; records without a selection fall back to the final evaluation)."""
    if df.empty:
        return df
    col = "is_final" if rule == "last" else f"sel_{rule}"
    if col not in df.columns:
        col = "is_final"
    return df[df[col].fillna(df["is_final"]).astype(bool)].copy()


def expected_cells(grid: str, df: pd.DataFrame) -> tuple[list[str], list[str], int]:
    """(targets, methods, replicates) a grid is expected to cover: from ``harness.grids`` when the grid is
    known (methods = ``methods.PLANNED``), else what the records show."""
    tg = sorted(df["target"].unique()) if not df.empty else []
    mt = sorted(df["method"].unique()) if not df.empty else []
    reps = int(df["replicate"].max()) + 1 if not df.empty else 1
    try:
        from harness import grids
        from methods import PLANNED

        g = grids.get(grid)
        if g.targets is not None:
            tg = list(g.targets)
        else:
            import targets as _t

            tg = _t.names()
        mt = list(PLANNED)
        reps = g.replicates
    except Exception:
        pass
    # external samplers: after the built-in methods, on whichever targets they were scored
    ext = df[df["method"].map(is_external)] if not df.empty else df
    tg = list(dict.fromkeys([*tg, *(sorted(ext["target"].unique()) if not ext.empty else [])]))
    mt = [m for m in _order(mt, METHOD_ORDER) if not is_external(m)]
    # named variants (``bnem@published``) found in the records: right after their method
    found = sorted(df["method"].unique()) if not df.empty else []
    for v in (k for k in found if "@" in k and not is_external(k) and k not in mt):
        base = v.split("@", 1)[0]
        at = [i for i, m in enumerate(mt) if m == base or m.startswith(base + "@")]
        mt.insert((max(at) if at else len(mt) - 1) + 1, v)
    mt += sorted(ext["method"].unique()) if not ext.empty else []
    return _order(tg, TARGET_ORDER), mt, reps


def build_cells(
    fin: pd.DataFrame, protocol: str, tgs: list[str], mts: list[str], reps: int
) -> dict[tuple[str, str, str], Cell]:
    cells = {}
    for t in tgs:
        for m in mts:
            sub = fin[(fin["target"] == t) & (fin["method"] == m)]
            n_div = int((sub["status"] == "diverged").sum()) if not sub.empty else 0
            for k in TABLE_METRICS[protocol]:
                col = METRIC_PREFIX + k
                vals = []
                if col in sub.columns:
                    ok = sub[sub["status"] == "ok"][col].astype(float)
                    vals = [float(v) for v in ok if math.isfinite(v)]
                n_exp = len(sub) if is_external(m) else max(reps, len(sub))  # external: the records there are
                cells[(m, t, k)] = Cell(vals, len(sub), n_div, n_exp)
    return cells


def rank_column(means: dict[str, float], display: dict[str, str]) -> dict[str, int]:
    """Dense rank (1 = best, lower is better) of the *displayed* means, so visually equal values tie."""
    shown = {m: display[m] for m, v in means.items() if math.isfinite(v)}
    distinct = sorted({float(s) for s in shown.values()})
    return {m: distinct.index(float(s)) + 1 for m, s in shown.items()}


def cell_text(c: Cell) -> str:
    if not c.values:
        return DIVERGED if c.n_diverged > 0 and c.n_diverged >= c.n_runs else MISSING
    s = fmt_num(c.mean)
    if len(c.values) > 1:
        s += " ± " + fmt_num(c.std, 2)
    if len(c.values) < c.n_expected:
        s += f" ({len(c.values)}/{c.n_expected})"
    return s


# ---------------------------------------------------------------------------------------- rendering


@dataclass
class Table:
    grid: str
    protocol: str
    columns: list[tuple[str, str]]  # (target, metric)
    methods: list[str]
    text: dict[tuple[str, str, str], str]  # (method, target, metric) -> plain cell text
    rank: dict[tuple[str, str, str], int]
    coverage: str
    footnotes: list[str]
    cost: dict[tuple[str, str], str] = field(default_factory=dict)  # (method, target) -> evaluations text
    selection: str = "last"  # the selection rule of the evaluations shown


def fmt_evals(v: float) -> str:
    """Evaluation counts: exact below 1e5 (12,800), else 3 significant digits (3.01e+07)."""
    if v is None or not math.isfinite(v):
        return MISSING
    return f"{v:,.0f}" if v < 1e5 else f"{v:.2e}"


def cost_cells(fin: pd.DataFrame, tgs: list[str], mts: list[str]) -> dict[tuple[str, str], str]:
    """Energy evaluations per (method, target) over the whole run (training and evaluation sampling), mean
    over the ok/diverged seeds, with how many also needed a gradient: what the MCMC and PT rows are compared
    against (the equal-evals grid gives every method the same training budget)."""
    out: dict[tuple[str, str], str] = {}
    for t in tgs:
        for m in mts:
            sub = fin[(fin["target"] == t) & (fin["method"] == m)] if not fin.empty else fin
            sub = sub[sub["status"].isin(["ok", "diverged"])] if not sub.empty else sub
            col = "total_energy_evals"
            if sub.empty or col not in sub.columns:
                out[(m, t)] = MISSING
                continue
            e = float(sub[col].astype(float).mean())
            g = float(sub["total_grad_evals"].astype(float).mean()) if "total_grad_evals" in sub else 0.0
            out[(m, t)] = fmt_evals(e) + (f" ({fmt_evals(g)} grad)" if g > 0 else "")
    return out


def make_table(df: pd.DataFrame, grid: str, protocol: str, selection: str = "paper") -> Table:
    """Aggregate the records of (grid, protocol) into a Table (ranks, coverage, footnotes), showing the
    evaluation of each run that ``selection`` picks (``SELECTIONS``)."""
    rule = selection_rule(selection, protocol)
    sub = protocol_rows(df[df["grid"] == grid], protocol) if not df.empty else df
    tgs, mts, reps = expected_cells(grid, sub)
    fin = final_rows(sub, rule)
    cells = build_cells(fin, protocol, tgs, mts, reps)
    columns = [(t, k) for t in tgs for k in TABLE_METRICS[protocol] if _metric_defined(protocol, t, k)]
    text = {key: cell_text(c) for key, c in cells.items()}
    rank: dict[tuple[str, str, str], int] = {}
    for t, k in columns:
        means = {m: cells[(m, t, k)].mean for m in mts}
        shown = {m: fmt_num(v) for m, v in means.items()}
        for m, r in rank_column(means, shown).items():
            rank[(m, t, k)] = r
    notes = footnotes(sub, protocol, tgs)
    notes.insert(0, f"Evaluation shown: {SELECTION_RULES[rule]} (selection rule `{rule}`; the test split is "
                 "read only by the final scoring).")
    ext = fin["method"].map(is_external) if not fin.empty else None
    var = fin["method"].map(lambda m: "@" in m and not is_external(m)) if not fin.empty else None
    if ext is not None and (ext.any() or var.any()):  # external samplers and named variants are not grid
        # cells: coverage counts the grid's own (method, target, seed) cells and names the others
        extra = ext | var
        g_tgs, g_mts, _ = expected_cells(grid, sub[~sub["method"].map(lambda m: is_external(m) or "@" in m)])
        coverage = coverage_line(fin[~extra], g_tgs, g_mts, reps)
        n_var, n_ext = int(var.sum()), int(ext.sum())
        if n_var:
            coverage += f" Plus {n_var} named-variant run{'s' if n_var != 1 else ''} (not grid cells)."
        if n_ext:
            coverage += f" Plus {n_ext} external sampler run{'s' if n_ext != 1 else ''} (not grid cells)."
            notes.insert(-1, "`(external)`: a sampler scored from its saved samples with `python -m "
                         "harness.score` (same protocol, sizes, reference splits and metric code as the "
                         "built-in methods; no training budget counted unless self-reported); ranked with "
                         "the built-in methods.")
    else:
        coverage = coverage_line(fin, tgs, mts, reps)
    return Table(
        grid,
        protocol,
        columns,
        mts,
        text,
        rank,
        coverage,
        notes,
        cost_cells(fin, tgs, mts),
        rule,
    )


def coverage_line(fin: pd.DataFrame, tgs: list[str], mts: list[str], reps: int) -> str:
    expected = len(tgs) * len(mts) * reps
    st = fin["status"].value_counts().to_dict() if not fin.empty else {}
    present = sum(st.values())
    ok, div = st.get("ok", 0), st.get("diverged", 0)
    failed = st.get("failed", 0) + st.get("timeout", 0)
    missing = max(0, expected - present)
    return (
        f"Coverage: {expected} expected runs ({len(mts)} methods × {len(tgs)} targets × {reps} seeds) — "
        f"{ok} ok, {div} diverged, {failed} failed/timeout, {missing} missing."
    )


def footnotes(sub: pd.DataFrame, protocol: str, tgs: list[str]) -> list[str]:
    p = hm.PROTOCOL_SPECS.get(protocol)
    notes = []
    if p is not None:
        notes.append(
            f"Protocol `{protocol}`: {p.description}. Lower is better for every column; mean ± std "
            f"over seeds of the evaluation named in note 1."
        )
        sizes = []
        for t in tgs:
            ng, nr = p.sizes.get(t, (None, None))
            s = f"{target_display(t)} {ng} vs {nr}"
            n_al = p.aligned_sizes.get(t) if protocol == "boltzbench" else None
            if not sub.empty and "m_n_generated" in sub.columns:
                used = sub[(sub["target"] == t) & sub["is_final"].astype(bool)]["m_n_generated"].dropna()
                if len(used) and int(used.min()) != ng:
                    lo, hi = int(used.min()), int(used.max())
                    s += f" (records used {lo}" + (f"–{hi})" if hi != lo else ")")
                    n_al = min(n_al, hi) if n_al else n_al
            if n_al:
                s += f"; aligned x-W2 at {n_al} vs {n_al}"
            sizes.append(s)
        notes.append("Sample sizes (generated vs reference): " + "; ".join(sizes) + ".")
        if protocol == "bnem" and "lj55" in tgs:
            notes.append("LJ-55 under `bnem`: 16 vs 16 samples, as published (eval_batch_size 16).")
        if protocol == "asbs":
            notes.append("Under `asbs`, x-W2 is the evaluator's `eq_w2` (Hungarian permutation on the "
                         "unaligned clouds, then Kabsch with reflections; GMM-40: unaligned, ours) and "
                         "dist-W2 is a W2² (no square root), as in facebookresearch/adjoint_samplers.")
        keys = TABLE_METRICS["asbs"] if protocol == "asbs" else ("x_w2", "e_w2", "tv")
        splits = {k: p.splits.get(k, p.default_split) for k in keys}
        notes.append(
            "Reference split per metric: "
            + ", ".join(f"{METRIC_LABELS[k]} vs {v}" for k, v in splits.items())
            + "."
        )
    if not sub.empty and "reference_source" in sub.columns:
        prov = []
        for t in tgs:
            r = sub[sub["target"] == t][["reference_source", "reference_sha256"]].dropna(how="all")
            if len(r):
                src = r["reference_source"].dropna().unique()
                sha = r["reference_sha256"].dropna().unique()
                prov.append(
                    f"{target_display(t)}: {', '.join(map(str, src)) or '?'}"
                    + (f" (sha256 {', '.join(s[:12] for s in map(str, sha))})" if len(sha) else "")
                )
        if prov:
            notes.append("Reference samples: " + "; ".join(prov) + ".")
    floors = []
    fin = final_rows(sub)
    for t in tgs:
        parts = []
        for k in TABLE_METRICS.get(protocol, ()):
            col = f"{METRIC_PREFIX}{k}_floor"
            if not fin.empty and col in fin.columns:
                v = fin[fin["target"] == t][col].astype(float)
                v = v[np.isfinite(v)]
                if len(v):
                    parts.append(f"{METRIC_LABELS[k]} {fmt_num(float(v.mean()))}")
        if parts:
            floors.append(f"{target_display(t)}: " + ", ".join(parts))
    if floors:
        notes.append("Noise floors (reference val vs test split, same sizes): " + "; ".join(floors) + ".")
    notes.append(
        f"`{DIVERGED}`: every seed diverged; `{MISSING}`: missing, failed or timed out; `(k/n)`: "
        "only k of n seeds usable."
    )
    return notes


def _decorate_md(s: str, r: int | None) -> str:
    if r == 1:
        return f"**{s}**"
    if r == 2:
        return f"<u>{s}</u>"
    return s


def _latex_escape(s: str) -> str:
    return (
        s.replace("\\", r"\textbackslash{}")
        .replace("&", r"\&")
        .replace("%", r"\%")
        .replace("_", r"\_")
        .replace("#", r"\#")
        .replace("±", r"$\pm$")
        .replace("—", "---")
        .replace("–", "--")
        .replace("×", r"$\times$")
        .replace("`", "")
    )


def _decorate_tex(s: str, r: int | None) -> str:
    s = _latex_escape(s)
    if r == 1:
        return rf"\textbf{{{s}}}"
    if r == 2:
        return rf"\underline{{{s}}}"
    return s


def render_markdown(tb: Table) -> str:
    headers = ["Method"] + [f"{target_display(t)} {METRIC_LABELS[k]}" for t, k in tb.columns]
    rows = []
    for m in tb.methods:
        rows.append(
            [method_display(m)]
            + [_decorate_md(tb.text[(m, t, k)], tb.rank.get((m, t, k))) for t, k in tb.columns]
        )
    body = tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True) if tb.columns else ""
    out = [f"### {tb.grid} grid — `{tb.protocol}` protocol, selection `{tb.selection}`", "", body, "",
           tb.coverage, ""]
    out += [f"{i + 1}. {n}" for i, n in enumerate(tb.footnotes)]
    tgs = list(dict.fromkeys(t for t, _ in tb.columns))
    if tb.cost and tgs:
        rows = [[method_display(m)] + [tb.cost.get((m, t), MISSING) for t in tgs] for m in tb.methods]
        head = "#### Cost — energy evaluations over the run (of which with gradient), mean over seeds"
        out += ["", head, ""]
        out.append(tabulate(rows, headers=["Method"] + [target_display(t) for t in tgs], tablefmt="github",
                            disable_numparse=True))
    return "\n".join(out) + "\n"


def render_latex(tb: Table) -> str:
    """booktabs table: a grouped header (targets) over the metric names."""
    ncol = len(tb.columns)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        rf"\begin{{tabular}}{{l{'c' * ncol}}}",
        r"\toprule",
    ]
    groups: list[tuple[str, int]] = []
    for t, _ in tb.columns:
        if groups and groups[-1][0] == t:
            groups[-1] = (t, groups[-1][1] + 1)
        else:
            groups.append((t, 1))
    head = ["Method"] + [
        rf"\multicolumn{{{n}}}{{c}}{{{_latex_escape(target_display(t))}}}" for t, n in groups
    ]
    lines.append(" & ".join(head) + r" \\")
    rules, col = [], 2
    for _, n in groups:
        rules.append(rf"\cmidrule(lr){{{col}-{col + n - 1}}}")
        col += n
    lines.append(" ".join(rules))
    lines.append(" & ".join([""] + [METRIC_LATEX[k] for _, k in tb.columns]) + r" \\")
    lines.append(r"\midrule")
    for m in tb.methods:
        cells = [_decorate_tex(tb.text[(m, t, k)], tb.rank.get((m, t, k))) for t, k in tb.columns]
        lines.append(" & ".join([_latex_escape(method_display(m))] + cells) + r" \\")
    lines.append(r"\bottomrule")
    lines.append(r"\end{tabular}")
    tgs = list(dict.fromkeys(t for t, _ in tb.columns))
    if tb.cost and tgs:
        lines += [r"\par\medskip", rf"\begin{{tabular}}{{l{'r' * len(tgs)}}}", r"\toprule"]
        lines.append(" & ".join(["Energy evaluations (with gradient)"]
                                + [_latex_escape(target_display(t)) for t in tgs]) + r" \\")
        lines.append(r"\midrule")
        for m in tb.methods:
            cells = [_latex_escape(tb.cost.get((m, t), MISSING)) for t in tgs]
            lines.append(" & ".join([_latex_escape(method_display(m))] + cells) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
    cap = _latex_escape(f"{tb.grid} grid, {tb.protocol} protocol, selection {tb.selection}. {tb.coverage} "
                        + " ".join(tb.footnotes))
    lines.append(rf"\caption{{{cap}}}")
    lines.append(rf"\label{{tab:{tb.grid}-{tb.protocol}}}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- reproduction


#: where the reproduction table takes each cell from: the paper-settings records, else the cpu ones
REPRODUCTION_GRIDS: tuple[str, ...] = ("paper", "full", "cpu")


def _repro_keys(sub: pd.DataFrame, p: Any) -> list[tuple[str, str]]:
    """(method key, target key) pairs whose records stand beside published number ``p``: our default method
    on the published target first (always, even without records), then the named variants of the method
    (``bnem@published``) and the energy variants of the target (``dw4-bnem``) that have records."""
    import targets as _t

    pairs = [(p.method, p.target)]
    if sub.empty:
        return pairs
    for m, t in sorted(set(zip(sub["method"], sub["target"]))):
        same_m = m == p.method or m.startswith(p.method + "@")
        same_t = _t.data_key(t) == p.target
        if same_m and same_t and (m, t) not in pairs:
            pairs.append((m, t))
    return pairs


def reproduction_rows(df: pd.DataFrame, grid: str | None, protocol: str,
                      selection: str = "paper") -> list[dict[str, Any]]:
    """Our means (the evaluation ``selection`` picks) beside every published number of ``protocol``, with
    ours / published: one row for our default configuration and one per named variant with records (the
    Variant column). ``grid`` None: each cell from the first of ``REPRODUCTION_GRIDS`` that has records of
    it (the row says which)."""
    rule = selection_rule(selection, protocol)
    sub = final_rows(protocol_rows(df, protocol), rule) if not df.empty else df
    rows = []
    for p in published_for(protocol):
        for key, tkey in _repro_keys(sub, p):
            ours_vals: list[float] = []
            status = "missing"
            used_grid = grid or MISSING
            if not sub.empty:
                s = sub[(sub["target"] == tkey) & (sub["method"] == key)]
                if grid is not None:
                    s = s[s["grid"] == grid]
                else:
                    for g in REPRODUCTION_GRIDS:
                        if (s["grid"] == g).any():
                            s, used_grid = s[s["grid"] == g], g
                            break
                    else:
                        s = s.iloc[0:0]
                col = METRIC_PREFIX + p.metric
                if len(s):
                    status = "diverged" if (s["status"] == "diverged").all() else "ok"
                    if col in s.columns:
                        ours_vals = [float(v) for v in s[s["status"] == "ok"][col] if math.isfinite(float(v))]
            ours = float(np.mean(ours_vals)) if ours_vals else float("nan")
            pub = p.value if p.value is not None else float("nan")
            variant = key.split("@", 1)[1] if "@" in key else "ours (default)"
            note = p.note
            if tkey != p.target:
                note = (note + "; " if note else "") + f"run on {tkey} (energy variant: not comparable)"
            rows.append(
                {
                    "method": p.method,
                    "target": p.target,
                    "metric": p.metric,
                    "variant": variant if tkey == p.target else f"{variant}, {tkey}",
                    "published": DIVERGED
                    if p.value is None
                    else fmt_num(pub) + (f" ± {fmt_num(p.std, 2)}" if p.std else ""),
                    "ours": (
                        fmt_num(ours)
                        + (f" ± {fmt_num(float(np.std(ours_vals, ddof=1)), 2)}" if len(ours_vals) > 1 else "")
                    )
                    if ours_vals
                    else (DIVERGED if status == "diverged" else MISSING),
                    "ratio": fmt_num(ours / pub, 3)
                    if ours_vals and math.isfinite(pub) and pub != 0 else MISSING,
                    "seeds": len(ours_vals),
                    "grid": used_grid,
                    "selection": rule if method_trains(key) else "last (sampling-only)",
                    "source": p.source,
                    "note": note,
                }
            )
    return rows


def render_reproduction(rows: list[dict[str, Any]], grid: str | None, protocol: str, fmt: str) -> str:
    headers = ["Method", "Target", "Metric", "Variant", "Published", "Ours", "Ours / published", "Seeds",
               "Grid", "Selection", "Note"]
    body = [
        [
            method_display(r["method"]),
            target_display(r["target"]),
            METRIC_LABELS[r["metric"]],
            r.get("variant", "ours (default)"),
            r["published"],
            r["ours"],
            r["ratio"],
            str(r["seeds"]),
            r.get("grid", grid),
            r.get("selection", "last"),
            r["note"],
        ]
        for r in rows
    ]
    sources = sorted({r["source"] for r in rows})
    if fmt == "md":
        out = [
            f"### Paper reproduction — {grid or ' / '.join(REPRODUCTION_GRIDS)} grid, `{protocol}` protocol",
            "",
            tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)
            if body
            else "(no published numbers for this protocol)",
            "",
            "Sources: " + "; ".join(sources) + ". Published numbers are copied from "
            "../shared/reference notes (harness/published.py); ours are means over seeds, under the "
            "same-named protocol, of the evaluation the Selection column's rule picks (on the val split; "
            "`idem`: best val x-W2, `bnem`: val E-W2 early stopping, `last`: the final one; MCMC and PT "
            "train no model, so every rule takes their final chain state); Grid says "
            "which records a cell comes from (`paper` where they exist, else `cpu`).",
        ]
        return "\n".join(out) + "\n"
    cap = f"Paper reproduction, {protocol} protocol. Sources: " + "; ".join(sources)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        r"\begin{tabular}{llllccccccl}",
        r"\toprule",
        " & ".join(headers) + r" \\",
        r"\midrule",
    ]
    for b in body:
        lines.append(" & ".join(_latex_escape(c) for c in b) + r" \\")
    lines += [
        r"\bottomrule",
        r"\end{tabular}",
        rf"\caption{{{_latex_escape(cap)}}}",
        r"\end{table}",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- CLI


def write_tables(
    df: pd.DataFrame, out: Path, grid: str | None = None, protocol: str | None = None,
    selection: str = "paper",
) -> list[Path]:
    """Write every (grid, protocol) table (+ reproduction tables) under ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if df.empty:
        p = out / "README.md"
        p.write_text("No run records found: run `python -m harness.run --grid smoke` first.\n")
        return [p]
    pairs = df[["grid", "protocol"]].drop_duplicates().itertuples(index=False)
    for g, pr in sorted(pairs):
        if (grid and g != grid) or (protocol and pr != protocol) or pr not in TABLE_METRICS:
            continue
        tb = make_table(df, g, pr, selection)
        for ext, text in (("md", render_markdown(tb)), ("tex", render_latex(tb))):
            p = out / f"{g}_{pr}.{ext}"
            p.write_text(text)
            written.append(p)
        if published_for(pr):
            rows = reproduction_rows(df, g, pr, selection)
            for ext in ("md", "tex"):
                p = out / f"{g}_{pr}_reproduction.{ext}"
                p.write_text(render_reproduction(rows, g, pr, ext))
                written.append(p)
    if grid is None:  # the reproduction table: every cell from paper records where they exist, else cpu
        for pr in sorted(set(df["protocol"])):
            if (protocol and pr != protocol) or not published_for(pr):
                continue
            rows = reproduction_rows(df, None, pr, selection)
            for ext in ("md", "tex"):
                p = out / f"reproduction_{pr}.{ext}"
                p.write_text(render_reproduction(rows, None, pr, ext))
                written.append(p)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.tables", description=__doc__.split("\n")[0])
    ap.add_argument("--results", default="results/runs", help="records root (default results/runs)")
    ap.add_argument("--out", default="results/tables", help="tables directory (default results/tables)")
    ap.add_argument(
        "--figures", default="results/figures", help="figures directory (default results/figures)"
    )
    ap.add_argument("--grid", default=None, help="only this grid")
    ap.add_argument("--protocol", default=None, help=f"only this protocol ({', '.join(hm.PROTOCOLS)})")
    ap.add_argument("--selection", default="paper", choices=SELECTIONS,
                    help="which evaluation of each run the tables show: paper = the rule of the table's "
                    "protocol's paper (idem: best val x-W2, bnem: val E-W2 early stopping, boltzbench: last)")
    ap.add_argument("--no-figures", action="store_true", help="tables only")
    a = ap.parse_args(argv)
    if a.protocol is not None and a.protocol not in hm.PROTOCOLS:
        ap.error(f"unknown protocol {a.protocol!r}; valid protocols: {', '.join(hm.PROTOCOLS)}")
    df = load_records(a.results)
    for path, why in df.attrs.get("skipped", []):
        print(f"skipped {path}: {why}", file=sys.stderr)
    if a.grid is not None and not df.empty and a.grid not in set(df["grid"]):
        print(
            f"no records for grid {a.grid!r} under {a.results}; grids found: "
            f"{', '.join(sorted(set(df['grid']))) or '(none)'}",
            file=sys.stderr,
        )
    written = write_tables(df, Path(a.out), a.grid, a.protocol, a.selection)
    if not a.no_figures:
        from harness.figures import write_figures

        written += write_figures(df, Path(a.figures), a.grid, a.protocol)
    n_runs = df["run_id"].nunique() if not df.empty else 0
    print(f"{n_runs} runs from {a.results}; wrote {len(written)} files")
    for p in written:
        print(f"  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
