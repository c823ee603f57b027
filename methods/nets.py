"""Networks shared by the diffusion-type samplers (iDEM, NEM, BNEM, PIS, DDS).

- ``SinusoidalEmbedding``: the transformer-style sin/cos embedding of a scalar (optionally pre-scaled).
- ``FourierTimeEmbedding``: sin/cos of coeff·t with coeff = linspace(0.1, 100, 64) (PIS / DDS time).
- ``TimeMLP``: the GMM network of iDEM (DEM's ``MyMLP``): sinusoidal embedding of every coordinate (scale 25)
  and of the time, Linear→GELU, residual GELU blocks, linear read-out.
- ``EGNN``: E(n)-equivariant graph network on a fully connected particle graph (Satorras et al. E_GCL layers
  as used by DEM / en_flows' ``EGNN_dynamics``), vectorised over the batch with dense [B, n, n, ·]
  edge tensors.

All modules take flat inputs (``t`` [B], ``x`` [B, dim]) and are device-agnostic
(they follow their parameters).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _as_batch_time(t: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast a time (scalar, [1] or [B]) to [B] with the dtype/device of ``x``."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0 or t.numel() == 1:
        return t.reshape(1).expand(x.shape[0])
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"time must be a scalar or of shape [{x.shape[0]}], got {list(t.shape)}")
    return t


class SinusoidalEmbedding(nn.Module):
    """Embed a scalar per row: v [...] -> [..., size] = [sin(s·v·f_k), cos(s·v·f_k)].

    f_k = 10000^(−k/(half−1)), k < half = size/2.

    ``scale`` multiplies the input first (DEM's coordinate embedding uses 25, the time embedding 1).
    """

    def __init__(self, size: int = 128, scale: float = 1.0) -> None:
        super().__init__()
        if size < 4 or size % 2:
            raise ValueError(f"SinusoidalEmbedding size must be an even integer >= 4, got {size}")
        self.size = size
        self.scale = float(scale)
        half = size // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, v: Tensor) -> Tensor:
        arg = (self.scale * v).unsqueeze(-1) * self.freqs.to(v.dtype)
        return torch.cat([arg.sin(), arg.cos()], dim=-1)


class FourierTimeEmbedding(nn.Module):
    """PIS / DDS time features: t [B] -> [B, 2·n] = [sin(c·t), cos(c·t)], c = linspace(c_min, c_max, n)."""

    def __init__(self, n: int = 64, c_min: float = 0.1, c_max: float = 100.0) -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"FourierTimeEmbedding needs n >= 1, got {n}")
        self.register_buffer("coeff", torch.linspace(c_min, c_max, n), persistent=False)
        self.out_dim = 2 * n

    def forward(self, t: Tensor) -> Tensor:
        arg = t.reshape(-1, 1) * self.coeff.to(t.dtype)
        return torch.cat([arg.sin(), arg.cos()], dim=-1)


class _ResidualGELU(nn.Module):
    """x + GELU(Linear(x))."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.act(self.lin(x))


class TimeMLP(nn.Module):
    """The iDEM GMM network (DEM ``MyMLP``): forward(t [B], x [B, dim]) -> [B, out_dim].

    Features: sinusoidal embedding (``emb_size``, scale ``coord_scale``) of each coordinate and of t (scale
    ``time_scale``), concatenated; Linear→GELU; ``n_blocks`` residual GELU blocks of width
    ``hidden``; Linear out.
    """

    def __init__(
        self,
        dim: int,
        out_dim: int | None = None,
        hidden: int = 128,
        n_blocks: int = 3,
        emb_size: int = 128,
        coord_scale: float = 25.0,
        time_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"TimeMLP dim must be >= 1, got {dim}")
        self.dim = dim
        self.out_dim = dim if out_dim is None else out_dim
        self.coord_emb = SinusoidalEmbedding(emb_size, coord_scale)
        self.time_emb = SinusoidalEmbedding(emb_size, time_scale)
        layers: list[nn.Module] = [nn.Linear(emb_size * (dim + 1), hidden), nn.GELU()]
        layers += [_ResidualGELU(hidden) for _ in range(n_blocks)]
        layers.append(nn.Linear(hidden, self.out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"TimeMLP expects x of shape [B, {self.dim}], got {list(x.shape)}")
        t = _as_batch_time(t, x)
        feats = torch.cat([self.coord_emb(x).flatten(1), self.time_emb(t)], dim=-1)
        return self.net(feats)


class EGCL(nn.Module):
    """One E(n)-equivariant graph convolution layer on a dense fully connected graph (no self-edges).

    Edge message m_ij = SiLU(W2 SiLU(W1 [h_i, h_j, |x_i − x_j|², a_ij])) (× sigmoid attention gate);
    coordinates x_i += Σ_j (x_i − x_j)/(|x_i − x_j| + 1) · coords_range · tanh(φ(m_ij));
    nodes h_i += MLP([h_i, Σ_j m_ij]) (recurrent). The first edge Linear is applied per node and summed
    (identical to a Linear on the concatenation, n× cheaper).
    """

    def __init__(self, hidden: int, attention: bool = True, tanh: bool = True, coords_range: float = 1.0,
                 agg: str = "sum") -> None:
        super().__init__()
        if agg not in ("sum", "mean"):
            raise ValueError(f"EGCL agg must be 'sum' or 'mean', got {agg!r}")
        self.attention, self.tanh, self.coords_range, self.agg = attention, tanh, float(coords_range), agg
        act = nn.SiLU()
        self.edge_in = nn.Linear(2 * hidden + 2, hidden)
        self.edge_mlp = nn.Sequential(act, nn.Linear(hidden, hidden), act)
        self.att = nn.Linear(hidden, 1) if attention else None
        last = nn.Linear(hidden, 1, bias=False)
        nn.init.xavier_uniform_(last.weight, gain=0.001)
        self.coord_mlp = nn.Sequential(nn.Linear(hidden, hidden), act, last)
        self.node_mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), act, nn.Linear(hidden, hidden))

    def forward(self, h: Tensor, x: Tensor, edge_attr: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """h [B, n, H], x [B, n, d], edge_attr [B, n, n] (squared input distances),
        mask [n, n] (0 on the diagonal)."""
        H = h.shape[-1]
        diff = x.unsqueeze(2) - x.unsqueeze(1)  # [B, n, n, d]: x_i − x_j
        radial = (diff**2).sum(-1)  # [B, n, n]
        w = self.edge_in.weight  # [H, 2H + 2]
        hi = torch.addmm(self.edge_in.bias, h.reshape(-1, H), w[:, :H].T).reshape(h.shape)  # [B, n, H]
        hj = h @ w[:, H : 2 * H].T
        pre = torch.stack([radial, edge_attr], dim=-1) @ w[:, 2 * H :].T  # [B, n, n, H]
        pre += hi.unsqueeze(2)
        pre += hj.unsqueeze(1)
        m = self.edge_mlp(pre)  # [B, n, n, H]
        if self.att is not None:
            m = m * torch.sigmoid(self.att(m))
        phi = self.coord_mlp(m)  # [B, n, n, 1]
        if self.tanh:
            phi = torch.tanh(phi) * self.coords_range
        norm = torch.sqrt(radial + 1e-8).unsqueeze(-1)
        trans = diff / (norm + 1.0) * phi  # zero on the diagonal (x_i − x_i = 0)
        agg_x = trans.sum(2)
        # messages summed over j ≠ i: subtract the self-edge instead of masking the [B, n, n, H] tensor
        agg_h = m.sum(2) - torch.diagonal(m, dim1=1, dim2=2).transpose(1, 2)
        if self.agg == "mean":
            deg = mask.sum(-1).clamp_min(1).unsqueeze(-1)
            agg_x, agg_h = agg_x / deg, agg_h / deg
        x = x + agg_x
        h = h + self.node_mlp(torch.cat([h, agg_h], dim=-1))
        return h, x


class EGNN(nn.Module):
    """E(n)-equivariant network for n particles in d dimensions (DEM / en_flows ``EGNN_dynamics``).

    forward(t [B], x [B, n·d]) -> [B, n·d]: the displacement x_out − x with the particle mean removed
    (rotation/permutation equivariant, translation invariant). Node features start from h = t.
    forward_with_features(t, x) -> (vel [B, n·d], h_out [B, n, out_node_features]): invariant node outputs.
    """

    def __init__(
        self,
        n_particles: int,
        spatial_dim: int,
        hidden: int = 128,
        n_layers: int = 3,
        out_node_features: int = 0,
        attention: bool = True,
        tanh: bool = True,
        coords_range: float | None = None,
        agg: str = "sum",
    ) -> None:
        super().__init__()
        if n_particles < 2 or spatial_dim < 1 or n_layers < 1 or hidden < 1:
            raise ValueError(
                f"EGNN needs n_particles >= 2, spatial_dim >= 1, n_layers >= 1, hidden >= 1; got "
                f"{n_particles}, {spatial_dim}, {n_layers}, {hidden}"
            )
        self.n, self.d = n_particles, spatial_dim
        self.out_node_features = out_node_features
        cr = 15.0 / n_layers if coords_range is None else coords_range
        self.embedding = nn.Linear(1, hidden)
        self.layers = nn.ModuleList(
            EGCL(hidden, attention=attention, tanh=tanh, coords_range=cr, agg=agg) for _ in range(n_layers)
        )
        self.embedding_out = nn.Linear(hidden, out_node_features) if out_node_features > 0 else None
        self.register_buffer("mask", 1.0 - torch.eye(n_particles), persistent=False)

    def forward_with_features(self, t: Tensor | float, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.ndim != 2 or x.shape[1] != self.n * self.d:
            raise ValueError(f"EGNN expects x of shape [B, {self.n * self.d}], got {list(x.shape)}")
        B = x.shape[0]
        t = _as_batch_time(t, x)
        pos0 = x.reshape(B, self.n, self.d)
        pos = pos0
        mask = self.mask.to(x.dtype)
        edge_attr = ((pos.unsqueeze(2) - pos.unsqueeze(1)) ** 2).sum(-1)
        h = self.embedding(t.reshape(B, 1, 1).expand(B, self.n, 1))
        for layer in self.layers:
            h, pos = layer(h, pos, edge_attr, mask)
        vel = pos - pos0
        vel = vel - vel.mean(dim=1, keepdim=True)
        h_out = self.embedding_out(h) if self.embedding_out is not None else h.new_zeros(B, self.n, 0)
        return vel.reshape(B, self.n * self.d), h_out

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        return self.forward_with_features(t, x)[0]
