"""Networks shared by the diffusion-type samplers (iDEM, NEM, BNEM, PIS, DDS).

- ``SinusoidalEmbedding``: the transformer-style sin/cos embedding of a scalar (optionally pre-scaled).
- ``FourierTimeEmbedding``: sin/cos of coeff·t (+ an optional learnable phase) with coeff = linspace(0.1, 100,
  64) (PIS / DDS time).
- ``TimeMLP``: the GMM network of iDEM (DEM's ``MyMLP``): sinusoidal embedding of every coordinate (scale 25)
  and of the time, Linear→GELU, residual GELU blocks, linear read-out.
- ``EGNN``: E(n)-equivariant graph network on a fully connected particle graph (Satorras et al. E_GCL layers
  as used by DEM / en_flows' ``EGNN_dynamics``), the same function and parameters as the straightforward
  layer, computed per node where the algebra allows, in cache-sized chunks, without storing pair activations
  for backward (see ``EGCL``; docs/timing.md).

All modules take flat inputs (``t`` [B], ``x`` [B, dim]) and are device-agnostic
(they follow their parameters).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_T = TypeVar("_T")


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
    """PIS / DDS time features: t [B] -> [B, 2·n] = [sin(c·t + φ), cos(c·t + φ)],
    c = linspace(c_min, c_max, n).

    φ = 0, or with ``learnable_phase`` a trainable phase per frequency initialised N(0, 1) (the
    ``timestep_phase`` of PIS's / BNEM's ``TimeConder``).
    """

    def __init__(self, n: int = 64, c_min: float = 0.1, c_max: float = 100.0,
                 learnable_phase: bool = False) -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"FourierTimeEmbedding needs n >= 1, got {n}")
        self.register_buffer("coeff", torch.linspace(c_min, c_max, n), persistent=False)
        self.phase = nn.Parameter(torch.randn(n)) if learnable_phase else None
        self.out_dim = 2 * n

    def forward(self, t: Tensor) -> Tensor:
        arg = t.reshape(-1, 1) * self.coeff.to(t.dtype)
        if self.phase is not None:
            arg = arg + self.phase
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


# ------------------------------------------------------------------------------------------------ EGNN
# Pair rows (configurations × ordered pairs) processed at once by the edge kernels: the [rows, hidden] pair
# tensors of one chunk (1 MiB at 2048 × 128 float32, one core's L2 on the reference VM) stay in cache between
# the elementwise passes and the two matmuls, instead of streaming [B, n, n, hidden] tensors through memory.
# Measured (docs/timing.md, idle 2-core VM, LJ-13 5 × 128, 1000 samples, no grad): 2048 rows 0.65 s, 4096
# 0.65 s, 8192 0.74 s, 1024 0.69 s; LJ-55 and training agree within a few per cent.
EDGE_CHUNK_ROWS = 2048
# Below this many pair rows (B · n(n−1)) a differentiated forward records the plain autograd graph (pair
# activations stored, ~8 [rows, hidden] tensors per layer: ≤ 100 MB per layer at hidden 128) instead of
# the recomputing Function: at small batches the recomputation and the per-chunk Python cost more than the
# memory saves (DW-4 training at 128 / 512 / 1000 configurations and LJ-13 at 64 / 128 measured 1.1–1.9×
# faster plain; LJ-13 at 256 is the crossover, at 512 the Function is 2.1× faster; docs/timing.md).
STORE_MAX_ROWS = 24576
# with k > 1 torch threads on a CPU, chunks are spread over k worker threads (see _map_chunks)
PARALLEL_CHUNKS = True
N_EDGE_INPUTS = 12  # tensor inputs of _EdgeAggregate: A, Bm, diff, e0 and the eight _EdgeWeights


class _EdgeWeights(NamedTuple):
    """The per-pair parameters of one EGCL in the layout the edge kernels use (views of the parameters).

    w_r, w_e [H]: columns of the first edge Linear acting on |x_i − x_j|² and on the input distance;
    W2 [H, H], b2 [H]: second edge Linear; Wc [H(+1), H]: the coordinate MLP's first Linear with the attention
    Linear stacked under it (the backward's one matmul gives both; the no-grad forward splits row H off);
    bc [H]; batt [1] (None without attention); wc2 [H]: the coordinate MLP's last Linear.
    """

    w_r: Tensor
    w_e: Tensor
    W2: Tensor
    b2: Tensor
    Wc: Tensor
    bc: Tensor
    batt: Tensor | None
    wc2: Tensor


def _silu_backward(grad: Tensor, v: Tensor) -> Tensor:
    """grad · SiLU'(v) in one fused pass."""
    return torch.ops.aten.silu_backward(grad, v)


class _EdgeSpec(NamedTuple):
    jidx: Tensor  # [n, n−1] long: the j ≠ i of each row i, in increasing order
    attention: bool
    tanh: bool
    coords_range: float
    need_h: bool  # whether the aggregated messages are needed (not in a last layer without node outputs)
    chunk: int  # configurations per chunk


def _pre_activation(A: Tensor, Bm: Tensor, r: Tensor, e0: Tensor, w: _EdgeWeights, jidx: Tensor) -> Tensor:
    """u_ij = W_a h_i + b + W_b h_j + w_r r_ij + w_e e_ij for the off-diagonal pairs: [C, n, n−1, H]
    (a fresh tensor; the first edge Linear per node, broadcast over pairs)."""
    C, n, H = Bm.shape
    u = Bm.index_select(1, jidx.reshape(-1)).view(C, n, n - 1, H)  # W_b h_j (index_select: a fast gather)
    u += A.unsqueeze(2)
    u.addcmul_(r.unsqueeze(-1), w.w_r)
    u.addcmul_(e0.unsqueeze(-1), w.w_e)
    return u


def _edge_forward_chunk(
    A: Tensor, Bm: Tensor, diff: Tensor, e0: Tensor, w: _EdgeWeights, spec: _EdgeSpec
) -> tuple[Tensor, Tensor | None]:
    """Aggregated coordinate update [C, n, d] and messages [C, n, H] (or None) of one chunk, without autograd
    (in-place activations)."""
    C, n, H = A.shape
    r = diff.square().sum(-1)
    P = C * n * (n - 1)
    a = F.silu(_pre_activation(A, Bm, r, e0, w, spec.jidx), inplace=True).view(P, H)
    m = F.silu(torch.addmm(w.b2, a, w.W2.t()), inplace=True)
    if spec.attention:
        # an H-wide GEMM and a matrix-vector product for the gate: MKL's (H+1)-wide GEMM measured 3-9 %
        # slower in the whole LJ-13 forward (docs/timing.md)
        y = m @ w.Wc[:H].t()
        s = torch.sigmoid(torch.addmv(w.batt, m, w.Wc[H]))
        q = y.mul_(s.unsqueeze(-1)).add_(w.bc)
    else:
        s = None
        q = (m @ w.Wc.t()).add_(w.bc)
    o = F.silu(q, inplace=True) @ w.wc2
    phi = torch.tanh(o).mul_(spec.coords_range) if spec.tanh else o
    coef = phi.view(C * n, 1, n - 1) / (torch.sqrt(r + 1e-8) + 1.0).view(C * n, 1, n - 1)
    agg_x = torch.bmm(coef, diff.reshape(C * n, n - 1, -1)).view(C, n, -1)
    agg_h = None
    if spec.need_h:
        mv = m.view(C * n, n - 1, H)
        agg_h = torch.bmm(s.view(C * n, 1, n - 1), mv) if s is not None else mv.sum(1, keepdim=True)
        agg_h = agg_h.view(C, n, H)
    return agg_x, agg_h


def _edge_forward_plain(
    A: Tensor, Bm: Tensor, diff: Tensor, e0: Tensor, w: _EdgeWeights, spec: _EdgeSpec
) -> tuple[Tensor, Tensor]:
    """The same function written with out-of-place differentiable ops on the whole batch (used for
    higher-order gradients, e.g. the score of an energy network or a flow's divergence under training)."""
    B, n, H = A.shape
    r = diff.square().sum(-1)
    u = Bm[:, spec.jidx] + A.unsqueeze(2) + r.unsqueeze(-1) * w.w_r + e0.unsqueeze(-1) * w.w_e
    m = F.silu(F.linear(F.silu(u), w.W2, w.b2))
    y = m @ w.Wc.t()
    if spec.attention:
        s = torch.sigmoid(y[..., H] + w.batt)
        q = y[..., :H] * s.unsqueeze(-1) + w.bc
        mh = m * s.unsqueeze(-1)
    else:
        q, mh = y + w.bc, m
    o = F.silu(q) @ w.wc2
    phi = torch.tanh(o) * spec.coords_range if spec.tanh else o
    coef = phi / (torch.sqrt(r + 1e-8) + 1.0)
    agg_x = (diff * coef.unsqueeze(-1)).sum(2)
    agg_h = mh.sum(2) if spec.need_h else A.new_zeros(B, n, 0)
    return agg_x, agg_h


class _EdgeAggregate(torch.autograd.Function):
    """(agg_x, agg_h) = edge block of one EGCL, with a chunked, recomputing backward.

    Forward keeps no pair activations: it saves only its inputs (node tensors, pair distances and
    differences), and backward recomputes each chunk's activations and back-propagates through them by hand
    while they are in cache. Memory per layer is O(B·n·H + B·n²·d) instead of O(B·n²·H), and parameter
    gradients accumulate chunk by chunk. Under ``create_graph`` (a gradient of a gradient) backward instead
    recomputes with the differentiable formulation and lets autograd differentiate it.
    """

    @staticmethod
    def forward(ctx: Any, A: Tensor, Bm: Tensor, diff: Tensor, e0: Tensor, w_r: Tensor,
                w_e: Tensor, W2: Tensor, b2: Tensor, Wc: Tensor, bc: Tensor, batt: Tensor | None,
                wc2: Tensor, spec: _EdgeSpec) -> tuple[Tensor, Tensor]:
        w = _EdgeWeights(w_r, w_e, W2, b2, Wc, bc, batt, wc2)
        agg_x, agg_h = _edge_forward_chunked(A, Bm, diff, e0, w, spec)
        ctx.save_for_backward(A, Bm, diff, e0, w_r, w_e, W2, b2, Wc, bc, batt, wc2)
        ctx.spec = spec
        if not spec.need_h:
            ctx.mark_non_differentiable(agg_h)
        return agg_x, agg_h

    @staticmethod
    def backward(ctx: Any, gx: Tensor, gh: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        spec: _EdgeSpec = ctx.spec
        need = ctx.needs_input_grad[:N_EDGE_INPUTS]
        if torch.is_grad_enabled():  # create_graph=True: differentiable recomputation
            # on fresh aliases of the inputs: autograd.grad w.r.t. an alias counts only the paths through this
            # recomputation (an input may itself depend on another input, e.g. through earlier layers)
            # recomputation (an input may itself depend on another input, e.g. through earlier layers). The
            # recomputed graph is kept with ctx: repeated backward passes through the same forward (an exact
            # divergence takes one per coordinate) reuse it instead of recomputing.
            if getattr(ctx, "recomputed", None) is None:
                alias = [v.view_as(v) if v is not None else None for v in saved]
                ctx.recomputed = (alias, _edge_forward_plain(*alias[:4], _EdgeWeights(*alias[4:]), spec))
            alias, out = ctx.recomputed
            idx = [i for i in range(N_EDGE_INPUTS) if need[i]]
            outs, gouts = [out[0]], [gx]
            if spec.need_h:
                outs.append(out[1])
                gouts.append(gh)
            got = torch.autograd.grad(outs, [alias[i] for i in idx], gouts, create_graph=True,
                                      retain_graph=True, allow_unused=True)
            grads: list[Tensor | None] = [None] * N_EDGE_INPUTS
            for i, g in zip(idx, got):
                grads[i] = g
            return (*grads, None)
        return (*_edge_backward_chunked(saved, gx, gh if spec.need_h else None, spec, need), None)


_MODE = threading.local()


@contextlib.contextmanager
def stored_activations() -> Iterator[None]:
    """Inside this block EGNN layers record the plain autograd graph (pair activations stored) instead of
    the recomputing Function: faster where one forward is differentiated several times or to second order
    (a flow's exact divergence, an energy network's score under ``create_graph``), at O(B·n²·H) memory."""
    prev = getattr(_MODE, "stored", False)
    _MODE.stored = True
    try:
        yield
    finally:
        _MODE.stored = prev


def _chunk_configs(B: int, n: int, x: Tensor) -> int:
    """Configurations per chunk: ``EDGE_CHUNK_ROWS`` pair rows, and at least one chunk per worker thread on a
    CPU (``_map_chunks``); on other devices the whole batch at once."""
    if x.device.type != "cpu":
        return max(1, B)
    c = max(1, EDGE_CHUNK_ROWS // (n * (n - 1)))
    k = torch.get_num_threads()
    if PARALLEL_CHUNKS and k > 1:
        # a multiple of k chunks of near-equal size, so that no worker waits for another's extra chunk
        n_chunks = max(1, -(-B // c))  # chunks of at most c configurations
        n_chunks = k * -(-n_chunks // k)  # rounded up to a multiple of k
        c = max(1, -(-B // n_chunks))
    return c


def _chunks(B: int, c: int) -> list[tuple[int, int]]:
    return [(i, min(B, i + c)) for i in range(0, B, c)]


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _map_chunks(fn: Callable[[tuple[int, int]], _T], chunks: list[tuple[int, int]],
                device: torch.device) -> list[_T]:
    """[fn(c) for c in chunks]; on a CPU with k > 1 torch threads, k worker threads take whole chunks, each
    computing with one torch thread. Chunks write disjoint rows, so the result does not depend on the split;
    there is no synchronisation between threads inside an op, which keeps both cores busy when the machine
    is shared (per-op two-thread parallelism stalls whenever one core is taken by another process)."""
    k = torch.get_num_threads()
    if not PARALLEL_CHUNKS or device.type != "cpu" or k <= 1 or len(chunks) < 2:
        return [fn(c) for c in chunks]
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers != k:
            _POOL = ThreadPoolExecutor(max_workers=k, thread_name_prefix="egnn-chunks")
        pool = _POOL
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def run(c: tuple[int, int]) -> _T:
        # grad and inference modes are thread-local: the workers take the caller's
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn(c)

    torch.set_num_threads(1)
    try:
        return list(pool.map(run, chunks))
    finally:
        torch.set_num_threads(k)


def _edge_forward_chunked(
    A: Tensor, Bm: Tensor, diff: Tensor, e0: Tensor, w: _EdgeWeights, spec: _EdgeSpec
) -> tuple[Tensor, Tensor]:
    B, n, H = A.shape
    agg_x = A.new_empty(B, n, diff.shape[-1])
    agg_h = A.new_empty(B, n, H if spec.need_h else 0)

    def run(c: tuple[int, int]) -> None:
        i, j = c
        ax, ah = _edge_forward_chunk(A[i:j], Bm[i:j], diff[i:j], e0[i:j], w, spec)
        agg_x[i:j] = ax
        if ah is not None:
            agg_h[i:j] = ah

    with torch.no_grad():
        _map_chunks(run, _chunks(B, spec.chunk), A.device)
    return agg_x, agg_h


def _edge_backward_chunked(
    saved: tuple[Tensor, ...], gx: Tensor, gh: Tensor | None, spec: _EdgeSpec, need: tuple[bool, ...]
) -> list[Tensor | None]:
    """Hand-written backward of the edge block, chunk by chunk (first-order gradients only)."""
    A, Bm, diff, e0 = saved[:4]
    w = _EdgeWeights(*saved[4:])
    B, n, H = A.shape
    d = diff.shape[-1]
    k = n - 1
    jflat = spec.jidx.reshape(-1)
    gA = torch.zeros_like(A) if need[0] else None
    gB = torch.zeros_like(Bm) if need[1] else None
    gdiff = torch.empty_like(diff) if need[2] else None
    ge0 = torch.empty_like(e0) if need[3] else None
    cr = spec.coords_range

    def chunk_backward(c: tuple[int, int]) -> list[Tensor | None]:
        """Writes this chunk's rows of the input gradients; returns its parameter gradients."""
        i0, i1 = c
        C = i1 - i0
        gw_r = torch.zeros_like(w.w_r)
        gw_e = torch.zeros_like(w.w_e)
        gW2 = torch.zeros_like(w.W2)
        gb2 = torch.zeros_like(w.b2)
        gWc = torch.zeros_like(w.Wc)
        gbc = torch.zeros_like(w.bc)
        gbatt = torch.zeros_like(w.batt) if w.batt is not None else None
        gwc2 = torch.zeros_like(w.wc2)
        P = C * n * k
        ec, dc = e0[i0:i1], diff[i0:i1]
        rc = dc.square().sum(-1)
        # ---- recompute the chunk's activations
        u = _pre_activation(A[i0:i1], Bm[i0:i1], rc, ec, w, spec.jidx).view(P, H)
        a = F.silu(u)
        z = torch.addmm(w.b2, a, w.W2.t())
        m = F.silu(z)
        y = m @ w.Wc.t()
        if spec.attention:
            s = torch.sigmoid(y[:, H] + w.batt)
            yc = y[:, :H]
            q = torch.addcmul(w.bc, yc, s.unsqueeze(-1))
        else:
            s, yc = None, y
            q = y + w.bc
        c = F.silu(q)
        o = c @ w.wc2
        th = torch.tanh(o) if spec.tanh else o
        phi = th * cr if spec.tanh else th
        sq = torch.sqrt(rc + 1e-8).reshape(P)
        den = sq + 1.0
        coef = phi / den
        # ---- coordinate aggregation: agg_x_i = Σ_j coef_ij diff_ij
        gxc = gx[i0:i1].reshape(C * n, d, 1)
        dcoef = torch.bmm(dc.reshape(C * n, k, d), gxc).reshape(P)
        dphi = dcoef / den
        dr_den = -(dcoef * coef / den) * 0.5 / sq  # through 1 / (sqrt(r + 1e-8) + 1)
        do = dphi * cr * (1.0 - th * th) if spec.tanh else dphi
        gwc2.addmv_(c.t(), do)
        dq = _silu_backward(torch.outer(do, w.wc2), q)
        gbc += dq.sum(0)
        if s is not None:
            ds = (dq * yc).sum(-1)
            dy = torch.empty(P, H + 1, dtype=m.dtype, device=m.device)
            torch.mul(dq, s.unsqueeze(-1), out=dy[:, :H])
        else:
            dy = dq
        mv = m.view(C * n, k, H)
        if gh is not None:
            ghc = gh[i0:i1].reshape(C * n, H, 1)
            if s is not None:
                ds += torch.bmm(mv, ghc).reshape(P)
        if s is not None:
            dya = ds * s * (1.0 - s)
            dy[:, H] = dya
            gbatt += dya.sum().reshape(gbatt.shape)
        gWc.addmm_(dy.t(), m)
        dm = dy @ w.Wc
        if gh is not None:  # agg_h_i = Σ_j s_ij m_ij
            if s is not None:
                dm.view(C, n, k, H).addcmul_(gh[i0:i1].unsqueeze(2), s.view(C, n, k, 1))
            else:
                dm.view(C, n, k, H).add_(gh[i0:i1].unsqueeze(2))
        dz = _silu_backward(dm, z)
        gW2.addmm_(dz.t(), a)
        gb2 += dz.sum(0)
        du = _silu_backward(dz @ w.W2, u)
        gw_r.addmv_(du.t(), rc.reshape(P))
        gw_e.addmv_(du.t(), ec.reshape(P))
        du4 = du.view(C, n, k, H)
        if gA is not None:
            gA[i0:i1] = du4.sum(2)
        if gB is not None:
            gB[i0:i1].index_add_(1, jflat, du.view(C, n * k, H))
        if gdiff is not None:  # through coef·diff and through r = |diff|²
            gr = (du @ w.w_r + dr_den).view(C, n, k, 1)
            gdiff[i0:i1] = torch.addcmul(coef.view(C, n, k, 1) * gx[i0:i1].unsqueeze(2), gr, dc, value=2.0)
        if ge0 is not None:
            ge0[i0:i1] = (du @ w.w_e).view(C, n, k)
        return [gw_r, gw_e, gW2, gb2, gWc, gbc, gbatt, gwc2]

    with torch.no_grad():
        parts = _map_chunks(chunk_backward, _chunks(B, spec.chunk), A.device)
    wgrads: list[Tensor | None] = []
    for idx, first in enumerate(parts[0]):
        if first is None or not need[4 + idx]:
            wgrads.append(None)
            continue
        total = first
        for part in parts[1:]:
            total += part[idx]
        wgrads.append(total)
    return [gA, gB, gdiff, ge0, *wgrads]


class EGCL(nn.Module):
    """One E(n)-equivariant graph convolution layer on a fully connected graph (no self-edges).

    Edge message m_ij = SiLU(W2 SiLU(W1 [h_i, h_j, |x_i − x_j|², a_ij])) (× sigmoid attention gate);
    coordinates x_i += Σ_j (x_i − x_j)/(|x_i − x_j| + 1) · coords_range · tanh(φ(m_ij));
    nodes h_i += MLP([h_i, Σ_j m_ij]) (recurrent).

    Parameters (and state_dict keys) are those of the straightforward layer; the computation is reorganised
    without changing the function (equal to float rounding, tested against an edge-list formulation):

    - the first edge Linear is applied per node, W1[h_i; h_j; r; a] = (W_a h_i + b) + W_b h_j + w_r r + w_e a,
      and broadcast over the n(n−1) off-diagonal pairs (no [B, n, n, 2H + 2] concatenation, no self-edges);
    - W_c(s·m) = s·(W_c m), so the coordinate MLP's first Linear acts on m once per pair; with autograd the
      attention Linear is stacked under it (one matmul serves both), without autograd the gate is a
      matrix-vector product beside an H-wide matmul; Σ_j s_ij m_ij is a batched matrix product;
    - pairs are processed in cache-sized chunks of configurations (``EDGE_CHUNK_ROWS``); without autograd
      activations are updated in place; with autograd a custom Function stores no pair activations and
      recomputes them chunk by chunk in backward (see ``_EdgeAggregate``), except for small batches
      (``STORE_MAX_ROWS`` pair rows or fewer), where the plain graph with stored activations is faster.
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

    def edge_weights(self) -> _EdgeWeights:
        H = self.edge_mlp[1].weight.shape[0]
        w1 = self.edge_in.weight
        wc = self.coord_mlp[0].weight
        if self.att is not None:
            wc = torch.cat([wc, self.att.weight], dim=0)
        return _EdgeWeights(
            w_r=w1[:, 2 * H], w_e=w1[:, 2 * H + 1], W2=self.edge_mlp[1].weight, b2=self.edge_mlp[1].bias,
            Wc=wc, bc=self.coord_mlp[0].bias, batt=self.att.bias if self.att is not None else None,
            wc2=self.coord_mlp[2].weight.reshape(-1),
        )

    def forward(self, h: Tensor, x: Tensor, edge_attr: Tensor, jidx: Tensor,
                need_h: bool = True) -> tuple[Tensor, Tensor]:
        """h [B, n, H], x [B, n, d], edge_attr [B, n, n−1] (squared input distances of the off-diagonal
        pairs, ordered as ``jidx`` [n, n−1]). ``need_h`` False skips the node update (returns h unchanged)."""
        B, n, H = h.shape
        w1 = self.edge_in.weight
        h2 = h.reshape(B * n, H)
        A = torch.addmm(self.edge_in.bias, h2, w1[:, :H].t()).view(B, n, H)
        Bm = (h2 @ w1[:, H : 2 * H].t()).view(B, n, H)
        diff = x.unsqueeze(2) - x[:, jidx]  # [B, n, n−1, d]: x_i − x_j
        spec = _EdgeSpec(jidx, self.attention, self.tanh, self.coords_range, need_h, _chunk_configs(B, n, x))
        w = self.edge_weights()
        tracked = (A, Bm, diff, edge_attr, *(p for p in w if p is not None))
        if torch.is_grad_enabled() and any(v.requires_grad for v in tracked):
            if getattr(_MODE, "stored", False) or B * n * (n - 1) <= STORE_MAX_ROWS:
                agg_x, agg_h = _edge_forward_plain(A, Bm, diff, edge_attr, w, spec)
            else:
                agg_x, agg_h = _EdgeAggregate.apply(A, Bm, diff, edge_attr, *w, spec)
        else:
            agg_x, agg_h = _edge_forward_chunked(A, Bm, diff, edge_attr, w, spec)
        if self.agg == "mean":
            agg_x = agg_x / (n - 1)
            agg_h = agg_h / (n - 1)
        x = x + agg_x
        if need_h:
            h = h + self.node_mlp(torch.cat([h, agg_h], dim=-1))
        return h, x


class EGNN(nn.Module):
    """E(n)-equivariant network for n particles in d dimensions (DEM / en_flows ``EGNN_dynamics``).

    forward(t [B], x [B, n·d]) -> [B, n·d]: the displacement x_out − x with the particle mean removed
    (rotation/permutation equivariant, translation invariant). Node features start from h = t.
    forward_with_features(t, x) -> (vel [B, n·d], h_out [B, n, out_node_features]): invariant node outputs.
    See ``EGCL`` for how the layers are computed (fast paths with and without autograd).
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
        n = n_particles
        jidx = torch.tensor([[j for j in range(n) if j != i] for i in range(n)], dtype=torch.long)
        self.register_buffer("jidx", jidx, persistent=False)

    def forward_with_features(self, t: Tensor | float, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.ndim != 2 or x.shape[1] != self.n * self.d:
            raise ValueError(f"EGNN expects x of shape [B, {self.n * self.d}], got {list(x.shape)}")
        B = x.shape[0]
        t = _as_batch_time(t, x)
        pos0 = x.reshape(B, self.n, self.d)
        pos = pos0
        jidx = self.jidx
        edge_attr = (pos.unsqueeze(2) - pos[:, jidx]).square().sum(-1)  # [B, n, n−1]
        h = self.embedding(t.reshape(B, 1, 1).expand(B, self.n, 1))
        last = len(self.layers) - 1
        for k, layer in enumerate(self.layers):
            h, pos = layer(h, pos, edge_attr, jidx, need_h=k < last or self.embedding_out is not None)
        vel = pos - pos0
        vel = vel - vel.mean(dim=1, keepdim=True)
        h_out = self.embedding_out(h) if self.embedding_out is not None else h.new_zeros(B, self.n, 0)
        return vel.reshape(B, self.n * self.d), h_out

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        return self.forward_with_features(t, x)[0]
