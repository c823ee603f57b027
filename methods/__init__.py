"""Samplers. Each module registers its method(s) in ``METHODS`` on import (one line each below)."""

from __future__ import annotations

from methods.base import Method, MethodConfig
from methods.registry import METHODS, PLANNED

__all__ = ["METHODS", "PLANNED", "Method", "MethodConfig", "get", "names"]


def get(name: str) -> type[Method]:
    """The method class for a registry key; an unknown key raises an error listing the valid keys."""
    return METHODS.get(name)


def names() -> list[str]:
    return METHODS.names()

# --- method modules: one import line each (keep this block at the end of the file) ---
from methods import fab  # noqa: F401
from methods import nem  # noqa: F401
from methods import idem  # noqa: F401
from methods import mcmc  # noqa: F401
from methods import dds  # noqa: F401
from methods import pis  # noqa: F401
