"""Reverse-time VE SDE integration (Euler–Maruyama) and the Gaussian priors it starts from; the forward VE
base process of Adjoint Sampling / ASBS (``ForwardVESDE``: its Euler integrator with a control, its bridge)
and their sources (``DeltaSource``, ``harmonic_prior``).

Reverse VE SDE (DEM ``integrate_sde`` with ``VEReverseSDE``), integrated from t = 1 to t = 0 on the grid
t_k = linspace(1, 0, N + 1)[:-1], dt = 1/N:

    x ← x + g(t_k)² s(t_k, x) dt + diffusion_scale · g(t_k) · sqrt(dt) · ε,   ε ~ N(0, I)

followed by ``center(x)`` (mean removal for particle systems) after every step. ``diffusion_scale`` < 1 only
shrinks the noise (LJ-13 0.9, LJ-55 0.5 in iDEM); it is not the exact reverse SDE then.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from methods.noise import GeometricNoiseSchedule

ScoreFn = Callable[[Tensor, Tensor], Tensor]  # score(t [B], x [B, dim]) -> [B, dim]


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def reverse_sde_step(
    score: ScoreFn,
    x: Tensor,
    t: float,
    dt: float,
    schedule: GeometricNoiseSchedule,
    diffusion_scale: float = 1.0,
    generator: torch.Generator | None = None,
    center: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """One Euler–Maruyama step of the reverse VE SDE at time t (going to t − dt): [B, dim] -> [B, dim]."""
    tb = torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)
    g = float(schedule.g(torch.tensor(float(t), dtype=torch.float64)))
    s = score(tb, x)
    x = x + (g * g * dt) * s
    if diffusion_scale != 0.0:
        x = x + (diffusion_scale * g * math.sqrt(dt)) * _randn_like(x, generator)
    if center is not None:
        x = center(x)
    return x


def integrate_reverse_sde(
    score: ScoreFn,
    x1: Tensor,
    schedule: GeometricNoiseSchedule,
    n_steps: int = 1000,
    diffusion_scale: float = 1.0,
    generator: torch.Generator | None = None,
    center: Callable[[Tensor], Tensor] | None = None,
    return_trajectory: bool = False,
    chunk_size: int | None = None,
    detach: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """Integrate the reverse VE SDE from prior samples x1 [B, dim] at t = 1 down to t = 0.

    Returns x0 [B, dim], or (x0, trajectory [n_steps + 1, B, dim]) with ``return_trajectory`` (trajectory[0]
    = x1). ``chunk_size`` integrates at most that many rows at a time (bounded memory; the noise stream then
    differs from the unchunked call). ``detach`` cuts the graph after every step (the score may still use
    autograd internally, e.g. an energy network).
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    if x1.ndim != 2:
        raise ValueError(f"x1 must be [batch, dim], got shape {list(x1.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    if chunk_size is not None and x1.shape[0] > chunk_size:
        outs = [
            integrate_reverse_sde(score, c, schedule, n_steps, diffusion_scale, generator, center,
                                  return_trajectory, None, detach)
            for c in x1.split(chunk_size)
        ]
        if return_trajectory:
            return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs], dim=1)
        return torch.cat(outs)
    times = torch.linspace(1.0, 0.0, n_steps + 1, dtype=torch.float64)[:-1].tolist()
    dt = 1.0 / n_steps
    x = x1
    traj = [x1.detach()] if return_trajectory else None
    for t in times:
        x = reverse_sde_step(score, x, t, dt, schedule, diffusion_scale, generator, center)
        if detach:
            x = x.detach()
        if traj is not None:
            traj.append(x.detach())
    if traj is not None:
        return x, torch.stack(traj)
    return x


