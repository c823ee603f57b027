"""Scoring a run's evaluations under every protocol, and choosing among them by the papers' rules.

A run is evaluated at a few budget fractions. While it trains, each evaluation saves its samples
(``eval_<k>.npz``) and computes only **val-split** selection metrics (``harness.metrics.selection_metrics``:
DEM's ``val/2-Wasserstein`` and ``val/energy_w2``). The **test split is read once, by the final scoring**
(``final_scoring``), after the last optimiser step: every saved evaluation is scored under every protocol
(``idem``, ``bnem``, ``boltzbench``, ``asbs``), one block per protocol in ``evaluation["scores"]``;
``metrics`` stays the block of the run's own protocol. Bootstrap intervals are computed for the evaluations a
selection rule picks (the others get point values and noise floors), which keeps the scoring of intermediate
evaluations cheap.

Selection rules (``select``), all on the val split:

``last``   the final evaluation (what the harness reported before; our default for ``boltzbench``; ``asbs``:
           the AS / ASBS code keeps no selection, so their tables' evaluation is taken to be the last).
``idem``   the evaluation with the lowest val x-W2: DEM's ``ModelCheckpoint(monitor="val/2-Wasserstein")``,
           ``trainer.test`` on the best checkpoint (jarridrb/DEM ``configs/callbacks/model_checkpoint.yaml``,
           ``dem/train.py``).
``bnem``   early stopping on val E-W2 with patience ``BNEM_PATIENCE`` evaluations and ``min_delta`` 0
           (tonyauyeung/BNEM ``configs/callbacks/early_stopping.yaml``, monitor ``val/energy_w2`` in its
           NEM/BNEM experiments); the evaluation at the stopping point is tested (BNEM's callbacks comment out
           ``model_checkpoint``, so Lightning tests the last weights). The published code computes its
           ``val/energy_w2`` against *test* samples; we use the val split.

``PROTOCOL_RULE`` names the rule each protocol's paper applied; the tables show that rule unless told
otherwise, and name it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness import metrics
from harness.records import PROTOCOL_RULE, RunSpec

__all__ = ["PROTOCOL_RULE", "SELECTION_RULES", "EvalPlan", "UnscorableCellError", "check_scorable",
           "eval_plan", "final_scoring", "method_trains", "score_evaluations", "select", "tidy_eval_samples"]

SAMPLES_NAME = "samples.npz"
#: every evaluation is scored under these
SCORE_PROTOCOLS: tuple[str, ...] = metrics.PROTOCOLS
#: BNEM's EarlyStopping patience (checks without improvement); min_delta 0
BNEM_PATIENCE = 10
#: what each rule picks (stored in every record's ``selection.rules`` and quoted by the tables)
SELECTION_RULES: dict[str, str] = {
    "last": "the final evaluation of each run",
    "idem": "each run's evaluation with the lowest val-split x-W2 (DEM's checkpoint selection)",
    "bnem": f"each run's evaluation at the point where early stopping on val-split E-W2 (patience "
    f"{BNEM_PATIENCE}, BNEM) stops it, else the final one",
}
#: stored in ``selection.note`` of a sampling-only method's record (``Method.trains`` False: MCMC, PT)
NO_MODEL_NOTE = ("sampling-only method (no model to select): every rule takes the final evaluation, the "
                 "chains' state at the end of the budget")


class UnscorableCellError(ValueError):
    """The cell's own protocol cannot score it (a reference smaller than the protocol's size): refused
    before it trains; the message names the fix."""


def eval_file(k: int) -> str:
    """File name of evaluation ``k``'s samples inside the run directory."""
    return f"eval_{k:03d}.npz"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class EvalPlan:
    """What a cell's evaluations sample and which protocols can score them."""

    n_generate: int  # samples drawn per evaluation
    unscorable: dict[str, str] = field(default_factory=dict)  # protocol -> reason
    refusal: str | None = None  # set when the cell's own protocol cannot score it (reference too small)

    def scorable(self) -> list[str]:
        return [p for p in SCORE_PROTOCOLS if p not in self.unscorable]


