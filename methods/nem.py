"""NEM and BNEM: (bootstrapped) noised energy matching (OuYang, Qiang, Hernández-Lobato, arXiv 2409.09787).

Both methods learn an energy network E_θ(x, t) (``methods.energy_net``) of the VE-noised target
p_t = p * N(0, σ_t² I) and sample with the reverse VE SDE driven by the score −∇_x E_θ (autograd, clipped per
sample to ``max_score_norm``). Outer loop as iDEM / the published code: a FIFO replay buffer initialised from
the prior, ``steps_per_epoch`` optimiser steps per epoch, then ``n_new_per_epoch`` fresh samples from the
reverse SDE of the EMA network (β per epoch) pushed into the buffer.

NEM target (paper's estimator; ``noised_energy_mc``):
    E_K(x_t, t) = −log (1/K) Σ_k exp(−E(x_t + σ_t ε_k)),
    loss ‖E_θ(x_t, t) − E_K‖²  (+ w₀ ‖E_θ(x_0, 0) − E(x_0)‖²)
with log-sum-exp over the TOTAL energy. The published code's per-particle log-mean-exp (since 2024-09) is the
option ``per_particle=True``; it factorises the estimator and is biased (see docs/nem.md).

BNEM (``bootstrap_noised_energy``): after ``bootstrap_start_step`` optimiser steps, each batch shares one
t ~ U(0, 1); if t lies in interval k ≥ 1 of the geometric bootstrap schedule (``bootstrap_time_splits``),
s ~ U(interval k − 1) and samples that pass the published acceptance test get the target
    −log (1/K) [ Σ_{j≤M} exp(−E_θ̄(x_t + sqrt(σ_t² − σ_s²) ε_j, s))
                 + Σ_{K−M resampled} exp(−E(x_t + σ_t ε_k)) ]
from the stop-gradient EMA teacher θ̄ mixed with K − M exact-energy terms; the others keep the NEM target.

Sampler options (off by default, as published; the GMM-40 ``cpu`` preset uses them, docs/nem.md "Issue 5"):
``denoiser_clip`` clamps the Tweedie denoiser y + σ_t²·score to a box before the norm clip;
``eval_from_ema`` / ``eval_sde_steps`` choose the network and SDE grid of ``sample`` (evaluation).

Counting: every target energy goes through ``target.energy`` (B·K per step for NEM, 2·B·K in the BNEM stage
for the acceptance test, plus the buffer insertions); NEM never asks for target gradients. Network forward
passes (student, teacher, sampler) are added to ``target.usage.network_evals`` (one per configuration).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor, nn

from methods.base import Method, MethodConfig
from methods.buffer import ReplayBuffer
from methods.ema import EMA
from methods.energy_net import EGNNEnergy, MLPEnergy, clip_denoised, clip_per_sample, energy_and_score
from methods.noise import GeometricNoiseSchedule
from methods.registry import METHODS
from methods.sde import GaussianPrior, MeanFreeGaussianPrior, integrate_reverse_sde

EnergyFn = Callable[[Tensor], Tensor]  # x [N, dim] -> energies [N] or per-particle [N, n]


# ============================================================================ estimators (pure functions)
def log_mean_exp(a: Tensor, dim: int) -> Tensor:
    """log (1/K) Σ_k exp(a_k) along ``dim`` (numerically stable)."""
    return torch.logsumexp(a, dim=dim) - math.log(a.shape[dim])


def _expand_sigma(sigma: Tensor | float, B: int, like: Tensor) -> Tensor:
    s = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if s.ndim == 0:
        s = s.expand(B)
    if s.shape != (B,):
        raise ValueError(f"sigma must be a scalar or of shape [{B}], got {list(s.shape)}")
    return s


def _chunked(fn: EnergyFn, x: Tensor, chunk: int) -> Tensor:
    if x.shape[0] <= chunk:
        return fn(x)
    return torch.cat([fn(c) for c in x.split(chunk)])


def noised_energy_mc(
    energy: EnergyFn,
    x_t: Tensor,
    sigma: Tensor | float,
    K: int,
    generator: torch.Generator | None = None,
    chunk: int = 1 << 18,
) -> tuple[Tensor, Tensor]:
    """NEM's Monte-Carlo noised energy E_K(x_t, t) = −log (1/K) Σ_k exp(−E(x_t + σ ε_k)).

    x_t [B, dim], sigma scalar or [B] (σ_t), K draws per row. ``energy`` maps [N, dim] to [N] (total energies,
    the paper's estimator) or [N, n] (per-particle columns: the published code's factorised variant).
    Returns (E_K [B] or [B, n], log-terms −E(x_0|t^(k)) [B, K] or [B, K, n]); no gradient flows.
    """
    if K < 1:
        raise ValueError(f"K (number of MC samples) must be >= 1, got {K}")
    B, D = x_t.shape
    s = _expand_sigma(sigma, B, x_t)
    with torch.no_grad():
        eps = torch.randn(B, K, D, generator=generator, dtype=x_t.dtype, device=x_t.device)
        x0 = (x_t.unsqueeze(1) + s.view(B, 1, 1) * eps).reshape(B * K, D)
        e = _chunked(energy, x0, chunk)
        log_terms = -e.reshape(B, K, *e.shape[1:])
        return -log_mean_exp(log_terms, dim=1), log_terms


def bootstrap_noised_energy(
    teacher: Callable[[Tensor, Tensor], Tensor],
    x_t: Tensor,
    sigma_t: Tensor | float,
    sigma_s: Tensor | float,
    s: Tensor | float,
    M: int,
    generator: torch.Generator | None = None,
    exact_log_terms: Tensor | None = None,
    K: int | None = None,
    center: Callable[[Tensor], Tensor] | None = None,
    chunk: int = 1 << 18,
) -> Tensor:
    """BNEM's bootstrapped target E_K(x_t, t, s) = −log (1/K) Σ_j exp(−E_teacher(x_{s|t}^(j), s)),
    x_{s|t}^(j) = x_t + sqrt(σ_t² − σ_s²) ε_j.

    ``teacher(s [N], x [N, dim])`` returns energies [N] (or per particle [N, n]); it is called under no_grad
    (stop-gradient). With ``exact_log_terms`` [B, K0(, n)] (the t-level MC terms −E(x_t + σ_t ε_k)) the M
    teacher terms are concatenated with K − M of them drawn uniformly with replacement, as the published
    code does.
    Returns [B] (or [B, n]).
    """
    if M < 1:
        raise ValueError(f"M (bootstrap MC samples) must be >= 1, got {M}")
    B, D = x_t.shape
    st, ss = _expand_sigma(sigma_t, B, x_t), _expand_sigma(sigma_s, B, x_t)
    sv = _expand_sigma(s, B, x_t)
    var = st**2 - ss**2
    if bool((var < 0).any()):
        raise ValueError("bootstrap needs sigma_s <= sigma_t (s < t)")
    with torch.no_grad():
        eps = torch.randn(B, M, D, generator=generator, dtype=x_t.dtype, device=x_t.device)
        xs = (x_t.unsqueeze(1) + var.sqrt().view(B, 1, 1) * eps).reshape(B * M, D)
        if center is not None:
            xs = center(xs)
        s_rep = sv.repeat_interleave(M)
        e = torch.cat([teacher(sc, xc) for sc, xc in zip(s_rep.split(chunk), xs.split(chunk))])
        terms = -e.reshape(B, M, *e.shape[1:])
        if exact_log_terms is not None:
            if K is None or K <= M:
                raise ValueError(f"mixing exact terms needs K > M, got K={K}, M={M}")
            K0 = exact_log_terms.shape[1]
            idx = torch.randint(0, K0, (B, K - M), generator=generator, device=x_t.device)
            if exact_log_terms.ndim == 3:
                idx = idx.unsqueeze(-1).expand(B, K - M, exact_log_terms.shape[2])
            terms = torch.cat([terms, exact_log_terms.gather(1, idx)], dim=1)
        return -log_mean_exp(terms, dim=1)


def bootstrap_time_splits(sigma_min: float, sigma_max: float, variance: float, n_grid: int = 1000) -> Tensor:
    """BNEM's geometric bootstrap schedule: time splits [0, t_1, …, 1] (float64) such that h(t) grows by at
    least ``variance`` over each interval, scanned on ``linspace(0, 1, n_grid)`` with the schedule's own
    σ_min/σ_max.

    Published counts (bnem-reference-code.md §2): GMM (1e-3, 1, 0.1) → 11, DW-4 (1e-4, 3, 0.1) → 69,
    LJ-13 (1e-4, 6, 0.1) → 130, LJ-55 (0.5, 4, 0.6) → 27.
    """
    if not variance > 0:
        raise ValueError(f"bootstrap variance must be > 0, got {variance}")
    sched = GeometricNoiseSchedule(sigma_min, sigma_max)
    grid = torch.linspace(0.0, 1.0, n_grid, dtype=torch.float64)
    h = sched.h(grid).tolist()
    splits, h_prev = [0.0], 0.0
    for t, ht in zip(grid.tolist(), h):
        if ht - h_prev >= variance:
            splits.append(t)
            h_prev = ht
    if splits[-1] < 1.0:
        splits.append(1.0)
    return torch.tensor(splits, dtype=torch.float64)


def bootstrap_s(t: float, splits: Tensor, generator: torch.Generator | None = None) -> float | None:
    """s for a time t: Uniform(previous interval) of the interval holding t, or None in the first interval."""
    k = int(torch.searchsorted(splits, torch.tensor([t], dtype=splits.dtype), right=True)[0]) - 1
    k = min(k, len(splits) - 2)
    if k <= 0:
        return None
    lo, hi = float(splits[k - 1]), float(splits[k])
    u = float(
        torch.rand(
            (),
            generator=generator,
            dtype=torch.float64,
            device=generator.device if generator is not None else "cpu",
        )
    )
    return max(lo + (hi - lo) * u, 1e-4)


# ======================================================================= training energies (LJ smoothing)
class LJSmoothing:
    """The published training-time LJ softening: below r = 0.65 each pair term r⁻¹² − 2 r⁻⁶ is replaced by
    the first piece of a cubic spline (scipy ``CubicSpline``, default not-a-knot) fitted on
    linspace(0.65, 2, 1000), extrapolated. ``correction(x)`` [B] is the energy change, to add to the
    (counted) exact energy; r uses the target's softened distance sqrt(|Δx|² + 1e-6)."""

    R_MIN = 0.65

    def __init__(self, target: Any, pair_factor: float, eps2: float) -> None:
        from scipy.interpolate import CubicSpline

        r = np.linspace(self.R_MIN, 2.0, 1000, dtype=np.float32).astype(np.float64)
        spl = CubicSpline(r, r**-12 - 2 * r**-6)
        self.coef = [float(c) for c in spl.c[:, 0]]  # c3, c2, c1, c0 of the first interval
        self.r0 = float(r[0])
        self.target, self.pair_factor, self.eps2 = target, pair_factor, eps2

    def spline(self, r: Tensor) -> Tensor:
        dr = r - self.r0
        c3, c2, c1, c0 = self.coef
        return ((c3 * dr + c2) * dr + c1) * dr + c0

    def pair_correction(self, x: Tensor) -> Tensor:
        """Per-pair corrections [B, P] (already multiplied by the pair factor)."""
        r = ((self.target.pair_vectors(x) ** 2).sum(-1) + self.eps2).sqrt()
        inv6 = r**-6
        lj = inv6**2 - 2 * inv6
        corr = torch.where(r < self.R_MIN, self.spline(r) - lj, torch.zeros_like(r))
        return self.pair_factor * corr

    def correction(self, x: Tensor) -> Tensor:
        return self.pair_correction(x).sum(-1)


