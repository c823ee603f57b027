"""Method interface and hyper-parameter configs.

A method is trained by the harness loop (``harness.job.run_one``)::

    method = M(counted_target, config, device, generator)
    while not budget.exhausted(usage): method.train_step()
    samples = method.sample(n)

It only ever sees a ``harness.budget.CountingTarget``; all randomness comes from ``generator`` (a
``torch.Generator`` on ``device``) so that a seed reproduces a run, and ``state_dict`` must capture
everything needed to resume (network, optimiser, buffers, counters) as tensors / plain containers
(checkpoints load with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base of every method's frozen ``Config``.

    Subclasses declare fields with generic defaults and put the published per-target settings in
    ``PER_TARGET`` (with a comment naming the source); ``for_target`` merges them.
    """

    PER_TARGET: ClassVar[dict[str, dict[str, Any]]] = {}
    #: grid presets: grid name -> target key (or "*" for every target) -> config overrides, e.g. a smaller K
    #: and batch for `smoke`. The method owner keeps them here; the harness applies them (same code path).
    PRESETS: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {}
    #: suggested budgets: grid name -> target key (or "*") -> Budget fields; the harness may override them
    BUDGETS: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {}

    @classmethod
    def preset(cls, grid: str, target_name: str) -> dict[str, Any]:
        """Config overrides for a grid cell: the "*" entry updated by the target's entry."""
        g = cls.PRESETS.get(grid, {})
        return {**g.get("*", {}), **g.get(target_name, {})}

    @classmethod
    def suggested_budget(cls, grid: str, target_name: str) -> dict[str, Any]:
        g = cls.BUDGETS.get(grid, {})
        return {**g.get("*", {}), **g.get(target_name, {})}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def for_target(cls, target_name: str, **overrides: Any) -> MethodConfig:
        """The published configuration for ``target_name`` with validated overrides applied."""
        base = cls(**cls.PER_TARGET.get(target_name, {}))
        return base.replace(**overrides) if overrides else base

    def replace(self, **overrides: Any) -> MethodConfig:
        """``dataclasses.replace`` that rejects unknown keys and wrongly-typed values with a clear error."""
        names = self.field_names()
        hints = typing.get_type_hints(type(self))
        for k, v in overrides.items():
            if k not in names:
                raise ValueError(
                    f"unknown {type(self).__qualname__} key {k!r}; valid keys: {', '.join(names)}"
                )
            if not _isinstance_hint(v, hints[k]):
                raise ValueError(
                    f"{type(self).__qualname__}.{k} expects {_hint_name(hints[k])}, "
                    f"got {v!r} ({type(v).__name__})"
                )
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _hint_name(h: Any) -> str:
    return getattr(h, "__name__", str(h))


def _isinstance_hint(v: Any, hint: Any) -> bool:
    """Loose runtime check of a value against a simple type hint (int/float/bool/str/None/tuple/Literal)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_isinstance_hint(v, a) for a in typing.get_args(hint))
    if origin is typing.Literal:
        return v in typing.get_args(hint)
    if hint is type(None):
        return v is None
    if hint is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if hint is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if origin in (tuple, list):
        return isinstance(v, (tuple, list))
    if isinstance(hint, type):
        return isinstance(v, hint)
    return True


class Method(ABC):
    """Base class of all samplers. Subclasses set ``name``, ``display_name`` and ``Config``."""

    name: ClassVar[str]
    display_name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]]

    def __init__(self, target: Any, config: MethodConfig, device: torch.device, generator: torch.Generator):
        if not isinstance(config, self.Config):
            raise TypeError(f"{self.name}: config must be a {self.Config.__qualname__}, got {type(config)}")
        self.target = target  # a CountingTarget
        self.config = config
        self.device = torch.device(device)
        self.generator = generator

    @abstractmethod
    def train_step(self) -> dict[str, float]:
        """One optimiser step (plus any outer-loop work that falls due); returns scalar logs (e.g. loss)."""

    @abstractmethod
    def sample(self, n: int) -> Tensor:
        """``n`` samples [n, dim] in the target's coordinates (centred for particle targets)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (tensors and plain containers only)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def diagnostics(self) -> dict[str, float]:
        """Extra scalars for the record at an evaluation (log Z, ESS, acceptance rate, ...). Default none."""
        return {}

    def parameters_finite(self) -> bool:
        """Whether all trainable parameters are finite (the harness marks a run diverged otherwise)."""
        for v in vars(self).values():
            if isinstance(v, torch.nn.Module):
                for p in v.parameters():
                    if not bool(torch.isfinite(p).all()):
                        return False
        return True
