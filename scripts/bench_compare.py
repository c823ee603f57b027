#!/usr/bin/env python
"""Compare a pytest-benchmark JSON (``make bench`` writes results/bench.json) against a stored baseline.

    python scripts/bench_compare.py [CURRENT] [BASELINE] [--stat min] [--factor 1.5] [--fail]
                                    [--ratio SLOW FAST ...] [--extra]

Prints, per benchmark present in both files, the baseline and current times and the ratio current/baseline
(> 1: slower now). Ratios above ``--factor`` are flagged REGRESSION, below 1/factor "faster". Benchmarks in
only one file are listed. ``--fail`` exits 1 when any regression is flagged. ``--ratio A B`` prints
time(A)/time(B) inside the current file (the "X is k× faster than Y, measured in one run" numbers); A and B
are substrings of benchmark names that must each match exactly one benchmark. ``--extra`` prints, from the
current file, what benchmarks store beside their time: side-by-side ratios measured inside one benchmark
(``ratio``, e.g. bench_egnn.py's edge-list / ours, interleaved) and the peak memory of training steps
(``peak_rss_mb``).

A ratio across files is only meaningful on the same machine and set-up: differences in the machine info
(host, CPU, torch version and threads, device, GPU) are printed as a warning first.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATS = ("min", "median", "mean", "max")
MACHINE_KEYS = ("node", "cpu", "python_version", "torch", "torch_threads", "bench_device", "gpu")


@dataclass
class Row:
    """One benchmark's comparison; times in seconds (NaN where absent)."""

    name: str
    baseline: float
    current: float
    ratio: float
    verdict: str  # "ok", "REGRESSION", "faster", "new", "gone"


def load(path: str | Path) -> dict[str, Any]:
    """Read a pytest-benchmark JSON; ValueError with the path when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read benchmark JSON {str(path)!r}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError(f"{str(path)!r} is not a pytest-benchmark JSON (no 'benchmarks' list)")
    return data


def times(data: dict[str, Any], stat: str = "median") -> dict[str, float]:
    """fullname -> the chosen statistic (seconds)."""
    if stat not in STATS:
        raise ValueError(f"unknown stat {stat!r}; valid: {', '.join(STATS)}")
    return {b.get("fullname") or b["name"]: float(b["stats"][stat]) for b in data["benchmarks"]}


def compare(
    current: dict[str, Any], baseline: dict[str, Any], stat: str = "median", factor: float = 1.5
) -> list[Row]:
    """Rows for every benchmark in either file, sorted by name."""
    if not factor > 1:
        raise ValueError(f"factor must be > 1, got {factor}")
    cur, base = times(current, stat), times(baseline, stat)
    rows = []
    for name in sorted(set(cur) | set(base)):
        c, b = cur.get(name, math.nan), base.get(name, math.nan)
        if name not in base:
            rows.append(Row(name, b, c, math.nan, "new"))
        elif name not in cur:
            rows.append(Row(name, b, c, math.nan, "gone"))
        else:
            r = c / b if b > 0 else math.inf
            verdict = "REGRESSION" if r > factor else ("faster" if r < 1 / factor else "ok")
            rows.append(Row(name, b, c, r, verdict))
    return rows


def machine_differences(current: dict[str, Any], baseline: dict[str, Any]) -> list[str]:
    """'key: baseline -> current' for the machine-info keys that differ (cpu = the CPU's brand string)."""

    def get(data: dict[str, Any], k: str) -> Any:
        mi = data.get("machine_info", {}) or {}
        return (mi.get("cpu", {}) or {}).get("brand_raw") if k == "cpu" else mi.get(k)

    return [
        f"{k}: {get(baseline, k)} -> {get(current, k)}"
        for k in MACHINE_KEYS
        if get(baseline, k) != get(current, k)
    ]


def within_ratio(data: dict[str, Any], slow: str, fast: str, stat: str = "median") -> tuple[str, str, float]:
    """time(slow)/time(fast) inside one file; each pattern must match exactly one benchmark name."""
    t = times(data, stat)

    def one(pat: str) -> str:
        hits = [n for n in t if pat in n]
        if len(hits) != 1:
            raise ValueError(
                f"pattern {pat!r} matches {len(hits)} benchmarks ({', '.join(hits[:5]) or 'none'})"
            )
        return hits[0]

    a, b = one(slow), one(fast)
    return a, b, t[a] / t[b]


EXTRA_KEYS = ("ratio", "edge_list_min_s", "ours_min_s", "peak_rss_mb", "cuda_peak_mb")


def extra_rows(data: dict[str, Any], stat: str = "min") -> list[list[str]]:
    """[name, time, ratio, edge-list s, ours s, peak RSS MiB, CUDA peak MiB] for benchmarks whose extra_info
    holds any of EXTRA_KEYS."""
    rows = []
    for b in data["benchmarks"]:
        ex = b.get("extra_info") or {}
        if not any(k in ex for k in EXTRA_KEYS):
            continue

        def num(k: str, fmt: str, ex: dict[str, Any] = ex) -> str:
            v = ex.get(k)
            return format(float(v), fmt) if isinstance(v, (int, float)) else "—"

        rows.append([b.get("fullname") or b["name"], _fmt_s(float(b["stats"][stat])), num("ratio", ".2f"),
                     num("edge_list_min_s", ".4g"), num("ours_min_s", ".4g"), num("peak_rss_mb", ".0f"),
                     num("cuda_peak_mb", ".0f")])
    return rows


def render_extra(data: dict[str, Any], stat: str = "min") -> str:
    from tabulate import tabulate

    return tabulate(extra_rows(data, stat),
                    headers=["benchmark", stat, "ratio", "edge-list s", "ours s", "peak RSS MiB", "CUDA MiB"],
                    tablefmt="pipe", disable_numparse=True)


def _fmt_s(x: float) -> str:
    if not math.isfinite(x):
        return "—"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x / 1e-9:.3g} ns"


