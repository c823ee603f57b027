"""Energy-parametrised networks of NEM / BNEM: E_θ(x, t) whose negative gradient is the score.

BNEM's ``EnergyNet.forward_e`` (tonyauyeung/BNEM, ``energy_net_wrapper.py``) returns the *log-density* −E_θ;
here every module returns the **energy** E_θ (kT = 1), so −E_θ below is the published expression:

- ``MLPEnergy`` (GMM-40): v = TimeMLP(t, x) ∈ R^d, −E_θ = −‖v‖₂ + Σ_j v_j + c (c a learnable scalar).
- ``EGNNEnergy`` (particles): (vel, h) = EGNN.forward_with_features(t, x), −E_θ,i = −‖vel_i‖ + h_i per
  particle i (``out_node_features = 1``), E_θ = Σ_i E_θ,i. vel is equivariant and mean-free and h
  invariant, so E_θ is invariant to rotations, reflections, translations and permutations of the particles.

``energy_and_score`` differentiates E_θ with autograd: score = −∇_x E_θ (graph kept only with
``create_graph=True``), optionally clipped per sample to a maximal L2 norm over the flattened vector
(BNEM's ``clipper_gen``, ``max_score_norm`` 1000).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from methods.nets import EGNN, TimeMLP, stored_activations


class MLPEnergy(nn.Module):
    """GMM energy network: forward(t [B] or scalar, x [B, dim]) -> E_θ [B] (per_particle gives [B, 1])."""

    def __init__(
        self, dim: int, hidden: int = 128, n_blocks: int = 3, emb_size: int = 128, coord_scale: float = 25.0
    ) -> None:
        super().__init__()
        self.mlp = TimeMLP(
            dim, out_dim=dim, hidden=hidden, n_blocks=n_blocks, emb_size=emb_size, coord_scale=coord_scale
        )
        self.c = nn.Parameter(torch.zeros(()))

    def per_particle(self, t: Tensor | float, x: Tensor) -> Tensor:
        """[B, 1]: the MLP energy has a single 'particle' column."""
        return self.forward(t, x).unsqueeze(-1)

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        v = self.mlp(t, x)
        log_p = -v.norm(dim=-1) + v.sum(-1) + self.c
        return -log_p


class EGNNEnergy(nn.Module):
    """Particle energy network: forward(t, x [B, n·d]) -> E_θ [B]; per_particle(t, x) -> [B, n]."""

    def __init__(self, n_particles: int, spatial_dim: int, hidden: int = 128, n_layers: int = 3) -> None:
        super().__init__()
        self.n, self.d = n_particles, spatial_dim
        self.egnn = EGNN(n_particles, spatial_dim, hidden=hidden, n_layers=n_layers, out_node_features=1)

    def per_particle(self, t: Tensor | float, x: Tensor) -> Tensor:
        vel, h = self.egnn.forward_with_features(t, x)
        vel = vel.reshape(x.shape[0], self.n, self.d)
        log_p_i = -vel.norm(dim=-1) + h[..., 0]
        return -log_p_i

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        return self.per_particle(t, x).sum(-1)


def clip_per_sample(v: Tensor, max_norm: float | None) -> Tensor:
    """Rescale each row of v [B, dim] to L2 norm ≤ max_norm (None: unchanged)."""
    if max_norm is None:
        return v
    norm = v.norm(dim=-1, keepdim=True)
    return v * torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def clip_denoised(y: Tensor, score: Tensor, h: Tensor, bound: float) -> Tensor:
    """Score whose Tweedie denoiser E[x_0 | x_t = y] = y + h·score lies in the box [−bound, bound]^dim.

    y, score [B, dim]; h [B] (σ_t², > 0). Rows whose denoiser already lies in the box are returned unchanged
    (bit for bit); the others get score = (clamp(y + h·score) − y) / h. Shrinks both the norm and the outward
    component of a spurious score far from the data (the x₀-clipping of image diffusion samplers).
    """
    if not bound > 0:
        raise ValueError(f"denoiser clip bound must be > 0, got {bound}")
    hh = h.to(y.dtype).reshape(-1, 1)
    x0 = y + hh * score
    outside = (x0.abs() > bound).any(-1, keepdim=True)
    clipped = (x0.clamp(-bound, bound) - y) / hh
    return torch.where(outside, clipped, score)


def energy_and_score(
    net: nn.Module, t: Tensor | float, x: Tensor, create_graph: bool = False, max_norm: float | None = None
) -> tuple[Tensor, Tensor]:
    """(E_θ(x, t) [B], score −∇_x E_θ [B, dim]) by autograd, the score clipped per sample to ``max_norm``.

    Without ``create_graph`` both outputs are detached from the parameters (sampling).
    """
    with torch.enable_grad():
        xg = x if (create_graph and x.requires_grad) else x.detach().requires_grad_(True)
        # a second-order gradient (training on the score) is faster through the stored-activation graph
        with stored_activations() if create_graph else contextlib.nullcontext():
            e = net(t, xg)
        (g,) = torch.autograd.grad(e.sum(), xg, create_graph=create_graph)
    score = clip_per_sample(-g, max_norm)
    if not create_graph:
        return e.detach(), score.detach()
    return e, score