def eval_plan(spec: RunSpec, target: Any) -> EvalPlan:
    """The evaluation plan of a cell: sample as many configurations as the largest scorable protocol needs
    (or ``spec.n_eval_samples``); a protocol whose reference is too small is left out with its reason; the
    cell is refused when that protocol is its own. A target without reference files at all still trains
    (its evaluations carry no metrics and say why)."""
    unscorable: dict[str, str] = {}
    missing_refs = False
    for p in SCORE_PROTOCOLS:
        used = metrics.references_used(target, p)
        if any("error" in info for info in used.values()):
            missing_refs = True
        reason = metrics.scorable(target, p, spec.n_eval_samples)
        if reason is not None:
            unscorable[p] = reason
    refusal = None
    if spec.protocol in unscorable and not missing_refs:
        refusal = (f"cell {spec.cell_id} cannot be scored under its protocol: {unscorable[spec.protocol]}")
    if spec.n_eval_samples is not None:
        n = int(spec.n_eval_samples)
    else:
        sizes = [metrics.eval_sizes(p, target.name)[0] for p in SCORE_PROTOCOLS if p not in unscorable]
        n = max(sizes) if sizes else metrics.eval_sizes(spec.protocol, target.name)[0]
    return EvalPlan(n_generate=int(n), unscorable=unscorable, refusal=refusal)


def check_scorable(spec: RunSpec) -> str | None:
    """None when the cell can be scored under its protocol, else the reason (for launch-time refusal)."""
    import targets

    return eval_plan(spec, targets.get(spec.target)).refusal


# ============================================================================================ selection


def method_trains(method: str) -> bool:
    """``Method.trains`` of a registry key (``KEY@VARIANT`` too); unknown keys count as trained."""
    import methods

    try:
        return bool(methods.get(method).trains)
    except KeyError:
        return True


def _val(ev: dict[str, Any], key: str) -> float:
    v = (ev.get("val") or {}).get(key)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.inf
    return f if math.isfinite(f) else math.inf


def select(evaluations: list[dict[str, Any]], patience: int = BNEM_PATIENCE,
           trains: bool = True) -> dict[str, Any]:
    """Indices of the evaluations each rule picks (``SELECTION_RULES``), from their val blocks only.
    Evaluations without val metrics (old records, no reference) fall back to the last one; so does every
    rule for a method that trains nothing (``trains=False``: MCMC, PT; see ``Method.trains``)."""
    n = len(evaluations)
    if n == 0:
        return {}
    last = n - 1
    if not trains:
        return {"index": {"last": last, "idem": last, "bnem": last}, "bnem_stopped_at": None,
                "bnem_patience": patience, "rules": dict(SELECTION_RULES), "note": NO_MODEL_NOTE}
    have_val = any(math.isfinite(_val(e, "val_x_w2")) for e in evaluations)
    idem = min(range(n), key=lambda k: (_val(evaluations[k], "val_x_w2"), k)) if have_val else last
    # BNEM: EarlyStopping(mode=min, min_delta=0, patience): stop after `patience` checks without improvement
    best, wait, stop = math.inf, 0, None
    for k, e in enumerate(evaluations):
        v = _val(e, "val_e_w2")
        if v < best:
            best, wait = v, 0
        else:
            wait += 1
            if wait >= patience:
                stop = k
                break
    bnem = stop if stop is not None else last
    if not any(math.isfinite(_val(e, "val_e_w2")) for e in evaluations):
        bnem = last
    return {
        "index": {"last": last, "idem": idem, "bnem": bnem},
        "bnem_stopped_at": stop,
        "bnem_patience": patience,
        "rules": dict(SELECTION_RULES),
    }


# ============================================================================================ scoring


def _metric_opts(spec: RunSpec) -> dict[str, Any]:
    from harness import grids

    g = grids.GRIDS.get(spec.grid)
    return dict(g.metric_opts) if g is not None else {}


def evaluate_metrics(samples: torch.Tensor, reference: dict[str, Any], target: Any, protocol: str,
                     **opts: Any) -> dict[str, Any]:
    """``harness.metrics.evaluate`` (a seam: the harness tests put a fast stand-in here)."""
    return metrics.evaluate(samples, reference, target, protocol, **opts)


def _clean(d: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items()}


def _references(target: Any, n_ref: int) -> dict[str, Any]:
    refs = {"test": target.reference("test", n_ref)}
    # an absent val split: evaluate falls back to test for the val metrics and flags it (val_fallback)
    with contextlib.suppress(FileNotFoundError, ValueError):
        refs["val"] = target.reference("val", n_ref)
    return refs


