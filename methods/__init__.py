"""Samplers. Each module registers its method(s) in ``METHODS`` on import (one line each below)."""

from __future__ import annotations

from methods import (
    dds,  # noqa: F401
    fab,  # noqa: F401
    idem,  # noqa: F401
    mcmc,  # noqa: F401
    nem,  # noqa: F401
    pis,  # noqa: F401
)
from methods.base import Method, MethodConfig
from methods.registry import METHODS, PLANNED

__all__ = ["METHODS", "PLANNED", "Method", "MethodConfig", "get", "names"]


def get(name: str) -> type[Method]:
    """The method class for a registry key; an unknown key raises an error listing the valid keys."""
    return METHODS.get(name)


def names() -> list[str]:
    return METHODS.names()
