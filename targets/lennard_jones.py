"""LJ-13 and LJ-55: Lennard-Jones clusters in 3-D with a harmonic restraint to the centre of mass.

E(x) = 2·Σ_{i<j} [r_ij^−12 − 2 r_ij^−6] + ½ Σ_i |x_i − x̄|²,  r_ij = sqrt(|x_i − x_j|² + 1e-6)

This is jarridrb/DEM's ``LennardJonesEnergy`` (ordered-pair sum with energy_factor 1 = 2× the i<j sum,
oscillator scale 1): the energy the published Klein et al. LJ-13 data are equilibrium for (virial
E[x·∇E] = 36 = (n − 1)·3; test mean −43.13, std 7.02). The paper's formula with ½ is a typo (DEM issue #2).

Implementation: the pair terms are evaluated on the full [B, n, n] matrix of squared distances (from exact
coordinate differences, not a Gram matrix, so float32 stays accurate for close pairs), diagonal masked, in
batch chunks small enough to stay in cache; the forces are assembled with one batched matmul,
g_i = Σ_j c_ij (x_i − x_j) = (Σ_j c_ij) x_i − (C x)_i. No autograd graph is built.
"""

from __future__ import annotations

import torch
from torch import Tensor

from targets.base import ParticleTarget
from targets.registry import TARGETS

EPS2 = 1e-6  # softening inside the square root, as bgflow's distances_from_vectors
PAIR_FACTOR = 2.0  # ordered pairs


def _squared_distances(c: Tensor) -> Tensor:
    """|x_i − x_j|² [B, n, n] from exact per-coordinate differences of c [B, n, d]."""
    ct = c.transpose(-1, -2).contiguous()  # [B, d, n]: contiguous coordinate planes broadcast faster
    r2 = None
    for k in range(ct.shape[-2]):
        ck = ct[..., k, :]
        dk = ck.unsqueeze(-1) - ck.unsqueeze(-2)
        r2 = dk * dk if r2 is None else r2.addcmul_(dk, dk)
    return r2


class LennardJones(ParticleTarget):
    spatial_dim = 3
    length_scale = 1.0

    @property
    def chunk_size(self) -> int:
        """Batch rows per chunk: keeps the [chunk, n, n] work arrays around 0.4 MB (cache-resident)."""
        return max(1, 100_000 // (self.n_particles * self.n_particles))

    def _split(self, x: Tensor) -> tuple[Tensor, ...]:
        return x.split(self.chunk_size) if x.shape[0] > self.chunk_size else (x,)

    # ----------------------------------------------------------------- energy (differentiable)
    def _energy(self, x: Tensor) -> Tensor:
        if not (x.requires_grad and torch.is_grad_enabled()):
            with torch.no_grad():
                return torch.cat([self._energy_and_grad_chunk(c, with_grad=False)[0] for c in self._split(x)])
        p = self.as_particles(x)
        c = p - p.mean(-2, keepdim=True)
        inv2 = (_squared_distances(c) + EPS2).reciprocal()
        off = 1.0 - torch.eye(self.n_particles, dtype=x.dtype, device=x.device)
        inv6 = inv2 * inv2 * inv2 * off
        # ordered-pair sum (both (i,j) and (j,i)) = PAIR_FACTOR × the i<j sum
        e_lj = (inv6 * inv6 - 2.0 * inv6).sum((-1, -2))
        return e_lj + 0.5 * (c * c).sum((-1, -2))

    # ----------------------------------------------------------------- analytic energy and forces
    def _energy_and_grad_chunk(self, x: Tensor, with_grad: bool = True) -> tuple[Tensor, Tensor | None]:
        p = self.as_particles(x)
        c = p - p.mean(-2, keepdim=True)
        inv2 = (_squared_distances(c).add_(EPS2)).reciprocal_()
        inv6 = inv2 * inv2
        inv6.mul_(inv2)
        inv6.diagonal(dim1=-2, dim2=-1).zero_()
        a = inv6 - 1.0
        a.mul_(inv6)  # r^-12 − r^-6
        # Σ_{i≠j} (r^-12 − 2 r^-6) = Σ (r^-12 − r^-6) − Σ r^-6
        e = a.sum((-1, -2)) - inv6.sum((-1, -2)) + 0.5 * (c * c).sum((-1, -2))
        if not with_grad:
            return e, None
        # φ(r) = 2 (r^-12 − 2 r^-6) per i<j pair; (dφ/dr)/r = −24 r^-2 (r^-12 − r^-6)
        a.mul_(inv2)
        rs = a.sum(-1, keepdim=True)
        g = torch.baddbmm(rs * c, a, c, beta=1.0, alpha=-1.0).mul_(-24.0).add_(c)
        return e, g.reshape(x.shape)

    def _energy_and_grad(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.detach()
        es, gs = zip(*(self._energy_and_grad_chunk(c) for c in self._split(x)))
        return torch.cat(es), torch.cat(gs)

    # ----------------------------------------------------------------- Laplacian (for the β̂ check)
    def _laplacian(self, x: Tensor) -> Tensor:
        """ΔE [B] in closed form. Per i<j pair with u = |x_i − x_j|² + ε and F(q) = φ(√(q + ε)):
        Δ over both particles = 2 (2 D F'(q) + 4 q F''(q)); the harmonic term adds D (n − 1)."""
        x = x.detach()
        out = []
        D, n = self.spatial_dim, self.n_particles
        for xc in self._split(x):
            p = self.as_particles(xc)
            c = p - p.mean(-2, keepdim=True)
            q = _squared_distances(c)
            iu = (q + EPS2).reciprocal()  # 1/u
            iu3 = iu * iu * iu
            iu4 = iu3 * iu
            # φ = 2 (u^-6 − 2 u^-3): F' = 12 (u^-4 − u^-7), F'' = 12 (7 u^-8 − 4 u^-5)
            f1 = 12.0 * (iu4 - iu4 * iu3)
            f2 = 12.0 * (7.0 * iu4 * iu4 - 4.0 * iu4 * iu)
            lap = 2.0 * (2 * D * f1 + 4.0 * q * f2)
            lap.diagonal(dim1=-2, dim2=-1).zero_()
            out.append(0.5 * lap.sum((-1, -2)) + D * (n - 1))  # ordered pairs counted twice
        return torch.cat(out)


@TARGETS.register("lj13")
class LJ13(LennardJones):
    name = "lj13"
    display_name = "LJ-13"
    n_particles = 13


@TARGETS.register("lj55")
class LJ55(LennardJones):
    name = "lj55"
    display_name = "LJ-55"
    n_particles = 55
