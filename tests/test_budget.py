"""Budgets and counting: every configuration at which the energy or its gradient is evaluated is counted."""

from __future__ import annotations

import pytest
import torch

import targets
from harness.budget import Budget, BudgetExhausted, CountingTarget, Usage


def test_budget_needs_a_limit_and_positive_numbers():
    with pytest.raises(ValueError, match="at least one"):
        Budget()
    with pytest.raises(ValueError, match="positive"):
        Budget(steps=0)
    with pytest.raises(ValueError, match="integer"):
        Budget(energy_evals=10.5)
    with pytest.raises(ValueError, match="number"):
        Budget(steps="5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="valid: energy_evals, wall_seconds, steps"):
        Budget.from_dict({"epochs": 3})


def test_exhausted_names_the_first_limit_reached():
    b = Budget(energy_evals=100, wall_seconds=10.0, steps=5)
    assert b.exhausted(Usage(energy_evals=99, steps=4, train_seconds=9.9)) is None
    assert b.exhausted(Usage(energy_evals=100)) == "energy_evals"
    assert b.exhausted(Usage(train_seconds=10.0)) == "wall_seconds"
    assert b.exhausted(Usage(steps=5)) == "steps"
    assert b.fraction(Usage(energy_evals=50, steps=1)) == pytest.approx(0.5)
    assert b.fraction(Usage(energy_evals=10, steps=4)) == pytest.approx(0.8)


def test_energy_budget_limits_training_evaluations_only():
    b = Budget(energy_evals=100)
    u = Usage(energy_evals=150, sample_energy_evals=60)
    assert u.train_energy_evals == 90
    assert b.exhausted(u) is None
    u.energy_evals += 10
    assert b.exhausted(u) == "energy_evals"


def test_counting_target_counts_energy_and_gradient_separately():
    t = targets.get("dw4")
    ct = CountingTarget(t)
    x = torch.randn(7, t.dim, generator=torch.Generator().manual_seed(0))
    e = ct.energy(x)
    assert torch.equal(e, t.energy(x))
    assert (ct.usage.energy_evals, ct.usage.grad_evals) == (7, 0)
    e2, g = ct.energy_and_grad(x[:3])
    assert (ct.usage.energy_evals, ct.usage.grad_evals) == (10, 3)
    ct.score(x[:2])
    ct.log_prob(x[:4])
    assert (ct.usage.energy_evals, ct.usage.grad_evals) == (16, 5)
    # an energy call that may be back-propagated through counts as a gradient evaluation too
    xr = x[:5].clone().requires_grad_(True)
    ct.energy(xr).sum().backward()
    assert (ct.usage.energy_evals, ct.usage.grad_evals) == (21, 10)
    # descriptive attributes pass through; distances are not energy evaluations
    assert ct.dim == t.dim and ct.n_particles == 4
    ct.interatomic_distances(x)
    assert ct.usage.energy_evals == 21


def test_sampling_scope_attributes_evaluations_to_sampling():
    t = targets.get("gmm40")
    ct = CountingTarget(t)
    x = torch.zeros(4, 2)
    ct.energy(x)
    with ct.sampling():
        ct.energy_and_grad(x)
        ct.energy(x[:1])
    assert ct.usage.energy_evals == 9
    assert ct.usage.sample_energy_evals == 5
    assert ct.usage.train_energy_evals == 4
    assert ct.usage.sample_seconds > 0


def test_hard_limit_raises_before_exceeding():
    ct = CountingTarget(targets.get("gmm40"), hard_energy_limit=10)
    ct.energy(torch.zeros(8, 2))
    with pytest.raises(BudgetExhausted):
        ct.energy(torch.zeros(3, 2))
    assert ct.usage.energy_evals == 8


def test_usage_round_trip_and_in_place_load():
    u = Usage(energy_evals=5, grad_evals=3, steps=2, train_seconds=1.5, sample_energy_evals=1)
    d = u.to_dict()
    assert d["train_energy_evals"] == 4
    v = Usage()
    ct = CountingTarget(targets.get("gmm40"), v)
    v.load(d)
    assert ct.usage is v and v == u
    assert Usage.from_dict(d) == u


def test_guard_is_checked_last_and_is_no_budget_of_its_own():
    from harness.budget import Budget, Usage

    b = Budget(steps=10, guard_seconds=5.0)
    assert b.counted and not Budget(wall_seconds=5.0).counted
    assert b.exhausted(Usage(steps=10, train_seconds=9.0)) == "steps"  # the counted limit wins a tie
    assert b.exhausted(Usage(steps=3, train_seconds=5.0)) == "guard_seconds"
    assert b.fraction(Usage(steps=3, train_seconds=5.0)) == 0.3  # the guard is not a budget fraction
    with pytest.raises(ValueError, match="guard_seconds alone is a guard"):
        Budget(guard_seconds=5.0)
    with pytest.raises(ValueError, match="guard_seconds"):
        Budget.from_dict({"guard": 1})
