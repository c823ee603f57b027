"""Monotone rational-quadratic splines (Durkan et al., *Neural Spline Flows*, NeurIPS 2019), elementwise.

The parametrisation is the one the SE(3) augmented coupling flow uses (distrax ``RationalQuadraticSpline``,
written here from its documented behaviour): a spline on [lo, hi] with K bins is given by 3K + 1 unconstrained
numbers per element,

- K bin widths and K bin heights: softmax, scaled to (hi − lo) with a floor ``min_bin_size`` per bin;
- K + 1 knot slopes: softplus(u + c) + ``min_knot_slope`` with c chosen so that u = 0 gives slope 1.

All-zero parameters give the identity. The end knots are fixed, f(lo) = lo and f(hi) = hi. Outside
[lo, hi] the map continues linearly with the slope of the nearest end knot. Boundary conditions on the end
slopes:

- ``"unconstrained"``: free;
- ``"circular"``: the slope at hi is set to that at lo (Rezende et al. 2020). This is a spline on a circle
  parametrised by an angle in [lo, hi]; f(lo) = lo is kept, so it cannot rotate the circle.

``rq_spline(x, knots, inverse)`` returns (y, log|dy/dx|) elementwise. ``inverse=True`` gives the inverse map
and the log-derivative of the inverse. Everything is differentiable in x and in the parameters and works in
any float dtype and on any device.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SplineKnots", "rq_knots", "rq_spline", "n_spline_params"]

Boundary = Literal["unconstrained", "circular"]


def n_spline_params(n_bins: int) -> int:
    """Unconstrained parameters per element: K widths, K heights, K + 1 slopes."""
    return 3 * n_bins + 1


class SplineKnots(NamedTuple):
    """Knot positions x_k, y_k and slopes s_k, each [..., K + 1]."""

    x: Tensor
    y: Tensor
    slope: Tensor


def _bin_edges(u: Tensor, lo: float, hi: float, min_bin: float) -> Tensor:
    """Knot positions [..., K + 1] from unconstrained sizes u [..., K]: lo, lo + w_1, ..., hi."""
    k = u.shape[-1]
    width = hi - lo
    if k * min_bin >= width:
        raise ValueError(f"{k} bins of minimum size {min_bin} do not fit in [{lo}, {hi}]")
    w = torch.softmax(u, dim=-1) * (width - k * min_bin) + min_bin
    inner = lo + torch.cumsum(w[..., :-1], dim=-1)
    pad = u.new_full((*u.shape[:-1], 1), lo)
    return torch.cat([pad, inner, pad.new_full(pad.shape, hi)], dim=-1)


def rq_knots(
    params: Tensor,
    lo: float,
    hi: float,
    boundary: Boundary = "unconstrained",
    min_bin_size: float | None = None,
    min_knot_slope: float = 1e-4,
) -> SplineKnots:
    """Knots of the spline(s) with unconstrained ``params`` [..., 3K + 1] on [lo, hi].

    ``min_bin_size`` defaults to 1e-4·(hi − lo), the value the augmented coupling flow uses.
    """
    if params.shape[-1] < 4 or params.shape[-1] % 3 != 1:
        raise ValueError(f"spline params must have 3K + 1 >= 4 entries, got {params.shape[-1]}")
    if not hi > lo:
        raise ValueError(f"spline range needs hi > lo, got [{lo}, {hi}]")
    if not 0 < min_knot_slope < 1:
        raise ValueError(f"min_knot_slope must be in (0, 1), got {min_knot_slope}")
    k = (params.shape[-1] - 1) // 3
    mb = 1e-4 * (hi - lo) if min_bin_size is None else min_bin_size
    xk = _bin_edges(params[..., :k], lo, hi, mb)
    yk = _bin_edges(params[..., k : 2 * k], lo, hi, mb)
    offset = math.log(math.expm1(1.0 - min_knot_slope))  # softplus(0 + offset) + min = 1
    s = F.softplus(params[..., 2 * k :] + offset) + min_knot_slope
    if boundary == "circular":
        s = torch.cat([s[..., :-1], s[..., :1]], dim=-1)
    elif boundary != "unconstrained":
        raise ValueError(f"boundary must be 'unconstrained' or 'circular', got {boundary!r}")
    return SplineKnots(xk, yk, s)


def _gather(t: Tensor, idx: Tensor) -> Tensor:
    return torch.gather(t, -1, idx.unsqueeze(-1)).squeeze(-1)


def rq_spline(x: Tensor, knots: SplineKnots, inverse: bool = False) -> tuple[Tensor, Tensor]:
    """Apply the spline (or its inverse) elementwise: x [...] with knots [..., K + 1] (same leading shape).

    Returns (y [...], log|dy/dx| [...]); for ``inverse`` the log-derivative of the inverse map at x.
    """
    xk, yk, sk = knots
    edges = yk if inverse else xk  # the knots on the input side
    if edges.shape[:-1] != x.shape:
        raise ValueError(f"spline knots {list(edges.shape)} do not match input {list(x.shape)}")
    lo, hi = edges[..., 0], edges[..., -1]
    below, above = x <= lo, x >= hi
    # bin index in [0, K − 1] from the inner knots
    idx = torch.searchsorted(edges[..., 1:-1].contiguous(), x.detach().unsqueeze(-1).contiguous(), right=True)
    idx = idx.squeeze(-1)
    x0, x1 = _gather(xk, idx), _gather(xk, idx + 1)
    y0, y1 = _gather(yk, idx), _gather(yk, idx + 1)
    d0, d1 = _gather(sk, idx), _gather(sk, idx + 1)
    w, h = x1 - x0, y1 - y0
    delta = h / w
    s_term = d0 + d1 - 2 * delta
    if not inverse:
        xi = ((x - x0) / w).clamp(0.0, 1.0)
    else:  # the root of the rational quadratic in ξ (Durkan et al. 2019, appendix A.3), stable form
        dy = (x - y0).clamp(min=torch.zeros_like(h), max=h)
        a = h * (delta - d0) + dy * s_term
        b = h * d0 - dy * s_term
        c = -delta * dy
        disc = (b * b - 4 * a * c).clamp_min(0.0)
        xi = (2 * c / (-b - torch.sqrt(disc))).nan_to_num(0.0).clamp(0.0, 1.0)
    om = 1 - xi
    denom = delta + s_term * xi * om
    # log dy/dx of the forward map at ξ
    num = d1 * xi * xi + 2 * delta * xi * om + d0 * om * om
    logd = 2 * torch.log(delta) + torch.log(num) - 2 * torch.log(denom)
    if not inverse:
        y = y0 + h * (delta * xi * xi + d0 * xi * om) / denom
        y = torch.where(below, yk[..., 0] + (x - lo) * sk[..., 0], y)
        y = torch.where(above, yk[..., -1] + (x - hi) * sk[..., -1], y)
        logd = torch.where(below, torch.log(sk[..., 0]), torch.where(above, torch.log(sk[..., -1]), logd))
        return y, logd
    y = x0 + w * xi
    y = torch.where(below, xk[..., 0] + (x - lo) / sk[..., 0], y)
    y = torch.where(above, xk[..., -1] + (x - hi) / sk[..., -1], y)
    logd = torch.where(below, -torch.log(sk[..., 0]), torch.where(above, -torch.log(sk[..., -1]), -logd))
    return y, logd