class GaussianPrior:
    """N(0, scale² I) on R^dim. sample(n) -> [n, dim]; log_prob(x [B, dim]) -> [B] (normalised)."""

    def __init__(self, dim: int, scale: float, device: torch.device | str = "cpu") -> None:
        if dim < 1 or not scale > 0:
            raise ValueError(f"GaussianPrior needs dim >= 1 and scale > 0, got dim={dim}, scale={scale}")
        self.dim, self.scale, self.device = dim, float(scale), torch.device(device)

    def sample(
        self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        return self.scale * torch.randn(n, self.dim, generator=generator, dtype=dtype, device=self.device)

    @property
    def n_dof(self) -> int:
        return self.dim

    def log_prob(self, x: Tensor) -> Tensor:
        log_norm = 0.5 * self.n_dof * math.log(2 * math.pi * self.scale**2)
        return -0.5 * (x**2).sum(-1) / self.scale**2 - log_norm


class MeanFreeGaussianPrior(GaussianPrior):
    """N(0, scale² I) on n particles × d dims projected onto the centre-of-mass-free subspace.

    sample(n) -> centred [n, n_particles·d]; log_prob uses the (n_particles − 1)·d degrees of freedom of that
    subspace (the input is centred first).
    """

    def __init__(self, n_particles: int, spatial_dim: int, scale: float, device: torch.device | str = "cpu"):
        if n_particles < 2 or spatial_dim < 1:
            raise ValueError(f"MeanFreeGaussianPrior needs n_particles >= 2 and spatial_dim >= 1, got "
                             f"{n_particles}, {spatial_dim}")
        super().__init__(n_particles * spatial_dim, scale, device)
        self.n_particles, self.spatial_dim = n_particles, spatial_dim

    def center(self, x: Tensor) -> Tensor:
        p = x.reshape(*x.shape[:-1], self.n_particles, self.spatial_dim)
        return (p - p.mean(-2, keepdim=True)).reshape(x.shape)

    @property
    def n_dof(self) -> int:
        return (self.n_particles - 1) * self.spatial_dim

    def sample(
        self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        return self.center(super().sample(n, generator, dtype))

    def log_prob(self, x: Tensor) -> Tensor:
        return super().log_prob(self.center(x))


# ------------------------------------------------------------------------------ forward VE process (AS, ASBS)
ControlFn = Callable[[Tensor, Tensor], Tensor]  # u(t [B], x [B, dim]) -> [B, dim]


class DeltaSource:
    """All mass at the origin (Adjoint Sampling's source): sample(n) -> zeros [n, dim]."""

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        if dim < 1:
            raise ValueError(f"DeltaSource needs dim >= 1, got {dim}")
        self.dim, self.device = dim, torch.device(device)

    def sample(
        self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        return torch.zeros(n, self.dim, dtype=dtype, device=self.device)


#: std of adjoint_samplers' harmonic source per unit of its ``scale`` (see ``harmonic_prior``)
HARMONIC_STD_PER_SCALE = math.sqrt(2.0 / 3.0)


def harmonic_prior(n_particles: int, spatial_dim: int, scale: float,
                   device: torch.device | str = "cpu") -> MeanFreeGaussianPrior:
    """ASBS's "harmonic" source with the public code's ``scale`` (``CenteredParticlesHarmonic``).

    The code draws x = scale·L z with L Lᵀ = |inv(A ⊗ I_d)| (A = 1 on the diagonal, −½ off it; absolute
    eigenvalues through an SVD) and then removes the centre of mass. A = 1.5·I − 0.5·J acts as 1.5 on every
    mean-free vector, so after the COM removal the law is the isotropic mean-free Gaussian with std
    scale·sqrt(2/3) per coordinate (scale 2: 1.633; scale 1: 0.816) — what this returns. (The COM eigenvalue
    1.5 − n/2 is removed; it is negative for n > 3 and singular for n = 3, irrelevant after the projection.)
    """
    if not scale > 0:
        raise ValueError(f"harmonic_prior needs scale > 0, got {scale}")
    return MeanFreeGaussianPrior(n_particles, spatial_dim, scale * HARMONIC_STD_PER_SCALE, device)


class ForwardVESDE:
    """The VE base process of Adjoint Sampling / ASBS (adjoint_samplers ``VESDE`` / ``GraphVESDE``) on
    t ∈ [0, 1]: dX = g(t) dW with zero drift,

        g(t) = σ_min σ_d^{1−t} sqrt(2 ln σ_d),  σ_d = σ_max / σ_min   (noise largest at t = 0),
        v(t) = ∫_0^t g² = σ_max² (1 − σ_d^{−2t}),  V = v(1) = σ_max² − σ_min²,

    i.e. DEM's geometric schedule (``methods.noise.GeometricNoiseSchedule``) run backwards: g(t) =
    schedule.g(1 − t), v(t) = schedule.h(1) − schedule.h(1 − t). ``center`` (particle systems) makes every
    noise increment mean-free and removes the centre of mass after every step, as the code's ``Graph`` mix-in
    does.
    Times are floats or tensors; coefficients are computed in float64.
    """

    def __init__(self, sigma_min: float, sigma_max: float,
                 center: Callable[[Tensor], Tensor] | None = None) -> None:
        self.schedule = GeometricNoiseSchedule(sigma_min, sigma_max)  # validates 0 < σ_min < σ_max
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._log_sd = math.log(self.sigma_max / self.sigma_min)
        self.total_var = self.sigma_max**2 - self.sigma_min**2
        self.center = center

    def g(self, t: Tensor | float) -> Tensor:
        """Diffusion coefficient g(t) (float64)."""
        return self.schedule.g(1.0 - torch.as_tensor(t, dtype=torch.float64))

    def var(self, t: Tensor | float) -> Tensor:
        """v(t) = ∫_0^t g² = σ_max²(1 − σ_d^{−2t}) (float64)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return -(self.sigma_max**2) * torch.expm1(-2.0 * t * self._log_sd)

    def kappa(self, t: Tensor | float) -> Tensor:
        """κ(t) = v(t) / V ∈ [0, 1]: the bridge's interpolation weight (float64)."""
        return (self.var(t) / self.total_var).clamp(0.0, 1.0)

    def noise_like(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """N(0, I) noise shaped like x [B, dim], projected to mean-free for particle systems."""
        eps = _randn_like(x, generator)
        return self.center(eps) if self.center is not None else eps

    def bridge_sample(self, t: Tensor, x0: Tensor, x1: Tensor, generator: torch.Generator | None) -> Tensor:
        """x_t of the base process pinned at x0 (t = 0) and x1 (t = 1) ("reciprocal projection"): t [B],
        x0, x1 [B, dim] -> [B, dim] ~ N((1 − κ)x0 + κx1, V κ(1 − κ) I) (mean-free noise for particles)."""
        k = self.kappa(t).to(x0.dtype).unsqueeze(-1)
        std = (self.total_var * k * (1.0 - k)).clamp_min(0.0).sqrt()
        return (1.0 - k) * x0 + k * x1 + std * self.noise_like(x0, generator)

    def transition_score(self, x0: Tensor, x1: Tensor) -> Tensor:
        """∇_{x1} log p^base_{1|0}(x1 | x0) = (x0 − x1) / V: [B, dim] (ASBS's corrector regression target)."""
        return (x0 - x1) / self.total_var

    def integrate(
        self,
        control: ControlFn | None,
        x0: Tensor,
        nfe: int,
        generator: torch.Generator | None,
        on_step: Callable[[int], None] | None = None,
    ) -> Tensor:
        """Euler–Maruyama of the controlled SDE dX = g(t)² u(t, X) dt + g(t) dW from x0 [B, dim] at t = 0 on
        the uniform grid linspace(0, 1, nfe) (nfe − 1 steps, g at the left end of each step; the code's
        ``sdeint`` with ``ControlledSDE``); ``control`` None integrates the base process. Returns X_1 [B, dim]
        (no graph kept between steps). ``on_step(rows)`` is called once per control evaluation (counting)."""
        if nfe < 2:
            raise ValueError(f"nfe (time points) must be >= 2, got {nfe}")
        if x0.ndim != 2:
            raise ValueError(f"x0 must be [batch, dim], got shape {list(x0.shape)}")
        times = torch.linspace(0.0, 1.0, nfe, dtype=torch.float64)
        gs = self.g(times[:-1]).tolist()
        dts = (times[1:] - times[:-1]).tolist()
        ts = times[:-1].tolist()
        x = x0
        B = x0.shape[0]
        for k in range(nfe - 1):
            g2dt = gs[k] * gs[k] * dts[k]
            dx = (gs[k] * math.sqrt(dts[k])) * self.noise_like(x, generator)
            if control is not None:
                u = control(torch.full((B,), ts[k], dtype=x.dtype, device=x.device), x)
                if on_step is not None:
                    on_step(B)
                dx = dx + g2dt * u
            x = (x + dx).detach()
            if self.center is not None:
                x = self.center(x)
        return x
