"""Counted budgets: every configuration at which a method evaluates the energy or its gradient is counted.

A ``Budget`` names any of energy evaluations, wall-clock seconds and optimiser steps; a run stops at the first
one exhausted (``Budget.exhausted`` says which). Methods only ever see a ``CountingTarget``.

Quality budgets are counted (``steps``, ``energy_evals``): what a cell produces must not depend on how busy
the machine is. ``guard_seconds`` is a wall-clock *guard*, not a budget: a run that reaches it before its
counted limit stops, is evaluated where it stopped and is recorded with status ``timeout`` (never as a normal
finish); it does not enter ``fraction`` (evaluation points and progress follow the counted limits), and it is
not part of a cell's identity (``harness.job.spec_key``), so re-running with a larger guard resumes a timed-
out cell. ``wall_seconds`` stays a *budget* (a normal finish) for grids that are meant to be wall-clock
limited (smoke, timing studies).

Counting rules (one "evaluation" = one configuration, i.e. one row of a batch):
- ``energy(x)``: +B energy evaluations; if ``x`` requires grad under grad mode (the caller may back-propagate
  through the energy, e.g. PIS/DDS terminal costs), +B gradient evaluations as well (counted conservatively).
- ``energy_and_grad(x)`` / ``score(x)``: +B energy and +B gradient evaluations.
- ``interatomic_distances``, ``reference`` etc. are not energy evaluations and are not counted.

Budget rule: the ``energy_evals`` limit applies to *training* evaluations, ``Usage.train_energy_evals`` =
``energy_evals − sample_energy_evals``. Evaluations spent inside ``with counted.sampling(): method.sample(n)``
at the harness's evaluation points are counted and reported (``sample_energy_evals``) but do not consume the
training budget, so the number of evaluation points and their sample size never change how long a method
trains. The ``wall_seconds`` limit likewise applies to ``train_seconds`` (time inside ``train_step``).
Limits are checked between optimiser steps: a step that crosses the energy limit completes, so a run may
overshoot by at most one step's evaluations (the record holds the exact counts).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from targets.base import Target


class BudgetExhausted(RuntimeError):  # noqa: N818  (name fixed by the design)
    """Raised by a ``CountingTarget`` with a hard limit when an evaluation would exceed it."""


@dataclass(frozen=True)
class Budget:
    """Limits of one run; ``None`` = unlimited. At least one must be set."""

    energy_evals: int | None = None
    wall_seconds: float | None = None
    steps: int | None = None
    #: wall-clock guard (s of training): reaching it first stops the run with status ``timeout``
    guard_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.energy_evals is None and self.wall_seconds is None and self.steps is None:
            raise ValueError("a Budget needs at least one of energy_evals, wall_seconds, steps "
                             "(guard_seconds alone is a guard, not a budget)")
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"Budget.{f.name} must be a number or None, got {v!r}")
            if f.name in ("energy_evals", "steps") and int(v) != v:
                raise ValueError(f"Budget.{f.name} must be an integer, got {v!r}")
            if v <= 0:
                raise ValueError(f"Budget.{f.name} must be positive, got {v}")

    @property
    def counted(self) -> bool:
        """Whether a counted limit (steps or energy evaluations) ends the run, not the wall clock."""
        return self.energy_evals is not None or self.steps is not None

    def exhausted(self, usage: Usage) -> str | None:
        """The name of the first exhausted limit ("energy_evals", "wall_seconds", "steps", or the guard
        "guard_seconds", checked last so that a run finishing its counted budget is never a timeout)."""
        if self.energy_evals is not None and usage.train_energy_evals >= self.energy_evals:
            return "energy_evals"
        if self.wall_seconds is not None and usage.train_seconds >= self.wall_seconds:
            return "wall_seconds"
        if self.steps is not None and usage.steps >= self.steps:
            return "steps"
        if self.guard_seconds is not None and usage.train_seconds >= self.guard_seconds:
            return "guard_seconds"
        return None

    def fraction(self, usage: Usage) -> float:
        """Fraction of the budget used (max over the set limits, the guard excluded), in [0, ∞)."""
        fr = []
        if self.energy_evals is not None:
            fr.append(usage.train_energy_evals / self.energy_evals)
        if self.wall_seconds is not None:
            fr.append(usage.train_seconds / self.wall_seconds)
        if self.steps is not None:
            fr.append(usage.steps / self.steps)
        return max(fr)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """Short human-readable form, e.g. ``steps=5, wall_seconds=4``."""
        return ", ".join(f"{k}={v:g}" for k, v in asdict(self).items() if v is not None)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Budget:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(
                f"unknown budget keys {sorted(unknown)}; "
                "valid: energy_evals, wall_seconds, steps, guard_seconds"
            )
        return cls(**d)


@dataclass
class Usage:
    """What a run has used so far. Seconds are wall-clock; evaluations count configurations."""

    energy_evals: int = 0
    grad_evals: int = 0
    steps: int = 0
    train_seconds: float = 0.0
    sample_seconds: float = 0.0
    sample_energy_evals: int = 0  # evaluations spent inside method.sample (already in energy_evals)
    network_evals: int = 0  # optional: methods may report network forward passes (configurations)

    @property
    def train_energy_evals(self) -> int:
        """Energy evaluations spent in training (what the ``energy_evals`` budget limits)."""
        return self.energy_evals - self.sample_energy_evals

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["train_energy_evals"] = self.train_energy_evals
        return d

    def load(self, d: dict[str, Any]) -> None:
        """Overwrite the counters in place from ``to_dict`` output (a CountingTarget keeps this object)."""
        for f in fields(self):
            if f.name in d:
                setattr(self, f.name, type(getattr(self, f.name))(d[f.name]))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Usage:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class CountingTarget:
    """Wraps a ``Target``, exposing the same interface, and counts every energy / gradient evaluation.

    ``hard_energy_limit``: raise ``BudgetExhausted`` *before* an evaluation that would exceed it.
    """

    def __init__(self, target: Target, usage: Usage | None = None, hard_energy_limit: int | None = None):
        self.target = target
        self.usage = usage if usage is not None else Usage()
        self.hard_energy_limit = hard_energy_limit
        self._sampling = False

    # pass through the descriptive attributes and helpers (dim, n_particles, center, as_particles, ...)
    def __getattr__(self, item: str) -> Any:
        if item in ("target", "usage"):
            raise AttributeError(item)
        return getattr(self.target, item)

    def _count(self, n: int, grad: bool) -> None:
        if self.hard_energy_limit is not None and self.usage.energy_evals + n > self.hard_energy_limit:
            raise BudgetExhausted(
                f"energy budget {self.hard_energy_limit} would be exceeded "
                f"({self.usage.energy_evals} used, {n} asked)"
            )
        self.usage.energy_evals += n
        if grad:
            self.usage.grad_evals += n
        if self._sampling:
            self.usage.sample_energy_evals += n

    def energy(self, x: Tensor) -> Tensor:
        self._count(x.shape[0] if x.ndim else 1, grad=x.requires_grad and torch.is_grad_enabled())
        return self.target.energy(x)

    def log_prob(self, x: Tensor) -> Tensor:
        return -self.energy(x)

    def energy_and_grad(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._count(x.shape[0] if x.ndim else 1, grad=True)
        return self.target.energy_and_grad(x)

    def score(self, x: Tensor) -> Tensor:
        return -self.energy_and_grad(x)[1]

    class _SamplingScope:
        def __init__(self, ct: CountingTarget):
            self.ct = ct

        def __enter__(self) -> None:
            self.ct._sampling = True
            self.t0 = time.perf_counter()

        def __exit__(self, *exc: object) -> None:
            self.ct._sampling = False
            self.ct.usage.sample_seconds += time.perf_counter() - self.t0

    def sampling(self) -> _SamplingScope:
        """``with counted.sampling(): method.sample(n)`` attributes evaluations and time to sampling."""
        return CountingTarget._SamplingScope(self)


@dataclass
class Stopwatch:
    """Accumulating wall-clock timer (seconds)."""

    total: float = 0.0
    _t0: float | None = field(default=None, repr=False)

    def __enter__(self) -> Stopwatch:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._t0 is not None
        self.total += time.perf_counter() - self._t0
        self._t0 = None
