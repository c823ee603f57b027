"""Named grids (Python, no YAML): ``expand(name, ...) -> Expansion`` with one ``RunSpec`` per
(target, method, replicate) cell.

Grids (budget numbers are the harness defaults; a method's ``Config.suggested_budget(grid, target)`` is merged
over them where the grid allows it, and ``--set budget.<field>=...`` over both):

=============  =====================  ========  ==============================================================
grid           targets                seeds     budget per cell
=============  =====================  ========  ==============================================================
smoke          all                    1         steps=3, wall_seconds=4 (method may suggest; wall-clock
                                                capped at 10 s); 64 eval samples at 50 % and 100 %,
                                                metrics without bootstrap CIs and noise floors
cpu            all                    3         the method's ``cpu`` steps (required: a cell without a
                                                counted budget is an error), guard_seconds=3600;
                                                LJ-13 / LJ-55 scored with 1000 / 200 samples
paper          all                    1         the method's published budget (``BUDGETS["paper"]``),
                                                guard 48 h
full           all                    3         as paper
equal-evals    all                    3         training energy evaluations: gmm40 2.56e9, dw4 5.12e9,
                                                lj13 5.12e9, lj55 2.56e8 (1/10 of iDEM's own budget,
                                                batch x K x steps), guard 12 h; same for every method
equal-evals-   all                    3         ``cpu`` presets, one training energy-evaluation budget
cpu                                             per target for every method (``EQUAL_EVALS_CPU``), at
                                                most the ``cpu`` cell's steps (not MCMC / PT); a ``cpu``
                                                run that stopped at its steps within the budget is reused
                                                (``harness.covered``); guard 1 h
=============  =====================  ========  ==============================================================

Budgets are counted (steps or energy evaluations), so what a cell produces does not depend on the machine's
load; ``guard_seconds`` is a wall-clock guard that stops a run with status ``timeout`` (harness.budget). A
``paper``/``full`` cell whose method publishes no step count runs for the guard's wall-clock as its budget
(``wall_seconds``); the ``cpu`` grids refuse such cells instead (``Grid.require_counted``).

Seeds: ``derive_seed(grid_seed, target, method, replicate)`` = the first 4 bytes (little endian) of
SHA-256("{grid_seed}:{target}:{method}:{replicate}") masked to 31 bits. Every grid uses grid seed 0, so a
cell has the same seed in every grid.

Config presets: a cell's config overrides are the method's ``Config.preset(p, target)`` for each preset name
``p`` of the grid (``full`` and ``equal-evals`` use the ``paper`` presets, then their own), then the
command-line ``--set method.key=value`` overrides, parsed with the field's type and validated by
``Config.for_target``.
"""

from __future__ import annotations

import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from harness.budget import Budget
from harness.records import RunSpec

GRID_SEED = 0
#: evaluation points (budget fractions) of every grid but smoke: 10 log-spaced points from 3 % to 100 %, so
#: the val-split selection rules have checkpoints to choose from and time-to-quality curves have resolution
LOG_EVAL_FRACTIONS: tuple[float, ...] = (0.03, 0.044, 0.065, 0.097, 0.143, 0.21, 0.311, 0.459, 0.677, 1.0)


@dataclass(frozen=True)
class Grid:
    """A named set of cells and how to budget them."""

    name: str
    description: str
    targets: tuple[str, ...] | None  # None: every registered target
    replicates: int = 1
    seed: int = GRID_SEED
    #: harness default budget: target key (or "*") -> Budget fields
    budgets: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: whether the method's suggested budget (for ``budget_grid``) is merged over the default
    method_budgets: bool = True
    budget_grid: str | None = None  # which grid name to ask methods for budgets (default: own name)
    preset_grids: tuple[str, ...] | None = None  # method preset names merged in order (default: own name)
    eval_fractions: tuple[float, ...] = LOG_EVAL_FRACTIONS
    #: samples per evaluation: None (the protocols' sizes), a number, or target key -> number (targets not
    #: listed: the protocols' sizes); a number is marked as a non-standard size in the tables
    n_eval_samples: int | dict[str, int] | None = None
    protocol: str = "boltzbench"
    time_limit_min: int = 60  # default SLURM time limit per cell when the budget has no wall-clock limit
    #: upper limits applied after the method's suggestion (not to --set): keeps `smoke` within minutes
    caps: dict[str, float] = field(default_factory=dict)
    #: options passed to harness.metrics.evaluate for this grid's cells (looked up by spec.grid)
    metric_opts: dict[str, Any] = field(default_factory=dict)
    #: every cell must have a counted budget (steps / energy_evals) after the method's suggestion
    require_counted: bool = False
    #: the step budget of this grid's methods in that grid (``cpu``) caps each cell's steps, except for
    #: ``uncapped`` methods (MCMC, PT: they exist to spend the energy budget)
    step_cap_grid: str | None = None
    uncapped: tuple[str, ...] = ()
    #: a cell whose run in that grid (same config, seed, step cap, evaluation points) stopped at its steps
    #: within this cell's energy budget is that same run: its record is reused (``harness.covered``)
    cover_from: str | None = None

    def default_budget(self, target: str) -> dict[str, Any]:
        return dict(self.budgets.get(target, self.budgets.get("*", {})))

    def eval_samples(self, target: str) -> int | None:
        """Samples per evaluation for ``target`` (None: the protocols' sizes)."""
        n = self.n_eval_samples
        return n.get(target) if isinstance(n, dict) else n