def render(rows: Sequence[Row]) -> str:
    from tabulate import tabulate

    body = [
        [
            r.name,
            _fmt_s(r.baseline),
            _fmt_s(r.current),
            f"{r.ratio:.2f}" if math.isfinite(r.ratio) else "—",
            r.verdict,
        ]
        for r in rows
    ]
    return tabulate(
        body,
        headers=["benchmark", "baseline", "current", "current/baseline", "verdict"],
        tablefmt="pipe",
        disable_numparse=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("current", nargs="?", default="results/bench.json")
    p.add_argument("baseline", nargs="?", default="results/bench_baseline.json")
    p.add_argument("--stat", default="min", choices=STATS, help="statistic compared (default min)")
    p.add_argument("--factor", type=float, default=1.5, help="flag ratios above this (default 1.5)")
    p.add_argument("--fail", action="store_true", help="exit 1 when a regression is flagged")
    p.add_argument(
        "--ratio",
        nargs=2,
        action="append",
        metavar=("SLOW", "FAST"),
        default=[],
        help="print time(SLOW)/time(FAST) within the current file (repeatable)",
    )
    p.add_argument("--extra", action="store_true",
                   help="print in-benchmark ratios and peak memory from the current file")
    a = p.parse_args(argv)
    try:
        cur = load(a.current)
        for slow, fast in a.ratio:
            n1, n2, r = within_ratio(cur, slow, fast, a.stat)
            print(f"{n1} / {n2} = {r:.2f} ({a.stat}, one run: {a.current})")
        if a.extra:
            print(render_extra(cur, a.stat))
        if (a.ratio or a.extra) and not Path(a.baseline).exists():
            return 0
        base = load(a.baseline)
        diffs = machine_differences(cur, base)
        if diffs:
            print("WARNING: different machine or set-up, ratios are not like for like: " + "; ".join(diffs))
        rows = compare(cur, base, a.stat, a.factor)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(render(rows))
    n = {v: sum(r.verdict == v for r in rows) for v in ("REGRESSION", "faster", "new", "gone")}
    print(
        f"\n{n['REGRESSION']} regression(s) over {a.factor}× ({a.stat}); {n['faster']} faster;"
        f" {n['new']} new; {n['gone']} gone"
    )
    return 1 if a.fail and n["REGRESSION"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
