"""The SE(3)-equivariant augmented coupling flow (EACF; Midgley et al., NeurIPS 2023), written in PyTorch from
the paper and from reading lollcat/se3-augmented-coupling-flows (study notes:
/work/shared/reference/eacf-fab-reference-code.md). It is FAB's default flow for particle targets. docs/fab.md
describes it and lists what is and is not faithful.

**Variables.** One augmented copy a ∈ R^{n×d} per configuration x ∈ R^{n×d}. A joint configuration is the flat
vector v = [x, a] of 2·n·d numbers (x first, both particle-major). Joint translations leave everything
invariant. Densities live on the slice where x is centred: ``log_prob`` first subtracts x's centre of mass
from x and a.

**Base.** q0(x, a) = N_cog(x; 0, s²) · N(a; x, σ_a² I).
- N_cog is the centre-of-gravity Gaussian over the (n − 1)·d degrees of freedom.
- σ_a = 0.1, on all n·d coordinates of a (not centred).
- The augmented target is the same conditional, π(a | x) = N(a; x, σ_a² I). FAB trains q(x, a) towards
  p(x)·π(a | x) (``AugmentedTarget``).

**Blocks.** ``n_blocks`` blocks, each with two couplings: a-given-x, then x-given-a.
- The x-given-a coupling first translates the joint so that a is centred. After the transform it translates
  it so that x is centred again. These are pure translations between slices, with log-det 0.
- Each coupling is a **spherical (3-D) / polar (2-D) coupling**:
  1. An EGNN (``EACFEGNN``) reads the conditioning half c ∈ R^{n×d}. It returns d equivariant vectors
     v_0..v_{d−1} per node and 128 invariant features per node.
  2. The reference points are c_i + v_k. The origin is o_i = c_i + v_0.
     - 3-D: the z axis is along v_1 − v_0; the x axis is v_2 − v_0 with its z component removed
       (Gram–Schmidt); y = x × z.
     - 2-D: one axis along v_1 − v_0.
  3. Node i of the other half is written in spherical coordinates (r, θ, φ) (2-D: polar (r, φ)) in its frame.
  4. Each coordinate goes through a rational-quadratic spline (``methods.splines``), with parameters from an
     MLP head on the invariant features. The head's last layer is zero-initialised, so the flow starts as the
     identity.
     - r on [0, r_max] (r_max = 10), unconstrained boundary slopes and linear tails;
     - θ on [0, π], unconstrained;
     - φ on [−π, π], circular.
  5. Back to Cartesian coordinates.
- log|det| per node = Σ spline log-derivatives − (2 log r + log sin θ)_in + (same)_out. In 2-D the correction
  is ∓ log r.

**Equivariance.** q(x, a) is invariant to rotations, translations and permutations of the particles. It is not
invariant to reflections: the flow is SE(3)-, not E(3)-equivariant, as in the published code.

**Marginal.** ``marginal_log_prob`` estimates log q(x) by importance sampling over a:
    log q̂(x) = logsumexp_k [log q(x, a_k) − log π(a_k | x)] − log K,  a_k ~ π(· | x).
The published evaluation uses K = 20. This estimate is biased low for finite K.

**Auxiliary loss** (3-D). A barrier −log(1 − |cos ∠(v_1, v_2)|) between two reference vectors, averaged over
nodes, couplings and batch rows, keeps the frames away from degenerate (collinear) reference vectors. It is on
with weight 1 in the published LJ-13 FAB config. As in the published code, the angle is taken between v_1 and
v_2, not between the frame vectors v_1 − v_0 and v_2 − v_0. Points closer than 1e-4 to collinear are not
penalised, which keeps gradients stable.

All functions take flat tensors and follow their parameters' dtype and device. Randomness comes only from the
generator that is passed in.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods.splines import n_spline_params, rq_knots, rq_spline

__all__ = ["AugmentedTarget", "EACFEGNN", "EACFFlow", "SphericalCoupling", "StableMLP"]


# ------------------------------------------------------------------------------------------ building blocks
def _linear(n_in: int, n_out: int, init: str | float = "default") -> nn.Linear:
    """A Linear layer with the published initialisations.

    - ``"default"``: truncated normal, std 1/√n_in, cut at ±2 std;
    - ``"zero"``: weights and bias 0;
    - a float s: variance scaling s with fan_avg, uniform: U(±√(3s / ((n_in + n_out)/2))).

    The bias is 0 in every case.
    """
    lin = nn.Linear(n_in, n_out)
    with torch.no_grad():
        if init == "zero":
            lin.weight.zero_()
        elif init == "default":
            std = 1.0 / math.sqrt(n_in)
            nn.init.trunc_normal_(lin.weight, std=std, a=-2 * std, b=2 * std)
        else:
            limit = math.sqrt(3.0 * float(init) / ((n_in + n_out) / 2))
            nn.init.uniform_(lin.weight, -limit, limit)
        lin.bias.zero_()
    return lin


class _ResidualLN(nn.Module):
    """x + SiLU(Linear(LayerNorm(x)))."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-5)
        self.lin = _linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + F.silu(self.lin(self.norm(x)))


