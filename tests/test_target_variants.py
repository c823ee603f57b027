"""The energy-variant target ``dw4-bnem`` (BNEM's doubled DW-4): energy, references, configs, grids."""

from __future__ import annotations

import pytest
import torch

import methods
import targets
from harness import grids, metrics
from targets.reference import physics_checks


def test_doubled_energy_forces_and_laplacian_are_twice_dw4s():
    t, b = targets.get("dw4-bnem"), targets.get("dw4")
    x = b.reference("test", 256).double()
    assert torch.allclose(t.energy(x), 2 * b.energy(x))
    (e, g), (e2, g2) = t.energy_and_grad(x), b.energy_and_grad(x)
    assert torch.allclose(e, 2 * e2) and torch.allclose(g, 2 * g2)
    assert torch.allclose(t.laplacian(x), 2 * b.laplacian(x))
    # autograd agrees with the analytic force of the doubled energy
    y = x[:8].clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(t.energy(y).sum(), y)
    assert torch.allclose(ga, g[:8], atol=1e-8)


def test_the_published_splits_are_at_another_temperature_for_the_doubled_energy():
    t, b = targets.get("dw4-bnem"), targets.get("dw4")
    x = b.reference("test", 2000)
    assert t.reference_info("test")["sha256"] == b.reference_info("test")["sha256"]
    assert physics_checks(b, x)["beta_hat"]["passed"]
    assert physics_checks(t, x)["beta_hat"]["value"] == pytest.approx(0.5, abs=0.05)


def test_variant_target_is_out_of_default_grids_but_selectable_and_uses_dw4_configs():
    assert "dw4-bnem" not in targets.names() and "dw4-bnem" in targets.names(include_variants=True)
    assert all(s.target != "dw4-bnem" for s in grids.expand("smoke").specs)
    a = grids.expand("cpu", methods=["bnem"], targets=["dw4"], seeds=1).specs[0]
    v = grids.expand("cpu", methods=["bnem"], targets=["dw4-bnem"], seeds=1).specs[0]
    assert a.config == v.config and a.budget == v.budget
    assert methods.get("idem").Config.for_target("dw4-bnem") == methods.get("idem").Config.for_target("dw4")
    assert metrics.eval_sizes("idem", "dw4-bnem") == metrics.eval_sizes("idem", "dw4")
