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
    #: named variants: the configuration behind a published number where the code that produced it departs
    #: from its paper (or from our corrected default). variant -> {"description": ..., "source": the published
    #: file(s), "overrides": {target key or "*": config overrides}}. Selected as method key ``NAME@VARIANT``
    #: (e.g. ``bnem@published``); applied before the grid presets (so the cpu grid keeps its cost settings)
    #: and ``--set``.
    VARIANTS: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def variant(cls, name: str, target_name: str) -> dict[str, Any]:
        """Config overrides of variant ``name`` for a target; an unknown name lists the valid ones."""
        if name not in cls.VARIANTS:
            valid = ", ".join(cls.VARIANTS) or "(none)"
            raise ValueError(f"unknown variant {name!r} of {_config_name(cls)}; valid variants: {valid}")
        o = cls.VARIANTS[name].get("overrides", {})
        return {**o.get("*", {}), **o.get(_config_key(target_name), {})}

    @classmethod
    def preset(cls, grid: str, target_name: str) -> dict[str, Any]:
        """Config overrides for a grid cell: the "*" entry updated by the target's entry."""
        g = cls.PRESETS.get(grid, {})
        return {**g.get("*", {}), **g.get(_config_key(target_name), {})}

    @classmethod
    def suggested_budget(cls, grid: str, target_name: str) -> dict[str, Any]:
        g = cls.BUDGETS.get(grid, {})
        return {**g.get("*", {}), **g.get(_config_key(target_name), {})}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    #: per-class additions to / replacements of the shared ``FIELD_RANGES`` table (field name -> Range)
    RANGES: ClassVar[dict[str, Range]] = {}

    @classmethod
    def for_target(cls, target_name: str, **overrides: Any) -> MethodConfig:
        """The published configuration for ``target_name`` with validated overrides applied (types, then
        value ranges: a ``ValueError`` names the field, the value and the valid range)."""
        base = cls(**cls.PER_TARGET.get(_config_key(target_name), {}))
        cfg = base.replace(**overrides) if overrides else base
        cfg.check_ranges()
        return cfg

    @classmethod
    def field_range(cls, name: str) -> Range | None:
        """The valid range of field ``name`` (None: not range-checked)."""
        return cls.RANGES.get(name, FIELD_RANGES.get(name))

    @classmethod
    def _check_range(cls, name: str, v: Any) -> None:
        r = cls.field_range(name)
        if r is None or v is None or isinstance(v, (bool, str)) or not isinstance(v, (int, float)):
            return
        if not r.contains(v):
            raise ValueError(f"{_config_name(cls)}.{name} = {v!r} is out of range; "
                             f"valid range: {name} {r.describe()}")

    def check_ranges(self) -> None:
        """Raise ``ValueError`` if a numeric field lies outside its declared range (``FIELD_RANGES`` and the
        class's ``RANGES``) or a declared ordered pair (``sigma_min < sigma_max``, ...) is out of order."""
        qn = _config_name(type(self))
        for name in self.field_names():
            self._check_range(name, getattr(self, name))
        names = set(self.field_names())
        for lo_name, hi_name in ORDERED_PAIRS:
            if lo_name in names and hi_name in names:
                lo, hi = getattr(self, lo_name), getattr(self, hi_name)
                if lo is not None and hi is not None and not lo < hi:
                    raise ValueError(
                        f"{qn}: {lo_name} = {lo!r} must be smaller than {hi_name} = {hi!r}"
                    )

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
        errors = []
        for k, v in overrides.items():  # before the class's own __post_init__ checks: name the range
            try:
                self._check_range(k, v)
            except ValueError as e:
                errors.append(str(e))
        if errors:
            raise ValueError("; ".join(errors))
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Range:
    """A closed or open numeric interval; ``None`` = unbounded on that side."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, v: float) -> bool:
        if v != v:  # NaN is never in range
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return "any number"


POSITIVE = Range(0.0, lo_open=True)  # rates, scales, clip thresholds, step sizes
NON_NEGATIVE = Range(0.0)  # weights, counts that may be zero
AT_LEAST_1 = Range(1)  # sizes, step counts, widths
PROBABILITY = Range(0.0, 1.0)
UNIT_OPEN = Range(0.0, 1.0, lo_open=True, hi_open=True)
DECAY = Range(0.0, 1.0, hi_open=True)  # EMA decays: 1 would freeze the average

#: valid ranges of config fields, by field name, shared by every method (a class may refine them in its
#: ``RANGES``). Checked by ``MethodConfig.for_target``, i.e. before a grid is submitted.
FIELD_RANGES: dict[str, Range] = {
    **dict.fromkeys(
        (
            "lr", "sigma_min", "sigma_max", "step_size", "init_scale", "prior_std", "noise_total",
            "base_scale",
            "grad_clip", "max_grad", "max_score_norm", "negative_time_dt", "negative_time_clip",
            "diffusion_scale", "diffusion_sq", "horizon", "warmup_max_step",
            "coord_scale", "grad_norm_clip", "w_adjust_max_clip", "boot_sigma_min", "boot_sigma_max",
            "boot_variance", "lambda_eps", "denoiser_clip", "alpha", "lr_final_factor",
        ),
        POSITIVE,
    ),
    **dict.fromkeys(
        ("weight_decay", "t0_weight", "negative_time_steps", "warmup_levels", "bootstrap_start_step",
         "buffer_min", "n_intermediate", "burnin_steps",
         "nn_clip", "score_clip"),  # PIS/DDS: 0 switches the network output / Langevin input off
        NON_NEGATIVE,
    ),
    **dict.fromkeys(
        (
            "n_steps", "batch_size", "hidden", "n_layers", "emb_size", "time_channels", "time_layers",
            "n_diag_samples", "sample_chunk", "num_mc_samples", "steps_per_epoch", "num_samples_per_epoch",
            "num_init_samples", "init_sde_steps", "init_mc_samples", "buffer_max_length", "sde_steps",
            "estimator_chunk_rows", "n_chains", "steps_per_train_step", "warmup_steps_per_level",
            "trace_chains", "trace_length", "n_temps", "n_replicas", "swap_every", "n_mc", "mc_chunk",
            "n_init", "n_new_per_epoch", "buffer_size", "eval_sde_steps", "bootstrap_mc", "n_inner",
            "cnf_steps", "buffer_max", "n_updates_per_ais", "diag_samples", "lr_decay_steps",
        ),
        AT_LEAST_1,
    ),
    "t_max": Range(1.0),  # the hottest replica's temperature (T = 1 is the target)
    "target_accept": UNIT_OPEN,
    "ema_decay": DECAY,
    "ema_beta": PROBABILITY,
}

#: (smaller, larger) field pairs that must be strictly ordered when both are set
ORDERED_PAIRS: tuple[tuple[str, str], ...] = (
    ("sigma_min", "sigma_max"), ("boot_sigma_min", "boot_sigma_max"), ("buffer_min", "buffer_max"),
)


def _config_key(target_name: str) -> str:
    """The key a target's configs are filed under (``targets.data_key``: dw4-bnem -> dw4)."""
    import targets

    return targets.data_key(target_name)


def _config_name(cls: type) -> str:
    """``DDSConfig``, or ``idem Config`` for a class named just ``Config`` (error messages)."""
    qn = cls.__qualname__
    return f"{cls.__module__.rsplit('.', 1)[-1]} {qn}" if qn == "Config" else qn


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
    #: False for samplers that learn nothing (MCMC, PT): their evaluation k is the chains' state after k
    #: steps, not a checkpoint of a model, so no selection rule applies — every rule takes the final state
    #: (what the published MCMC numbers are), never a transient early state with a lucky val x-W2
    trains: ClassVar[bool] = True

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