class StableMLP(nn.Module):
    """The published "stable" MLP: Linear(n_in, w) → SiLU, then (depth − 1) × ``_ResidualLN(w)``, then an
    optional output Linear(w, n_out) (``out_init``: "default", "zero" or a variance-scaling factor).

    [..., n_in] → [..., n_out or w].
    """

    def __init__(self, n_in: int, width: int, depth: int = 2, n_out: int | None = None,
                 out_init: str | float = "default") -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"StableMLP depth must be >= 1, got {depth}")
        self.first = _linear(n_in, width)
        self.blocks = nn.ModuleList(_ResidualLN(width) for _ in range(depth - 1))
        self.out = _linear(width, n_out, out_init) if n_out is not None else None

    def forward(self, x: Tensor) -> Tensor:
        h = F.silu(self.first(x))
        for b in self.blocks:
            h = b(h)
        return self.out(h) if self.out is not None else h


def _safe_norm(v: Tensor, keepdim: bool = False) -> Tensor:
    """|v| over the last axis, with 1 where |v|² = 0 exactly (so that its gradient is finite)."""
    s = (v * v).sum(-1, keepdim=keepdim)
    return torch.where(s == 0, torch.ones_like(s), s).sqrt()


# ------------------------------------------------------------------------------------------------- the EGNN
class _EACFLayer(nn.Module):
    """One EGCL of the conditioner EGNN, with M vector channels per node.

    Edges are i ← j for all i ≠ j (receiver i, sender j), and x_ij^m = x_i^m − x_j^m for channel m.
    - Messages: m_ij = φ_e([h_j, h_i, |x_ij^m|²_m, c_j, c_i]). Here c are the per-node squared distances
      |x_i^r − x_i^s|² between channels r ≠ s.
    - Vectors: x_i^m += Σ_j φ_x(m_ij)^m x_ij^m / (1 + |x_ij^m|) / (n − 1).
    - Cross-channel shifts, if M > 1:
      x_i^r += Σ_{s≠r} ψ(Σ_k m_ki)^{rs} (x_i^r − x_i^s) / (1 + |x_i^r − x_i^s|²) / (M − 1).
      Σ_k m_ki is the sum of the messages node i sent; the squared length in the denominator is the
      published code's.
    - Features: h_i += φ_h([Σ_j σ(w·m_ij) m_ij / √(n − 1), h_i]).
    The MLPs are ``StableMLP`` of width w and depth 2; the shift heads are variance-scaling(1e-3)
    initialised.
    """

    def __init__(self, n_features: int, width: int, n_channels: int) -> None:
        super().__init__()
        m = n_channels
        self.m = m
        self.pairs = [(r, s) for r in range(m) for s in range(m) if r != s]
        p = len(self.pairs)
        # the first edge Linear, split by input block (applied per node, then broadcast over the pairs)
        self.e_send = _linear(n_features + p, width)  # [h_j, c_j] (its bias is the edge Linear's bias)
        self.e_recv = nn.Linear(n_features + p, width, bias=False)  # [h_i, c_i]
        self.e_sq = nn.Linear(m, width, bias=False)  # |x_ij^m|²
        with torch.no_grad():  # one truncated-normal Linear over the concatenated input, split in blocks
            fan = 2 * (n_features + p) + m
            std = 1.0 / math.sqrt(fan)
            for lin in (self.e_send, self.e_recv, self.e_sq):
                nn.init.trunc_normal_(lin.weight, std=std, a=-2 * std, b=2 * std)
        self.e_res = _ResidualLN(width)  # φ_e = StableMLP of depth 2: Linear → SiLU → residual block
        self.x_torso = StableMLP(width, width, 2)
        self.x_head = _linear(width, m, 1e-3)
        if m > 1:
            self.cross_torso = StableMLP(width, width, 2)
            self.cross_head = _linear(width, p, 1e-3)
            r_idx = torch.tensor([r for r, _ in self.pairs])
            s_idx = torch.tensor([s for _, s in self.pairs])
            self.register_buffer("r_idx", r_idx, persistent=False)
            self.register_buffer("s_idx", s_idx, persistent=False)
        self.att = _linear(width, 1)
        self.h_mlp = StableMLP(width + n_features, width, 2, n_out=n_features)

    def forward(self, pos: Tensor, h: Tensor, jidx: Tensor) -> tuple[Tensor, Tensor]:
        """pos [B, n, M, d], h [B, n, F], jidx [n, n−1] (senders of each receiver) -> (pos, h)."""
        B, n, m, d = pos.shape
        diff = pos.unsqueeze(2) - pos[:, jidx]  # [B, n, n−1, M, d]: x_i − x_j
        length = _safe_norm(diff)  # [B, n, n−1, M]
        sq = length * length
        if m > 1:
            cvec = pos[:, :, self.r_idx] - pos[:, :, self.s_idx]  # [B, n, P, d]
            csq = _safe_norm(cvec) ** 2  # [B, n, P]
            node_in = torch.cat([h, csq], dim=-1)
        else:
            node_in = h
        u = self.e_recv(node_in).unsqueeze(2) + self.e_send(node_in)[:, jidx] + self.e_sq(sq)
        msg = self.e_res(F.silu(u))  # [B, n, n−1, w]
        coef = self.x_head(self.x_torso(msg))  # [B, n, n−1, M]
        shift = (coef / (1.0 + length)).unsqueeze(-1) * diff  # [B, n, n−1, M, d]
        new_pos = pos + shift.sum(2) / (n - 1)
        if m > 1:
            sent = torch.zeros(B, n, msg.shape[-1], dtype=msg.dtype, device=msg.device)
            sent = sent.index_add(1, jidx.reshape(-1), msg.reshape(B, n * (n - 1), -1))
            cc = self.cross_head(self.cross_torso(sent))  # [B, n, P]
            cshift = (cc / (1.0 + csq)).unsqueeze(-1) * cvec  # [B, n, P, d]
            cross = torch.zeros_like(pos).index_add(2, self.r_idx, cshift)
            new_pos = new_pos + cross / (m - 1)
        gate = torch.sigmoid(self.att(msg))  # [B, n, n−1, 1]
        agg = (msg * gate).sum(2) / math.sqrt(n - 1)
        h = h + self.h_mlp(torch.cat([agg, h], dim=-1))
        return new_pos, h


