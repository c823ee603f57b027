"""FAB: flow annealed importance sampling bootstrap (Midgley et al., ICLR 2023) as method ``fab``.

A normalising flow q_θ is trained by minimising the α-divergence D_α(p‖q) with α = 2. The gradient is
−E_g[∇ log q_θ] with g ∝ p^α q^{1−α}.
- It is estimated with AIS samples from q towards g (``methods.ais``).
- The samples are stored in a prioritised replay buffer (``methods.prioritised_buffer``) and re-used for
  several gradient steps, with the weight correction (1 − α)(log q_new − log q_old).

One ``train_step`` is one optimiser step.
- With the buffer (the published setting), an AIS batch of ``batch_size`` chains is generated before every
  ``n_updates_per_ais`` steps. Before the first step, enough batches are generated to reach ``buffer_min``.
- Without the buffer, every step uses a fresh AIS batch and the loss −Σ softmax(log w) log q_θ(x).

Flows (``flow``):
- ``realnvp`` (GMM-40): works in the target's raw coordinates, as fab-torch does. The base is
  N(loc, diag(scale²)) with trainable loc and log-scale and initial scale ``base_scale``.
- ``eacf`` (default for particle targets): the SE(3)-equivariant augmented coupling flow of the published
  particle results (``methods.eacf``).
  - It is a flow on the joint (x, a) space. AIS/HMC and the buffer run there, with target p(x)·π(a | x)
    (``methods.eacf.AugmentedTarget``).
  - ``sample`` returns the x part.
  - Importance weights (``sample_mode="resample"``, ``log_z``, ``ess``) are the joint weights
    p(x)π(a|x)/q(x, a), as the published evaluation's reverse ESS.
  - ``diagnostics`` also reports the marginal ones, with log q̂(x) the K-sample estimate.
- ``cnf`` (the variant ``fab@cnf``): our E(n)-equivariant continuous flow on the shared
  ``methods.nets.EGNN``, with a mean-free Gaussian base.

Optimiser: Adam.
- ``lr_schedule="warmup_cosine"`` is the published particle schedule: linear warm-up from ``lr_init`` to
  ``lr``, then cosine decay to ``lr_end`` at ``lr_total_steps``.
- ``grad_clip_mode="dynamic"`` is the published dynamic clipping: skip a step whose gradient norm is above
  10 × the median of the last 100 norms, or is not finite; otherwise clip to 2 × that median.
- ``"fixed"`` clips to ``grad_clip``. This is fab-torch's, and our GMM-40 and CNF setting.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from methods.ais import HMC, AnnealedImportanceSampler, Metropolis, alpha_div_loss, log_weights_ess
from methods.base import AT_LEAST_1, NON_NEGATIVE, POSITIVE, Method, MethodConfig, Range
from methods.eacf import AugmentedTarget, EACFFlow
from methods.flows import EquivariantCNF, RealNVP
from methods.lr import plateau_update
from methods.prioritised_buffer import PrioritisedReplayBuffer
from methods.registry import METHODS

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# smoke-grid particle flows: one RK4 step of a one-layer EGNN (CNF) or one block of a one-layer EGNN (EACF),
# one HMC intermediate with 2 leapfrog steps
_TINY = {
    "cnf_steps": 1, "hidden": 16, "n_layers": 1, "n_intermediate": 1, "n_inner": 2,
    "eacf_blocks": 1, "eacf_egnn_layers": 1, "eacf_hidden": 16, "eacf_features": 16, "spline_bins": 4,
    "marginal_k": 4, "diag_marginal_samples": 16,
}
# the published particle optimiser (EACF examples/config/training/optimizer/default_lr_schedule.yaml): Adam,
# lr 2e-5 -> 2e-4 over 30 AIS iterations x 8 updates, cosine down to 2e-5 at the last step; dynamic clipping
# (skip above 10 x, clip at 2 x the median of the last 100 gradient norms)
_EACF_OPT = {
    "lr": 2e-4, "lr_schedule": "warmup_cosine", "lr_init": 2e-5, "lr_end": 2e-5, "lr_warmup_steps": 30 * 8,
    "grad_clip_mode": "dynamic", "dyn_clip_factor": 2.0, "dyn_skip_factor": 10.0, "dyn_window": 100,
}
# the published particle AIS and buffer (EACF examples/config/fab/default.yaml): HMC 1 x 5 leapfrog steps,
# eps0 1.0 tuned to p_accept 0.65, 8 gradient updates per AIS pass, buffer 512 / 64 batches, w-adjust clip 10
_EACF_FAB = {
    "transition": "hmc", "n_inner": 5, "step_size": 1.0, "adapt_step_size": True, "n_updates_per_ais": 8,
    "w_adjust_max_clip": 10.0, "dtype": "float32", "flow": "eacf",
}
# the variant fab@cnf: our continuous flow with a constant lr and the fixed gradient-norm clip
_CNF_VARIANT = {"flow": "cnf", "lr_schedule": "constant", "grad_clip_mode": "fixed"}
# the variant fab@bnem: FAB as tonyauyeung/BNEM ran it for its poster's FAB rows (dem/models/fab_module.py,
# components/ffjord.py, ais_fab.py, replay_buffer.py; configs/model/fab.yaml at 6f016c7; fab-torch's
# Metropolis from jarridrb/fab-torch febeeaa). Per-target parts (GMM-40 / DW-4): VARIANTS["bnem"]; docs/fab.md
_BNEM_FAB = {
    # FFJORD: Hutchinson trace, log q over torch.linspace(0, 1, 25) = 24 RK4 steps; the AIS's flow draws
    # integrate one RK4 step (reverse_fn in training mode gets only the end points); vector field 3 x 128
    "flow": "cnf", "cnf_divergence": "hutchinson", "cnf_steps": 24, "cnf_sample_steps": 1, "hidden": 128,
    "n_layers": 3, "cnf_rk": "3/8", "cnf_probe": "gaussian_fixed",
    # AIS towards p^2/q: 5 intermediates, 10 Metropolis updates each, ladder 5 -> 0.1 (flow units), each
    # update's step adapted x/÷1.05 towards mean acceptance probability 0.65 (fab-torch's set_eval_mode is
    # inverted, so tuning is on in every pass); float32 exp overflow rejects log ratios > 88.72
    "transition": "metropolis", "n_intermediate": 5, "n_inner": 10, "step_size": 5.0, "min_step_size": 0.1,
    "adapt_step_size": True, "adapt_per_update": True, "step_adapt_factor": 1.05, "target_accept": 0.65,
    "max_log_ratio": math.log(torch.finfo(torch.float32).max),
    # fab-torch's Metropolis compares each update's proposal with π at the transition's start (its
    # x_prev_log_prob is never refreshed): not π-invariant, reproduced
    "stale_reference": True,
    # 1 024 AIS chains per epoch of 100 steps of 512 buffer draws; buffer 10 000 (first fill 1 024 >= 1 000);
    # loss -mean(min(w_adj, 1e3) log q); Adam lr 1e-3, Lightning gradient_clip_val 0.5 (norm)
    "ais_batch_size": 1024, "batch_size": 512, "n_updates_per_ais": 100, "buffer_max": 10_000,
    "buffer_min": 1_000, "w_adjust_max_clip": 1e3, "lr": 1e-3, "lr_schedule": "constant",
    "grad_clip_mode": "fixed", "grad_clip": 0.5, "dtype": "float32", "alpha": 2.0,
    # uncentred proposals / density; first fill from the base with the -log q slip
    "centre_chains": False, "init_from_base": True, "init_log_q_negated": True, "buffer_rule": "bnem",
    "ais_at_epoch_end": True,
}
#: cpu grid: optimiser steps of the particle cells (one core, about 20 minutes each; the lr schedule decays
#: over exactly these). Measured CPU s/step of the default EACF presets (docs/fab.md): DW-4 0.53, LJ-13 0.62,
#: LJ-55 0.57; fab@cnf (same budget, variant-blind) needs ≈ 1.3 s/step on DW-4
CPU_STEPS = {"dw4": 1_800, "lj13": 1_500, "lj55": 1_500}

@dataclasses.dataclass(frozen=True)
class FABConfig(MethodConfig):
    """Hyper-parameters of FAB. Defaults are the fab-torch GMM settings (``experiments/config/gmm.yaml`` run
    with ``use_buffer=True prioritised_buffer=True``, α = 2, 1 intermediate distribution)."""

    alpha: float = 2.0
    # --- AIS
    n_intermediate: int = 1
    transition: Literal["metropolis", "hmc"] = "metropolis"
    n_inner: int = 1  # Metropolis steps per intermediate density, or HMC leapfrog steps
    step_size: float = 5.0
    adapt_step_size: bool = False
    target_accept: float = 0.65
    step_adapt_factor: float | None = None  # None: log ε += acc − target; f: ×/÷ f per pass (fab-jax 1.02)
    max_grad: float = 1e3  # HMC gradient clamp (fab-torch max_grad)
    # Metropolis as fab-torch's operator in BNEM's FAB (fab@bnem; methods.ais.Metropolis): a per-update ladder
    # linspace(step_size, min_step_size, n_inner), each update's step adapted after it from the mean
    # acceptance probability, proposals with log ratio > max_log_ratio rejected (float32 exp overflow)
    min_step_size: float | None = None
    adapt_per_update: bool = False
    max_log_ratio: float | None = None
    stale_reference: bool = False  # fab-torch: every update's ratio against π at the transition's start
    ais_batch_size: int | None = None  # AIS chains per pass (None: batch_size)
    # --- flow
    flow: Literal["realnvp", "cnf", "eacf"] = "realnvp"
    n_layers: int = 15  # RealNVP coupling blocks; CNF: EGNN layers
    hidden: int = 80  # RealNVP MLP width; CNF: EGNN width
    base_scale: float = 1.0  # std of the base (EACF: of its x part)
    cnf_steps: int = 8  # RK4 steps of the continuous flow
    cnf_divergence: Literal["auto", "exact", "hutchinson"] = "auto"
    cnf_coord_scale: float = 1.0  # the CNF lives on x / cnf_coord_scale (BNEM GMM-40: 50)
    cnf_rk: Literal["classic", "3/8"] = "classic"  # "3/8": torchdiffeq's rk4 (BNEM's FFJORD)
    cnf_probe: Literal["rademacher", "gaussian_fixed"] = "rademacher"  # FFJORD: one N(0, I) probe per solve
    cnf_sample_steps: int | None = None  # RK4 steps of the AIS's flow draws only (None: cnf_steps; BNEM: 1)
    # False (fab@bnem): AIS proposals in the full n·d space and the CNF density not restricted to centred x
    # (BNEM's); the buffer points are centred before the loss, as BNEM's training step does
    centre_chains: bool = True
    # BNEM's initial buffer fill: AIS chains start from base samples (init_from_prior) with the flow's log q,
    # and the buffer stores −log q for that first pass (the published sign slip)
    init_from_base: bool = False
    init_log_q_negated: bool = False
    # EACF (methods.eacf; published: 12 blocks, EGNN 3 layers, MLPs 64, 128 invariant features, 8 bins)
    eacf_blocks: int = 12
    eacf_egnn_layers: int = 3
    eacf_hidden: int = 64
    eacf_features: int = 128
    spline_bins: int = 8
    spline_r_max: float = 10.0
    aug_scale: float = 0.1  # std of π(a | x) = N(x, σ²) and of the base's a | x
    aux_loss_weight: float = 0.0  # frame barrier loss (published: 1 on LJ-13, off on DW-4)
    marginal_k: int = 20  # K of the marginal log q̂(x) (published K_marginal_log_lik)
    diag_marginal_samples: int = 256  # flow samples for the marginal ESS / log Z in diagnostics (0: off)
    dtype: Literal["float32", "float64"] = "float64"
    # --- optimisation
    batch_size: int = 128
    lr: float = 1e-4  # the peak of the warm-up/cosine schedule
    lr_schedule: Literal["constant", "warmup_cosine"] = "constant"
    lr_init: float = 2e-5
    lr_end: float = 2e-5
    lr_warmup_steps: int = 240
    lr_total_steps: int = 160_000
    grad_clip_mode: Literal["fixed", "dynamic"] = "fixed"
    grad_clip: float = 100.0  # fixed mode
    dyn_clip_factor: float = 2.0
    dyn_skip_factor: float = 10.0
    dyn_window: int = 100
    # --- prioritised replay buffer
    use_buffer: bool = True
    buffer_max: int = 12_800
    buffer_min: int = 1_280
    n_updates_per_ais: int = 4
    w_adjust_max_clip: float | None = None
    # "bnem" (fab@bnem): BNEM's ReplayBuffer draw rule, ∝ exp(min(log w, 20)) over all buffer_max slots, the
    # unfilled ones (x = 0, log w = 0, log q = 0) included
    buffer_rule: Literal["fab", "bnem"] = "fab"
    # True (fab@bnem): the AIS pass runs after every n_updates_per_ais-th step (BNEM: at the end of each epoch
    # of 100 steps, after the setup fill), not before it (fab-torch: fill, then AIS before each block)
    ais_at_epoch_end: bool = False
    # fab@bnem DW-4: Lightning's ReduceLROnPlateau on val/energy_w2, stepped every 10 epochs. Every
    # plateau_check_steps steps (at an epoch end), W2² of the energies of the last plateau_ref_size AIS
    # samples against plateau_ref_size val-split rows (BNEM: test rows); lr × plateau_factor after more than
    # plateau_patience checks without a relative improvement of 1e-4 (torch's defaults)
    lr_plateau: bool = False
    plateau_factor: float = 0.1
    plateau_patience: int = 10
    plateau_check_steps: int = 1000
    plateau_ref_size: int = 1000
    # --- sampling / diagnostics
    sample_mode: Literal["flow", "resample"] = "flow"
    diag_samples: int = 1024

    RANGES = {
        **dict.fromkeys(("eacf_blocks", "eacf_egnn_layers", "eacf_hidden", "eacf_features", "marginal_k",
                         "lr_warmup_steps", "lr_total_steps", "dyn_window"), AT_LEAST_1),
        "spline_bins": Range(2),
        **dict.fromkeys(("spline_r_max", "aug_scale", "lr_init", "lr_end", "dyn_clip_factor",
                         "dyn_skip_factor"), POSITIVE),
        **dict.fromkeys(("aux_loss_weight", "diag_marginal_samples"), NON_NEGATIVE),
        "step_adapt_factor": Range(1.0, lo_open=True),
        **dict.fromkeys(("min_step_size", "cnf_coord_scale"), POSITIVE),
        **dict.fromkeys(("ais_batch_size", "cnf_sample_steps", "plateau_check_steps", "plateau_ref_size"),
                        AT_LEAST_1),
        "plateau_factor": Range(0.0, 1.0, lo_open=True, hi_open=True),
        "plateau_patience": NON_NEGATIVE,
    }

    PER_TARGET = {
        # fab-torch experiments/config/gmm.yaml (README command: use_buffer=True prioritised_buffer=True),
        # 1 intermediate density as in the FAB paper's GMM experiment; flow in raw coordinates, base N(0, I).
        "gmm40": {},
        # se3-augmented-coupling-flows examples/config/dw4_fab.yaml + fab/default.yaml + flow/default.yaml +
        # training/optimizer/default_lr_schedule.yaml: EACF (spherical = polar in 2-D, 12 blocks, unit base),
        # 2 intermediates, HMC, batch 128, buffer 512/64 batches, 20 000 iterations x 8 updates (the lr
        # schedule's length), no auxiliary loss (use_flow_aux_loss: false), float32.
        # hidden / n_layers / base_scale 2 are the CNF's (fab@cnf) when the flow is switched
        "dw4": {
            **_EACF_FAB, **_EACF_OPT,
            "n_intermediate": 2, "batch_size": 128, "buffer_max": 512 * 128, "buffer_min": 64 * 128,
            "lr_total_steps": 20_000 * 8, "hidden": 64, "n_layers": 3,
        },
        # EACF lj13_fab.yaml: 8 intermediates, batch 1024 (8 TPU x 128), 14 000 iterations x 8 updates, the
        # auxiliary frame loss on with weight 1 (training/default.yaml); the rest as DW-4. Our LJ-13 energy
        # counts each pair twice (DEM's), the published run used the once-counted one: docs/fab.md
        "lj13": {
            **_EACF_FAB, **_EACF_OPT,
            "n_intermediate": 8, "batch_size": 1024, "buffer_max": 512 * 1024, "buffer_min": 64 * 1024,
            "lr_total_steps": 14_000 * 8, "aux_loss_weight": 1.0, "hidden": 64, "n_layers": 3,
        },
        # no published FAB setting for LJ-55: the LJ-13 one with batch 128 and a smaller buffer; the CNF
        # (fab@cnf) uses the Hutchinson divergence here
        "lj55": {
            **_EACF_FAB, **_EACF_OPT,
            "n_intermediate": 8, "batch_size": 128, "buffer_max": 512 * 128, "buffer_min": 8 * 128,
            "lr_total_steps": 14_000 * 8, "aux_loss_weight": 1.0, "step_size": 0.5, "hidden": 64,
            "n_layers": 3, "cnf_divergence": "hutchinson",
        },
    }
    VARIANTS: ClassVar[dict[str, dict[str, Any]]] = {
        "cnf": {
            "description": "the continuous E(n)-equivariant flow (our EGNN CNF, RK4, exact divergence up to "
            "dim 64) instead of the augmented coupling flow: issue 21's fab-cnf; constant lr, fixed "
            "gradient-norm clip 100; DW-4 base scale 2. Not comparable with the published FAB numbers "
            "(another model class; log q carries integration error, on LJ-55 Hutchinson noise)",
            "source": "methods/flows.py EquivariantCNF (ours); AIS and buffer as the EACF FAB configs",
            # particle targets only: on GMM-40 the variant is plain fab (RealNVP)
            "overrides": {
                "dw4": {**_CNF_VARIANT, "base_scale": 2.0}, "lj13": _CNF_VARIANT, "lj55": _CNF_VARIANT,
            },
        },
        "bnem": {
            "description": "FAB as BNEM's code ran it for the BNEM poster's FAB rows (GMM-40 x-W2 3.828, "
            "E-W2 64.23, TV 0.824; DW-4 0.614, 211.5, 0.359 under the bnem protocol; DW-4 most likely on the "
            "once-counted energy, target dw4, see docs/fab.md): an FFJORD "
            "CNF (Hutchinson, 24 RK4 steps for log q, one for the AIS's draws) with BNEM's MLP (GMM-40, on "
            "x/50) or EGNN (DW-4) field, AIS with 5 intermediates x 10 random-walk Metropolis updates "
            "(ladder 5 -> 0.1 in flow units, adapted x/÷1.05 per update, each ratio against the transition's "
            "start state as fab-torch computes it), uncentred DW-4 proposals, buffer "
            "10 000 drawn 512 per step, one AIS pass of 1 024 chains per 100 steps, w-adjust clip 1e3, Adam "
            "1e-3, gradient-norm clip 0.5, float32, first fill from the base with -log q stored, buffer "
            "draws ∝ exp(min(log w, 20)) over all slots (empty ones too), AIS at each epoch's end, DW-4 "
            "ReduceLROnPlateau on the AIS samples' val E-W2 every 1000 steps; early stopping is the bnem "
            "selection rule (docs/fab.md)",
            "source": "tonyauyeung/BNEM dem/models/fab_module.py, dem/models/components/{ffjord,ais_fab,"
            "replay_buffer}.py, configs/model/fab.yaml, configs/experiment/{gmm,dw4}_idem.yaml, "
            "configs/trainer/default.yaml, configs/data/dummy.yaml at 6f016c7 (2024-09-06; fab_module.py "
            "unchanged in what it computes to 1b2eb92); jarridrb/fab-torch fab/sampling_methods/"
            "transition_operators/metropolis.py at febeeaa",
            "overrides": {
                # BNEM GMM: data_normalization_factor 50 (the flow sees x/50), Prior N(0, sigma_max^2 = 1)
                # in those units; Metropolis steps 5 -> 0.1 in flow units = 250 -> 5 in ours
                "gmm40": {**_BNEM_FAB, "cnf_coord_scale": 50.0, "base_scale": 1.0, "step_size": 250.0,
                          "min_step_size": 5.0},
                # BNEM DW-4 (FAB could run only before f632e13, i.e. on bgflow's once-counted energy: target
                # dw4; the same settings apply to dw4-bnem): EGNN 3 x 128, MeanFreePrior scale
                # sigma_max = 3; fab.yaml's ReduceLROnPlateau (the GMM experiment sets scheduler: null)
                "dw4": {**_BNEM_FAB, "base_scale": 3.0, "lr_plateau": True},
            },
        },
        "published": {
            "description": "the published code's HMC step-size rule: ×/÷ 1.02 per AIS pass towards "
            "acceptance 0.65 (fab-jax), instead of our log-step rule (log ε += acceptance − 0.65)",
            "source": "lollcat/fab-jax fabjax/sampling/mcmc/hmc.py at v0.0.0 (step_size_multiplier 1.02), "
            "as pinned by lollcat/se3-augmented-coupling-flows",
            "overrides": {"dw4": {"step_adapt_factor": 1.02}, "lj13": {"step_adapt_factor": 1.02},
                          "lj55": {"step_adapt_factor": 1.02}},
        },
    }
    PRESETS = {
        # a few seconds per cell on a CPU: tiny flows, batches and buffers (plumbing only)
        "smoke": {
            "*": {"batch_size": 32, "buffer_max": 256, "buffer_min": 64, "diag_samples": 128,
                  "ais_batch_size": None},
            "gmm40": {"n_layers": 4, "hidden": 32, "cnf_steps": 2},
            "dw4": {
                **_TINY, "n_layers": 2, "n_intermediate": 2, "n_inner": 5, "batch_size": 16, "buffer_min": 16,
                "buffer_max": 128, "diag_samples": 64, "lr_warmup_steps": 2, "lr_total_steps": 4,
            },
            "lj13": {
                **_TINY, "cnf_divergence": "hutchinson", "batch_size": 16, "buffer_min": 16,
                "diag_samples": 32, "lr_warmup_steps": 2, "lr_total_steps": 4,
            },
            "lj55": {**_TINY, "batch_size": 8, "buffer_min": 8, "buffer_max": 64, "diag_samples": 16,
                     "lr_warmup_steps": 2, "lr_total_steps": 4},
        },
        "cpu": {
            # GMM-40: the published flow, AIS and buffer, but fewer optimiser steps than published fit in a
            # CPU hour: a base scaled to the problem (σ = 20 in raw coordinates; the means spread over
            # [−40, 40]²), lr 1e-3, and the weight-adjustment clip 10 of the FAB authors' particle configs
            # (without it lr 1e-3 made buffer weights blow up: skipped steps, see docs/fab.md)
            "gmm40": {"base_scale": 20.0, "lr": 1e-3, "w_adjust_max_clip": 10.0},
            # particles (docs/fab.md, "cpu presets"): the EACF architecture, AIS and buffer as published but
            # smaller (blocks, batch, buffer); the published schedule shape over the cell's steps with peak
            # lr 1e-3 instead of 2e-4 (DW-4, 5 CPU-min: E-W2 19.6 vs 28.4); LJ-13 2 intermediates, not 8.
            # The cnf_* / hidden / n_layers fields are fab@cnf's cost settings (unused by EACF)
            "dw4": {
                "eacf_blocks": 4, "batch_size": 64, "buffer_min": 16 * 64, "buffer_max": 256 * 64,
                "lr": 1e-3, "lr_warmup_steps": 80, "lr_total_steps": CPU_STEPS["dw4"],
                "diag_marginal_samples": 128, "cnf_steps": 2, "hidden": 32, "n_layers": 3,
            },
            "lj13": {
                "eacf_blocks": 3, "eacf_egnn_layers": 2, "n_intermediate": 2, "batch_size": 32,
                "buffer_min": 8 * 32, "buffer_max": 256 * 32, "lr": 1e-3, "lr_warmup_steps": 60,
                "lr_total_steps": CPU_STEPS["lj13"], "diag_samples": 256, "diag_marginal_samples": 32,
                # fab@cnf: exact divergence (39 backward passes per RK stage) did not finish 8 steps in 20 min
                "cnf_steps": 2, "hidden": 32, "n_layers": 2, "cnf_divergence": "hutchinson",
            },
            "lj55": {
                "eacf_blocks": 2, "eacf_egnn_layers": 1, "eacf_hidden": 32, "eacf_features": 32,
                "n_intermediate": 1, "batch_size": 16, "buffer_min": 4 * 16, "buffer_max": 64 * 16,
                "lr": 1e-3, "lr_warmup_steps": 60, "lr_total_steps": CPU_STEPS["lj55"], "diag_samples": 64,
                "diag_marginal_samples": 0, "cnf_steps": 1, "hidden": 16, "n_layers": 1,
            },
        },
    }
    BUDGETS = {
        "smoke": {"*": {"steps": 4, "wall_seconds": 60}},
        # counted quality budgets; the wall-clock guard (status `timeout`) is the cpu grid's 1 h
        "cpu": {
            "gmm40": {"steps": 5_000, "guard_seconds": 3600.0},
            **{t: {"steps": n, "guard_seconds": 3600.0} for t, n in CPU_STEPS.items()},
        },
        # fab-torch GMM: 2e7 flow forward passes = 52 076 AIS iterations × 4 buffer steps
        "paper": {"gmm40": {"steps": 208_304}, "dw4": {"steps": 20_000 * 8}, "lj13": {"steps": 14_000 * 8}},
    }

    def __post_init__(self) -> None:
        checks = {
            "alpha": self.alpha > 0,
            "n_intermediate": self.n_intermediate >= 1,
            "n_inner": self.n_inner >= 1,
            "step_size": self.step_size > 0,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "n_layers": self.n_layers >= 1,
            "hidden": self.hidden >= 1,
            "base_scale": self.base_scale > 0,
            "cnf_steps": self.cnf_steps >= 1,
            "n_updates_per_ais": self.n_updates_per_ais >= 1,
            "buffer_min": 0 < self.buffer_min <= self.buffer_max,
            "diag_samples": self.diag_samples >= 2,
            "target_accept": 0 < self.target_accept < 1,
            "eacf_blocks": self.eacf_blocks >= 1,
            "spline_bins": self.spline_bins >= 2,
            "marginal_k": self.marginal_k >= 1,
            "lr_total_steps": self.lr_total_steps >= 1,
            "dyn_window": self.dyn_window >= 3,
            "step_adapt_factor": self.step_adapt_factor is None or self.step_adapt_factor > 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"FABConfig: invalid values for {bad}: {[getattr(self, k) for k in bad]}")
        if self.use_buffer and self.buffer_min < self.batch_size:
            raise ValueError(
                f"FABConfig: buffer_min ({self.buffer_min}) must be >= batch_size ({self.batch_size})"
            )


class _BNEMReplayBuffer(PrioritisedReplayBuffer):
    """BNEM's ``ReplayBuffer`` draw rule (``buffer_rule="bnem"``): ``batch`` distinct slots drawn
    ∝ exp(min(log w, ``LOG_W_MAX``)) over **all** ``max_length`` slots. Slots not yet filled hold x = 0,
    log w = 0 and log q = 0 (weight 1), are drawn and adjusted like the others, as in BNEM's code (its
    ``sample`` computes the filled range but does not use it)."""

    LOG_W_MAX = 20.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log_w.zero_()

    def sample(self, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if not self.can_sample:
            raise ValueError(f"buffer holds {self.length} < min_length {self.min_length} entries")
        lw = self.log_w.clamp(max=self.LOG_W_MAX)
        if int(torch.isfinite(lw).sum()) < batch:
            raise ValueError(f"buffer has fewer than {batch} slots with finite weight")
        u = torch.rand(self.max_length, generator=generator, dtype=torch.float64, device=lw.device)
        idx = torch.topk(lw - torch.log(-torch.log(u.clamp_min(1e-300))), batch).indices
        return self.x[idx], self.log_w[idx], self.log_q_old[idx], idx


class _BaseStart(torch.nn.Module):
    """AIS start of BNEM's first buffer fill (``init_from_base``): x from the CNF's base (in target
    coordinates) with log q = the flow's log q at x, i.e. chains that do not start from q."""

    exact_sample_log_prob = True

    def __init__(self, flow: EquivariantCNF) -> None:
        super().__init__()
        self.flow = flow

    def log_prob(self, x: Tensor) -> Tensor:
        return self.flow.log_prob(x)

    def sample_and_log_prob(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        p = next(self.flow.parameters())
        x = self.flow.base.sample(n, generator, p.dtype, p.device) * self.flow.coord_scale
        return x, self.flow.log_prob(x)


def _derive_seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())


