"""A straightforward edge-list EGNN, written the way the published codes write it (DEM's / en_flows'
``EGNN_dynamics`` with ``E_GCL`` layers): one graph over all B·n nodes, explicit edge index lists, gathers of
both endpoints, a concatenation [h_i, h_j, r_ij, a_ij] per edge, the edge / attention / coordinate MLPs per
edge, and unsorted segment sums (``index_add``) back to the nodes.

It shares the parameters of a ``methods.nets.EGNN`` (same modules, same widths), so it computes the same
function with the textbook data layout: the benchmark (``bench_egnn.py``) and the equality tests
(``tests/test_egnn_fast.py``) use it as the baseline. Benchmark/test code only; our own code, not copied.
"""

from __future__ import annotations

import torch
from torch import Tensor

from methods.nets import EGNN


def edge_index(batch: int, n: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """rows, cols [B·n·(n−1)]: every ordered pair i ≠ j of every configuration, as node indices b·n + i."""
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    keep = i != j
    i, j = i[keep], j[keep]
    off = (torch.arange(batch) * n).unsqueeze(1)
    return (off + i).reshape(-1).to(device), (off + j).reshape(-1).to(device)


def unsorted_segment_sum(data: Tensor, segment_ids: Tensor, num_segments: int) -> Tensor:
    out = data.new_zeros(num_segments, data.shape[1])
    return out.index_add(0, segment_ids, data)


class EdgeListEGNN:
    """forward(t [B], x [B, n·d]) -> (vel [B, n·d], h_out [B, n, out]) with the parameters of ``net``."""

    def __init__(self, net: EGNN) -> None:
        self.net = net
        self._edges: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = {}

    def edges(self, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
        key = (batch, device)
        if key not in self._edges:
            self._edges[key] = edge_index(batch, self.net.n, device)
        return self._edges[key]

    def forward_with_features(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        net = self.net
        B, n, d = x.shape[0], net.n, net.d
        N = B * n
        rows, cols = self.edges(B, x.device)
        pos0 = x.reshape(N, d)
        pos = pos0
        h = net.embedding(t.reshape(B, 1).expand(B, n).reshape(N, 1))
        edge_attr = ((pos[rows] - pos[cols]) ** 2).sum(1, keepdim=True)
        for layer in net.layers:
            coord_diff = pos[rows] - pos[cols]
            radial = (coord_diff**2).sum(1, keepdim=True)
            coord_diff = coord_diff / (torch.sqrt(radial + 1e-8) + 1.0)
            # edge model
            m = layer.edge_mlp(layer.edge_in(torch.cat([h[rows], h[cols], radial, edge_attr], dim=1)))
            if layer.att is not None:
                m = m * torch.sigmoid(layer.att(m))
            # coordinate model
            phi = layer.coord_mlp(m)
            if layer.tanh:
                phi = torch.tanh(phi) * layer.coords_range
            agg_x = unsorted_segment_sum(coord_diff * phi, rows, N)
            agg_h = unsorted_segment_sum(m, rows, N)
            if layer.agg == "mean":
                agg_x, agg_h = agg_x / (n - 1), agg_h / (n - 1)
            pos = pos + agg_x
            # node model (recurrent)
            h = h + layer.node_mlp(torch.cat([h, agg_h], dim=1))
        vel = (pos - pos0).reshape(B, n, d)
        vel = vel - vel.mean(1, keepdim=True)
        h_out = net.embedding_out(h) if net.embedding_out is not None else h.new_zeros(N, 0)
        return vel.reshape(B, n * d), h_out.reshape(B, n, -1)

    def __call__(self, t: Tensor, x: Tensor) -> Tensor:
        return self.forward_with_features(t, x)[0]