class EACFEGNN(nn.Module):
    """The conditioner EGNN of the augmented coupling flow (``eacf/nets/en_gnn.py`` and ``make_egnn.py``).

    forward(pos [B, n, d]) -> (vectors [B, n, n_vectors, d], features [B, n, n_out]).
    1. The positions are centred. The single input channel is repeated to ``n_vectors`` channels.
    2. The node features start from one learned embedding shared by all nodes, then a Linear to F.
    3. ``n_layers`` EGCLs (``_EACFLayer``) follow.
    4. The vectors are the final channels minus their initial values. These are rotation-equivariant and
       translation-invariant displacements.
    5. The features are softmax(h) followed by a Linear(F, n_out).
    """

    def __init__(self, n_particles: int, n_vectors: int, n_layers: int = 3, width: int = 64,
                 n_features: int = 128, n_out: int = 128) -> None:
        super().__init__()
        if n_particles < 2 or n_vectors < 1 or n_layers < 1:
            raise ValueError(f"EACFEGNN needs n_particles >= 2, n_vectors >= 1, n_layers >= 1; got "
                             f"{n_particles}, {n_vectors}, {n_layers}")
        self.n, self.n_vectors = n_particles, n_vectors
        self.embedding = nn.Parameter(torch.randn(1))
        self.h_in = _linear(1, n_features)
        self.layers = nn.ModuleList(_EACFLayer(n_features, width, n_vectors) for _ in range(n_layers))
        self.h_out = _linear(n_features, n_out)
        n = n_particles
        jidx = torch.tensor([[j for j in range(n) if j != i] for i in range(n)], dtype=torch.long)
        self.register_buffer("jidx", jidx, persistent=False)

    def forward(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        B, n, d = pos.shape
        c = pos - pos.mean(1, keepdim=True)
        v0 = c.unsqueeze(2).expand(B, n, self.n_vectors, d)
        v = v0
        h = self.h_in(self.embedding.to(pos.dtype).expand(B, n, 1))
        for layer in self.layers:
            v, h = layer(v, h, self.jidx)
        return v - v0, self.h_out(torch.softmax(h, dim=-1))


# ----------------------------------------------------------------------------------------- coordinate frames
def _to_local(y: Tensor, ref: Tensor) -> tuple[Tensor, Tensor]:
    """Cartesian points y [..., d] → local coordinates [..., d] in the frames given by reference vectors
    ref [..., d(vectors), d] (absolute points), and log|det ∂local/∂y| [...].

    3-D: (r, θ, φ) about origin ref_0, z along ref_1 − ref_0, x along the rejection of ref_2 − ref_0.
    2-D: (r, φ) about ref_0 with the angle measured from ref_1 − ref_0.
    """
    d = y.shape[-1]
    o = ref[..., 0, :]
    v = y - o
    r = _safe_norm(v)
    if d == 2:
        u = ref[..., 1, :] - o
        u = u / _safe_norm(u, keepdim=True)
        cross = u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]
        dot = (u * v).sum(-1)
        phi = torch.atan2(cross, dot)
        return torch.stack([r, phi], dim=-1), -torch.log(r)
    ez, ex, ey = _frame3(ref)
    zc = (v * ez).sum(-1)
    perp = v - zc.unsqueeze(-1) * ez
    rho = _safe_norm(perp)
    theta = torch.atan2(rho, zc)
    phi = torch.atan2((perp * ey).sum(-1), (perp * ex).sum(-1))
    # 2 log r + log sin θ = log r + log ρ  (sin θ = ρ / r)
    return torch.stack([r, theta, phi], dim=-1), -(torch.log(r) + torch.log(rho))