@METHODS.register("fab")
class FAB(Method):
    name = "fab"
    display_name = "FAB"
    Config = FABConfig

    def __init__(self, target: Any, config: FABConfig, device: torch.device, generator: torch.Generator):
        super().__init__(target, config, device, generator)
        c = config
        self.dtype = _DTYPES[c.dtype]
        self.particles = getattr(target, "n_particles", None) is not None
        if c.flow == "realnvp" and self.particles:
            raise ValueError(
                f"fab: flow 'realnvp' is not equivariant; use flow='eacf' or 'cnf' for {target.name}"
            )
        if c.flow == "eacf" and not self.particles:
            raise ValueError(
                f"fab: flow 'eacf' needs a particle target; use flow='realnvp' for {target.name}"
            )
        #: EACF: the flow, AIS and buffer live on the joint (x, a) space
        self.joint = c.flow == "eacf"
        seed = _derive_seed(generator)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            init_gen = torch.Generator().manual_seed(seed)
            self.flow = self._build_flow(init_gen)
        self.flow.to(device=self.device, dtype=self.dtype)
        if isinstance(self.flow, EquivariantCNF):
            self.flow.set_probe_generator(generator)
        if isinstance(self.flow, EACFFlow):
            self.ais_target: Any = AugmentedTarget(target, self.flow)
            project = self.flow.project
        else:
            self.ais_target = target
            project = target.center if self.particles and c.centre_chains else None
        if c.transition == "hmc":
            trans: Metropolis | HMC = HMC(
                c.n_intermediate, c.step_size, c.n_inner, c.adapt_step_size, c.target_accept, c.max_grad,
                c.step_adapt_factor,
            )
        else:
            trans = Metropolis(c.n_intermediate, c.step_size, c.n_inner, c.adapt_step_size, c.target_accept,
                               c.step_adapt_factor, c.min_step_size, c.adapt_per_update, c.max_log_ratio,
                               c.stale_reference)
        self.ais = AnnealedImportanceSampler(
            self.flow, self.ais_target, trans, c.n_intermediate, c.alpha, project
        )
        self.optimizer = torch.optim.Adam(self.flow.parameters(), lr=self._lr())
        flow_dim = self.flow.dim if isinstance(self.flow, EACFFlow) else target.dim
        self.buffer = (
            (_BNEMReplayBuffer if c.buffer_rule == "bnem" else PrioritisedReplayBuffer)(
                flow_dim, c.buffer_max, c.buffer_min, self.device, self.dtype
            )
            if c.use_buffer
            else None
        )
        self.n_steps = 0
        self.n_skipped = 0
        self.n_opt_steps = 0  # optimiser steps taken (the lr schedule's clock; skipped steps do not count)
        self.n_ais_batches = 0
        self._last_ais_ess = float("nan")
        self._last_accept = float("nan")
        self._last_aux = float("nan")
        # dynamic clipping: the last `dyn_window` gradient norms; as published, the window starts with 2/3 of
        # its entries at 1e30 (every step is taken until 1/3 of the window holds real norms) and the rest NaN
        self.grad_norms = torch.full((c.dyn_window,), float("nan"), dtype=torch.float64)
        self.grad_norms[: int(c.dyn_window * 2 / 3)] = 1e30
        # lr_plateau: [best metric, checks without improvement, lr factor]; the last AIS pass's log p
        self.plateau = [float("inf"), 0.0, 1.0]
        self._last_ais_log_p: Tensor | None = None
        self._ref_energy: Tensor | None = None
        self._last_val_e_w2 = float("nan")

    def _build_flow(self, gen: torch.Generator) -> torch.nn.Module:
        c, t = self.config, self.target
        if c.flow == "realnvp":
            return RealNVP(t.dim, c.n_layers, c.hidden, c.base_scale, generator=gen, dtype=self.dtype)
        if c.flow == "eacf":
            return EACFFlow(
                t.n_particles, t.spatial_dim, c.eacf_blocks, c.eacf_egnn_layers, c.eacf_hidden,
                c.eacf_features, c.spline_bins, c.spline_r_max, c.base_scale, c.aug_scale,
            )
        from methods.nets import EGNN, TimeMLP

        if not self.particles:  # BNEM's GMM-40 FAB: its MLP vector field (DEM MyMLP) on x / cnf_coord_scale
            mlp = TimeMLP(t.dim, hidden=c.hidden, n_blocks=c.n_layers)
            return EquivariantCNF(
                mlp, None, t.dim, c.cnf_steps, c.base_scale, c.cnf_divergence, c.cnf_coord_scale,
                rk=c.cnf_rk, probe=c.cnf_probe,
            )
        field = EGNN(t.n_particles, t.spatial_dim, hidden=c.hidden, n_layers=c.n_layers)
        return EquivariantCNF(
            field, t.n_particles, t.spatial_dim, c.cnf_steps, c.base_scale, c.cnf_divergence,
            c.cnf_coord_scale, c.centre_chains, rk=c.cnf_rk, probe=c.cnf_probe,
        )

    # ------------------------------------------------------------------ training
    def _run_ais(self) -> tuple[Tensor, Tensor, Tensor]:
        c = self.config
        self.flow.eval()
        first = self.n_ais_batches == 0
        if first and c.init_from_base:  # BNEM: the first chains start at base samples, weighted with log q
            self.ais.flow = _BaseStart(self.flow)
        cnf = self.flow if isinstance(self.flow, EquivariantCNF) else None
        if cnf is not None:  # BNEM's AIS draws integrate cnf_sample_steps; sample() and log q use cnf_steps
            cnf.sample_steps = c.cnf_sample_steps
        try:
            res = self.ais.run(c.ais_batch_size or c.batch_size, self.generator)
        finally:
            self.ais.flow = self.flow
            if cnf is not None:
                cnf.sample_steps = None
        self.n_ais_batches += 1
        self._last_ais_ess = log_weights_ess(res.log_w)
        self._last_accept = float(res.accept.mean())
        self._last_ais_log_p = res.log_p
        log_q = -res.log_q if first and c.init_log_q_negated else res.log_q
        return res.x, res.log_w, log_q

    def _fill_buffer(self) -> None:
        assert self.buffer is not None
        while not self.buffer.can_sample:
            self.buffer.add(*self._run_ais())

    def _log_q(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """log q_θ(x) [B] and, when the frame barrier is on (EACF, ``aux_loss_weight`` > 0), its loss [B]."""
        if isinstance(self.flow, EACFFlow) and self.config.aux_loss_weight > 0:
            return self.flow.log_prob_and_aux(x)
        return self.flow.log_prob(x), None

    def _log_q_finite(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """log q_θ(x) with a graph on the rows where it is finite: (log_q [k], mask [B], aux loss [k] / None).

        A row whose log q overflows (a stale buffer point far outside the flow's support) would poison the
        gradient (0 · inf = NaN through ``torch.where``), so the pass is redone without those rows.
        """
        log_q, aux = self._log_q(x)
        rows = torch.isfinite(log_q)
        if aux is not None:
            rows = rows & torch.isfinite(aux)
        if not bool(rows.all()):
            if bool(rows.any()):
                log_q, aux = self._log_q(x[rows])
            else:
                log_q, aux = log_q[rows], (aux[rows] if aux is not None else None)
        return log_q, rows, aux

    def _lr(self) -> float:
        """The learning rate of the next optimiser step (``lr_schedule``).

        As optax's warmup_cosine_decay_schedule: linear from ``lr_init`` to ``lr`` over ``lr_warmup_steps``,
        cosine to ``lr_end`` at ``lr_total_steps``, then constant. The clock is the number of steps taken.
        """
        c = self.config
        if c.lr_schedule == "constant":
            return c.lr * self.plateau[2] if hasattr(self, "plateau") else c.lr
        t = getattr(self, "n_opt_steps", 0)
        if t < c.lr_warmup_steps:
            return c.lr_init + (c.lr - c.lr_init) * t / c.lr_warmup_steps
        decay = max(c.lr_total_steps - c.lr_warmup_steps, 1)
        frac = min(t - c.lr_warmup_steps, decay) / decay
        return c.lr_end + (c.lr - c.lr_end) * 0.5 * (1.0 + math.cos(math.pi * frac))

    def _optimise(self, loss: Tensor) -> tuple[float, bool]:
        """Adam step on ``loss`` with the gradient clipped (``grad_clip_mode``); False if the step is skipped.

        Overflow-safe: back-propagates loss·s with s = 1/max(1, |loss|) and rescales. This gives exactly the
        clipped gradient of ``loss``, but stays finite when a stale buffer point with an astronomically small
        (finite) log q makes the raw gradient overflow.
        - Seen on GMM-40: log q ≈ −5e298 at |x| < 50, after a coupling layer's scale blew up there.
        - Without this, such a point (drawn again at every step) made ~30 % of the steps skip.

        Dynamic mode (the published particle setting) works on the window of the last ``dyn_window`` norms of
        the raw gradient:
        - a step whose norm is not finite, or above ``dyn_skip_factor`` × the window's median, is skipped;
        - otherwise the gradient is clipped to ``dyn_clip_factor`` × that median;
        - every norm enters the window, including those of skipped steps.
        """
        c = self.config
        self.optimizer.zero_grad(set_to_none=True)
        lv = float(loss.detach())
        if not math.isfinite(lv):
            if c.grad_clip_mode == "dynamic":
                self._push_norm(float("nan"))
            return lv, False
        s = 1.0 / max(1.0, abs(lv))
        (loss * s).backward()
        params = [p for p in self.flow.parameters() if p.grad is not None]
        n = float(torch.nn.utils.get_total_norm([p.grad for p in params])) if params else 0.0
        if c.grad_clip_mode == "dynamic":
            median = float(torch.nanmedian(self.grad_norms))
            true_norm = n / s if math.isfinite(n) else float("nan")
            self._push_norm(true_norm)
            if not math.isfinite(true_norm) or true_norm > c.dyn_skip_factor * median:
                self.optimizer.zero_grad(set_to_none=True)
                return lv, False
            clip = c.dyn_clip_factor * median
        else:
            clip = c.grad_clip
        if not math.isfinite(n):
            self.optimizer.zero_grad(set_to_none=True)
            return lv, False
        factor = clip / n if n > clip * s else 1.0 / s  # true norm n/s > clip: clip; else undo the scaling
        for p in params:
            p.grad.mul_(factor)
        for g in self.optimizer.param_groups:
            g["lr"] = self._lr()
        self.optimizer.step()
        self.n_opt_steps += 1
        return lv, True

    def _push_norm(self, v: float) -> None:
        self.grad_norms = torch.cat([self.grad_norms[1:], torch.tensor([v], dtype=torch.float64)])

    def train_step(self) -> dict[str, float]:
        c = self.config
        self.flow.train()
        if self.buffer is None:
            x, log_w, _ = self._run_ais()
            self.flow.train()
            keep = torch.isfinite(log_w)
            log_q, rows, aux = self._log_q_finite(x[keep])
            loss = alpha_div_loss(log_q, log_w[keep][rows]) + self._aux_term(aux)
            lv, ok = self._optimise(loss)
        else:
            self._fill_buffer()
            if not c.ais_at_epoch_end and self.n_steps % c.n_updates_per_ais == 0:
                self.buffer.add(*self._run_ais())
            self.flow.train()
            x, _, log_q_old, idx = self.buffer.sample(c.batch_size, self.generator)
            if self.particles and not c.centre_chains:  # BNEM centres the drawn points (remove_mean)
                x = self.target.center(x)
            log_q, rows, aux = self._log_q_finite(x)
            log_w_adj = (1.0 - c.alpha) * (log_q.detach() - log_q_old[rows])
            w_adj = torch.exp(log_w_adj)
            if c.w_adjust_max_clip is not None:
                w_adj = w_adj.clamp(max=c.w_adjust_max_clip)
            loss = -(w_adj * log_q).sum() / max(int(rows.sum()), 1) + self._aux_term(aux)
            lv, ok = self._optimise(loss)
            # points whose log q is no longer finite get weight 0 (log w = −inf) and are never drawn again
            adj_all = torch.full_like(log_q_old, -float("inf"))
            adj_all[rows] = log_w_adj
            lq_all = log_q_old.clone()
            lq_all[rows] = log_q.detach()
            self.buffer.adjust(idx, adj_all, lq_all)
            if c.ais_at_epoch_end and (self.n_steps + 1) % c.n_updates_per_ais == 0:
                self.buffer.add(*self._run_ais())
        if c.lr_plateau and (self.n_steps + 1) % c.plateau_check_steps == 0:
            self._plateau_check()
        self.n_steps += 1
        self.n_skipped += int(not ok)
        logs = {
            "loss": lv,
            "ais_ess": self._last_ais_ess,
            "ais_accept": self._last_accept,
            "step_size": float(self.ais.transition.step_sizes.mean()),
        }
        if c.lr_schedule != "constant" or c.lr_plateau:
            logs["lr"] = self._lr()
        if c.lr_plateau and math.isfinite(self._last_val_e_w2):  # after the first check (the harness reads
            logs["val_energy_w2"] = self._last_val_e_w2  # a non-finite log value as a divergence)
        if c.aux_loss_weight > 0 and self.joint:
            logs["aux_loss"] = self._last_aux
        return logs

    def _val_energy_w2(self) -> float:
        """BNEM's val/energy_w2: W2² (1-D, sorted) between the energies of the last ``plateau_ref_size`` AIS
        samples (their log p from the chains: no further evaluation) and as many val-split rows (counted
        once, then cached). Unequal sizes (non-finite chains) are truncated to the smaller."""
        c = self.config
        if self._ref_energy is None:
            ref = self.target.reference("val")[: c.plateau_ref_size].to(self.device, self.dtype)
            with torch.no_grad():
                self._ref_energy = self.target.energy(ref).double()
        lp = self._last_ais_log_p
        if lp is None:
            return float("nan")
        gen = -lp.double()
        gen = gen[torch.isfinite(gen)][-c.plateau_ref_size :]
        n = min(gen.numel(), self._ref_energy.numel())
        if n == 0:
            return float("nan")
        a, b = torch.sort(gen[-n:]).values, torch.sort(self._ref_energy[:n]).values
        return float(((a - b) ** 2).mean())

    def _plateau_check(self) -> None:
        """One ReduceLROnPlateau step (mode min, relative threshold 1e-4, cooldown 0) on the val E-W2."""
        c = self.config
        m = self._val_energy_w2()
        self._last_val_e_w2 = m
        best, bad, factor = self.plateau
        best, bad_n, reduce = plateau_update(best, int(bad), m if math.isfinite(m) else math.nan,
                                             c.plateau_patience)
        if reduce:
            factor *= c.plateau_factor
        self.plateau = [best, float(bad_n), factor]

    def _aux_term(self, aux: Tensor | None) -> Tensor | float:
        """``aux_loss_weight`` × the mean frame-barrier loss of the batch (0 without it)."""
        if aux is None or aux.numel() == 0:
            return 0.0
        m = aux.mean()
        self._last_aux = float(m.detach())
        return self.config.aux_loss_weight * m

    # ------------------------------------------------------------------ sampling
    def _flow_samples(self, n: int) -> tuple[Tensor, Tensor]:
        self.flow.eval()
        with torch.no_grad():
            x, log_q = self.flow.sample_and_log_prob(n, self.generator)
        return x, log_q

    def _importance_log_weights(self, x: Tensor, log_q: Tensor) -> Tensor:
        """log p − log q [n] (float64) on flow samples; counted energy evaluations (one per row); −inf where
        non-finite. EACF: the joint weights p(x)π(a|x)/q(x, a) of joint samples."""
        ok = torch.isfinite(x).all(-1) & torch.isfinite(log_q)
        xs = torch.where(ok.unsqueeze(-1), x, torch.zeros_like(x))
        with torch.no_grad():
            lw = -self.ais_target.energy(xs).double() - log_q.double()
        return torch.where(ok & torch.isfinite(lw), lw, torch.full_like(lw, -float("inf")))

    def _x_part(self, x: Tensor) -> Tensor:
        return self.flow.split(x)[0] if isinstance(self.flow, EACFFlow) else x

    def sample(self, n: int) -> Tensor:
        """n samples [n, dim] in target coordinates: flow samples, or (``sample_mode='resample'``) n flow
        samples resampled multinomially ∝ p/q (n counted energy evaluations; EACF: joint weights). EACF
        returns the x part of joint samples."""
        if n < 1:
            raise ValueError(f"sample: n must be >= 1, got {n}")
        x, log_q = self._flow_samples(n)
        if self.config.sample_mode == "resample":
            lw = self._importance_log_weights(x, log_q)
            if bool(torch.isfinite(lw).any()):
                probs = torch.softmax(lw, 0)
                idx = torch.multinomial(probs.to(x.device), n, replacement=True, generator=self.generator)
                x = x[idx]
        x = self._x_part(x)
        if self.particles:
            x = self.target.center(x)
        return x.detach().float()

    def diagnostics(self) -> dict[str, float]:
        """log Z (importance-sampling estimate from ``diag_samples`` flow samples, energies counted) and the
        normalised ESS of the weights p/q, plus AIS / buffer state.

        EACF: ``log_z`` / ``ess`` use the joint weights p(x)π(a|x)/q(x, a) (the published reverse ESS);
        ``log_z_marginal`` / ``ess_marginal`` use p(x)/q̂(x) with the K-sample marginal estimate on the first
        ``diag_marginal_samples`` of them (no further energy evaluations; K flow passes per sample)."""
        c = self.config
        n = c.diag_samples
        x, log_q = self._flow_samples(n)
        lw = self._importance_log_weights(x, log_q)
        out = {
            "log_z": float(torch.logsumexp(lw, 0) - math.log(n)),
            "ess": log_weights_ess(lw),
            "ais_ess": self._last_ais_ess,
            "ais_accept": self._last_accept,
            "step_size": float(self.ais.transition.step_sizes.mean()),
            "skipped_steps": float(self.n_skipped),
            "ais_batches": float(self.n_ais_batches),
            "frac_nonfinite": float((~torch.isfinite(lw)).double().mean()),
        }
        if isinstance(self.flow, EACFFlow) and c.diag_marginal_samples > 0:
            m = min(c.diag_marginal_samples, n)
            xv, a = self.flow.split(x[:m])
            with torch.no_grad():
                # log p(x) = joint log-weight + log q(x, a) − log π(a | x): no second energy evaluation
                log_p = lw[:m] + log_q[:m].double() - self.flow.aux_log_prob(xv, a).double()
                lq_marg = self.flow.marginal_log_prob(xv, c.marginal_k, self.generator)
            lwm = log_p - lq_marg.double()
            lwm = torch.where(torch.isfinite(lwm), lwm, torch.full_like(lwm, -float("inf")))
            out["log_z_marginal"] = float(torch.logsumexp(lwm, 0) - math.log(m))
            out["ess_marginal"] = log_weights_ess(lwm)
        if c.grad_clip_mode == "dynamic":
            out["grad_norm_median"] = float(torch.nanmedian(self.grad_norms))
        return out

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "flow": self.flow.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "transition": self.ais.transition.state_dict(),
            "buffer": self.buffer.state_dict() if self.buffer is not None else None,
            "n_steps": self.n_steps,
            "n_skipped": self.n_skipped,
            "n_ais_batches": self.n_ais_batches,
            "n_opt_steps": self.n_opt_steps,
            "grad_norms": self.grad_norms.clone(),
            "last": [self._last_ais_ess, self._last_accept, self._last_aux],
            "plateau": list(self.plateau),
            "last_ais_log_p": self._last_ais_log_p.clone() if self._last_ais_log_p is not None else None,
            "ref_energy": self._ref_energy.clone() if self._ref_energy is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.flow.load_state_dict(state["flow"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ais.transition.load_state_dict(state["transition"])
        if self.buffer is not None:
            if state["buffer"] is None:
                raise ValueError("fab: checkpoint has no buffer but the config uses one")
            self.buffer.load_state_dict(state["buffer"])
        self.n_steps, self.n_skipped = int(state["n_steps"]), int(state["n_skipped"])
        self.n_ais_batches = int(state["n_ais_batches"])
        self.n_opt_steps = int(state["n_opt_steps"])
        self.grad_norms = state["grad_norms"].clone().to(torch.float64)
        self._last_ais_ess, self._last_accept, self._last_aux = (float(v) for v in state["last"])
        self.plateau = [float(v) for v in state.get("plateau", [float("inf"), 0.0, 1.0])]
        lp = state.get("last_ais_log_p")
        self._last_ais_log_p = lp.clone() if lp is not None else None
        ref = state.get("ref_energy")  # counted once per run: a resumed run does not count it again
        self._ref_energy = ref.clone() if ref is not None else None