def eval_samples_path(run_dir: Path, evaluations: list[dict[str, Any]], k: int) -> Path | None:
    """The saved samples of evaluation ``k`` (the last one may have been renamed to samples.npz)."""
    f = evaluations[k].get("samples_file")
    if f and (run_dir / f).exists():
        return run_dir / f
    if k == len(evaluations) - 1 and (run_dir / SAMPLES_NAME).exists():
        return run_dir / SAMPLES_NAME
    return None


def score_evaluations(
    spec: RunSpec, run_dir: Path, target: Any, evaluations: list[dict[str, Any]], plan: EvalPlan,
    selection: dict[str, Any], protocols: list[str] | None = None,
) -> dict[str, Any]:
    """Score every evaluation with saved samples under ``protocols`` (default: every scorable one), in place
    (``scores[protocol]``; ``metrics`` = the run's own protocol's block). Returns the scoring provenance."""
    chosen = set((selection.get("index") or {}).values())
    opts = _metric_opts(spec)
    unscorable = dict(plan.unscorable)
    refs: dict[int, dict[str, Any]] = {}
    for p in protocols or list(SCORE_PROTOCOLS):
        n_ref = int(spec.n_eval_samples) if spec.n_eval_samples else metrics.eval_sizes(p, target.name)[1]
        if p in unscorable or n_ref in refs:
            continue
        try:
            refs[n_ref] = _references(target, n_ref)
        except (FileNotFoundError, ValueError) as e:  # e.g. LJ references not generated yet
            unscorable[p] = f"{type(e).__name__}: {e}"
    protos = [p for p in (protocols or list(SCORE_PROTOCOLS)) if p not in unscorable]
    for k, entry in enumerate(evaluations):
        path = eval_samples_path(run_dir, evaluations, k)
        if path is None:
            continue
        with np.load(path, allow_pickle=False) as z:
            x = z["samples"]
        scores = dict(entry.get("scores") or {})
        for p in protos:
            n_ref = int(spec.n_eval_samples) if spec.n_eval_samples else metrics.eval_sizes(p, target.name)[1]
            o = dict(opts)
            if k not in chosen:
                o.update(n_boot=0, n_boot_ot=0)
            scores[p] = _clean(evaluate_metrics(torch.from_numpy(x), refs[n_ref], target, p, **o))
        entry["scores"] = scores
        entry["metrics"] = scores.get(spec.protocol, entry.get("metrics") or {})
        entry["with_ci"] = k in chosen
    noise_floor = bool(opts.get("noise_floor", True))
    return {
        "scored_at": _now(),
        "protocols": {
            p: (
                {"unscorable": unscorable[p]}
                if p in unscorable
                else {
                    "references": metrics.references_used(target, p, noise_floor),
                    "sizes": list(metrics.eval_sizes(p, target.name))
                    if spec.n_eval_samples is None else [int(spec.n_eval_samples)] * 2,
                }
            )
            for p in SCORE_PROTOCOLS
        },
        "test_reference": metrics.split_source(target, "test"),
        "splits": {sp: metrics.split_source(target, sp) for sp in ("test", "val")},
    }


def final_scoring(
    spec: RunSpec, run_dir: Path, target: Any, evaluations: list[dict[str, Any]], plan: EvalPlan,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Select on val, then score every evaluation on test under every protocol: (selection, scoring)."""
    selection = select(evaluations, trains=method_trains(spec.method))
    scoring = score_evaluations(spec, run_dir, target, evaluations, plan, selection)
    return selection, scoring


def tidy_eval_samples(
    run_dir: Path, evaluations: list[dict[str, Any]], selection: dict[str, Any]
) -> str | None:
    """Keep the samples of the evaluations a rule selected; the last one becomes ``samples.npz``; the others
    are removed (their scores stay in the record). Returns the run's samples file name, or None."""
    keep = set((selection.get("index") or {}).values())
    last = len(evaluations) - 1
    out = None
    for k, e in enumerate(evaluations):
        path = eval_samples_path(run_dir, evaluations, k)
        if path is None:
            e["samples_file"] = None
            continue
        if k == last:
            if path.name != SAMPLES_NAME:
                os.replace(path, run_dir / SAMPLES_NAME)
            e["samples_file"] = out = SAMPLES_NAME
        elif k not in keep:
            path.unlink()
            e["samples_file"] = None
    return out
