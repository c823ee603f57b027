"""Shared fixtures of the harness tests: a small toy method (Gaussian fitted by reparameterised SGD on the
reverse KL, calling ``target.energy_and_grad`` once per step on ``batch_size`` configurations, so counts are
checkable exactly), and stand-ins for modules other engineers are still writing (``harness.metrics``,
``targets.reference``) that are used only while those modules are absent.

Child processes (local executor, SLURM) load the toy method with the harness's plugin option:
``--plugin tests/conftest.py:register_toy``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
import time
import types
from typing import Any

import pytest
import torch

REPO = __file__.rsplit("/tests/", 1)[0]
TOY_PLUGIN = "tests/conftest.py:register_toy"


# ------------------------------------------------------------------------------------------ toy method
def _toy_classes() -> tuple[type, type]:
    from methods.base import Method, MethodConfig

    @dataclasses.dataclass(frozen=True)
    class ToyConfig(MethodConfig):
        # plain class attributes (no annotation): a string "ClassVar[...]" annotation is resolved in
        # sys.modules["conftest"], which is tests/bench/conftest.py when both conftests are loaded
        PRESETS = {"smoke": {"*": {"batch_size": 16}}}
        BUDGETS = {"cpu": {"*": {"steps": 50}}}

        batch_size: int = 32
        lr: float = 0.01
        init_scale: float = 1.0
        diverge_at_step: int | None = None  # set parameters to NaN at this step
        fail_at_step: int | None = None  # raise RuntimeError at this step
        nan_samples: bool = False  # sample() returns NaNs
        step_sleep_s: float = 0.0  # make steps slow (kill tests)
        exit_at_step: int | None = None  # the process dies (os._exit) at this step: a killed job
        hidden: tuple[int, ...] = (4, 4)  # unused; exercises tuple parsing

    class Toy(Method):
        name = "toy"
        display_name = "Toy"
        Config = ToyConfig

        def __init__(self, target: Any, config: Any, device: Any, generator: torch.Generator):
            super().__init__(target, config, device, generator)
            d = target.dim
            self.mu = torch.nn.Parameter(
                config.init_scale * torch.randn(d, generator=generator, device=self.device)
            )
            self.log_sigma = torch.nn.Parameter(torch.zeros(d, device=self.device))
            # hand-written SGD with momentum (torch.optim's first use imports torch._dynamo: seconds)
            self.velocity = torch.zeros(2, d, device=self.device)
            self.n_steps = 0

        def _draw(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
            eps = torch.randn(n, self.target.dim, generator=self.generator, device=self.device)
            return self.mu.detach() + self.log_sigma.detach().exp() * eps, eps

        def train_step(self) -> dict[str, float]:
            self.n_steps += 1
            c = self.config
            if c.step_sleep_s:
                time.sleep(c.step_sleep_s)
            if c.exit_at_step is not None and self.n_steps >= c.exit_at_step:
                os._exit(3)
            if c.fail_at_step is not None and self.n_steps >= c.fail_at_step:
                raise RuntimeError(f"toy failure at step {self.n_steps}")
            x, eps = self._draw(c.batch_size)
            e, g = self.target.energy_and_grad(x)
            g = g.clamp(-1e3, 1e3)
            sigma = self.log_sigma.detach().exp()
            grad = torch.stack([g.mean(0), (g * eps * sigma).mean(0) - 1.0])
            self.velocity.mul_(0.9).add_(grad)
            with torch.no_grad():
                self.mu.sub_(c.lr * self.velocity[0])
                self.log_sigma.sub_(c.lr * self.velocity[1]).clamp_(-5.0, 5.0)
            if c.diverge_at_step is not None and self.n_steps >= c.diverge_at_step:
                with torch.no_grad():
                    self.log_sigma.fill_(float("nan"))
            return {"loss": float(e.mean() - self.log_sigma.detach().sum())}

        def sample(self, n: int) -> torch.Tensor:
            x, _ = self._draw(n)
            if self.config.nan_samples:
                x[0] = float("nan")
            if getattr(self.target, "n_particles", None):
                x = self.target.center(x)
            return x

        def state_dict(self) -> dict[str, Any]:
            return {
                "mu": self.mu.detach().clone(),
                "log_sigma": self.log_sigma.detach().clone(),
                "velocity": self.velocity.clone(),
                "n_steps": self.n_steps,
            }

        def load_state_dict(self, state: dict[str, Any]) -> None:
            with torch.no_grad():
                self.mu.copy_(state["mu"])
                self.log_sigma.copy_(state["log_sigma"])
                self.velocity.copy_(state["velocity"])
            self.n_steps = int(state["n_steps"])

        def diagnostics(self) -> dict[str, float]:
            return {"mean_sigma": float(self.log_sigma.detach().exp().mean())}

    return Toy, ToyConfig


def _install_fallbacks() -> None:
    """Stand-ins for harness.metrics / targets.reference while those modules do not exist yet."""
    if importlib.util.find_spec("harness.metrics") is None and "harness.metrics" not in sys.modules:
        m = types.ModuleType("harness.metrics")

        def evaluate(samples: torch.Tensor, reference: torch.Tensor, target: Any, protocol: str = "") -> dict:
            s = samples.double()
            ok = torch.isfinite(s).all(1)
            s = s[ok]
            e = target.energy(s.float()).double() if len(s) else torch.tensor([float("nan")])
            return {
                "x_w2": float((s.mean(0) - reference.double().mean(0)).norm()) if len(s) else float("nan"),
                "e_w2": float(e.mean()),
                "tv": float("nan"),
                "n_nonfinite": int((~ok).sum()),
            }

        def eval_sizes(protocol: str, target_name: str) -> tuple[int, int]:
            return 100, 100

        m.evaluate = evaluate  # type: ignore[attr-defined]
        m.eval_sizes = eval_sizes  # type: ignore[attr-defined]
        m.STUB = True  # type: ignore[attr-defined]
        sys.modules["harness.metrics"] = m
    if importlib.util.find_spec("targets.reference") is None and "targets.reference" not in sys.modules:
        r = types.ModuleType("targets.reference")

        def load_reference(target: Any, split: str = "test", n: int | None = None) -> torch.Tensor:
            g = torch.Generator().manual_seed(123)
            x = torch.randn(n or 1000, target.dim, generator=g)
            return target.center(x) if getattr(target, "n_particles", None) else x

        def reference_info(target: Any, split: str = "test") -> dict:
            return {"source": "test stand-in (targets.reference absent)"}

        r.load_reference = load_reference  # type: ignore[attr-defined]
        r.reference_info = reference_info  # type: ignore[attr-defined]
        sys.modules["targets.reference"] = r


def register_toy() -> type:
    """Register the toy method as ``toy`` (idempotent) and install the fallbacks; returns the class."""
    import methods

    _install_fallbacks()
    if "toy" in methods.METHODS:
        return methods.get("toy")
    Toy, _ = _toy_classes()
    methods.METHODS.register("toy")(Toy)
    return Toy


def unregister_toy() -> None:
    import methods

    methods.METHODS._items.pop("toy", None)


@pytest.fixture
def toy_method():
    """The toy method registered as ``toy`` for the duration of a test."""
    was = "toy" in __import__("methods").METHODS
    cls = register_toy()
    yield cls
    if not was:
        unregister_toy()


@pytest.fixture
def results(tmp_path):
    d = tmp_path / "runs"
    d.mkdir()
    return d


# ------------------------------------------------------------------------------------------ SLURM
def slurm_available() -> tuple[bool, str]:
    """Whether a SLURM controller answers here (``scontrol ping`` says UP and ``sinfo`` lists a node)."""
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return False, "no SLURM client installed (run `make slurm-up`)"
    try:
        p = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"scontrol ping failed: {e}"
    if p.returncode != 0 or "UP" not in p.stdout:
        return False, f"no SLURM controller answers (scontrol ping: {p.stdout.strip() or p.stderr.strip()})"
    s = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
    states = s.stdout.split()
    if not any(st.startswith(("idle", "mix", "alloc")) for st in states):
        return False, f"SLURM answers but no usable node (sinfo states: {states})"
    return True, ""


@pytest.fixture
def slurm():
    ok, why = slurm_available()
    if not ok:
        pytest.skip(why)


# ------------------------------------------------------------------------------------------ metrics stand-in
def fast_metrics_fn(samples, reference, target, protocol, **opts):
    """Deterministic stand-in for ``harness.metrics.evaluate`` (a function of the samples only)."""
    import torch

    s = samples[torch.isfinite(samples).all(1)]
    return {"x_w2": float((s.double().mean(0) - reference["test"].double().mean(0)).norm()),
            "e_w2": float(target.energy(s).double().mean())}


@pytest.fixture
def fast_metrics(monkeypatch):
    """The harness's final scoring uses ``fast_metrics_fn`` instead of the real metrics."""
    from harness import scoring

    monkeypatch.setattr(scoring, "evaluate_metrics", fast_metrics_fn)
