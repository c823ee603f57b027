"""What PIS and DDS share: the Langevin-preconditioned control network, the discretised controlled SDE with
its path-space objectives (reverse KL and log-variance), and log Z / importance-weight estimates.

Both samplers simulate a Markov chain on K steps in *working coordinates* y = x / scale (GMM-40: scale 50, the
iDEM / BNEM normalisation; particle targets: scale 1)::

    y_{k+1} = a_k y_k + c_k u_θ(t_k, y_k) + s_k ε_k,    ε_k ~ N(0, I)  (centred for particle targets)

whose uncontrolled version (u = 0) is the *reference* chain with a known Gaussian terminal marginal
N(0, v_ref I).
PIS: a = 1, c = g·dt, s = g·sqrt(dt) (Euler–Maruyama of dY = g u dt + g dW, Y_0 = 0, v_ref = g²T).
DDS: a = sqrt(1 − β²), c = β²σ², s = σβ (exponential integrator of the OU reference, Y_0 ~ N(0, σ²),
v_ref = σ²).

Per step the exact discrete-time log Radon–Nikodym derivative of the controlled against the reference
transition is, with r_k = c_k / s_k,   ½ r_k²|u_k|²  (running cost)  +  r_k u_k·ε_k  (zero-mean Itô term).
So, with terminal cost Ψ(y) = log N(y; 0, v_ref) − log p̃(y)  (p̃ = exp(−E(scale·y)), unnormalised),

    KL(controlled path ‖ target path) = E[Σ_k ½ r_k²|u_k|² + Ψ(y_K)] + log Z_y  ≥ 0,
    log w = −Σ_k (½ r_k²|u_k|² + r_k u_k·ε_k) − Ψ(y_K),   E[exp(log w)] = Z_y  (exact for the discrete chain),

and log Z of the target in its own coordinates is log Z_y + n_dof·log(scale). The KL loss is the batch mean of
Σ ½ r²|u|² + Ψ(y_K), reparameterised through the whole chain (gradients flow through every y_k, the network
and the terminal energy); the log-variance loss is the batch variance of log w on a detached trajectory
(Richter & Berner), re-expressed so that it still depends on θ: Σ_k [r_k u_θ·z_k − ½ r_k²|u_θ|²] with
z_k = (y_{k+1} − a_k y_k)/s_k the reference-noise increment of the detached path.

The control network (PIS ``PISGRADNet`` / DDS):
    u(t, y) = clip(NN₁(t, y), ±nn_clip) + NN₂(t) · clip(∇_y log p̃(y)),
NN₁ the shared ``TimeMLP`` (GMM) or ``EGNN`` (particles), last layer zero-initialised; NN₂ a Fourier-time MLP
(64 frequencies linspace(0.1, 100), 3 layers of width 64, last layer weight 0 and bias 0.01 as in PIS's
``TimeConder``). Target scores are taken from ``energy_and_grad`` of the counting target and treated as inputs
(no second derivatives of E); the terminal cost back-propagates through ``energy_and_grad`` with a custom
autograd function, so every target evaluation is counted once (energy + gradient).

Options for reproducing BNEM's DDS (``dds@bnem``, docs/pis_dds.md): ``ou_coefficients`` (its
variance-preserving step; a noise level σ other than the prior's makes the reference non-stationary:
``ref_var`` is then its terminal variance and the loss's terminal Gaussian keeps the prior,
``ChainCoefficients.loss_ref_var``), ``running_cost="norm"`` (its unsquared-norm running cost, loss only:
importance weights and log Z always use the exact ½ r²|u|² and N(0, ref_var)), ``readout_init`` /
``time_phase`` (its networks' initialisation) and
``lr_plateau`` (ReduceLROnPlateau on a validation loss).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from methods.base import AT_LEAST_1, NON_NEGATIVE, UNIT_OPEN, Method, MethodConfig
from methods.ema import EMA
from methods.lr import plateau_update
from methods.nets import EGNN, FourierTimeEmbedding, TimeMLP
from methods.noise import GeometricNoiseSchedule, cosine_alpha

ControlFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # u(t [B], y [B, dim], score [B, dim]) -> [B, dim]
ScoreFn = Callable[[Tensor], Tensor]  # score(y [B, dim]) -> [B, dim] (detached)


# ------------------------------------------------------------------------------------------------ networks
class TimeScale(nn.Module):
    """NN₂(t): Fourier features of t [B] (64 frequencies 0.1..100) -> MLP (GELU) -> [B, out_dim].

    The last layer has weight 0 and bias ``bias_init`` (PIS ``TimeConder``: 0.01), so u starts as
    0.01·clip(∇log p̃).
    """

    def __init__(self, channels: int = 64, n_layers: int = 3, out_dim: int = 1,
                 bias_init: float = 0.01, phase: bool = False) -> None:
        super().__init__()
        if channels < 1 or n_layers < 1:
            raise ValueError(f"TimeScale needs channels >= 1 and n_layers >= 1, got {channels}, {n_layers}")
        # phase: TimeConder's learnable phase of the Fourier features (randn init)
        self.emb = FourierTimeEmbedding(channels, learnable_phase=phase)
        layers: list[nn.Module] = [nn.Linear(self.emb.out_dim, channels)]
        for _ in range(n_layers - 1):
            layers += [nn.GELU(), nn.Linear(channels, channels)]
        layers += [nn.GELU(), nn.Linear(channels, out_dim)]
        self.net = nn.Sequential(*layers)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.constant_(self.net[-1].bias, bias_init)

    def forward(self, t: Tensor) -> Tensor:
        return self.net(self.emb(t))


def clip_score(score: Tensor, clip: float | None, mode: Literal["value", "norm"]) -> Tensor:
    """Clip target scores [B, dim]: elementwise to ±clip ("value", PIS) or each row's norm to ≤ clip ("norm",
    rotation-equivariant, as the particle codes do). ``clip`` None: unchanged."""
    if clip is None:
        return score
    if mode == "value":
        return score.clamp(-clip, clip)
    if mode == "norm":
        n = score.norm(dim=-1, keepdim=True)
        return score * torch.clamp(clip / n.clamp_min(1e-30), max=1.0)
    raise ValueError(f"score clip mode must be 'value' or 'norm', got {mode!r}")


class LangevinControl(nn.Module):
    """u(t, y, s) = clip(NN₁(t, y), ±nn_clip) + NN₂(t) · clip(s): t [B] in [0, 1], y, s [B, dim] -> [B, dim].

    ``center`` (particle targets) removes the centre of mass of the output.
    """

    def __init__(
        self,
        base: nn.Module,
        time_net: TimeScale,
        nn_clip: float | None = 1e4,
        score_clip: float | None = 1e4,
        score_clip_mode: Literal["value", "norm"] = "value",
        center: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        if score_clip_mode not in ("value", "norm"):
            raise ValueError(f"score_clip_mode must be 'value' or 'norm', got {score_clip_mode!r}")
        self.base, self.time_net = base, time_net
        self.nn_clip, self.score_clip, self.score_clip_mode = nn_clip, score_clip, score_clip_mode
        self.center = center

    def forward(self, t: Tensor, y: Tensor, score: Tensor) -> Tensor:
        f = self.base(t, y)
        if self.nn_clip is not None:
            f = f.clamp(-self.nn_clip, self.nn_clip)
        # NN₂ depends on t only: one row when the whole batch shares its time (as in simulate)
        tt = t[:1] if t.numel() > 1 and bool((t == t[0]).all()) else t
        u = f + self.time_net(tt) * clip_score(score, self.score_clip, self.score_clip_mode)
        return self.center(u) if self.center is not None else u


def build_control(
    target: Any,
    network: Literal["mlp", "egnn"],
    hidden: int,
    n_layers: int,
    emb_size: int = 128,
    time_channels: int = 64,
    time_layers: int = 3,
    nn_clip: float | None = 1e4,
    score_clip: float | None = 1e4,
    score_clip_mode: Literal["value", "norm"] = "value",
    readout_init: Literal["zero", "default"] = "zero",
    time_phase: bool = False,
) -> LangevinControl:
    """The Langevin-preconditioned control for ``target``: NN₁ = shared TimeMLP for "mlp" (read-out
    zero-initialised as PIS's, or torch's default initialisation as BNEM's DDS MyMLP: ``readout_init``), the
    shared EGNN (centred displacement) for "egnn" (particle targets only). ``time_phase``: NN₂'s Fourier
    features get TimeConder's learnable phase."""
    if readout_init not in ("zero", "default"):
        raise ValueError(f"readout_init must be 'zero' or 'default', got {readout_init!r}")
    if network == "mlp":
        base: nn.Module = TimeMLP(target.dim, hidden=hidden, n_blocks=n_layers, emb_size=emb_size)
        if readout_init == "zero":
            last = [m for m in base.modules() if isinstance(m, nn.Linear)][-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
    elif network == "egnn":
        if getattr(target, "n_particles", None) is None:
            raise ValueError(f"network 'egnn' needs a particle target; {target.name} is not one (use 'mlp')")
        base = EGNN(target.n_particles, target.spatial_dim, hidden=hidden, n_layers=n_layers)
    else:
        raise ValueError(f"network must be 'mlp' or 'egnn', got {network!r}")
    center = target.center if getattr(target, "n_particles", None) is not None else None
    return LangevinControl(base, TimeScale(time_channels, time_layers, phase=time_phase), nn_clip, score_clip,
                           score_clip_mode, center)


# --------------------------------------------------------------------------------------------- target view
class _EnergyWithGrad(torch.autograd.Function):
    """E(y) [B] whose backward uses the gradient returned together with it (one counted evaluation)."""

    @staticmethod
    def forward(ctx: Any, y: Tensor, fn: Callable[[Tensor], tuple[Tensor, Tensor]]) -> Tensor:
        e, g = fn(y.detach())
        ctx.save_for_backward(g)
        return e

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None]:
        (g,) = ctx.saved_tensors
        return grad_out.unsqueeze(-1) * g, None


class WorkingTarget:
    """The (counting) target seen in working coordinates y = x / scale.

    energy_and_grad(y) -> (E(scale·y) [B], ∇_y [B, dim]); score(y) = −∇_y; energy(y, differentiable) -> [B]
    (differentiable: back-propagates through the counted gradient). ``log_jacobian`` = n_dof·log(scale) turns
    log Z_y into log Z of the target (x coordinates).
    """

    def __init__(self, target: Any, scale: float) -> None:
        if not scale > 0:
            raise ValueError(f"coordinate scale must be > 0, got {scale}")
        self.target, self.scale = target, float(scale)
        self.dim = target.dim
        self.is_particle = getattr(target, "n_particles", None) is not None
        self.n_dof = target.n_dof if self.is_particle else target.dim
        self.log_jacobian = self.n_dof * math.log(self.scale)

    def energy_and_grad(self, y: Tensor) -> tuple[Tensor, Tensor]:
        e, g = self.target.energy_and_grad(self.scale * y)
        return e.to(y.dtype), (self.scale * g).to(y.dtype)

    def score(self, y: Tensor) -> Tensor:
        return -self.energy_and_grad(y.detach())[1]

    def energy(self, y: Tensor, differentiable: bool = False) -> Tensor:
        if differentiable and torch.is_grad_enabled() and y.requires_grad:
            return _EnergyWithGrad.apply(y, self.energy_and_grad)
        return self.target.energy(self.scale * y.detach()).to(y.dtype)

    def center(self, y: Tensor) -> Tensor:
        return self.target.center(y) if self.is_particle else y


# ----------------------------------------------------------------------------------------------- the chain
@dataclass(frozen=True)
class ChainCoefficients:
    """Per-step coefficients of y_{k+1} = a_k y_k + c_k u_k + s_k ε_k, k = 0..K−1 (each a float64 [K] tensor);
    ``times`` [K] are the network's time inputs in [0, 1]; ``ref_var`` the reference terminal variance (the
    uncontrolled chain's terminal law is N(0, ref_var)); ``loss_ref_var`` the variance of the Gaussian in the
    training loss's terminal cost where it is *not* that law (BNEM's DDS: its prior N(0, 1) while its chain's
    noise level is σ_max), None: ref_var. Importance weights always use ``ref_var``."""

    a: Tensor
    c: Tensor
    s: Tensor
    times: Tensor
    ref_var: float
    loss_ref_var: float | None = None

    def __post_init__(self) -> None:
        K = self.a.shape[0]
        if any(v.shape != (K,) for v in (self.c, self.s, self.times)) or K < 1:
            raise ValueError("ChainCoefficients a, c, s, times must all be [K] tensors with K >= 1")
        if not bool((self.s > 0).all()):
            raise ValueError("ChainCoefficients: every noise scale s_k must be > 0")

    @property
    def n_steps(self) -> int:
        return int(self.a.shape[0])

    @property
    def loss_var(self) -> float:
        """Variance of the Gaussian in the loss's terminal cost (``loss_ref_var``, else ``ref_var``)."""
        return self.ref_var if self.loss_ref_var is None else self.loss_ref_var


def terminal_variance(a: Tensor, s: Tensor, init_var: float) -> float:
    """Per-coordinate variance of y_K of the uncontrolled chain y_{k+1} = a_k y_k + s_k ε_k from
    y_0 ~ N(0, init_var): v ← a_k² v + s_k²."""
    v = float(init_var)
    for ak, sk in zip(a.tolist(), s.tolist(), strict=True):
        v = ak * ak * v + sk * sk
    return v


def pis_coefficients(n_steps: int, diffusion_sq: float, horizon: float) -> ChainCoefficients:
    """PIS: Euler–Maruyama of dY = g u dt + g dW on [0, T], g² = ``diffusion_sq``, dt = T/K; v_ref = g²T."""
    if n_steps < 1 or not diffusion_sq > 0 or not horizon > 0:
        raise ValueError(f"PIS needs n_steps >= 1, diffusion_sq > 0, horizon > 0; got {n_steps}, "
                         f"{diffusion_sq}, {horizon}")
    K, g, dt = n_steps, math.sqrt(diffusion_sq), horizon / n_steps
    one = torch.ones(K, dtype=torch.float64)
    return ChainCoefficients(a=one, c=one * g * dt, s=one * g * math.sqrt(dt),
                             times=torch.arange(K, dtype=torch.float64) / K, ref_var=diffusion_sq * horizon)


def dds_betas_sq(n_steps: int, total: float, s: float = 0.008) -> Tensor:
    """DDS step sizes β_k² [K] (float64), in generation order (prior -> target): a cos⁴ profile
    cos⁴(((j/K) + s)/(1 + s)·π/2), j = 0..K, normalised to sum to ``total`` (Vargas et al.'s
    ``cos_sq_fn_step_scheme``); the last point is 0 and is dropped, so steps shrink towards the target."""
    if n_steps < 1 or not total > 0:
        raise ValueError(f"DDS schedule needs n_steps >= 1 and total > 0, got {n_steps}, {total}")
    j = torch.arange(n_steps + 1, dtype=torch.float64) / n_steps
    w = torch.cos((j + s) / (1 + s) * math.pi / 2) ** 4
    w = w / w.sum() * total
    return w[:n_steps].clamp(1e-12, 1.0)


def dds_coefficients(n_steps: int, prior_std: float, total: float) -> ChainCoefficients:
    """DDS exponential integrator: a = sqrt(1 − β²), c = β²σ², s = σβ; the reference is stationary at
    N(0, σ²), so v_ref = σ²."""
    if not prior_std > 0:
        raise ValueError(f"DDS prior_std must be > 0, got {prior_std}")
    b2 = dds_betas_sq(n_steps, total)
    beta = b2.sqrt()
    return ChainCoefficients(a=(1 - b2).clamp_min(0).sqrt(), c=b2 * prior_std**2, s=beta * prior_std,
                             times=torch.arange(n_steps, dtype=torch.float64) / n_steps, ref_var=prior_std**2)


def bnem_alphas(schedule: Literal["bnem_cosine", "geometric"], n_steps: int, sigma_min: float,
                sigma_max: float) -> Tensor:
    """Per-step rates α_k [K] (float64) of BNEM's DDS at its times t_k = k/K, dt = 1/K (prior at t = 0,
    target at t = 1): ``noise_schedule.a(t_k, dt)`` of its ``DDSNoiseSchedule`` ("bnem_cosine",
    ``methods.noise.cosine_alpha`` with offset ``sigma_min``) or ``GeometricNoiseSchedule(sigma_min,
    sigma_max)`` ("geometric", ``GeometricNoiseSchedule.alpha``). Both grow towards the target."""
    if n_steps < 1:
        raise ValueError(f"BNEM DDS schedule needs n_steps >= 1, got {n_steps}")
    dt = 1.0 / n_steps
    t = torch.arange(n_steps, dtype=torch.float64) * dt
    if schedule == "bnem_cosine":
        return cosine_alpha(t, dt, sigma_min)
    if schedule == "geometric":
        return GeometricNoiseSchedule(sigma_min, sigma_max).alpha(t, dt)
    raise ValueError(f"BNEM DDS schedule must be 'bnem_cosine' or 'geometric', got {schedule!r}")


def ou_coefficients(steps: Tensor, noise_std: float, prior_std: float,
                    integrator: Literal["exponential", "var_preserve"] = "var_preserve") -> ChainCoefficients:
    """A DDS chain for the OU reference stationary at N(0, σ²) (σ = ``noise_std``) with per-step rates
    ``steps`` = α_k (or β_k²) [K]::

        "var_preserve":  y_{k+1} = sqrt(1 − α_k) y_k + 2σ² λ_k u_k + σ sqrt(α_k) ε_k,  λ_k = 1 − sqrt(1 − α_k)
        "exponential":   y_{k+1} = sqrt(1 − α_k) y_k + α_k σ² u_k + σ sqrt(α_k) ε_k

    "var_preserve" is BNEM's ``integrate_sde(var_preserve=True)`` (its σ = ``sigma_max``; Vargas et al.'s
    exact exponential integrator), λ_k computed as α_k / (1 + sqrt(1 − α_k)), the same number without the
    cancellation; "exponential" its first-order form, our default DDS step (``dds_coefficients``). y_0 ~
    N(0, prior_std²); when prior_std ≠ σ the reference is not stationary: ``ref_var`` is its terminal variance
    and ``loss_ref_var`` = prior_std² (BNEM's terminal cost uses its prior's log-density)."""
    if not (noise_std > 0 and prior_std > 0):
        raise ValueError(f"need noise_std > 0 and prior_std > 0, got {noise_std}, {prior_std}")
    if integrator not in ("exponential", "var_preserve"):
        raise ValueError(f"integrator must be 'exponential' or 'var_preserve', got {integrator!r}")
    al = steps.to(torch.float64)
    if al.ndim != 1 or not bool(((al > 0) & (al <= 1)).all()):
        raise ValueError("OU step rates α_k must be a [K] tensor with every 0 < α_k <= 1")
    K = al.shape[0]
    root = (1 - al).sqrt()
    c = 2 * noise_std**2 * al / (1 + root) if integrator == "var_preserve" else al * noise_std**2
    a, s = root, noise_std * al.sqrt()
    if noise_std == prior_std:
        ref_var, loss_var = noise_std**2, None  # stationary: (1 − α)σ² + σ²α = σ²
    else:
        ref_var, loss_var = terminal_variance(a, s, prior_std**2), prior_std**2
    return ChainCoefficients(a=a, c=c, s=s, times=torch.arange(K, dtype=torch.float64) / K, ref_var=ref_var,
                             loss_ref_var=loss_var)


@dataclass
class PathResult:
    """Outcome of one batch of trajectories. y [B, dim] terminal states; running [B] = Σ½r²|u|²;
    ito [B] = Σ r u·ε; log_rnd [B] (log-variance mode: θ-dependent log dP^u/dP^ref on the detached path);
    cost [B]: the KL loss's running cost where it is not ``running`` (``running_cost="norm"``: Σ½r²|u|,
    BNEM's DDS; ``running`` is then detached and serves the importance weights only), else None."""

    y: Tensor
    running: Tensor
    ito: Tensor
    log_rnd: Tensor | None = None
    cost: Tensor | None = None


def simulate(
    control: ControlFn,
    y0: Tensor,
    coef: ChainCoefficients,
    score_fn: ScoreFn | None,
    generator: torch.Generator | None,
    center: Callable[[Tensor], Tensor] | None = None,
    detach_path: bool = False,
    score_from_step: int = 0,
    checkpoint_steps: bool = False,
    running_cost: Literal["squared", "norm"] = "squared",
) -> PathResult:
    """Run the controlled chain from y0 [B, dim]. ``score_fn`` (may be None) gives the detached target score
    fed to the control. ``detach_path``: the state is cut from the graph each step (log-variance loss);
    otherwise gradients flow through every state (reparameterised KL). Noise: ``generator`` on y0's device.
    Steps before ``score_from_step`` get a zero score (PIS: step 0, where every path sits at the origin and
    particle energies are singular). ``checkpoint_steps``: when gradients flow, each step's control is
    recomputed in backward instead of keeping its activations (``torch.utils.checkpoint``): the same
    gradients, memory O(K·B·dim) instead of O(K × one network forward), for one extra forward per step.
    ``running_cost="norm"``: the loss's running cost is Σ ½ r_k² |u_k| with the *unsquared* norm (BNEM's DDS
    ``2σ²λ_k²/α_k · ‖u_k‖``), returned as ``cost``; reparameterised paths only."""
    if running_cost not in ("squared", "norm"):
        raise ValueError(f"running_cost must be 'squared' or 'norm', got {running_cost!r}")
    if running_cost == "norm" and detach_path:
        raise ValueError("running_cost='norm' is a KL-loss running cost; the log-variance path has none")
    y = y0
    B = y0.shape[0]
    running = y0.new_zeros(B)
    cost = y0.new_zeros(B) if running_cost == "norm" else None
    ito = y0.new_zeros(B)
    log_rnd = y0.new_zeros(B) if detach_path else None
    a, c, s, times = (v.tolist() for v in (coef.a, coef.c, coef.s, coef.times))
    for k in range(coef.n_steps):
        t = torch.full((B,), times[k], dtype=y.dtype, device=y.device)
        yin = y.detach() if detach_path else y
        use_score = score_fn is not None and k >= score_from_step
        score = score_fn(y.detach()) if use_score else torch.zeros_like(y)
        if checkpoint_steps and torch.is_grad_enabled() and not detach_path:
            u = torch.utils.checkpoint.checkpoint(control, t, yin, score, use_reentrant=False)
        else:
            u = control(t, yin, score)
        eps = torch.randn(y.shape, generator=generator, dtype=y.dtype, device=y.device)
        if center is not None:
            eps = center(eps)
        r = c[k] / s[k]
        if detach_path:
            ud = u.detach()
            z = eps + r * ud  # reference-noise increment (y_{k+1} − a y_k)/s of the detached path
            log_rnd = log_rnd + r * (u * z).sum(-1) - 0.5 * r * r * (u * u).sum(-1)
            running = running + 0.5 * r * r * (ud * ud).sum(-1)
            ito = ito + r * (ud * eps).sum(-1)
            y = (a[k] * y + c[k] * ud + s[k] * eps).detach()
        else:
            if cost is not None:
                cost = cost + 0.5 * r * r * torch.linalg.vector_norm(u, dim=-1)
                ud = u.detach()
                running = running + 0.5 * r * r * (ud * ud).sum(-1)
            else:
                running = running + 0.5 * r * r * (u * u).sum(-1)
            ito = ito + r * (u.detach() * eps).sum(-1)
            y = a[k] * y + c[k] * u + s[k] * eps
    return PathResult(y=y, running=running, ito=ito, log_rnd=log_rnd, cost=cost)


def gaussian_log_prob(y: Tensor, var: float, n_dof: int,
                      center: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """log N(y; 0, var·I) on n_dof degrees of freedom (mean-free subspace when ``center`` is given): [B]."""
    if center is not None:
        y = center(y)
    return -0.5 * (y * y).sum(-1) / var - 0.5 * n_dof * math.log(2 * math.pi * var)


def log_weights(path: PathResult, terminal_cost: Tensor) -> Tensor:
    """log w [B] = −(running + Itô + terminal cost): importance weights of the terminal samples
    (E[exp(log w)] = Z_y)."""
    return -(path.running + path.ito + terminal_cost)


def log_z_estimate(log_w: Tensor) -> float:
    """log(mean exp(log w)); −inf/NaN propagate (a diverged run shows up)."""
    return float(torch.logsumexp(log_w.double(), 0) - math.log(log_w.shape[0]))


def effective_sample_size(log_w: Tensor) -> float:
    """Normalised ESS (Σw)² / (N Σw²) in [0, 1]."""
    lw = log_w.double()
    return float(torch.exp(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0)) / lw.shape[0])


def kl_loss(path: PathResult, terminal_cost: Tensor) -> Tensor:
    """Reverse-KL objective (up to log Z): mean(running + terminal cost) [scalar] = −ELBO estimate (with
    ``path.cost`` in place of ``running`` where the path carries one: BNEM's unsquared-norm cost)."""
    run = path.running if path.cost is None else path.cost
    return (run + terminal_cost).mean()


def log_variance_loss(path: PathResult, terminal_cost: Tensor) -> Tensor:
    """Log-variance objective: batch variance of log_rnd + terminal cost (path and terminal cost detached)."""
    if path.log_rnd is None:
        raise ValueError("log_variance_loss needs a PathResult simulated with detach_path=True")
    v = path.log_rnd + terminal_cost.detach()
    return ((v - v.mean()) ** 2).mean()


# --------------------------------------------------------------------------------------------- method base
@dataclass(frozen=True)
class ControlConfig(MethodConfig):
    """Hyper-parameters shared by PIS and DDS (defaults: the GMM-40 settings of BNEM's `pis_module` /
    `dds_module`, which produced the published PIS / DDS numbers)."""

    n_steps: int = 100  # SDE steps K
    # trajectories per optimiser step: BNEM's PIS and DDS train on `eval_batch_size` paths, 1000 in its
    # gmm / dw4 / lj13 experiment configs (DEM's PIS module: 512)
    batch_size: int = 1000
    lr: float = 1e-3
    weight_decay: float = 1e-7  # BNEM pis.yaml / dds.yaml (and DEM pis.yaml)
    # clip of the parameter-gradient norm (None: off): the DEM / BNEM trainer's `gradient_clip_val: 0.5`
    grad_norm_clip: float | None = 0.5
    # learning rate lr · lr_final_factor^(min(k, lr_decay_steps) / lr_decay_steps) at optimiser step k:
    # a geometric decay to lr_final_factor·lr (juliusberner/sde_sampler decays PIS/DDS to 0.02×, qsh-zh/pis
    # linearly); lr_decay_steps None: constant (the DEM / BNEM PIS and DDS modules)
    lr_final_factor: float = 1.0
    lr_decay_steps: int | None = None
    # EMA of the control network's parameters, updated every optimiser step and used by sample() and
    # diagnostics() (sde_sampler: 0.9999); None: sample with the trained network (DEM / BNEM)
    ema_decay: float | None = None
    loss: Literal["kl", "lv"] = "kl"  # reverse KL (reparameterised) or log-variance
    network: Literal["mlp", "egnn"] = "mlp"
    hidden: int = 128
    n_layers: int = 3  # TimeMLP residual blocks / EGNN layers
    emb_size: int = 128  # TimeMLP sinusoidal embedding size
    time_channels: int = 32  # NN₂ width / depth: BNEM TimeConder(channel 32, num_layers 2) (DEM PIS: 64, 3)
    time_layers: int = 2
    nn_clip: float | None = 1e4
    score_clip: float | None = 1e4
    score_clip_mode: Literal["value", "norm"] = "value"
    coord_scale: float | None = None  # working coordinates y = x / coord_scale; None: target.length_scale
    n_diag_samples: int = 1000  # trajectories for log Z / ESS when diagnostics() finds no fresh sample
    sample_chunk: int = 2000  # rows simulated at once by sample()
    dtype: Literal["float32", "float64"] = "float32"
    # recompute each SDE step's control network in backward instead of storing its activations (same
    # gradients and numbers; bounded memory: a DW-4 EGNN step at 1000 paths × 128 steps otherwise keeps
    # gigabytes). None: on for the EGNN control, off for the MLP (whose activations are small)
    checkpoint_steps: bool | None = None
    # the KL loss's running cost: ½ r_k²|u_k|² ("squared", the path-space KL) or ½ r_k²|u_k| ("norm": BNEM's
    # dds_module / integrate_sde, an unsquared norm; the importance weights and log Z keep the squared one)
    running_cost: Literal["squared", "norm"] = "squared"
    # NN₁'s (TimeMLP's) read-out: zero-initialised ("zero", PIS) or torch's default init ("default": the
    # MyMLP of BNEM's DDS); NN₂'s Fourier features with TimeConder's learnable phase (BNEM / PIS TimeConder)
    readout_init: Literal["zero", "default"] = "zero"
    time_phase: bool = False
    # ReduceLROnPlateau on the validation loss (BNEM dds.yaml: factor 0.1, patience 10, monitor val/loss,
    # stepped every check_val_every_n_epoch = 10 epochs of 100 steps; LJ-55 50): every
    # ``plateau_check_steps`` optimiser steps the training objective is computed on
    # ``plateau_val_batches`` × ``batch_size`` fresh paths (no gradient; their energy evaluations are
    # counted) and the learning rate is multiplied by ``plateau_factor`` after more than
    # ``plateau_patience`` checks without a relative improvement of 1e-4 (torch's defaults). Off: constant
    lr_plateau: bool = False
    plateau_factor: float = 0.1
    plateau_patience: int = 10
    plateau_check_steps: int = 1000
    plateau_val_batches: int = 1
    RANGES = {"plateau_factor": UNIT_OPEN, "plateau_patience": NON_NEGATIVE,
              "plateau_check_steps": AT_LEAST_1, "plateau_val_batches": AT_LEAST_1}

    # grid presets and budgets, the same for PIS and DDS (plain class attributes, not dataclass fields)
    PRESETS = {
        "smoke": {"*": {"n_steps": 8, "batch_size": 16, "hidden": 16, "n_layers": 1, "emb_size": 8,
                        "time_channels": 8, "time_layers": 1, "n_diag_samples": 64}},
        "cpu": {
            "gmm40": {"batch_size": 128, "hidden": 64, "n_layers": 2, "emb_size": 32, "lr": 2e-3},
            "dw4": {"batch_size": 128, "hidden": 32, "n_layers": 2, "lr": 1e-3},
            # LJ: every optimiser step back-propagates through the whole SDE path of EGNN calls, so the
            # cells get small paths batches, 50 SDE steps (published 100) and a 2-layer, 32-wide EGNN
            # (published 5 x 128); they run and are recorded, they are not expected to be good
            "lj13": {"batch_size": 64, "n_steps": 50, "hidden": 32, "n_layers": 2, "lr": 1e-3},
            "lj55": {"batch_size": 16, "n_steps": 50, "hidden": 32, "n_layers": 2, "lr": 1e-3},
        },
    }
    BUDGETS = {
        "smoke": {"*": {"steps": 3}},
        # cpu: about 20 minutes of one core of training per cell. Measured CPU s per step at these presets
        # (scripts/fab_step_times.py --method dds|pis, one thread, two cells sharing the 2 cores): DW-4
        # DDS 2.19, PIS 1.76; LJ-13 DDS 2.89, PIS 2.82; LJ-55 DDS 8.17, PIS 6.74. The earlier 1500 / 600 /
        # 300 steps took 44-55 / 29 / 34-41 CPU-minutes and could reach the 1 h guard on a loaded machine
        "cpu": {"gmm40": {"steps": 2000},
                "dw4": {"steps": 600},
                "lj13": {"steps": 400},
                "lj55": {"steps": 150}},
        # the DEM / BNEM trainer: 100 optimiser steps per epoch × 1000 epochs (LJ-55: 2000 epochs)
        "paper": {"*": {"steps": 100_000}, "lj55": {"steps": 200_000}},
    }


class ControlledDiffusionSampler(Method):
    """Training and sampling loop shared by PIS and DDS; subclasses give the chain and its start."""

    config: ControlConfig
    #: first step whose control sees the target score (PIS: 1, the paths all start at the origin)
    score_from_step: int = 0

    def __init__(self, target: Any, config: ControlConfig, device: torch.device, generator: torch.Generator):
        super().__init__(target, config, device, generator)
        cfg = config
        if cfg.loss not in ("kl", "lv"):
            raise ValueError(f"loss must be 'kl' or 'lv', got {cfg.loss!r}")
        for name in ("n_steps", "batch_size", "n_diag_samples", "sample_chunk"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"{self.name}: {name} must be >= 1, got {getattr(cfg, name)}")
        if cfg.loss == "lv" and cfg.batch_size < 2:
            raise ValueError("the log-variance loss needs batch_size >= 2")
        if not 0.0 < cfg.lr_final_factor <= 1.0:
            raise ValueError(f"{self.name}: lr_final_factor must be in (0, 1], got {cfg.lr_final_factor}")
        if cfg.lr_decay_steps is not None and cfg.lr_decay_steps < 1:
            raise ValueError(f"{self.name}: lr_decay_steps must be >= 1 or None, got {cfg.lr_decay_steps}")
        if cfg.ema_decay is not None and not 0.0 <= cfg.ema_decay < 1.0:
            raise ValueError(f"{self.name}: ema_decay must be in [0, 1) or None, got {cfg.ema_decay}")
        if cfg.running_cost not in ("squared", "norm"):
            raise ValueError(f"{self.name}: running_cost must be 'squared' or 'norm', "
                             f"got {cfg.running_cost!r}")
        if cfg.running_cost == "norm" and cfg.loss != "kl":
            raise ValueError(f"{self.name}: running_cost='norm' (BNEM's DDS) is a KL-loss running cost; "
                             "the log-variance loss has none (use loss='kl')")
        self.dtype = {"float32": torch.float32, "float64": torch.float64}[cfg.dtype]
        scale = cfg.coord_scale if cfg.coord_scale is not None else float(getattr(target, "length_scale", 1))
        self.work = WorkingTarget(target, scale)
        self.center = self.work.center if self.work.is_particle else None
        self.coef = self.coefficients()
        # parameters are initialised from a seed drawn from the run's generator (global RNG left untouched),
        # so a seed reproduces a run across processes
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = build_control(target, cfg.network, cfg.hidden, cfg.n_layers, cfg.emb_size,
                                     cfg.time_channels, cfg.time_layers, cfg.nn_clip, cfg.score_clip,
                                     cfg.score_clip_mode, cfg.readout_init, cfg.time_phase)
        self.net.to(device=self.device, dtype=self.dtype)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        # the sampling network: an EMA copy of the control network, or the network itself
        self.ema = EMA(self.net, cfg.ema_decay) if cfg.ema_decay is not None else None
        self.ema_net = self.ema.model if self.ema is not None else None
        self.steps_done = 0
        self._last_log_w: Tensor | None = None
        # ReduceLROnPlateau state (lr_plateau): best val loss, checks without improvement, lr multiplier
        self.plateau_best, self.plateau_bad, self.lr_scale = math.inf, 0, 1.0

    # -- subclass hooks
    @abstractmethod
    def coefficients(self) -> ChainCoefficients: ...

    @abstractmethod
    def initial_states(self, n: int) -> Tensor:
        """y_0 [n, dim] in working coordinates (PIS: zeros; DDS: prior samples)."""

    # -- pieces
    def terminal_cost(self, y: Tensor, differentiable: bool) -> Tensor:
        """The training loss's terminal cost log N(y; 0, coef.loss_var) − log p̃(y) [B] (working
        coordinates)."""
        ref = gaussian_log_prob(y, self.coef.loss_var, self.work.n_dof, self.center)
        return ref + self.work.energy(y, differentiable=differentiable)

    def weight_terminal_cost(self, y: Tensor, loss_term: Tensor) -> Tensor:
        """Ψ(y) = log N(y; 0, v_ref) − log p̃(y) [B] of the importance weights, from the loss's terminal cost
        (detached) without another energy evaluation: they differ only where ``coef.loss_ref_var`` is set."""
        term = loss_term.detach()
        if self.coef.loss_ref_var is None:
            return term
        y = y.detach()
        return (term + gaussian_log_prob(y, self.coef.ref_var, self.work.n_dof, self.center)
                - gaussian_log_prob(y, self.coef.loss_var, self.work.n_dof, self.center))

    def run_paths(self, n: int, detach_path: bool, net: nn.Module | None = None) -> PathResult:
        ckpt = self.config.checkpoint_steps
        if ckpt is None:
            ckpt = self.config.network == "egnn"
        return simulate(net if net is not None else self.net, self.initial_states(n), self.coef,
                        self.work.score, self.generator, self.center, detach_path=detach_path,
                        score_from_step=self.score_from_step, checkpoint_steps=ckpt,
                        running_cost="squared" if detach_path else self.config.running_cost)

    def learning_rate(self, step: int) -> float:
        """Learning rate of optimiser step ``step`` (0-based): geometric decay to lr·lr_final_factor, times
        the plateau multiplier (``lr_plateau``)."""
        cfg = self.config
        if cfg.lr_decay_steps is None:
            return cfg.lr * self.lr_scale
        decay = cfg.lr_final_factor ** (min(step, cfg.lr_decay_steps) / cfg.lr_decay_steps)
        return cfg.lr * decay * self.lr_scale

    def paths_and_loss(self, n: int) -> tuple[PathResult, Tensor, Tensor]:
        """Simulate n paths for the configured objective: (path, loss's terminal cost [n], loss [scalar])."""
        if self.config.loss == "kl":
            path = self.run_paths(n, detach_path=False)
            term = self.terminal_cost(path.y, differentiable=True)
            return path, term, kl_loss(path, term)
        path = self.run_paths(n, detach_path=True)
        term = self.terminal_cost(path.y, differentiable=False)
        return path, term, log_variance_loss(path, term)

    @torch.no_grad()
    def val_loss(self) -> float:
        """BNEM's ``val/loss``: the training objective on ``plateau_val_batches`` fresh batches of
        ``batch_size`` paths (mean of the batch losses), without gradients."""
        cfg = self.config
        losses = [float(self.paths_and_loss(cfg.batch_size)[2]) for _ in range(cfg.plateau_val_batches)]
        return sum(losses) / len(losses)

    def plateau_step(self, value: float) -> None:
        """torch's ReduceLROnPlateau (mode min, relative threshold 1e-4, no cooldown, eps 1e-8) on the lr
        multiplier: a check improves if value < best·(1 − 1e-4); after more than ``plateau_patience`` checks
        without improvement the lr is multiplied by ``plateau_factor`` and the count restarts."""
        cfg = self.config
        self.plateau_best, self.plateau_bad, reduce = plateau_update(
            self.plateau_best, self.plateau_bad, value, cfg.plateau_patience)
        if reduce:
            lr = self.learning_rate(self.steps_done)
            if lr - lr * cfg.plateau_factor > 1e-8:
                self.lr_scale *= cfg.plateau_factor

    # -- Method interface
    def train_step(self) -> dict[str, float]:
        cfg = self.config
        self.net.train()
        self.opt.zero_grad(set_to_none=True)
        path, term, loss = self.paths_and_loss(cfg.batch_size)
        out = {"loss": float(loss.detach())}
        if torch.isfinite(loss):
            loss.backward()
            finite_grad = True
            if cfg.grad_norm_clip is not None:
                gn = torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_norm_clip)
                out["grad_norm"] = float(gn)
                # an overflowing gradient (e.g. LJ forces at overlapping particles) would turn the clipped
                # gradient into NaN: report it (the harness marks the run diverged) and skip the step
                finite_grad = math.isfinite(out["grad_norm"])
            if finite_grad:
                lr = self.learning_rate(self.steps_done)
                for group in self.opt.param_groups:
                    group["lr"] = lr
                self.opt.step()
                if self.ema is not None:
                    self.ema.update(self.net)
        self.steps_done += 1
        with torch.no_grad():
            log_w = log_weights(path, self.weight_terminal_cost(path.y, term))
            # −(running + terminal), in target coordinates like log Z (ELBO ≤ log Z)
            out["elbo"] = float(log_w.mean() + path.ito.mean()) + self.work.log_jacobian
            out["log_z"] = log_z_estimate(log_w) + self.work.log_jacobian
        if cfg.lr_plateau and self.steps_done % cfg.plateau_check_steps == 0:
            out["val_loss"] = self.val_loss()
            self.plateau_step(out["val_loss"])
            out["lr"] = self.learning_rate(self.steps_done)
        return out

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        if n < 1:
            raise ValueError(f"sample needs n >= 1, got {n}")
        self.net.eval()
        net = self.ema_net if self.ema_net is not None else self.net
        xs, lws = [], []
        left = n
        while left > 0:
            m = min(left, self.config.sample_chunk)
            path = self.run_paths(m, detach_path=False, net=net)
            term = self.terminal_cost(path.y, differentiable=False)
            lws.append(log_weights(path, self.weight_terminal_cost(path.y, term)))
            x = self.work.scale * path.y
            xs.append(self.work.center(x) if self.work.is_particle else x)
            left -= m
        self._last_log_w = torch.cat(lws).detach()
        return torch.cat(xs).to(torch.get_default_dtype())

    def log_weights(self) -> Tensor | None:
        """log importance weights [n] of the samples from the last ``sample`` call (working coordinates)."""
        return self._last_log_w

    def diagnostics(self) -> dict[str, float]:
        """log Z (target coordinates) and normalised ESS from the last sample() batch (or a fresh one)."""
        if self._last_log_w is None:
            self.sample(self.config.n_diag_samples)
        lw = self._last_log_w
        assert lw is not None
        return {"log_z": log_z_estimate(lw) + self.work.log_jacobian, "ess": effective_sample_size(lw),
                "n_is": float(lw.shape[0])}

    def state_dict(self) -> dict[str, Any]:
        state = {"net": self.net.state_dict(), "opt": self.opt.state_dict(), "steps_done": self.steps_done,
                 "generator": self.generator.get_state()}
        if self.ema_net is not None:
            state["ema_net"] = self.ema_net.state_dict()
        if self.config.lr_plateau:
            state["plateau"] = {"best": self.plateau_best, "bad": self.plateau_bad, "lr_scale": self.lr_scale}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        if self.ema_net is not None:
            self.ema_net.load_state_dict(state["ema_net"])
        self.opt.load_state_dict(state["opt"])
        self.steps_done = int(state["steps_done"])
        self.generator.set_state(state["generator"])
        self._last_log_w = None
        p = state.get("plateau", {"best": math.inf, "bad": 0, "lr_scale": 1.0})
        self.plateau_best, self.plateau_bad = float(p["best"]), int(p["bad"])
        self.lr_scale = float(p["lr_scale"])