def _frame3(ref: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Unit axes (z, x, y) [..., 3] from three reference points ref [..., 3, 3]; y = x × z as published."""
    o = ref[..., 0, :]
    z = ref[..., 1, :] - o
    ez = z / _safe_norm(z, keepdim=True)
    w = ref[..., 2, :] - o
    xr = w - (w * ez).sum(-1, keepdim=True) * ez
    ex = xr / _safe_norm(xr, keepdim=True)
    y = torch.linalg.cross(ex, ez)
    ey = y / _safe_norm(y, keepdim=True)
    return ez, ex, ey


def _to_cartesian(s: Tensor, ref: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of ``_to_local``: local coordinates s [..., d] → Cartesian points, and log|det ∂y/∂s| [...]."""
    d = s.shape[-1]
    o = ref[..., 0, :]
    r = s[..., 0]
    if d == 2:
        u = ref[..., 1, :] - o
        u = u / _safe_norm(u, keepdim=True)
        c, sn = torch.cos(s[..., 1]), torch.sin(s[..., 1])
        rot = torch.stack([u[..., 0] * c - u[..., 1] * sn, u[..., 0] * sn + u[..., 1] * c], dim=-1)
        return o + r.unsqueeze(-1) * rot, torch.log(r)
    ez, ex, ey = _frame3(ref)
    theta, phi = s[..., 1], s[..., 2]
    st = torch.sin(theta)
    perp = ex * torch.cos(phi).unsqueeze(-1) + ey * torch.sin(phi).unsqueeze(-1)
    v = r.unsqueeze(-1) * (ez * torch.cos(theta).unsqueeze(-1) + perp * st.unsqueeze(-1))
    return o + v, 2 * torch.log(r) + torch.log(st)


# ---------------------------------------------------------------------------------------------- the coupling
class SphericalCoupling(nn.Module):
    """One spherical (3-D) / polar (2-D) coupling of the augmented flow; ``swap`` False transforms a given x,
    True transforms x given a (with the centring translations described in the module docstring).

    forward(z [B, n, 2, d], inverse) -> (z', log|det| [B], aux [B]); z[:, :, 0] = x, z[:, :, 1] = a.
    """

    def __init__(self, n_particles: int, spatial_dim: int, swap: bool, n_bins: int = 8, r_max: float = 10.0,
                 egnn_layers: int = 3, width: int = 64, n_features: int = 128) -> None:
        super().__init__()
        if spatial_dim not in (2, 3):
            raise ValueError(f"the spherical coupling is written for 2-D and 3-D, got {spatial_dim}-D")
        self.d, self.swap, self.n_bins, self.r_max = spatial_dim, swap, n_bins, r_max
        self.egnn = EACFEGNN(n_particles, spatial_dim, egnn_layers, width, n_features, n_features)
        n_out = spatial_dim * n_spline_params(n_bins)
        self.head = StableMLP(n_features, width, 2, n_out=n_out, out_init="zero")

    def _ranges(self) -> list[tuple[float, float, str]]:
        if self.d == 2:
            return [(0.0, self.r_max, "unconstrained"), (-math.pi, math.pi, "circular")]
        return [(0.0, self.r_max, "unconstrained"), (0.0, math.pi, "unconstrained"),
                (-math.pi, math.pi, "circular")]

    def forward(self, z: Tensor, inverse: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        ci, ti = (1, 0) if self.swap else (0, 1)  # conditioning and transformed channels
        if self.swap:
            z = z - z[:, :, 1:2].mean(1, keepdim=True)
        cond, y = z[:, :, ci], z[:, :, ti]  # [B, n, d]
        vec, feat = self.egnn(cond)  # [B, n, d, d], [B, n, F]
        ref = cond.unsqueeze(2) + vec
        B, n, d = y.shape
        params = self.head(feat).view(B, n, d, -1)
        loc, ld_in = _to_local(y, ref)
        outs, ld = [], ld_in
        for k, (lo, hi, bd) in enumerate(self._ranges()):
            knots = rq_knots(params[..., k, :], lo, hi, bd)  # type: ignore[arg-type]
            yk, lk = rq_spline(loc[..., k], knots, inverse=inverse)
            outs.append(yk)
            ld = ld + lk
        y_new, ld_out = _to_cartesian(torch.stack(outs, dim=-1), ref)
        ld = ld + ld_out
        z = torch.stack([cond, y_new] if ci == 0 else [y_new, cond], dim=2)
        if self.swap:
            z = z - z[:, :, 0:1].mean(1, keepdim=True)
        aux = self._barrier(vec) if d == 3 else torch.zeros(B, dtype=z.dtype, device=z.device)
        return z, ld.sum(1), aux

    @staticmethod
    def _barrier(vec: Tensor) -> Tensor:
        """−log(1 − |cos ∠(v_1, v_2)|) per node, 0 where 1 − |cos| < 1e-4; mean over nodes: [B]."""
        v1, v2 = vec[..., 1, :], vec[..., 2, :]
        cos = (v1 * v2).sum(-1) / _safe_norm(v1) / _safe_norm(v2)
        b = 1 - cos.abs()
        b = torch.where(b < 1e-4, torch.ones_like(b), b)
        return -torch.log(b).mean(1)


# ------------------------------------------------------------------------------------------------- the flow
class EACFFlow(nn.Module):
    """The augmented coupling flow on joint vectors v = [x, a] ∈ R^{2·n·d}: base q0 (module docstring), then
    ``n_blocks`` × [a-given-x coupling, x-given-a coupling].

    Interface (as ``methods.flows``, on the joint space): ``sample_and_log_prob(n, generator)`` ->
    (v [n, 2nd], log q [n]); ``log_prob(v)`` -> [n] (differentiable in v and the parameters);
    ``log_prob_and_aux(v)`` also returns the auxiliary barrier loss per row;
    ``marginal_log_prob(x, K, generator)`` -> log q̂(x) [n]; ``aux_log_prob(x, a)`` = log π(a | x).
    """

    exact_sample_log_prob = True

    def __init__(self, n_particles: int, spatial_dim: int, n_blocks: int = 12, egnn_layers: int = 3,
                 width: int = 64, n_features: int = 128, n_bins: int = 8, r_max: float = 10.0,
                 base_scale: float = 1.0, aug_scale: float = 0.1) -> None:
        super().__init__()
        if n_blocks < 1 or base_scale <= 0 or aug_scale <= 0:
            raise ValueError(f"EACFFlow needs n_blocks >= 1, base_scale > 0, aug_scale > 0; got {n_blocks}, "
                             f"{base_scale}, {aug_scale}")
        self.n, self.d = n_particles, spatial_dim
        self.nd = n_particles * spatial_dim
        self.dim = 2 * self.nd
        self.base_scale, self.aug_scale = float(base_scale), float(aug_scale)
        self.layers = nn.ModuleList(
            SphericalCoupling(n_particles, spatial_dim, swap, n_bins, r_max, egnn_layers, width, n_features)
            for _ in range(n_blocks) for swap in (False, True)
        )

    def _param(self) -> Tensor:
        return next(self.parameters())

    # ------------------------------------------------------------------ layout helpers
    def split(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """[B, 2nd] -> (x [B, nd], a [B, nd])."""
        return v[..., : self.nd], v[..., self.nd :]

    def _to_joint(self, v: Tensor) -> Tensor:
        x, a = self.split(v)
        return torch.stack([x.reshape(-1, self.n, self.d), a.reshape(-1, self.n, self.d)], dim=2)

    def _to_flat(self, z: Tensor) -> Tensor:
        return torch.cat([z[:, :, 0].reshape(z.shape[0], -1), z[:, :, 1].reshape(z.shape[0], -1)], dim=-1)

    def center(self, v: Tensor) -> Tensor:
        """Translate joint vectors so that x is centred (x and a by the same vector)."""
        z = self._to_joint(v)
        return self._to_flat(z - z[:, :, 0:1].mean(1, keepdim=True))

    def project(self, v: Tensor) -> Tensor:
        """Orthogonal projection of a joint direction onto the tangent space of the centred-x slice: the x
        part's particle mean is removed, the a part is unchanged (HMC momenta, forces, Metropolis moves)."""
        x, a = self.split(v)
        xp = x.reshape(-1, self.n, self.d)
        return torch.cat([(xp - xp.mean(1, keepdim=True)).reshape(x.shape), a], dim=-1)

    # ------------------------------------------------------------------ densities
    def aux_log_prob(self, x: Tensor, a: Tensor) -> Tensor:
        """log π(a | x) = log N(a; x, σ_a² I) over n·d dims: x, a [B, nd] -> [B]."""
        s = self.aug_scale
        return (-0.5 * ((a - x) ** 2).sum(-1) / s**2 - self.nd * math.log(s)
                - 0.5 * self.nd * math.log(2 * math.pi))

    def base_log_prob(self, z: Tensor) -> Tensor:
        """log q0(x, a) of joint positions z [B, n, 2, d] (x centred first)."""
        x = z[:, :, 0] - z[:, :, 0].mean(1, keepdim=True)
        a = z[:, :, 1] - z[:, :, 0].mean(1, keepdim=True)
        dof = (self.n - 1) * self.d
        s = self.base_scale
        lx = -0.5 * (x**2).sum((1, 2)) / s**2 - dof * math.log(s) - 0.5 * dof * math.log(2 * math.pi)
        return lx + self.aux_log_prob(x.reshape(-1, self.nd), a.reshape(-1, self.nd))

    def log_prob_and_aux(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """(log q(x, a) [B], auxiliary barrier loss [B]) of joint vectors v [B, 2nd]."""
        z = self._to_joint(v)
        z = z - z[:, :, 0:1].mean(1, keepdim=True)
        logdet = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        aux = torch.zeros_like(logdet)
        for layer in reversed(self.layers):
            z, ld, ax = layer(z, inverse=True)
            logdet = logdet + ld
            aux = aux + ax
        return self.base_log_prob(z) + logdet, aux / len(self.layers)

    def log_prob(self, v: Tensor) -> Tensor:
        """log q(x, a): [B, 2nd] -> [B]."""
        return self.log_prob_and_aux(v)[0]

    def sample_and_log_prob(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n joint samples [n, 2nd] (x centred) and their log q [n] (one pass through the couplings)."""
        p = self._param()
        eps = torch.randn(n, self.n, 2, self.d, generator=generator, dtype=p.dtype, device=p.device)
        x = eps[:, :, 0] - eps[:, :, 0].mean(1, keepdim=True)
        x = x * self.base_scale
        a = x + self.aug_scale * eps[:, :, 1]
        z = torch.stack([x, a], dim=2)
        log_q = self.base_log_prob(z)
        for layer in self.layers:
            z, ld, _ = layer(z)
            log_q = log_q - ld
        return self._to_flat(z), log_q

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        with torch.no_grad():
            return self.sample_and_log_prob(n, generator)[0]

    def marginal_log_prob(self, x: Tensor, k: int = 20, generator: torch.Generator | None = None,
                          chunk: int = 4096) -> Tensor:
        """Importance-sampling estimate of log q(x) [B] with K draws a_k ~ π(· | x) per row (x [B, nd])."""
        if k < 1:
            raise ValueError(f"marginal_log_prob needs K >= 1, got {k}")
        B = x.shape[0]
        eps = torch.randn(k, B, self.nd, generator=generator, dtype=x.dtype, device=x.device)
        xs = x.unsqueeze(0).expand(k, B, self.nd)
        a = xs + self.aug_scale * eps
        v = torch.cat([xs, a], dim=-1).reshape(k * B, self.dim)
        lw = torch.cat([self.log_prob(c) for c in v.split(chunk)]) - self.aux_log_prob(
            xs.reshape(k * B, -1), a.reshape(k * B, -1)
        )
        return torch.logsumexp(lw.view(k, B), dim=0) - math.log(k)


class AugmentedTarget:
    """The joint FAB target p(x)·π(a | x) on vectors v = [x, a] [B, 2nd], with E(v) = E_p(x) − log π(a | x).

    Evaluations go to the wrapped (counted) target on x, so each joint configuration costs exactly one counted
    energy (and, for ``energy_and_grad``, one gradient) evaluation.
    """

    def __init__(self, target: object, flow: EACFFlow) -> None:
        self.target, self.flow = target, flow
        self.dim = flow.dim

    def _aux(self, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x, a = self.flow.split(v)
        s2 = self.flow.aug_scale**2
        e = -self.flow.aux_log_prob(x, a)
        return e, (x - a) / s2, (a - x) / s2  # energy, ∂/∂x, ∂/∂a

    def energy(self, v: Tensor) -> Tensor:
        """E(v) [B] (no graph: v is detached, as the counted target counts a gradient for inputs with one)."""
        v = v.detach()
        with torch.no_grad():
            e_aux, _, _ = self._aux(v)
            return self.target.energy(self.flow.split(v)[0]).to(v.dtype) + e_aux  # type: ignore[attr-defined]

    def energy_and_grad(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """(E(v) [B], ∇E(v) [B, 2nd]), detached."""
        v = v.detach()
        with torch.no_grad():
            e, g = self.target.energy_and_grad(self.flow.split(v)[0])  # type: ignore[attr-defined]
            e_aux, gx, ga = self._aux(v)
            return e.to(v.dtype) + e_aux, torch.cat([g.to(v.dtype) + gx, ga], dim=-1)