def particle_energy_columns(target: Any, x: Tensor) -> Tensor:
    """Per-particle energy columns [B, n] summing to the total energy (for the biased per-particle estimator):
    pair terms split half/half between the two particles (i.e. column i = ½ Σ_{j≠i} φ(r_ij)), single-particle
    terms (the LJ harmonic restraint) to their particle. Supports dw4, lj13, lj55."""
    from targets import double_well, lennard_jones

    inner = getattr(target, "target", target)
    p = inner.as_particles(x)
    n = inner.n_particles
    i, j = inner.pair_indices(x.device)
    if isinstance(inner, double_well.DoubleWell4):
        u = inner.pair_vectors(x).norm(dim=-1) - double_well.OFFSET
        phi = double_well.A * u**4 + double_well.B * u**2
        single = x.new_zeros(x.shape[0], n)
    elif isinstance(inner, lennard_jones.LennardJones):
        r2 = (inner.pair_vectors(x) ** 2).sum(-1) + lennard_jones.EPS2
        inv6 = r2.reciprocal() ** 3
        phi = lennard_jones.PAIR_FACTOR * (inv6**2 - 2 * inv6)
        single = 0.5 * ((p - p.mean(-2, keepdim=True)) ** 2).sum(-1)
    else:
        raise ValueError(f"per-particle energies are defined for dw4, lj13, lj55; got {inner.name!r}")
    cols = single.clone()
    cols.index_add_(1, i, 0.5 * phi)
    cols.index_add_(1, j, 0.5 * phi)
    return cols