#: equal-evals energy budgets (training energy evaluations per run): 1/10 of what iDEM's published configs
#: spend (batch x K x optimiser steps: gmm40 256k x 1e5, dw4/lj13 512k x 1e5, lj55 12.8k x 2e5)
EQUAL_EVALS = {"gmm40": 2_560_000_000, "dw4": 5_120_000_000, "lj13": 5_120_000_000, "lj55": 256_000_000}

#: equal-evals-cpu energy budgets (training energy evaluations per run), sized so the neural samplers' cpu
#: settings spend them in about the time of their ``cpu`` cells (docs/results.md: the usage behind them)
EQUAL_EVALS_CPU = {"gmm40": 50_000_000, "dw4": 50_000_000, "lj13": 20_000_000, "lj55": 2_000_000}

#: samples per evaluation in the cpu grids where the protocols' sizes cost more than the training: sampling
#: 5000 LJ-13 / 10 000 LJ-55 configurations through 100 EGNN steps at each of 10 evaluation points takes
#: longer than a cell's training on one core. Scored at these sizes under every protocol (noise floors at the
#: same size) and marked as non-standard sizes in the tables; GMM-40 and DW-4 keep the protocols' sizes
CPU_EVAL_SAMPLES = {"lj13": 1000, "lj55": 200}

GRIDS: dict[str, Grid] = {
    g.name: g
    for g in (
        Grid(
            "smoke",
            "every method x every target, tiny budgets: proves the plumbing in minutes on a CPU",
            targets=None,
            budgets={"*": {"steps": 3, "wall_seconds": 4.0}},
            eval_fractions=(0.5, 1.0),
            n_eval_samples=64,
            time_limit_min=10,
            caps={"wall_seconds": 10.0},
            # a plumbing check: no bootstrap intervals and no noise floors (they dominate a smoke cell)
            metric_opts={"n_boot": 0, "n_boot_ot": 0, "noise_floor": False},
        ),
        Grid(
            "cpu",
            "every target, budgets (optimiser steps) that give meaningful numbers on one CPU core in about "
            "20 minutes per cell; a 1 h wall-clock guard records `timeout`",
            targets=None,
            replicates=3,
            budgets={"*": {"guard_seconds": 3600.0}},
            n_eval_samples=CPU_EVAL_SAMPLES,
            time_limit_min=80,
            require_counted=True,
        ),
        Grid(
            "paper",
            "each method at its paper's settings (steps, batch sizes, K, ...), every target, one seed",
            targets=None,
            budgets={"*": {"guard_seconds": 172800.0}},
            time_limit_min=2880,
        ),
        Grid(
            "full",
            "paper x every target x 3 seeds: what goes to SLURM",
            targets=None,
            replicates=3,
            budgets={"*": {"guard_seconds": 172800.0}},
            budget_grid="paper",
            preset_grids=("paper", "full"),
            time_limit_min=2880,
        ),
        Grid(
            "equal-evals",
            "every method under the same training energy-evaluation budget per target",
            targets=None,
            replicates=3,
            budgets={t: {"energy_evals": n, "guard_seconds": 43200.0} for t, n in EQUAL_EVALS.items()},
            method_budgets=False,
            preset_grids=("paper", "equal-evals"),
            time_limit_min=780,
        ),
        Grid(
            "equal-evals-cpu",
            "every method (MCMC and PT included) at its cpu settings under one training energy-evaluation "
            "budget per target (EQUAL_EVALS_CPU): does a neural sampler beat MCMC at equal cost?",
            targets=None,
            replicates=3,
            budgets={t: {"energy_evals": n, "guard_seconds": 3600.0} for t, n in EQUAL_EVALS_CPU.items()},
            method_budgets=False,
            preset_grids=("cpu", "equal-evals-cpu"),
            n_eval_samples=CPU_EVAL_SAMPLES,
            time_limit_min=80,
            require_counted=True,
            step_cap_grid="cpu",
            uncapped=("mcmc", "pt"),
            cover_from="cpu",
        ),
    )
}


