"""DDS — Denoising Diffusion Samplers (Vargas, Grathwohl & Doucet, ICLR 2023).

OU / VP reference with stationary law N(0, σ²I) run from the prior to the target with the exponential
integrator  y ← sqrt(1 − β_k²) y + β_k² σ² u_k + σ β_k ε  (the uncontrolled chain keeps N(0, σ²) exactly),
β_k² from the cos⁴ step scheme of Vargas et al.'s code normalised to Σβ_k² = ``noise_total`` (6.4 = their
T = 6.4 with dt = 0.05, i.e. 128 steps), largest steps at the prior and shrinking towards the target.
Objective: the DDS KL with the *squared* control norm, running cost ½ β_k² σ² |u_k|² (BNEM's `dds_module` uses
an unsquared norm there — a bug we do not copy) + terminal cost log N(y_K; 0, σ²) − log p̃(y_K); or the
log-variance loss. Working coordinates x / target.length_scale (GMM-40: x / 50, as iDEM / BNEM), prior σ = 1
there. For particle targets prior, noise and control are mean-free. See ``methods.control``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from methods.control import ChainCoefficients, ControlConfig, ControlledDiffusionSampler, dds_coefficients
from methods.registry import METHODS

_PARTICLE = {"network": "egnn", "hidden": 128}


@dataclass(frozen=True)
class DDSConfig(ControlConfig):
    """DDS hyper-parameters. Defaults = GMM-40: 128 steps and the cos⁴ scheme with Σβ² = 6.4 (Vargas et al.
    T = 6.4, dt = 0.05); prior σ = 1 (working coordinates); BNEM `dds.yaml` / `gmm_idem.yaml`: Adam lr 1e-3,
    weight decay 1e-7, target score (norm) clipped at 100, 1000 trajectories per step (its `eval_batch_size`),
    TimeMLP 3 × 128, TimeConder 32 × 2; the trainer clips the gradient norm at 0.5 (the shared
    ControlConfig defaults)."""

    n_steps: int = 128
    prior_std: float = 1.0  # σ of the reference / prior, working coordinates
    noise_total: float = 6.4  # Σ_k β_k²
    score_clip: float | None = 100.0
    score_clip_mode: Literal["value", "norm"] = "norm"

    PER_TARGET: ClassVar[dict[str, dict[str, Any]]] = {
        "gmm40": {},
        # particles: the shared EGNN (DEM: 3 × 128 for DW-4, 5 × 128 for LJ); LJ-55 batch 128 as iDEM's LJ-55
        "dw4": {**_PARTICLE, "n_layers": 3},
        "lj13": {**_PARTICLE, "n_layers": 5},
        "lj55": {**_PARTICLE, "n_layers": 5, "batch_size": 128},
    }
    # PRESETS and BUDGETS: shared with the other controlled-diffusion sampler (methods.control.ControlConfig)


@METHODS.register("dds")
class DDS(ControlledDiffusionSampler):
    name = "dds"
    display_name = "DDS"
    Config = DDSConfig
    config: DDSConfig

    def coefficients(self) -> ChainCoefficients:
        return dds_coefficients(self.config.n_steps, self.config.prior_std, self.config.noise_total)

    def initial_states(self, n: int) -> Tensor:
        y = torch.randn(n, self.target.dim, generator=self.generator, dtype=self.dtype, device=self.device)
        y = self.config.prior_std * y
        return self.work.center(y) if self.work.is_particle else y