# ============================================================================ configs
@dataclasses.dataclass(frozen=True)
class NEMConfig(MethodConfig):
    """NEM hyper-parameters (model coordinates: x / target.length_scale, i.e. x/50 for GMM-40)."""

    # energy network: MLP (non-particle) or EGNN energy head (particles)
    hidden: int = 128
    n_layers: int = 3  # residual blocks of the MLP / EGNN layers
    emb_size: int = 128
    # VE geometric noise schedule (model coordinates)
    sigma_min: float = 1e-4
    sigma_max: float = 1.0
    # estimator
    n_mc: int = 1000  # K
    per_particle: bool = False  # published code's per-particle log-mean-exp (biased); paper: False
    lj_smooth: bool = False  # published LJ spline softening below r = 0.65 in training targets
    t0_weight: float = 0.0  # w₀ of ‖E_θ(x_0, 0) − E(x_0)‖² on clean buffer samples
    mc_chunk: int = 1 << 18  # max configurations per energy call (memory bound, no effect on values)
    # optimisation
    batch_size: int = 512
    lr: float = 1e-3
    grad_clip: float = 0.5  # gradient-norm clip (Lightning gradient_clip_val)
    # outer loop
    steps_per_epoch: int = 100
    n_init: int = 1024  # prior samples in the initial buffer
    n_new_per_epoch: int = 1024
    buffer_size: int = 10_000
    ema_beta: float = 0.95  # per epoch
    buffer_from_ema: bool = True
    # sampling (reverse VE SDE, Euler–Maruyama)
    sde_steps: int = 1000
    diffusion_scale: float = 1.0
    max_score_norm: float = 1000.0
    sample_chunk: int = 2048
    eval_from_ema: bool = False  # sample() from the EMA network (the code's test path uses the raw network)
    eval_sde_steps: int | None = None  # SDE grid of sample() (evaluation); None: sde_steps (as published)
    #: sampler only (None: off, as published): clamp the Tweedie denoiser y + σ_t²·score of the learned score
    #: to the box [−c, c]^dim (model coordinates) before the norm clip. 1.0 for GMM-40 = the data
    #: normalisation range ±50, the box the published integrate_sde has a (commented-out) clamp of x to.
    denoiser_clip: float | None = None
    #: generated samples with a training energy above this are not added to the buffer (None: keep all). The
    #: published GMM (fab-torch) sets log p = −inf where log p < −1e4, where NEM's targets are undefined.
    buffer_max_energy: float | None = None

    # Published settings (tonyauyeung/BNEM HEAD 1b2eb92: configs/model/nem.yaml +
    # configs/experiment/*_nem.yaml; bnem-reference-code.md §5). GMM works in x/50.
    PER_TARGET: ClassVar[dict[str, dict[str, Any]]] = {
        "gmm40": dict(sigma_max=1.0, n_mc=100, sde_steps=100, n_layers=3),
        "dw4": dict(sigma_max=3.0, n_mc=1000, n_layers=3),
        "lj13": dict(sigma_max=6.0, n_mc=1000, n_layers=5, lj_smooth=True),
        "lj55": dict(
            sigma_min=0.5,
            sigma_max=4.0,
            n_mc=1000,
            n_layers=5,
            lj_smooth=True,
            batch_size=128,
            n_new_per_epoch=128,
            diffusion_scale=0.5,
        ),
    }
    PRESETS: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {
        # seconds per cell on a CPU: tiny nets, K, batches and SDE grids
        "smoke": {
            "*": dict(
                hidden=16,
                n_layers=2,
                emb_size=16,
                n_mc=8,
                batch_size=16,
                steps_per_epoch=2,
                n_init=32,
                n_new_per_epoch=16,
                sde_steps=10,
                buffer_size=256,
            ),
        },
        # GMM-40 / DW-4 numbers on a 2-core CPU in well under an hour per cell. GMM-40 (issue 5, docs/nem.md):
        # half batch; the paper-time (2024) sampler score clip (clipper_gen NEM 50 / BNEM 70; HEAD 1000);
        # buffer_max_energy 1e4 (fab-torch's log p = −inf region). Departures that remove the far-out samples
        # (K = 100 MC targets are biased upwards by 10²–10³ at |x| ≳ 100 for t ≳ 0.85, the network learns that
        # wall and one Euler step near t = 1 (g²dt = 0.18) throws samples hundreds of units out):
        # denoiser_clip 1.0 (Tweedie denoiser kept in the ±50 data box), evaluation from the EMA network
        # (the buffer's sampler; the raw network's last steps are noisy) on the paper-time 1000-step grid
        # (training buffer: HEAD's 100 steps). DW-4: a small EGNN, K = 100, batch 128, a 100-step SDE grid
        # (published 1000) and a faster EMA (0.8 per epoch)
        "cpu": {
            "gmm40": dict(
                batch_size=256,
                max_score_norm=50.0,
                buffer_max_energy=1e4,
                denoiser_clip=1.0,
                eval_from_ema=True,
                eval_sde_steps=1000,
            ),
            "dw4": dict(
                batch_size=128, ema_beta=0.8, n_mc=100, hidden=32, sde_steps=100, n_new_per_epoch=256
            ),
            # LJ: DW-4's cost settings; LJ-55 with K 50, batch 64, a 50-step SDE grid and a 2-layer EGNN
            # (0.67 s per NEM step measured on LJ-13 with two other jobs per core)
            "lj13": dict(
                batch_size=128, ema_beta=0.8, n_mc=100, hidden=32, sde_steps=100, n_new_per_epoch=256
            ),
            "lj55": dict(
                batch_size=64, ema_beta=0.8, n_mc=50, hidden=32, n_layers=2, sde_steps=50, n_new_per_epoch=64,
                n_init=256,
            ),
        },
    }
    #: the configurations behind the published numbers (MethodConfig.VARIANTS; docs/reproduction.md)
    VARIANTS: ClassVar[dict[str, dict[str, Any]]] = {
        "published": {
            "description": "the HEAD code's per-particle log-mean-exp estimator and per-particle loss",
            "source": "tonyauyeung/BNEM dem/models/nem_module.py (energy_estimator, get_loss) since "
            "2283a53 / f632e13 (2024-09-07); bnem-reference-code.md §1.1, §1.5",
            "overrides": {"dw4": dict(per_particle=True), "lj13": dict(per_particle=True),
                          "lj55": dict(per_particle=True)},
        },
        "poster": {
            "description": "the 2024 configuration behind the ML4PS poster (σ_min 0.01, K 1000, sampler "
            "clip 50, t0 weight 0.1, GMM 1000 SDE steps; per-particle estimator on DW-4)",
            "source": "tonyauyeung/BNEM configs/model/endem.yaml at af2c1bb (2024-12-07) and the 2024 "
            "*_idem experiments; bnem-reference-code.md §5",
            "overrides": {
                "*": dict(sigma_min=0.01, n_mc=1000, max_score_norm=50.0, t0_weight=0.1),
                "gmm40": dict(sde_steps=1000),
                "dw4": dict(per_particle=True),
            },
        },
    }
    BUDGETS: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {
        "smoke": {"*": dict(steps=6)},
        # cpu (1 thread, quiet CPU, docs/nem.md): GMM-40 20k steps (~0.03 s/step NEM, 0.06 BNEM stage 1:
        # 10-12 min per cell; the paper's 100k would be ~1 h); DW-4 10k steps (0.025 / 0.05 s/step: 4-7 min;
        # x-W2 / E-W2 were still falling at 1500 steps). BNEM switches at half (as the paper grid); cap 40 min
        "cpu": {
            "gmm40": dict(steps=20_000),
            "dw4": dict(steps=10_000),
            "lj13": dict(steps=3000),
            "lj55": dict(steps=1000),
        },
        # published: at most 1000 epochs x 100 steps (LJ-55: 2000 epochs), early-stopped on val energy W2
        "paper": {"*": dict(steps=100_000), "lj55": dict(steps=200_000)},
    }


