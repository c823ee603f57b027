"""Grids: expansion, deterministic seeds, budgets, config overrides parsed with the field's type."""

from __future__ import annotations

import hashlib
from typing import Literal

import pytest

import methods
import targets
from harness import grids


def _independent_seed(grid_seed: int, t: str, m: str, r: int) -> int:
    # the documented formula, computed independently of harness.grids
    digest = hashlib.sha256(f"{grid_seed}:{t}:{m}:{r}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % 2**31


def test_every_named_grid_exists_and_unknown_names_list_them():
    assert set(grids.names()) == {"smoke", "cpu", "paper", "full", "equal-evals", "equal-evals-cpu"}
    valid = "valid grids: smoke, cpu, paper, full, equal-evals, equal-evals-cpu"
    with pytest.raises(ValueError, match=valid):
        grids.get("nope")


def test_smoke_covers_every_registered_method_and_target(toy_method):
    ex = grids.expand("smoke")
    cells = {(s.target, s.method) for s in ex.specs}
    assert cells == {(t, m) for t in targets.names() for m in methods.names()}
    assert set(ex.missing_methods) == set(methods.PLANNED) - set(methods.names())
    for s in ex.specs:
        assert s.n_eval_samples == 64 and s.eval_fractions[-1] == 1.0
        assert s.budget["wall_seconds"] <= 10.0  # smoke cap, whatever a method suggests
        assert s.seed == _independent_seed(0, s.target, s.method, s.replicate)


def test_seeds_are_deterministic_distinct_and_grid_independent(toy_method):
    a = grids.expand("cpu", methods=["toy"])
    b = grids.expand("cpu", methods=["toy"])
    assert [s.seed for s in a.specs] == [s.seed for s in b.specs]
    assert len({s.seed for s in a.specs}) == len(a.specs) == 4 * 3  # every target x 3 seeds
    full = {(s.target, s.replicate): s.seed for s in grids.expand("full", methods=["toy"]).specs}
    for s in a.specs:
        assert full[(s.target, s.replicate)] == s.seed


def test_full_is_paper_times_three_seeds(toy_method):
    paper = grids.expand("paper", methods=["toy"]).specs
    full = grids.expand("full", methods=["toy"]).specs
    assert {(s.target, s.method) for s in paper} == {(s.target, s.method) for s in full}
    assert sorted({s.replicate for s in full}) == [0, 1, 2] and len(full) == 3 * len(paper)
    assert {s.target for s in full} == set(targets.names())


def test_equal_evals_gives_every_method_the_same_energy_budget(toy_method):
    ex = grids.expand("equal-evals")
    for s in ex.specs:
        assert s.budget["energy_evals"] == grids.EQUAL_EVALS[s.target]
    by_target = {}
    for s in ex.specs:
        by_target.setdefault(s.target, set()).add(s.budget["energy_evals"])
    assert all(len(v) == 1 for v in by_target.values())


def test_method_presets_and_suggested_budgets_are_applied(toy_method):
    s = grids.expand("smoke", methods=["toy"], targets=["dw4"]).specs[0]
    assert s.config == {"batch_size": 16}  # ToyConfig.PRESETS["smoke"]["*"]
    s = grids.expand("cpu", methods=["toy"], targets=["dw4"], seeds=1).specs[0]
    assert s.budget == {"guard_seconds": 3600.0, "steps": 50}  # harness guard + ToyConfig.BUDGETS["cpu"]


def test_cpu_grids_refuse_a_cell_without_a_counted_budget(toy_method, monkeypatch):
    monkeypatch.setattr(toy_method.Config, "BUDGETS", {"cpu": {"dw4": {"steps": 50}}})
    with pytest.raises(ValueError, match=r"counted budget .* toy on gmm40 .*BUDGETS\['cpu'\]\['gmm40'\]"):
        grids.expand("cpu", methods=["toy"])
    ok = grids.expand("cpu", methods=["toy"], overrides=["budget.steps=7"]).specs  # --set supplies one
    assert {s.budget["steps"] for s in ok} == {7}
    # the paper grids fall back to the guard's wall-clock as the budget when no step count is published
    s = grids.expand("paper", methods=["toy"], targets=["gmm40"]).specs[0]
    assert s.budget == {"wall_seconds": 172800.0}


def test_equal_evals_cpu_uses_cpu_presets_and_one_budget_per_target(toy_method, monkeypatch):
    monkeypatch.setattr(toy_method.Config, "PRESETS", {"cpu": {"*": {"batch_size": 8}}})
    ex = grids.expand("equal-evals-cpu", methods=["toy"])
    assert {s.target for s in ex.specs} == set(targets.names())
    for s in ex.specs:
        # at most E evaluations and at most the toy's cpu step budget (the cap comes from the cpu grid)
        cap = toy_method.Config.suggested_budget("cpu", s.target).get("steps")
        assert cap is not None
        assert s.budget == {"energy_evals": grids.EQUAL_EVALS_CPU[s.target], "guard_seconds": 3600.0,
                            "steps": cap}
        assert s.config == {"batch_size": 8}
    monkeypatch.setattr(toy_method.Config, "BUDGETS", {})  # no cpu step budget: E alone
    for s in grids.expand("equal-evals-cpu", methods=["toy"]).specs:
        assert s.budget == {"energy_evals": grids.EQUAL_EVALS_CPU[s.target], "guard_seconds": 3600.0}


def test_selection_errors_name_the_valid_choices(toy_method):
    with pytest.raises(ValueError, match="valid methods: .*toy"):
        grids.expand("smoke", methods=["nope"])
    with pytest.raises(ValueError, match="valid targets: .*gmm40"):
        grids.expand("smoke", targets=["lj99"])
    with pytest.raises(ValueError, match="positive"):
        grids.expand("smoke", seeds=0)
    unregistered = [m for m in methods.PLANNED if m not in methods.names()]
    if unregistered:
        with pytest.raises(ValueError, match="not implemented yet"):
            grids.expand("smoke", methods=[unregistered[0]])


def test_overrides_are_parsed_with_the_field_type(toy_method):
    ex = grids.expand(
        "smoke", methods=["toy"], targets=["gmm40"],
        overrides=["toy.lr=1e-3", "toy.batch_size=7", "toy.nan_samples=true", "toy.hidden=8,16,32",
                   "toy.diverge_at_step=none", "budget.steps=11", "budget.wall_seconds=none"],
    )
    s = ex.specs[0]
    assert s.config["lr"] == 0.001 and s.config["batch_size"] == 7 and s.config["nan_samples"] is True
    assert s.config["hidden"] == [8, 16, 32] and s.config["diverge_at_step"] is None
    assert s.budget == {"steps": 11}


@pytest.mark.parametrize(
    "item, message",
    [
        ("toy.nope=1", "valid keys: batch_size, lr"),
        ("toy.batch_size=1.5", "expects an int"),
        ("toy.lr=abc", "expects a float"),
        ("toy.nan_samples=maybe", "expects a bool"),
        ("idemx.k=1", "valid prefixes: budget, toy"),
        ("budget.epochs=3", "valid keys: energy_evals, wall_seconds, steps, guard_seconds"),
        ("budget.steps=-1", "positive"),
        ("toy.lr", "malformed override"),
        ("lr=3", "malformed override"),
    ],
)
def test_bad_overrides_are_rejected_with_a_clear_message(toy_method, item, message):
    with pytest.raises(ValueError, match=message):
        grids.expand("smoke", methods=["toy"], overrides=[item])


def test_coerce_handles_literals_unions_and_tuples():
    assert grids.coerce("vp", Literal["ve", "vp"]) == "vp"
    with pytest.raises(ValueError, match=r"one of \['ve', 'vp'\]"):
        grids.coerce("x", Literal["ve", "vp"])
    assert grids.coerce("none", int | None) is None
    assert grids.coerce("3", int | None) == 3
    assert grids.coerce("2e3", int) == 2000
    assert grids.coerce("[1, 2]", tuple[int, ...]) == (1, 2)
    assert grids.coerce("1,2.5", tuple[int, float]) == (1, 2.5)
    with pytest.raises(ValueError, match="2 items"):
        grids.coerce("1", tuple[int, float])


def test_time_limit_follows_the_wall_clock_budget(toy_method):
    ex = grids.expand("cpu", methods=["toy"], seeds=1)
    s = ex.specs[0]
    assert ex.time_limit_min(s) == int(-(-1.25 * 3600 // 60) + 10)  # from the guard
    ex = grids.expand("smoke", methods=["toy"], overrides=["budget.wall_seconds=none"])
    assert ex.time_limit_min(ex.specs[0]) == grids.get("smoke").time_limit_min


def test_config_overrides_types_values_by_the_config_fields():
    """The scripts' ``--set key=value``: typed like the CLI's METHOD.KEY=VALUE, errors name what is valid."""
    from methods.idem import IDEM

    got = grids.config_overrides(IDEM, ["num_mc_samples=50", "lr=1e-3"])
    assert got == {"num_mc_samples": 50, "lr": 1e-3} and isinstance(got["num_mc_samples"], int)
    assert grids.config_overrides(IDEM, None) == {}
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        grids.config_overrides(IDEM, ["lr"])
    with pytest.raises(ValueError, match="valid keys: .*num_mc_samples"):
        grids.config_overrides(IDEM, ["no_such_field=1"])
