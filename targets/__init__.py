"""Benchmark targets. ``targets.get("lj13")`` returns a fresh instance; ``targets.names()`` lists keys."""

from __future__ import annotations

from targets import double_well, gmm, lennard_jones  # noqa: F401  (register the families)
from targets.base import NonFiniteInputError, ParticleTarget, Target
from targets.registry import TARGETS

__all__ = ["TARGETS", "NonFiniteInputError", "ParticleTarget", "Target", "get", "names"]


def get(name: str) -> Target:
    """Instantiate a target by registry key; an unknown key raises an error listing the valid keys."""
    return TARGETS.get(name)()


def names() -> list[str]:
    return TARGETS.names()