@dataclasses.dataclass(frozen=True)
class BNEMConfig(NEMConfig):
    """BNEM = NEM + bootstrapping; defaults from configs/model/bnem.yaml (K = 100, M = 80, w₀ = 0.5)."""

    n_mc: int = 100
    t0_weight: float = 0.5
    bootstrap_mc: int = 80  # M teacher draws (K − M exact terms are mixed in)
    bootstrap_start_step: int = 50_000  # NEM stage length; the code switches by early stopping (see docs)
    # "step": bootstrap from ``bootstrap_start_step`` (ours, deterministic); "plateau": as the published
    # code's MultiEarlyStopping (configs/callbacks/bootstrap.yaml: monitor energy_loss, patience 5): every
    # ``switch_check_steps`` (check_val_every_n_epoch 10 × 100 steps) the mean NEM energy loss since the
    # last check is compared with the best so far; after ``switch_patience`` checks without improvement
    # bootstrapping starts (``bootstrap_start_step`` is then ignored)
    bootstrap_switch: Literal["step", "plateau"] = "step"
    switch_patience: int = 5
    switch_check_steps: int = 1000
    boot_sigma_min: float = 1e-3
    boot_sigma_max: float = 6.0
    boot_variance: float = 0.1
    lambda_eps: float = 1e-3  # λ(t) = σ_t² + 1e-3 of the acceptance test

    # configs/model/bnem.yaml + configs/experiment/*_bnem.yaml (HEAD), bnem-reference-code.md §2 and §5
    PER_TARGET: ClassVar[dict[str, dict[str, Any]]] = {
        "gmm40": dict(sigma_max=1.0, sde_steps=100, boot_sigma_min=1e-3, boot_sigma_max=1.0),
        "dw4": dict(sigma_max=3.0, n_layers=3, boot_sigma_min=1e-4, boot_sigma_max=3.0),
        "lj13": dict(sigma_max=6.0, n_layers=5, lj_smooth=True, boot_sigma_min=1e-4, boot_sigma_max=6.0),
        "lj55": dict(
            sigma_min=0.5,
            sigma_max=4.0,
            n_layers=5,
            lj_smooth=True,
            batch_size=128,
            n_new_per_epoch=128,
            diffusion_scale=0.5,
            n_mc=1000,
            bootstrap_mc=500,
            t0_weight=0.0,
            boot_sigma_min=0.5,
            boot_sigma_max=4.0,
            boot_variance=0.6,
        ),
    }
    PRESETS: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {
        "smoke": {"*": dict(NEMConfig.PRESETS["smoke"]["*"], n_mc=8, bootstrap_mc=4, bootstrap_start_step=3)},
        "cpu": {
            "gmm40": dict(
                NEMConfig.PRESETS["cpu"]["gmm40"], max_score_norm=70.0, bootstrap_start_step=10_000
            ),
            "dw4": dict(NEMConfig.PRESETS["cpu"]["dw4"], bootstrap_start_step=5000),
            # bootstrapping from half the budget, as on GMM-40 / DW-4; M = 80 % of K
            "lj13": dict(NEMConfig.PRESETS["cpu"]["lj13"], bootstrap_mc=80, bootstrap_start_step=1500),
            "lj55": dict(NEMConfig.PRESETS["cpu"]["lj55"], bootstrap_mc=40, bootstrap_start_step=500),
        },
    }
    BUDGETS: ClassVar[dict[str, dict[str, dict[str, Any]]]] = NEMConfig.BUDGETS
    VARIANTS: ClassVar[dict[str, dict[str, Any]]] = {
        "published": {
            "description": "the HEAD code: per-particle estimator and loss; bootstrapping starts when the "
            "training energy loss plateaus (MultiEarlyStopping, patience 5 checks every 10 epochs) instead "
            "of at a fixed step; stopping on val E-W2 is the `bnem` selection rule",
            "source": "tonyauyeung/BNEM dem/models/nem_module.py, dem/callbacks/earlystop.py, "
            "configs/callbacks/bootstrap.yaml; bnem-reference-code.md §1.1, §2",
            "overrides": {
                "*": dict(bootstrap_switch="plateau", switch_patience=5, switch_check_steps=1000),
                "dw4": dict(per_particle=True),
                "lj13": dict(per_particle=True),
                "lj55": dict(per_particle=True, switch_check_steps=5000),
            },
        },
        "poster": {
            "description": "the 2024 configuration behind the ML4PS poster (σ_min 0.001, K 100, M 80, "
            "sampler clip 70, t0 weight 0.5, bootstrap σ 0.001-6.0 var 0.1, GMM 1000 SDE steps; "
            "per-particle estimator on DW-4; plateau switch)",
            "source": "tonyauyeung/BNEM configs/model/endem_bootstrap.yaml at af2c1bb (2024-12-07); "
            "bnem-reference-code.md §5",
            "overrides": {
                "*": dict(sigma_min=1e-3, n_mc=100, bootstrap_mc=80, max_score_norm=70.0, t0_weight=0.5,
                          boot_sigma_min=1e-3, boot_sigma_max=6.0, boot_variance=0.1,
                          bootstrap_switch="plateau", switch_patience=5, switch_check_steps=1000),
                "gmm40": dict(sde_steps=1000),
                "dw4": dict(per_particle=True),
            },
        },
    }


