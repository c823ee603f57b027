"""Reverse-time VE SDE integration (Euler–Maruyama) and the Gaussian priors it starts from.

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
