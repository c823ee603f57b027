"""Variance-exploding noise schedules (the forward process x_t = x_0 + sqrt(h(t)) ε, t ∈ [0, 1]).

``GeometricNoiseSchedule`` is DEM's (iDEM / NEM / BNEM): σ_d = σ_max/σ_min,
g(t) = σ_min σ_d^t sqrt(2 ln σ_d)  (diffusion coefficient of dx = g dW),
h(t) = ∫_0^t g² = σ_min² (σ_d^{2t} − 1)  (variance of x_t | x_0), σ(t) = sqrt(h(t)).
Note h(0) = 0 and sqrt(h(1)) = sqrt(σ_max² − σ_min²) ≈ σ_max (the prior scale).

Per-step variance-preserving rates α(t, dt) ∈ (0, 1] of BNEM's DDS baseline (its ``noise_schedule.a(t, dt)``,
used by the ``var_preserve`` integrator, ``methods.control.ou_coefficients``):
``GeometricNoiseSchedule.alpha`` = 1 − exp(−2 ∫_{t−dt}^{t} g) (t clamped to ≥ dt), the exact one-step variance
fraction of an OU process dY = −g(t) Y dt + σ sqrt(2 g(t)) dW whose *rate* is DEM's diffusion coefficient g;
``cosine_alpha`` = dt · cos⁴(π/2 · (1 − t + s)/(1 + s)) (BNEM's ``DDSNoiseSchedule``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class GeometricNoiseSchedule:
    """Geometric VE schedule; all methods take a tensor (or float) t and return a tensor of the same shape."""

    def __init__(self, sigma_min: float, sigma_max: float) -> None:
        if not (0 < sigma_min < sigma_max):
            raise ValueError(
                f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}"
            )
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.sigma_diff = self.sigma_max / self.sigma_min
        self._log_sd = math.log(self.sigma_diff)

    def g(self, t: Tensor | float) -> Tensor:
        """Diffusion coefficient g(t) = σ_min σ_d^t sqrt(2 ln σ_d)."""
        t = torch.as_tensor(t)
        return self.sigma_min * torch.exp(t * self._log_sd) * math.sqrt(2 * self._log_sd)

    def h(self, t: Tensor | float) -> Tensor:
        """Variance of x_t | x_0: σ_min² (σ_d^{2t} − 1)."""
        t = torch.as_tensor(t)
        return self.sigma_min**2 * torch.expm1(2 * t * self._log_sd)

    def sigma(self, t: Tensor | float) -> Tensor:
        """Standard deviation sqrt(h(t))."""
        return torch.sqrt(self.h(t))

    def g_integral(self, t0: Tensor | float, t1: Tensor | float) -> Tensor:
        """∫_{t0}^{t1} g(s) ds = σ_min sqrt(2 ln σ_d) / ln σ_d · (σ_d^{t1} − σ_d^{t0})."""
        t0, t1 = torch.as_tensor(t0), torch.as_tensor(t1)
        c = self.sigma_min * math.sqrt(2 * self._log_sd) / self._log_sd
        return c * (torch.exp(t1 * self._log_sd) - torch.exp(t0 * self._log_sd))

    def alpha(self, t: Tensor | float, dt: float) -> Tensor:
        """BNEM's ``GeometricNoiseSchedule.a(t, dt)``: 1 − exp(−2 ∫_{t'−dt}^{t'} g), t' = max(t, dt) (so the
        steps at t = 0 and t = dt get the same α)."""
        t = torch.clamp(torch.as_tensor(t), min=dt)
        return -torch.expm1(-2 * self.g_integral(t - dt, t))

    @property
    def prior_scale(self) -> float:
        """sqrt(h(1)): the scale of the Gaussian prior at t = 1."""
        return math.sqrt(self.sigma_min**2 * math.expm1(2 * self._log_sd))

    def __repr__(self) -> str:
        return f"GeometricNoiseSchedule(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


def cosine_alpha(t: Tensor | float, dt: float, offset: float = 1e-4) -> Tensor:
    """BNEM's ``DDSNoiseSchedule.a(t, dt)`` = dt · cos⁴(π/2 · (1 − t + s)/(1 + s)), s = ``offset`` (its
    ``sigma_min``, 1e-4 in ``dds.yaml``). ≈ 0 at t = 0, ≈ dt at t = 1: run from t = 0 (prior) to 1 (target),
    the steps grow towards the target and sum to ≈ 3/8."""
    t = torch.as_tensor(t)
    return dt * torch.cos(math.pi / 2 * (1 - t + offset) / (1 + offset)) ** 4