# ============================================================================ the methods
@METHODS.register("nem")
class NEM(Method):
    """Noised energy matching (with bootstrapping in the subclass ``BNEM``)."""

    name = "nem"
    display_name = "NEM"
    Config = NEMConfig
    bootstrap: ClassVar[bool] = False

    def __init__(
        self, target: Any, config: NEMConfig, device: torch.device | str, generator: torch.Generator
    ) -> None:
        super().__init__(target, config, device, generator)
        c = config
        self.particles = getattr(target, "n_particles", None) is not None
        if c.per_particle and not self.particles:
            raise ValueError(
                f"per_particle=True needs a particle target (dw4, lj13, lj55), got {target.name!r}"
            )
        if c.lj_smooth and not target.name.startswith("lj"):
            raise ValueError(f"lj_smooth=True applies to lj13/lj55 only, got {target.name!r}")
        for k in ("n_mc", "batch_size", "steps_per_epoch", "n_init", "n_new_per_epoch", "sde_steps"):
            if getattr(c, k) < 1:
                raise ValueError(f"{type(c).__name__}.{k} must be >= 1, got {getattr(c, k)}")
        if c.eval_sde_steps is not None and c.eval_sde_steps < 1:
            raise ValueError(f"eval_sde_steps must be None or >= 1, got {c.eval_sde_steps}")
        if c.denoiser_clip is not None and not c.denoiser_clip > 0:
            raise ValueError(f"denoiser_clip must be None or > 0, got {c.denoiser_clip}")
        self.scale = float(target.length_scale)
        self.dim = int(target.dim)
        self.schedule = GeometricNoiseSchedule(c.sigma_min, c.sigma_max)
        dev = self.device
        # parameter initialisation drawn from the run's generator (reproducible without touching global RNG)
        init_seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self._build_nets(target, c, dev)
        self.ema = EMA(self.net, c.ema_beta)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=c.lr)
        self.smoothing: LJSmoothing | None = None
        if c.lj_smooth:
            from targets import lennard_jones

            self.smoothing = LJSmoothing(target, lennard_jones.PAIR_FACTOR, lennard_jones.EPS2)
        self.buffer = ReplayBuffer(self.dim, c.buffer_size, dev)
        self.step = 0
        self.n_rejected = 0  # generated samples kept out of the buffer by buffer_max_energy
        self.last_accept_rate = float("nan")
        x_init = self.prior.sample(c.n_init, generator)
        self.buffer.add(x_init, self.train_energy_total(x_init))

    def _build_nets(self, target: Any, c: NEMConfig, dev: torch.device) -> None:
        if self.particles:
            self.net: nn.Module = EGNNEnergy(target.n_particles, target.spatial_dim, c.hidden, c.n_layers).to(
                dev
            )
            self.prior: GaussianPrior = MeanFreeGaussianPrior(
                target.n_particles, target.spatial_dim, self.schedule.prior_scale, dev
            )
        else:
            self.net = MLPEnergy(self.dim, c.hidden, c.n_layers, c.emb_size).to(dev)
            self.prior = GaussianPrior(self.dim, self.schedule.prior_scale, dev)

    # ------------------------------------------------------------------ helpers
    def center(self, x: Tensor) -> Tensor:
        return self.target.center(x) if self.particles else x

    def _count_net(self, n: int) -> None:
        self.target.usage.network_evals += int(n)

    def train_energy_total(self, y: Tensor) -> Tensor:
        """Training-target energy of model-space y [N, dim] -> [N] (counted; LJ smoothed if set)."""
        x = y * self.scale if self.scale != 1.0 else y
        e = self.target.energy(x)
        if self.smoothing is not None:
            e = e + self.smoothing.correction(x)
        return e

    def train_energy(self, y: Tensor) -> Tensor:
        """Training energies: total [N] or, with ``per_particle``, columns [N, n] (counted once per row)."""
        if not self.config.per_particle:
            return self.train_energy_total(y)
        total = self.train_energy_total(y)  # counted evaluation of the same configurations
        cols = particle_energy_columns(self.target, y)
        if self.smoothing is not None:
            corr = self.smoothing.pair_correction(y)
            i, j = self.target.pair_indices(y.device)
            cols = cols.index_add(1, i, 0.5 * corr).index_add(1, j, 0.5 * corr)
        if not torch.allclose(cols.sum(-1), total, rtol=1e-4, atol=1e-3):
            raise RuntimeError("per-particle energy columns do not sum to the target energy")
        return cols

    def model_energy(self, net: nn.Module, t: Tensor | float, y: Tensor) -> Tensor:
        """E_θ(y, t) [B] (or per-particle [B, n] with ``per_particle``); counts network evaluations."""
        self._count_net(y.shape[0])
        if self.config.per_particle:
            return net.per_particle(t, y)
        return net(t, y)

    def score_fn(self, net: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
        c = self.config

        def score(t: Tensor, y: Tensor) -> Tensor:
            self._count_net(y.shape[0])
            if c.denoiser_clip is None:
                return energy_and_score(net, t, y, create_graph=False, max_norm=c.max_score_norm)[1]
            s = energy_and_score(net, t, y, create_graph=False)[1]
            s = clip_denoised(y, s, self.schedule.h(t), c.denoiser_clip)
            return clip_per_sample(s, c.max_score_norm)

        return score

    def _generate(self, net: nn.Module, n: int, n_steps: int | None = None) -> Tensor:
        """n model-space samples from the reverse SDE driven by −∇E_net (``n_steps``: default sde_steps)."""
        c = self.config
        y1 = self.prior.sample(n, self.generator)
        return integrate_reverse_sde(
            self.score_fn(net),
            y1,
            self.schedule,
            c.sde_steps if n_steps is None else n_steps,
            c.diffusion_scale,
            self.generator,
            self.center if self.particles else None,
            chunk_size=c.sample_chunk,
        )

    # ------------------------------------------------------------------ targets and loss
    def _noised(self, y0: Tensor, t: Tensor) -> Tensor:
        eps = torch.randn(y0.shape, generator=self.generator, dtype=y0.dtype, device=y0.device)
        return self.center(y0 + self.schedule.sigma(t).to(y0.dtype).unsqueeze(-1) * eps)

    def _mc(self, y: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        return noised_energy_mc(
            self.train_energy, y, sigma, self.config.n_mc, self.generator, self.config.mc_chunk
        )

    def _target(self, y0: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, float]]:
        """(t [B], x_t [B, dim], regression target [B(, n)], logs) for NEM: t ~ U(0, 1) per sample."""
        B = y0.shape[0]
        t = torch.rand(B, generator=self.generator, dtype=y0.dtype, device=y0.device)
        yt = self._noised(y0, t)
        target, _ = self._mc(yt, self.schedule.sigma(t).to(y0.dtype))
        return t, yt, target, {}

    def train_step(self) -> dict[str, float]:
        c = self.config
        self.net.train()
        y0, e0 = self.buffer.sample(c.batch_size, self.generator)
        t, yt, target, logs = self._target(y0)
        pred = self.model_energy(self.net, t, yt)
        err = (pred - target) ** 2
        loss = err.sum(-1).mean() if c.per_particle else err.mean()
        energy_loss = float(loss.detach())
        if c.t0_weight > 0:
            pred0 = self.model_energy(self.net, torch.zeros_like(t), y0)
            ref0 = e0 if not c.per_particle else self.train_energy(y0)
            err0 = (pred0 - ref0) ** 2
            loss = loss + c.t0_weight * (err0.sum(-1).mean() if c.per_particle else err0.mean())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), c.grad_clip)
        self.opt.step()
        self.step += 1
        if self.step % c.steps_per_epoch == 0:
            self._end_epoch()
        return {"loss": float(loss.detach()), "energy_loss": energy_loss, "grad_norm": float(gnorm), **logs}

    @torch.no_grad()
    def _end_epoch(self) -> None:
        """EMA update (once per epoch, as the code), then new buffer samples from the EMA (or raw) network."""
        self.ema.update(self.net)
        net = self.ema.model if self.config.buffer_from_ema else self.net
        y = self._generate(net, self.config.n_new_per_epoch)
        y = y[torch.isfinite(y).all(-1)]
        if y.shape[0] == 0:
            return
        e = self.train_energy_total(y)
        if self.config.buffer_max_energy is not None:
            keep = e <= self.config.buffer_max_energy
            self.n_rejected += int((~keep).sum())
            y, e = y[keep], e[keep]
        if y.shape[0] > 0:
            self.buffer.add(y, e)

    # ------------------------------------------------------------------ sampling and state
    def sample(self, n: int) -> Tensor:
        """n samples [n, dim] in target coordinates from the reverse SDE of the raw network (the code's test
        path) or, with ``eval_from_ema``, of the EMA network; on the ``eval_sde_steps`` grid if set."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.net.eval()
        c = self.config
        y = self._generate(self.ema.model if c.eval_from_ema else self.net, n, c.eval_sde_steps)
        return (y * self.scale).detach()

    def diagnostics(self) -> dict[str, float]:
        return {"buffer_size": float(len(self.buffer)), "buffer_rejected": float(self.n_rejected)}

    def state_dict(self) -> dict[str, Any]:
        """A snapshot (deep copy, safe to keep while training continues)."""
        return copy.deepcopy(
            {
                "net": self.net.state_dict(),
                "ema": self.ema.model.state_dict(),
                "opt": self.opt.state_dict(),
                "buffer": self.buffer.state_dict(),
                "step": self.step,
                "n_rejected": self.n_rejected,
                "last_accept_rate": self.last_accept_rate,
                "generator": self.generator.get_state(),
            }
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.ema.model.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.buffer.load_state_dict(state["buffer"])
        self.step = int(state["step"])
        self.n_rejected = int(state.get("n_rejected", 0))
        self.last_accept_rate = float(state["last_accept_rate"])
        self.generator.set_state(state["generator"])


@METHODS.register("bnem")
class BNEM(NEM):
    """Bootstrapped NEM: NEM until ``bootstrap_start_step``, then the bootstrapped targets."""

    name = "bnem"
    display_name = "BNEM"
    Config = BNEMConfig
    bootstrap = True

    def __init__(
        self, target: Any, config: BNEMConfig, device: torch.device | str, generator: torch.Generator
    ) -> None:
        super().__init__(target, config, device, generator)
        if not config.n_mc > config.bootstrap_mc >= 1:
            raise ValueError(
                f"BNEM needs n_mc > bootstrap_mc >= 1, got n_mc={config.n_mc}, "
                f"bootstrap_mc={config.bootstrap_mc}"
            )
        self.splits = bootstrap_time_splits(
            config.boot_sigma_min, config.boot_sigma_max, config.boot_variance
        )
        # the plateau switch's state (bootstrap_switch="plateau")
        self.switch_step: int | None = None
        self.plateau_best, self.plateau_bad = math.inf, 0
        self.plateau_sum, self.plateau_n = 0.0, 0

    @property
    def stage(self) -> int:
        """0: plain NEM; 1: bootstrapping."""
        if self.config.bootstrap_switch == "plateau":
            return int(self.switch_step is not None)
        return int(self.step >= self.config.bootstrap_start_step)

    def train_step(self) -> dict[str, float]:
        logs = super().train_step()
        c = self.config
        if c.bootstrap_switch == "plateau" and self.switch_step is None:
            self.plateau_sum += logs["energy_loss"]
            self.plateau_n += 1
            if self.step % c.switch_check_steps == 0:
                mean = self.plateau_sum / self.plateau_n
                self.plateau_sum, self.plateau_n = 0.0, 0
                if mean < self.plateau_best:  # EarlyStopping(mode=min, min_delta=0)
                    self.plateau_best, self.plateau_bad = mean, 0
                else:
                    self.plateau_bad += 1
                    if self.plateau_bad >= c.switch_patience:
                        self.switch_step = self.step
                logs["switch_check_loss"] = mean
        return logs

    def _lambda(self, sigma: Tensor) -> Tensor:
        return sigma**2 + self.config.lambda_eps

    def _teacher(self, s: Tensor, y: Tensor) -> Tensor:
        return self.model_energy(self.ema.model, s, y)

    def _target(self, y0: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, float]]:
        if self.stage == 0:
            return super()._target(y0)
        c = self.config
        B, dt = y0.shape[0], y0.dtype
        t_val = float(torch.rand((), generator=self.generator, dtype=torch.float64, device=y0.device))
        t = torch.full((B,), t_val, dtype=dt, device=y0.device)  # one t per batch (iden_t)
        yt = self._noised(y0, t)
        sig_t = self.schedule.sigma(t).to(dt)
        target, log_terms = self._mc(yt, sig_t)
        s_val = bootstrap_s(t_val, self.splits, self.generator)
        if s_val is None:  # first interval: plain NEM target
            self.last_accept_rate = 0.0
            return t, yt, target, {"bootstrap_accept_rate": 0.0, "t": t_val}
        s = torch.full((B,), s_val, dtype=dt, device=y0.device)
        sig_s = self.schedule.sigma(s).to(dt)
        with torch.no_grad():  # acceptance test (per sample)
            self.net.eval()
            red = (lambda e: e.sum(-1)) if c.per_particle else (lambda e: e)
            t_loss = red((target - self.model_energy(self.net, t, yt)) ** 2) * self._lambda(sig_t)
            yu = self._noised(y0, s)
            target_u, _ = self._mc(yu, sig_s)
            u_loss = red((target_u - self.model_energy(self.net, s, yu)) ** 2) / self._lambda(sig_s)
            accept = t_loss * (c.bootstrap_mc - 1) / c.bootstrap_mc > u_loss
            self.net.train()
            if bool(accept.any()):
                boot = bootstrap_noised_energy(
                    self._teacher,
                    yt[accept],
                    sig_t[accept],
                    sig_s[accept],
                    s[accept],
                    c.bootstrap_mc,
                    self.generator,
                    log_terms[accept],
                    c.n_mc,
                    self.center if self.particles else None,
                    c.mc_chunk,
                )
                target = target.clone()
                target[accept] = boot
        rate = float(accept.float().mean())
        self.last_accept_rate = rate
        return t, yt, target, {"bootstrap_accept_rate": rate, "t": t_val, "s": s_val}

    def diagnostics(self) -> dict[str, float]:
        d = {**super().diagnostics(), "stage": float(self.stage)}
        if self.switch_step is not None:
            d["bootstrap_switch_step"] = float(self.switch_step)
        if self.last_accept_rate == self.last_accept_rate:  # not NaN: at least one bootstrap-stage batch
            d["bootstrap_accept_rate"] = self.last_accept_rate
        return d

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "stage": self.stage,
            "switch": [-1 if self.switch_step is None else self.switch_step, self.plateau_best,
                       self.plateau_bad, self.plateau_sum, self.plateau_n],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "switch" in state:
            sw, best, bad, tot, n = state["switch"]
            self.switch_step = None if int(sw) < 0 else int(sw)
            self.plateau_best, self.plateau_bad = float(best), int(bad)
            self.plateau_sum, self.plateau_n = float(tot), int(n)
