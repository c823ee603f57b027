"""Variance-exploding noise schedules (the forward process x_t = x_0 + sqrt(h(t)) ε, t ∈ [0, 1]).

``GeometricNoiseSchedule`` is DEM's (iDEM / NEM / BNEM): σ_d = σ_max/σ_min,
g(t) = σ_min σ_d^t sqrt(2 ln σ_d)  (diffusion coefficient of dx = g dW),
h(t) = ∫_0^t g² = σ_min² (σ_d^{2t} − 1)  (variance of x_t | x_0), σ(t) = sqrt(h(t)).
Note h(0) = 0 and sqrt(h(1)) = sqrt(σ_max² − σ_min²) ≈ σ_max (the prior scale).
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

    @property
    def prior_scale(self) -> float:
        """sqrt(h(1)): the scale of the Gaussian prior at t = 1."""
        return math.sqrt(self.sigma_min**2 * math.expm1(2 * self._log_sd))

    def __repr__(self) -> str:
        return f"GeometricNoiseSchedule(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"