def names() -> list[str]:
    return list(GRIDS)


def get(name: str) -> Grid:
    if name not in GRIDS:
        raise ValueError(f"unknown grid {name!r}; valid grids: {', '.join(GRIDS)}")
    return GRIDS[name]


def derive_seed(grid_seed: int, target: str, method: str, replicate: int) -> int:
    """Deterministic 31-bit seed of a cell (documented in the module docstring)."""
    h = hashlib.sha256(f"{grid_seed}:{target}:{method}:{replicate}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------- overrides
def _hint_name(h: Any) -> str:
    return getattr(h, "__name__", None) or str(h).replace("typing.", "")


def coerce(text: str, hint: Any, what: str = "value") -> Any:
    """Parse a command-line string into a value of type ``hint`` (int, float, bool, str, None, Literal,
    tuple/list of those, unions); raises ValueError naming the expected type."""
    s = text.strip()
    origin = typing.get_origin(hint)
    if hint is Any:
        try:
            return json.loads(s)
        except json.JSONDecodeError:
            return s
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if type(None) in args and s.lower() in ("none", "null"):
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(s, a, what)
            except ValueError:
                continue
        raise ValueError(f"{what} expects {_hint_name(hint)}, got {text!r}")
    if hint is type(None):
        if s.lower() in ("none", "null"):
            return None
        raise ValueError(f"{what} expects None, got {text!r}")
    if origin is typing.Literal:
        for a in typing.get_args(hint):
            if str(a) == s or (isinstance(a, bool) and s.lower() == str(a).lower()):
                return a
        raise ValueError(f"{what} expects one of {list(typing.get_args(hint))}, got {text!r}")
    if hint is bool:
        if s.lower() in ("true", "1", "yes", "on"):
            return True
        if s.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{what} expects a bool (true/false), got {text!r}")
    if hint is int:
        try:
            v = float(s) if ("e" in s.lower() and not s.lower().startswith("0x")) else int(s, 0)
        except ValueError:
            raise ValueError(f"{what} expects an int, got {text!r}") from None
        if isinstance(v, float):
            if not v.is_integer():
                raise ValueError(f"{what} expects an int, got {text!r}")
            v = int(v)
        return v
    if hint is float:
        try:
            v = float(s)
        except ValueError:
            raise ValueError(f"{what} expects a float, got {text!r}") from None
        if math.isnan(v):
            raise ValueError(f"{what} expects a finite float or inf, got {text!r}")
        return v
    if hint is str:
        return text
    if origin in (tuple, list) or hint in (tuple, list):
        args = typing.get_args(hint)
        if s.startswith("["):
            try:
                items = json.loads(s)
            except json.JSONDecodeError:
                raise ValueError(f"{what} expects a list like [1,2] or 1,2, got {text!r}") from None
            items = [json.dumps(i) if not isinstance(i, str) else i for i in items]
        else:
            items = [p for p in s.split(",") if p.strip()] if s else []
        if args and len(args) == 2 and args[1] is Ellipsis:
            out = [coerce(i, args[0], what) for i in items]
        elif args:
            if len(items) != len(args):
                raise ValueError(f"{what} expects {len(args)} items ({_hint_name(hint)}), got {text!r}")
            out = [coerce(i, a, what) for i, a in zip(items, args)]
        else:
            out = [coerce(i, Any, what) for i in items]
        return tuple(out) if (origin is tuple or hint is tuple) else out
    raise ValueError(f"{what}: cannot parse a value of type {_hint_name(hint)} from the command line")


def parse_overrides(
    items: list[str] | None, methods: list[str]
) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Split ``["idem.num_mc_samples=100", "budget.steps=5"]`` into per-method raw overrides and raw
    budget overrides (strings; typed later). Errors name the valid prefixes."""
    per_method: dict[str, dict[str, str]] = {}
    budget: dict[str, str] = {}
    for item in items or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"malformed override {item!r}: expected METHOD.KEY=VALUE or budget.KEY=VALUE")
        lhs, value = item.split("=", 1)
        prefix, key = lhs.strip().split(".", 1)
        if not key:
            raise ValueError(f"malformed override {item!r}: empty key")
        if prefix == "budget":
            valid = ("energy_evals", "wall_seconds", "steps", "guard_seconds")
            if key not in valid:
                raise ValueError(f"unknown budget key {key!r} in {item!r}; valid keys: {', '.join(valid)}")
            budget[key] = value
        elif prefix in methods:
            per_method.setdefault(prefix, {})[key] = value
        else:
            raise ValueError(
                f"override {item!r} names {prefix!r}, which is not a selected method; "
                f"valid prefixes: budget, {', '.join(methods)}"
            )
    return per_method, budget


def typed_method_overrides(method_cls: Any, raw: dict[str, str]) -> dict[str, Any]:
    """Raw strings -> values typed by the method's Config fields; unknown keys name the valid ones."""
    cfg = method_cls.Config
    names_ = cfg.field_names()
    hints = typing.get_type_hints(cfg)
    out = {}
    for k, v in raw.items():
        if k not in names_:
            raise ValueError(f"unknown {cfg.__qualname__} key {k!r}; valid keys: {', '.join(names_)}")
        out[k] = coerce(v, hints[k], f"{method_cls.name}.{k}")
    return out


def config_overrides(method_cls: Any, items: list[str] | None) -> dict[str, Any]:
    """``["lr=1e-3", "hidden=64"]`` (the scripts' ``--set``) -> values typed by the method's Config fields;
    a malformed item or unknown key raises ``ValueError`` naming what is valid."""
    raw: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"malformed override {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        raw[k.strip()] = v
    return typed_method_overrides(method_cls, raw)


def typed_budget_overrides(raw: dict[str, str]) -> dict[str, Any]:
    hints = {"energy_evals": int | None, "wall_seconds": float | None, "steps": int | None,
             "guard_seconds": float | None}
    return {k: coerce(v, hints[k], f"budget.{k}") for k, v in raw.items()}


# ---------------------------------------------------------------------------------------------- expansion
@dataclass
class Expansion:
    """The cells of a grid selection, plus what could not be included and where budgets came from."""

    grid: Grid
    specs: list[RunSpec]
    missing_methods: list[str]  # planned but not registered
    budget_sources: dict[tuple[str, str], str]  # (target, method) -> "harness default" / "method" / ...

    def time_limit_min(self, spec: RunSpec) -> int:
        """SLURM time limit of a cell: 1.25 x its wall-clock budget or guard + 10 min, else the grid's."""
        ws = spec.budget.get("wall_seconds") or spec.budget.get("guard_seconds")
        if ws:
            return int(math.ceil(1.25 * ws / 60.0 + 10))
        return self.grid.time_limit_min


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d))


