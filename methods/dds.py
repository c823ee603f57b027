"""DDS — Denoising Diffusion Samplers (Vargas, Grathwohl & Doucet, ICLR 2023).

OU / VP reference with stationary law N(0, σ²I) run from the prior to the target with the exponential
integrator  y ← sqrt(1 − β_k²) y + β_k² σ² u_k + σ β_k ε  (the uncontrolled chain keeps N(0, σ²) exactly),
β_k² from the cos⁴ step scheme of Vargas et al.'s code normalised to Σβ_k² = ``noise_total`` (6.4 = their
T = 6.4 with dt = 0.05, i.e. 128 steps), largest steps at the prior and shrinking towards the target.
Objective: the DDS KL with the *squared* control norm, running cost ½ β_k² σ² |u_k|² (BNEM's `dds_module` uses
an unsquared norm there — a bug we do not copy) + terminal cost log N(y_K; 0, σ²) − log p̃(y_K); or the
log-variance loss. Working coordinates x / target.length_scale (GMM-40: x / 50, as iDEM / BNEM), prior σ = 1
there. For particle targets prior, noise and control are mean-free. See ``methods.control``.

The variant ``dds@bnem`` (``DDSConfig.VARIANTS["bnem"]``) is DDS as BNEM's code ran it for the DDS rows of its
tables: BNEM's per-step rates α_k (``schedule="bnem_cosine"`` / ``"geometric"``) with its variance-preserving
step (``integrator="var_preserve"``), noise level σ_max ≠ prior σ on DW-4 / LJ, the unsquared-norm running
cost (``running_cost="norm"``), 100 steps, its networks' initialisation and ReduceLROnPlateau on the particle
targets. docs/pis_dds.md lists every difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from methods.control import (
    ChainCoefficients,
    ControlConfig,
    ControlledDiffusionSampler,
    bnem_alphas,
    dds_betas_sq,
    dds_coefficients,
    ou_coefficients,
)
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
    prior_std: float = 1.0  # σ of the prior y_0 and of the terminal cost's Gaussian, working coordinates
    noise_total: float = 6.4  # Σ_k β_k² of the "cos4" schedule
    score_clip: float | None = 100.0
    score_clip_mode: Literal["value", "norm"] = "norm"
    # step sizes: "cos4" (Vargas et al.'s cos_sq_fn_step_scheme, β_k² summing to noise_total, largest at the
    # prior); BNEM's α_k(t_k, dt) at t_k = k/K: "bnem_cosine" (its DDSNoiseSchedule, dt·cos⁴(π/2·(1 − t + s)
    # /(1 + s)), s = sigma_min) or "geometric" (DEM's GeometricNoiseSchedule(sigma_min, σ), 1 − exp(−2∫g));
    # both grow towards the target
    schedule: Literal["cos4", "bnem_cosine", "geometric"] = "cos4"
    # the step: "exponential" (a = sqrt(1 − β²), c = β²σ², s = σβ) or "var_preserve" (BNEM's integrate_sde
    # var_preserve: a = sqrt(1 − α), c = 2σ²(1 − sqrt(1 − α)), s = σ sqrt(α))
    integrator: Literal["exponential", "var_preserve"] = "exponential"
    # σ of the chain's noise (the OU reference's stationary std; BNEM's noise_schedule.sigma_max, also the
    # geometric schedule's σ_max); None: prior_std (a stationary reference)
    sigma_max: float | None = None
    # BNEM's noise_schedule.sigma_min: the geometric schedule's σ_min, or the bnem_cosine offset s
    sigma_min: float = 1e-4

    PER_TARGET: ClassVar[dict[str, dict[str, Any]]] = {
        "gmm40": {},
        # particles: the shared EGNN (DEM: 3 × 128 for DW-4, 5 × 128 for LJ); LJ-55 batch 128 as iDEM's LJ-55
        "dw4": {**_PARTICLE, "n_layers": 3},
        "lj13": {**_PARTICLE, "n_layers": 5},
        "lj55": {**_PARTICLE, "n_layers": 5, "batch_size": 128},
    }
    # PRESETS and BUDGETS: shared with the other controlled-diffusion sampler (methods.control.ControlConfig)

    #: DDS as BNEM's code ran it (MethodConfig.VARIANTS; docs/pis_dds.md "dds@bnem", docs/reproduction.md).
    #: The configuration composed by `python dem/train.py experiment=<t>_idem model=dds` from configs/model/
    #: dds.yaml + configs/experiment/<t>_idem.yaml + trainer/default.yaml as they stood from 9a7eacf
    #: (2024-09-03, DDSNoiseSchedule.a without the σ_max factor) to 631dd27 (2025-02-12): the poster's code.
    #: GMM: gmm_idem.yaml set only sigma_max 1.0, so dds.yaml's DDSNoiseSchedule (cosine) ran; since abac3f3
    #: (2025-05-24) it is GeometricNoiseSchedule(1e-4, 1): `--set schedule=geometric`.
    VARIANTS: ClassVar[dict[str, dict[str, Any]]] = {
        "bnem": {
            "description": "DDS as BNEM's code ran it for its tables: 100 steps; BNEM's variance-preserving "
            "step with its per-step rates α(t, dt) (DDSNoiseSchedule dt·cos⁴, offset 1e-4; LJ-55 DEM's "
            "geometric schedule σ 0.5-4), noise σ_max 1 / 3 / 6 / 4 (GMM / DW-4 / LJ-13 / LJ-55) while the "
            "prior and the terminal cost stay N(0, 1); running cost with the unsquared norm "
            "2σ²λ²/α·‖u‖ (a bug, kept); MyMLP with torch's default read-out init, TimeConder with a "
            "learnable phase; ReduceLROnPlateau (0.1, patience 10) on the val loss for DW-4 / LJ; LJ-55 "
            "16 paths per step",
            "source": "tonyauyeung/BNEM dem/models/dds_module.py, dem/models/components/sde_integration.py "
            "(euler_maruyama_step, var_preserve), dem/models/components/noise_schedules.py "
            "(DDSNoiseSchedule.a, GeometricNoiseSchedule.a), dem/models/components/mlp.py (MyMLP, "
            "TimeConder), configs/model/dds.yaml, configs/experiment/{gmm,dw4,lj13,lj55}_idem.yaml, "
            "configs/trainer/default.yaml at af2c1bb (2024-12-07; unchanged in these files since 9a7eacf "
            "/ ce3177d); docs/pis_dds.md",
            "overrides": {
                "*": dict(n_steps=100, schedule="bnem_cosine", integrator="var_preserve", prior_std=1.0,
                          sigma_min=1e-4, running_cost="norm", time_phase=True, score_clip=100.0,
                          score_clip_mode="norm", nn_clip=1e4, batch_size=1000, lr=1e-3, weight_decay=1e-7,
                          grad_norm_clip=0.5, time_channels=32, time_layers=2),
                "gmm40": dict(sigma_max=1.0, readout_init="default", hidden=128, n_layers=3, emb_size=128),
                "dw4": dict(sigma_max=3.0, lr_plateau=True, plateau_check_steps=1000),
                "lj13": dict(sigma_max=6.0, lr_plateau=True, plateau_check_steps=1000),
                # check_val_every_n_epoch 50 (5000 steps), 4 val batches, eval_batch_size 16
                "lj55": dict(schedule="geometric", sigma_min=0.5, sigma_max=4.0, batch_size=16,
                             lr_plateau=True, plateau_check_steps=5000, plateau_val_batches=4),
            },
        },
    }


@METHODS.register("dds")
class DDS(ControlledDiffusionSampler):
    name = "dds"
    display_name = "DDS"
    Config = DDSConfig
    config: DDSConfig

    def coefficients(self) -> ChainCoefficients:
        c = self.config
        if c.schedule not in ("cos4", "bnem_cosine", "geometric"):
            raise ValueError(f"dds: schedule must be 'cos4', 'bnem_cosine' or 'geometric', "
                             f"got {c.schedule!r}")
        sigma = c.prior_std if c.sigma_max is None else c.sigma_max
        if c.schedule == "cos4" and c.integrator == "exponential" and sigma == c.prior_std:
            return dds_coefficients(c.n_steps, c.prior_std, c.noise_total)  # the default chain
        if c.schedule == "cos4":
            steps = dds_betas_sq(c.n_steps, c.noise_total)
        else:
            if c.schedule == "geometric" and not c.sigma_min < sigma:
                raise ValueError(f"dds: the geometric schedule needs sigma_min < sigma_max (or prior_std), "
                                 f"got {c.sigma_min} and {sigma}")
            steps = bnem_alphas(c.schedule, c.n_steps, c.sigma_min, sigma)
        return ou_coefficients(steps, sigma, c.prior_std, c.integrator)

    def initial_states(self, n: int) -> Tensor:
        y = torch.randn(n, self.target.dim, generator=self.generator, dtype=self.dtype, device=self.device)
        y = self.config.prior_std * y
        return self.work.center(y) if self.work.is_particle else y

