"""Samplers. Each module registers its method(s) in ``METHODS`` on import (one line each below)."""

from __future__ import annotations

from methods import (
    adjoint,  # noqa: F401
    asbs,  # noqa: F401
    dds,  # noqa: F401
    fab,  # noqa: F401
    idem,  # noqa: F401
    mcmc,  # noqa: F401
    nem,  # noqa: F401
    pis,  # noqa: F401
)
from methods.base import Method, MethodConfig
from methods.registry import METHODS, PLANNED

__all__ = ["METHODS", "PLANNED", "VARIANT_SEP", "Method", "MethodConfig", "get", "names", "split_key",
           "variants"]


#: separates a method key from a named variant of its Config (``bnem@published``; ``MethodConfig.VARIANTS``)
VARIANT_SEP = "@"


def split_key(name: str) -> tuple[str, str | None]:
    """``"bnem@published"`` -> ``("bnem", "published")``; ``"bnem"`` -> ``("bnem", None)``."""
    base, sep, variant = name.partition(VARIANT_SEP)
    return base, (variant if sep else None)


def get(name: str) -> type[Method]:
    """The method class for a registry key, or ``KEY@VARIANT`` (the same class: a variant only changes the
    config); an unknown key or variant raises an error listing the valid ones."""
    base, variant = split_key(name)
    cls = METHODS.get(base)
    if variant is not None and variant not in cls.Config.VARIANTS:
        valid = ", ".join(f"{base}{VARIANT_SEP}{v}" for v in cls.Config.VARIANTS) or "(none)"
        raise KeyError(f"unknown variant {name!r}; variants of {base}: {valid}")
    return cls


def variants() -> list[str]:
    """Every ``KEY@VARIANT`` of the registered methods."""
    return [f"{m}{VARIANT_SEP}{v}" for m in METHODS.names() for v in METHODS.get(m).Config.VARIANTS]


def names() -> list[str]:
    return METHODS.names()