def expand(
    name: str,
    methods: list[str] | None = None,
    targets: list[str] | None = None,
    seeds: int | None = None,
    overrides: list[str] | None = None,
    device: str = "cpu",
) -> Expansion:
    """Expand a grid into RunSpecs. ``methods``/``targets`` restrict the selection (unknown names raise a
    ValueError listing the valid ones; a planned but unregistered method named explicitly is an error, while
    the grid's own unregistered methods are returned in ``missing_methods``)."""
    import methods as methods_pkg
    import targets as targets_pkg

    grid = get(name)
    registered = methods_pkg.names()
    planned = list(methods_pkg.PLANNED) + [m for m in registered if m not in methods_pkg.PLANNED]
    if methods:
        for m in methods:
            base, variant = methods_pkg.split_key(m)
            if variant is not None and base in registered:
                if m not in methods_pkg.variants():
                    valid = ", ".join(methods_pkg.variants()) or "(none)"
                    raise ValueError(f"unknown variant {m!r}; valid variants: {valid}")
                continue
            if m not in planned:
                raise ValueError(
                    f"unknown method {m!r}; valid methods: {', '.join(planned)}; "
                    f"variants: {', '.join(methods_pkg.variants())}"
                )
            if m not in registered:
                raise ValueError(
                    f"method {m!r} is planned but not implemented yet; "
                    f"registered methods: {', '.join(registered) or '(none)'}"
                )
        sel_methods = list(dict.fromkeys(methods))
        missing: list[str] = []
    else:
        sel_methods = [m for m in planned if m in registered]
        missing = [m for m in planned if m not in registered]
    grid_targets = list(grid.targets) if grid.targets is not None else targets_pkg.names()
    all_targets = targets_pkg.names(include_variants=True)
    if targets:
        for t in targets:
            if t not in all_targets:
                raise ValueError(f"unknown target {t!r}; valid targets: {', '.join(all_targets)}")
        sel_targets = list(dict.fromkeys(targets))
    else:
        sel_targets = grid_targets
    if seeds is not None and (isinstance(seeds, bool) or int(seeds) < 1):
        raise ValueError(f"--seeds must be a positive integer, got {seeds!r}")
    replicates = int(seeds) if seeds is not None else grid.replicates

    raw_method, raw_budget = parse_overrides(overrides, sel_methods)
    budget_over = typed_budget_overrides(raw_budget)
    preset_names = grid.preset_grids or (grid.name,)
    budget_grid = grid.budget_grid or grid.name

    specs: list[RunSpec] = []
    sources: dict[tuple[str, str], str] = {}
    for t in sel_targets:
        for m in sel_methods:
            M = methods_pkg.get(m)
            cli = typed_method_overrides(M, raw_method.get(m, {}))
            cfg_over: dict[str, Any] = {}
            variant = methods_pkg.split_key(m)[1]
            if variant is not None:  # the published configuration behind a number (MethodConfig.VARIANTS);
                # the grid's presets still apply over it (cpu: the cost settings K, batch, widths, SDE grid)
                cfg_over.update(M.Config.variant(variant, t))
            for p in preset_names:
                cfg_over.update(M.Config.preset(p, t))
            cfg_over.update(cli)
            M.Config.for_target(t, **cfg_over)  # validates keys and types (ValueError names valid keys)
            budget = grid.default_budget(t)
            source = "harness default"
            if grid.method_budgets:
                suggested = M.Config.suggested_budget(budget_grid, t)
                if suggested:
                    budget.update(suggested)
                    source = f"method ({budget_grid})"
            if grid.step_cap_grid and methods_pkg.split_key(m)[0] not in grid.uncapped:
                cap_steps = M.Config.suggested_budget(grid.step_cap_grid, t).get("steps")
                if cap_steps is not None:  # at most E evaluations and at most the cpu cell's steps
                    budget["steps"] = cap_steps
                    source += f", steps capped at the {grid.step_cap_grid} cell's {cap_steps}"
            for k, cap in grid.caps.items():
                if budget.get(k) is None or budget[k] > cap:
                    budget[k] = cap
                    source += f", {k} capped at {cap:g}"
            if budget_over:
                budget.update(budget_over)
                source += " + --set"
            budget = {k: v for k, v in budget.items() if v is not None}
            if budget.get("steps") is None and budget.get("energy_evals") is None:
                if grid.require_counted:
                    raise ValueError(
                        f"grid {grid.name!r} needs a counted budget (steps or energy_evals) for every cell, "
                        f"but {m} on {t} has {budget or 'none'}: add {M.Config.__qualname__}."
                        f"BUDGETS[{budget_grid!r}][{t!r}] or pass --set budget.steps=N"
                    )
                if "guard_seconds" in budget and "wall_seconds" not in budget:
                    budget["wall_seconds"] = budget.pop("guard_seconds")  # no step count: the clock is
                    source += ", wall-clock budget (no counted one)"  # the budget (paper grids)
            Budget.from_dict(budget)  # validates
            sources[(t, m)] = source
            for r in range(replicates):
                specs.append(
                    RunSpec(
                        grid=grid.name,
                        target=t,
                        method=m,
                        replicate=r,
                        seed=derive_seed(grid.seed, t, m, r),
                        config=_jsonable(cfg_over),
                        budget=budget,
                        protocol=grid.protocol,
                        eval_fractions=grid.eval_fractions,
                        n_eval_samples=grid.eval_samples(t),
                        device=device,
                    )
                )
    return Expansion(grid=grid, specs=specs, missing_methods=missing, budget_sources=sources)
