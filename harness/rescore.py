"""Re-score the saved samples of existing run records without retraining: ``python -m harness.rescore``.

    python -m harness.rescore --results DIR [--protocol idem|bnem|boltzbench|asbs|all ...] [--grid NAME]
                              [--dry-run]

For every ``record.json`` under ``DIR`` (optionally one grid), each evaluation whose samples are saved beside
the record (the selected ones and the last: ``samples.npz``, ``eval_<k>.npz``) is scored again under the
given protocols (default all) with the same code path as the final scoring of a run
(``harness.scoring.score_evaluations``): after a metric fix or a new reference file. The record's
``scoring`` block says when and against which reference files (source, file, sha256) each protocol scored
it. A sampling-only method's record (MCMC, PT: ``Method.trains`` False) written before that rule had its
selection taken from val like a trained model's; it is re-selected to the final evaluation, which needs no
samples (the scores of every evaluation are in the record). Atomic (temp file + rename) and idempotent: a
record whose scores, reference files and selection are unchanged is not rewritten. Evaluations whose
samples were not kept keep their stored scores (reported).
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness import metrics, scoring
from harness.records import SCHEMA_VERSION, RunRecord, iter_record_paths


def _same(a: Any, b: Any) -> bool:
    """Equality that treats NaN as equal to NaN (scores hold NaN for undefined metrics)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    return a == b


def rescore_record(path: str | Path, protocols: Sequence[str] | None = None,
                   write: bool = True) -> dict[str, Any]:
    """Re-score one record in place; returns a summary: ``changed`` (bool), ``scored`` (evaluation
    indices), ``missing`` (indices without saved samples), ``unscorable`` (protocol -> reason)."""
    import targets

    path = Path(path)
    rec = RunRecord.read(path)
    run_dir = path.parent
    target = targets.get(rec.spec.target)
    evaluations = copy.deepcopy(rec.evaluations)
    if not evaluations:
        return {"path": str(path), "changed": False, "rescored": False, "reselected": False, "scored": [],
                "missing": [], "unscorable": {}}
    plan = scoring.eval_plan(rec.spec, target)
    selection = rec.selection or scoring.select(evaluations)
    reselected = False
    if not scoring.method_trains(rec.spec.method):  # records written before sampling-only selection
        fresh = scoring.select(evaluations, trains=False)
        stored = {k: v for k, v in selection.items() if k != "reselected_at"}
        reselected = not _same(fresh, stored)
        if reselected:
            selection = fresh
    have = [k for k in range(len(evaluations)) if scoring.eval_samples_path(run_dir, evaluations, k)]
    missing = [k for k in range(len(evaluations)) if k not in have]
    protos = list(protocols) if protocols else list(scoring.SCORE_PROTOCOLS)
    new_scoring = scoring.score_evaluations(rec.spec, run_dir, target, evaluations, plan, selection, protos)
    merged = dict(rec.scoring or {})
    old_protocols = dict(merged.get("protocols") or {})
    changed = not _same(evaluations, rec.evaluations)
    for p in protos:
        if not _same(old_protocols.get(p), new_scoring["protocols"].get(p)):
            changed = True
        old_protocols[p] = new_scoring["protocols"][p]
    for k in ("test_reference", "splits"):
        if not _same(merged.get(k), new_scoring[k]):
            changed = True
        merged[k] = new_scoring[k]
    merged["protocols"] = old_protocols
    if reselected and write:  # needs no samples: the scores of every evaluation are in the record
        rec.selection = {**selection, "reselected_at": new_scoring["scored_at"]}
    if changed and write:
        merged["scored_at"] = new_scoring["scored_at"]
        merged["rescored"] = {"at": new_scoring["scored_at"], "protocols": protos}
        rec.evaluations = evaluations
        rec.scoring = merged
        rec.selection = rec.selection or selection  # schema-1 records gain theirs
        if "error" not in (rec.reference or {}):
            rec.reference = {**new_scoring["test_reference"], "splits": new_scoring["splits"]}
        rec.schema_version = SCHEMA_VERSION
    if (changed or reselected) and write:
        rec.write(path)
    unscorable = {p: v["unscorable"] for p, v in new_scoring["protocols"].items() if "unscorable" in v}
    return {"path": str(path), "changed": changed or reselected, "rescored": changed,
            "reselected": reselected, "scored": have, "missing": missing, "unscorable": unscorable}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.rescore", description=__doc__.split("\n")[0])
    ap.add_argument("--results", default="results/runs", help="records root (default: %(default)s)")
    ap.add_argument("--protocol", action="append", default=None,
                    help=f"a protocol to re-score ({', '.join(metrics.PROTOCOLS)}, or all; repeatable; "
                    "default all)")
    ap.add_argument("--grid", default=None, help="only records of this grid")
    ap.add_argument("--dry-run", action="store_true", help="score, report, write nothing")
    a = ap.parse_args(argv)
    protos: list[str] = []
    for p in a.protocol or ["all"]:
        for q in p.split(","):
            if q == "all":
                protos += list(metrics.PROTOCOLS)
            elif q in metrics.PROTOCOLS:
                protos.append(q)
            else:
                ap.error(f"unknown protocol {q!r}; valid: {', '.join(metrics.PROTOCOLS)}, all")
    protos = list(dict.fromkeys(protos))
    root = Path(a.results)
    if not root.exists():
        ap.error(f"results directory {root} does not exist")
    paths = iter_record_paths(root)
    n_changed = n_failed = 0
    for p in paths:
        try:
            rec = RunRecord.read(p)
        except Exception as e:
            print(f"skipped {p}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        if a.grid and rec.spec.grid != a.grid:
            continue
        try:
            r = rescore_record(p, protos, write=not a.dry_run)
        except Exception as e:
            n_failed += 1
            print(f"FAILED {p}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        n_changed += r["changed"]
        what = "re-scored" if r["rescored"] else "unchanged scores"
        if r["reselected"]:
            what += "; re-selected (sampling-only method: the final evaluation)"
        extra = f"; no saved samples for evaluations {r['missing']}" if r["missing"] else ""
        extra += "".join(f"; {q} unscorable: {why}" for q, why in r["unscorable"].items())
        print(f"{rec.spec.cell_id}: {what} ({len(r['scored'])} evaluations){extra}")
    verb = "would change" if a.dry_run else "changed"
    print(f"{len(paths)} records under {root}; {verb} {n_changed}; failed {n_failed}")
    return 1 if n_failed else 0


if __name__ == "__main__":
    sys.exit(main())
