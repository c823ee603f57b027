"""LJ-13 and LJ-55: Lennard-Jones clusters in 3-D with a harmonic restraint to the centre of mass.

E(x) = 2·Σ_{i<j} [r_ij^−12 − 2 r_ij^−6] + ½ Σ_i |x_i − x̄|²,  r_ij = sqrt(|x_i − x_j|² + 1e-6)

This is jarridrb/DEM's ``LennardJonesEnergy`` (ordered-pair sum with energy_factor 1 = 2× the i<j sum,
oscillator scale 1): the energy the published Klein et al. LJ-13 data are equilibrium for (virial
E[x·∇E] = 36 = (n − 1)·3; test mean −43.13, std 7.02). The paper's formula with ½ is a typo (DEM issue #2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from targets.base import ParticleTarget
from targets.registry import TARGETS

EPS2 = 1e-6  # softening inside the square root, as bgflow's distances_from_vectors
PAIR_FACTOR = 2.0  # ordered pairs


class LennardJones(ParticleTarget):
    spatial_dim = 3
    length_scale = 1.0
    #: batches larger than this are processed in chunks (bounded memory for [B, P, 3] pair tensors)
    chunk_size: int = 4096

    def _energy(self, x: Tensor) -> Tensor:
        diff = self.pair_vectors(x)
        r2 = (diff**2).sum(-1) + EPS2
        inv6 = r2.reciprocal() ** 3
        e_lj = PAIR_FACTOR * (inv6**2 - 2 * inv6).sum(-1)
        p = self.as_particles(x)
        e_osc = 0.5 * ((p - p.mean(-2, keepdim=True)) ** 2).sum((-1, -2))
        return e_lj + e_osc

    def _energy_and_grad_chunk(self, x: Tensor) -> tuple[Tensor, Tensor]:
        diff = self.pair_vectors(x)  # [B, P, 3]
        r2 = (diff**2).sum(-1) + EPS2
        inv2 = r2.reciprocal()
        inv6 = inv2**3
        e_lj = PAIR_FACTOR * (inv6**2 - 2 * inv6).sum(-1)
        # φ(r) = 2 (r^−12 − 2 r^−6); (dφ/dr)/r = 2 (−12 r^−14 + 12 r^−8) = 24 r^−8 (1 − r^−6)
        coef = (PAIR_FACTOR * 12.0) * inv6 * inv2 * (1.0 - inv6)
        g = self.scatter_pair_forces(coef, diff)
        p = self.as_particles(x)
        c = p - p.mean(-2, keepdim=True)
        e_osc = 0.5 * (c**2).sum((-1, -2))
        return e_lj + e_osc, (g + c).reshape(x.shape)

    def _energy_and_grad(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.detach()
        if x.shape[0] <= self.chunk_size:
            return self._energy_and_grad_chunk(x)
        es, gs = zip(*(self._energy_and_grad_chunk(c) for c in x.split(self.chunk_size)))
        return torch.cat(es), torch.cat(gs)


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
