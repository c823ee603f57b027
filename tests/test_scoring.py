"""Final scoring under every protocol, val-split selection rules, the test-split guard, rescoring, and the
reference-provenance rules of ``harness.metrics.evaluate``."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

import targets
import targets.base
from harness import job, metrics, scoring
from harness.records import RunRecord, RunSpec, load_records
from harness.rescore import main as rescore_main
from harness.rescore import rescore_record


def _spec(**kw) -> RunSpec:
    base = dict(grid="test", target="gmm40", method="toy", seed=11, config={"batch_size": 16},
                budget={"steps": 6}, eval_fractions=(0.3, 0.6, 1.0), n_eval_samples=48)
    base.update(kw)
    return RunSpec(**base)


# ------------------------------------------------------------------------------------------ selection rules
def _evs(xw2, ew2):
    return [{"val": {"val_x_w2": a, "val_e_w2": b}} for a, b in zip(xw2, ew2)]


def test_idem_rule_is_the_val_x_w2_argmin_and_last_is_last():
    sel = scoring.select(_evs([3.0, 1.0, 2.0, 1.5], [1, 1, 1, 1]))
    assert sel["index"]["idem"] == 1 and sel["index"]["last"] == 3


def test_bnem_rule_stops_after_patience_checks_without_improvement():
    # E-W2: best at 1, no strict improvement for 2 checks -> stop at index 3 (min_delta 0: equal is no gain)
    sel = scoring.select(_evs([1] * 6, [5.0, 2.0, 2.0, 3.0, 0.1, 0.1]), patience=2)
    assert sel["bnem_stopped_at"] == 3 and sel["index"]["bnem"] == 3
    # never stops: the last evaluation
    sel = scoring.select(_evs([1] * 4, [4.0, 3.0, 2.0, 1.0]), patience=2)
    assert sel["bnem_stopped_at"] is None and sel["index"]["bnem"] == 3


def test_non_finite_val_metrics_are_never_selected_and_no_val_falls_back_to_last():
    sel = scoring.select(_evs([float("nan"), 2.0, float("nan")], [float("nan"), 1.0, 5.0]))
    assert sel["index"]["idem"] == 1
    assert scoring.select([{}, {}, {}])["index"] == {"last": 2, "idem": 2, "bnem": 2}


def test_sampling_only_methods_take_the_final_evaluation_under_every_rule():
    import methods

    # a transient early chain state with a lucky val x-W2 is not a checkpoint: MCMC / PT take the last
    sel = scoring.select(_evs([0.5, 3.0, 2.0], [0.1, 9.0, 9.0]), patience=1, trains=False)
    assert sel["index"] == {"last": 2, "idem": 2, "bnem": 2} and "sampling-only" in sel["note"]
    untrained = {m for m in methods.names() if not methods.get(m).trains}
    assert untrained == {"mcmc", "pt"}
    assert scoring.method_trains("pt") is False and scoring.method_trains("idem") is True


def test_rescore_reselects_an_old_sampling_only_record_without_samples_idempotently(tmp_path):
    evs = [{"fraction": (k + 1) / 3, "step": k + 1, "usage": {}, "val": {"val_x_w2": a, "val_e_w2": b},
            "scores": {"idem": {"x_w2": a}}, "metrics": {}}
           for k, (a, b) in enumerate([(0.5, 9.0), (3.0, 1.0), (2.0, 2.0)])]
    spec = RunSpec(grid="g", target="gmm40", method="mcmc", replicate=0, seed=0)
    old = scoring.select(evs)  # what records written before the rule hold: idem picked evaluation 0
    assert old["index"]["idem"] == 0
    path = spec.run_dir(tmp_path) / "record.json"
    RunRecord(spec=spec, status="ok", evaluations=evs, selection=old).write(path)
    r = rescore_record(path)
    assert r["reselected"] is True and r["changed"] is True and r["missing"] == [0, 1, 2]
    again = RunRecord.read(path)
    assert again.selection["index"] == {"last": 2, "idem": 2, "bnem": 2}
    assert "reselected_at" in again.selection
    assert again.evaluations == evs  # the scores were not touched (no samples to re-score)
    before = path.read_bytes()
    r = rescore_record(path)
    assert r["changed"] is False and r["reselected"] is False and path.read_bytes() == before


# ------------------------------------------------------------------------------------------ a real run
@pytest.fixture
def scored_run(toy_method, tmp_path):
    rec = job.run_one(_spec(), tmp_path / "runs")
    assert rec.status == "ok", rec.error
    return rec, tmp_path / "runs"


def test_every_evaluation_has_a_block_per_protocol_and_a_val_block(scored_run):
    rec, _ = scored_run
    assert len(rec.evaluations) == 3
    for ev in rec.evaluations:
        assert set(ev["scores"]) == set(metrics.PROTOCOLS)
        assert ev["metrics"] == ev["scores"]["boltzbench"]
        assert math.isfinite(ev["val"]["val_x_w2"]) and math.isfinite(ev["val"]["val_e_w2"])
        for p in metrics.PROTOCOLS:
            assert math.isfinite(ev["scores"][p]["x_w2"]), p
    # provenance of every split each protocol read, with its sha256
    for p in metrics.PROTOCOLS:
        refs = rec.scoring["protocols"][p]["references"]
        assert refs and all(len(v["sha256"]) == 64 and v["source"] == "exact" for v in refs.values()), refs


def test_selection_picks_the_val_best_evaluation_and_only_selected_samples_are_kept(scored_run):
    rec, root = scored_run
    vals = [ev["val"]["val_x_w2"] for ev in rec.evaluations]
    assert rec.selection["index"]["idem"] == int(np.argmin(vals))
    assert rec.selection["index"]["last"] == 2
    run_dir = _spec().run_dir(root)
    kept = {k for k in range(3) if scoring.eval_samples_path(run_dir, rec.evaluations, k)}
    assert kept == set(rec.selection["index"].values())
    assert rec.samples_file == "samples.npz" and (run_dir / "samples.npz").exists()
    # CIs where a rule selected the evaluation, point values elsewhere
    for k, ev in enumerate(rec.evaluations):
        assert ("x_w2_ci_lo" in ev["scores"]["boltzbench"]) == (k in kept)


def test_load_records_gives_a_row_per_protocol_and_flags_the_papers_selection(scored_run):
    rec, root = scored_run
    df = load_records(root)
    assert len(df) == 3 * len(metrics.PROTOCOLS)
    assert set(df["protocol"]) == set(metrics.PROTOCOLS)
    idem_sel = df[(df["protocol"] == "idem") & df["is_selected"]]
    assert list(idem_sel["checkpoint"]) == [rec.selection["index"]["idem"]]
    bz_sel = df[(df["protocol"] == "boltzbench") & df["is_selected"]]
    assert list(bz_sel["checkpoint"]) == [2]
    assert "v_val_x_w2" in df.columns


def test_the_test_split_is_read_only_after_training_and_selection(toy_method, tmp_path, monkeypatch):
    """A reference that raises when the test split is read before the last optimiser step."""
    spec = _spec(budget={"steps": 5})
    state = {"steps": 0, "log": []}
    real = targets.base.Target.reference

    def guarded(self, split="test", n=None, source=None):
        state["log"].append((split, state["steps"]))
        if split == "test" and state["steps"] < 5:
            raise AssertionError(f"test split read at step {state['steps']}")
        return real(self, split, n, source)

    def on_step(step, logs):
        state["steps"] = step

    monkeypatch.setattr(targets.base.Target, "reference", guarded)
    rec = job.run_one(spec, tmp_path / "runs", on_step=on_step)
    assert rec.status == "ok", rec.error
    reads = [s for s, _ in state["log"]]
    assert "val" in reads and "test" in reads
    first_test = reads.index("test")
    # evaluations during training read val only; the test split comes after the last step, once
    assert all(split == "val" and step < 5 or step == 5 for split, step in state["log"][:first_test])
    assert all(step == 5 for split, step in state["log"] if split == "test")
    # the selection stored is the one the val blocks alone give
    assert rec.selection["index"] == scoring.select(rec.evaluations)["index"]


def test_rescore_reproduces_the_stored_values_exactly_and_is_idempotent(scored_run):
    rec, root = scored_run
    path = _spec().run_dir(root) / "record.json"
    before = path.read_bytes()
    r = rescore_record(path)
    assert r["changed"] is False and path.read_bytes() == before
    # a stale value is restored by re-scoring, and the record says when and against what
    d = json.loads(before)
    k = rec.selection["index"]["idem"]
    true_val = d["evaluations"][k]["scores"]["idem"]["x_w2"]
    d["evaluations"][k]["scores"]["idem"]["x_w2"] = 123.0
    path.write_text(json.dumps(d))
    assert rescore_record(path)["changed"] is True
    again = RunRecord.read(path)
    assert again.evaluations[k]["scores"]["idem"]["x_w2"] == true_val
    assert again.scoring["rescored"]["protocols"] == list(metrics.PROTOCOLS)
    assert rescore_record(path)["changed"] is False


def test_rescore_cli_dry_run_writes_nothing_and_bad_protocol_exits_2(scored_run, capsys):
    _, root = scored_run
    path = _spec().run_dir(root) / "record.json"
    d = json.loads(path.read_text())
    d["evaluations"][-1]["scores"]["bnem"]["e_w2"] = -1.0
    path.write_text(json.dumps(d))
    before = path.read_bytes()
    assert rescore_main(["--results", str(root), "--protocol", "bnem", "--dry-run"]) == 0
    assert "would change 1" in capsys.readouterr().out and path.read_bytes() == before
    with pytest.raises(SystemExit) as e:
        rescore_main(["--results", str(root), "--protocol", "nope"])
    assert e.value.code == 2


def test_schema_1_record_is_rescored_from_its_samples(scored_run, tmp_path):
    rec, root = scored_run
    src = _spec().run_dir(root)
    dst = tmp_path / "old" / "test" / "gmm40" / "toy" / "r0"
    shutil.copytree(src, dst)
    d = json.loads((dst / "record.json").read_text())
    for ev in d["evaluations"]:
        ev.pop("scores"), ev.pop("val")
    d.pop("selection"), d.pop("scoring")
    d["schema_version"] = 1
    (dst / "record.json").write_text(json.dumps(d))
    assert len(load_records(tmp_path / "old")) == 3  # one protocol block per evaluation (its own)
    r = rescore_record(dst / "record.json")
    assert r["changed"] and 2 in r["scored"]
    new = RunRecord.read(dst / "record.json")
    assert set(new.evaluations[-1]["scores"]) == set(metrics.PROTOCOLS)
    assert new.evaluations[-1]["scores"]["idem"]["x_w2"] == rec.evaluations[-1]["scores"]["idem"]["x_w2"]


# ------------------------------------------------------------------------------------------ refusal
def test_a_cell_its_protocol_cannot_score_is_refused_before_training(toy_method, tmp_path):
    spec = _spec(target="dw4", n_eval_samples=10**6)
    reason = scoring.check_scorable(spec)
    assert reason and "needs 1000000" in reason and "python -m targets.reference" in reason
    rec = job.run_one(spec, tmp_path / "runs")
    assert rec.status == "failed" and rec.usage["steps"] == 0 and "cannot be scored" in rec.stop_reason


def test_an_unscorable_other_protocol_is_recorded_not_fatal(toy_method, tmp_path, monkeypatch):
    monkeypatch.setitem(metrics.PROTOCOL_SPECS["idem"].sizes, "gmm40", (10**7, 10**7))
    plan = scoring.eval_plan(_spec(n_eval_samples=None), targets.get("gmm40"))
    assert "idem" in plan.unscorable and plan.refusal is None
    assert plan.n_generate == 5000  # boltzbench's size, the largest scorable one


# ------------------------------------------------------------------------------------------ provenance
def test_evaluate_refuses_to_complete_a_foreign_test_split_with_the_data_directory_val():
    t = targets.get("dw4")
    rng = np.random.default_rng(0)
    gen = t.center(torch.from_numpy(rng.standard_normal((200, 8)) * 2)).numpy()
    mine = t.center(torch.from_numpy(rng.standard_normal((200, 8)) * 2)).numpy()
    with pytest.raises(ValueError, match="mix_sources=True"):
        metrics.evaluate(gen, mine, t, "idem", noise_floor=False)
    r = metrics.evaluate(gen, mine, t, "idem", noise_floor=False, mix_sources=True)
    assert math.isfinite(r["e_w2"])
    r2 = metrics.evaluate(gen, {"test": mine, "val": mine}, t, "idem", noise_floor=False)
    assert math.isfinite(r2["e_w2"])
    # the data directory's own test split completes silently with its own val split
    r3 = metrics.evaluate(gen, t.reference("test", 200), t, "idem", noise_floor=False)
    assert math.isfinite(r3["e_w2"])


def test_evaluate_refuses_splits_of_different_sources(monkeypatch):
    t = targets.get("dw4")
    real = type(t).reference_info

    def info(self, split="test", source=None):
        d = dict(real(self, split, source))
        d["source"] = "published" if split == "test" else "generated"
        return d

    monkeypatch.setattr(type(t), "reference_info", info)
    gen = t.reference("val", 100).numpy()[::-1].copy()
    with pytest.raises(ValueError, match="different sources"):
        metrics.evaluate(gen, t.reference("test", 100), t, "idem", noise_floor=False)
    used = metrics.references_used(t, "idem")
    assert used["test"]["source"] == "published" and used["val"]["source"] == "generated"
    assert "e_w2" in used["val"]["metrics"] and "x_w2" in used["test"]["metrics"]


# ------------------------------------------------------------------------------------- reproduction table
def _rec(root, grid, target, method, rep, per_eval):
    """A schema-2 record: per_eval = [(val_x_w2, val_e_w2, {protocol: {metric: value}})]."""
    spec = RunSpec(grid=grid, target=target, method=method, replicate=rep, seed=rep)
    evs = [{"fraction": (k + 1) / len(per_eval), "step": k + 1, "usage": {}, "val": {"val_x_w2": a,
            "val_e_w2": b}, "scores": sc, "metrics": sc.get("boltzbench", {})}
           for k, (a, b, sc) in enumerate(per_eval)]
    rec = RunRecord(spec=spec, status="ok", evaluations=evs, selection=scoring.select(evs))
    rec.write(spec.run_dir(root) / "record.json")


def test_reproduction_table_takes_paper_records_else_cpu_names_variant_and_selection(tmp_path):
    from harness import tables

    def sc(x, e):
        return {"bnem": {"x_w2": x, "e_w2": e, "tv": 0.1}, "idem": {"x_w2": x + 1, "e_w2": e, "tv": 0.2}}

    for r in range(2):  # BNEM DW-4 on the cpu grid: the val-best x-W2 evaluation is the middle one
        evs = [(3, 3, sc(9, 9)), (1, 2, sc(0.5, 0.4 + r)), (2, 1, sc(7, 7))]
        _rec(tmp_path, "cpu", "dw4", "bnem", r, evs)
    _rec(tmp_path, "cpu", "dw4", "bnem@published", 0, [(1, 1, sc(0.6, 0.5))])
    _rec(tmp_path, "cpu", "dw4-bnem", "bnem@poster", 0, [(1, 1, sc(0.3, 0.2))])
    _rec(tmp_path, "cpu", "dw4", "idem", 0, [(1, 1, sc(2.0, 1.0))])
    _rec(tmp_path, "paper", "dw4", "idem", 0, [(1, 1, sc(1.5, 0.5))])
    df = load_records(tmp_path)
    rows = tables.reproduction_rows(df, None, "bnem")
    dw = {(r["variant"], r["metric"]): r for r in rows if r["method"] == "bnem" and r["target"] == "dw4"}
    # bnem rule (E-W2 early stopping, patience 10: never stops) = the last evaluation
    ours = dw[("ours (default)", "e_w2")]
    assert ours["ours"].startswith("7.000") and ours["seeds"] == 2
    assert ours["selection"] == "bnem" and ours["grid"] == "cpu"
    assert dw[("published", "e_w2")]["ours"] == "0.5000"
    assert dw[("published", "e_w2")]["ratio"] == tables.fmt_num(0.5 / 0.458, 3)
    assert "not comparable" in dw[("poster, dw4-bnem", "e_w2")]["note"]
    # the idem rule picks the val-best x-W2 evaluation; idem takes its cell from the paper records
    rows = tables.reproduction_rows(df, None, "idem", selection="idem")
    idem = {(r["method"], r["metric"]): r for r in rows if r["target"] == "dw4"}
    assert idem[("idem", "x_w2")]["grid"] == "paper" and idem[("idem", "x_w2")]["ours"] == "2.500"
    last = {(r["method"], r["metric"]): r for r in tables.reproduction_rows(df, "cpu", "bnem", "last")
            if r["target"] == "dw4" and r["variant"] == "ours (default)"}
    assert last[("bnem", "x_w2")]["ours"].startswith("7.000")
    assert last[("bnem", "x_w2")]["selection"] == "last"
    sel = {(r["method"], r["metric"]): r for r in tables.reproduction_rows(df, "cpu", "bnem", "idem")
           if r["target"] == "dw4" and r["variant"] == "ours (default)"}
    assert sel[("bnem", "x_w2")]["ours"].startswith("0.5000")  # the middle evaluation of both seeds
    md = tables.render_reproduction(rows, None, "idem", "md")
    assert "Variant" in md.splitlines()[2] and "Selection" in md.splitlines()[2]


def test_idem_lj55_tv_is_against_the_test_split_as_dems_readme_says():
    t = targets.get("lj55")
    assert metrics.metric_split("idem", "tv", "lj55") == "test"
    assert metrics.metric_split("idem", "tv", "lj13") == "val" and metrics.metric_split("idem", "tv") == "val"
    ref = t.reference("test", 60).numpy()
    val = t.reference("val", 60).numpy()
    gen = t.reference("val", 120).numpy()[60:]
    r = metrics.evaluate(gen, {"test": ref, "val": val}, t, "idem", noise_floor=False)
    d = lambda a: t.interatomic_distances(torch.from_numpy(a).double()).numpy()  # noqa: E731
    assert r["tv"] == pytest.approx(metrics.hist_tv_1d(d(gen), d(ref), bins=200), abs=1e-12)
    assert r["dist_w2"] == pytest.approx(metrics.w2_squared_1d(d(val), d(gen)), rel=1e-9)
    assert "tv" in metrics.references_used(t, "idem")["test"]["metrics"]
