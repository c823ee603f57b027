"""Benchmark targets. ``targets.get("lj13")`` returns a fresh instance; ``targets.names()`` lists keys."""

from __future__ import annotations

from targets import double_well, gmm, lennard_jones  # noqa: F401  (register the families)
from targets.base import NonFiniteInputError, ParticleTarget, Target
from targets.registry import TARGETS

__all__ = ["TARGETS", "NonFiniteInputError", "ParticleTarget", "Target", "data_key", "get", "names"]


def get(name: str) -> Target:
    """Instantiate a target by registry key; an unknown key raises an error listing the valid keys."""
    return TARGETS.get(name)()


def names(include_variants: bool = False) -> list[str]:
    """Target keys of the benchmark; ``include_variants`` adds the named energy variants (``dw4-bnem``: a
    target with ``data_key`` set, kept out of the grids' default target lists)."""
    keys = TARGETS.names()
    if include_variants:
        return keys
    return [k for k in keys if getattr(TARGETS.get(k), "data_key", None) is None]


def data_key(name: str) -> str:
    """The key whose configs, protocol sizes and reference files a target uses: its base's for an energy
    variant (``dw4-bnem`` -> ``dw4``), else itself; a name that is not registered is returned unchanged."""
    if name not in TARGETS.names():
        return name
    return getattr(TARGETS.get(name), "data_key", None) or name
