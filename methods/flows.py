"""Normalising flows for FAB: a RealNVP coupling flow (GMM-40) and an E(n)-equivariant continuous flow
(particle targets).

Both expose the same small interface used by ``methods.ais`` and ``methods.fab``::

    x, log_q = flow.sample_and_log_prob(n, generator)   # [n, dim], [n]
    log_q = flow.log_prob(x)                            # [n]   (differentiable in x and in the parameters)

``RealNVP`` (Dinh et al. 2017; the fab-torch GMM flow layout): a diagonal Gaussian base with trainable mean
and log-scale, then ``n_layers`` × [affine coupling block (exp scale, MLP [⌈d/2⌉, w, w, 2⌊d/2⌋] with a
zero-initialised last layer) → LU-parametrised invertible linear map]. Because every last layer starts at zero
the coupling blocks start as the identity; the linear maps start as random rotations (|det| = 1).

``EquivariantCNF``: a continuous normalising flow dx/dt = v(t, x) with an E(n)-equivariant vector field (an
EGNN, centred output) on centred particle coordinates; the base is the mean-free Gaussian over the
(n − 1)·d degrees of freedom. log q is integrated with a fixed-step RK4 scheme together with the divergence
of v (exact by one backward pass per coordinate for small dims, Hutchinson otherwise). Being a fixed-step
discretisation, the map is invertible only up to the integration error (tested); see docs/fab.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from methods.nets import stored_activations

__all__ = ["MLP", "AffineCoupling", "InvertibleLinearLU", "RealNVP", "MeanFreeGaussian", "EquivariantCNF"]


class MLP(nn.Module):
    """Plain MLP [in, hidden..., out] with ReLU between layers; ``zero_last`` zero-initialises the output."""

    def __init__(self, sizes: list[int], zero_last: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)
        if zero_last:
            last = self.net[-1]
            assert isinstance(last, nn.Linear)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class AffineCoupling(nn.Module):
    """Affine coupling: the first ``d1 = ⌈d/2⌉`` coordinates condition an exp-scale and shift of the rest.

    forward (base → data): y2 = x2 · exp(s(x1)) + t(x1), log|det| = Σ s.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        if dim < 2:
            raise ValueError(f"AffineCoupling needs dim >= 2, got {dim}")
        self.d1 = (dim + 1) // 2
        self.d2 = dim - self.d1
        self.net = MLP([self.d1, hidden, hidden, 2 * self.d2], zero_last=True)

    def _st(self, x1: Tensor) -> tuple[Tensor, Tensor]:
        h = self.net(x1)
        return h[..., : self.d2], h[..., self.d2 :]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x1, x2 = x[..., : self.d1], x[..., self.d1 :]
        s, t = self._st(x1)
        return torch.cat([x1, x2 * torch.exp(s) + t], dim=-1), s.sum(-1)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        y1, y2 = y[..., : self.d1], y[..., self.d1 :]
        s, t = self._st(y1)
        return torch.cat([y1, (y2 - t) * torch.exp(-s)], dim=-1), -s.sum(-1)


class InvertibleLinearLU(nn.Module):
    """y = x Wᵀ with W = P L U (P a fixed permutation, L unit lower, U upper with diag sign · exp(log_s)).

    Initialised from the QR decomposition of a random matrix (a rotation or reflection), as Glow's 1×1
    convolutions; log|det W| = Σ log_s.
    """

    def __init__(
        self, dim: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        a = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        q, _ = torch.linalg.qr(a)
        p, lower, upper = torch.linalg.lu(q)
        diag = torch.diagonal(upper)
        self.register_buffer("perm", p.to(dtype))
        self.register_buffer("sign", torch.sign(diag).to(dtype))
        self.register_buffer("lmask", torch.tril(torch.ones(dim, dim, dtype=dtype), -1))
        self.lower = nn.Parameter(lower.to(dtype))
        self.upper = nn.Parameter(torch.triu(upper, 1).to(dtype))
        self.log_s = nn.Parameter(torch.log(diag.abs()).to(dtype))

    def weight(self) -> Tensor:
        eye = torch.eye(self.lower.shape[0], dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower * self.lmask + eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign * torch.exp(self.log_s))
        return self.perm @ lower @ upper

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x @ self.weight().T, self.log_s.sum().expand(x.shape[0])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        # solve W x = y for each row: x = W^{-1} y
        x = torch.linalg.solve(self.weight(), y.T).T
        return x, (-self.log_s.sum()).expand(y.shape[0])


class RealNVP(nn.Module):
    """RealNVP coupling flow on R^dim with a trainable diagonal Gaussian base.

    Args:
        dim: dimension (≥ 2).
        n_layers: number of (coupling, invertible linear) pairs (fab-torch GMM: 15).
        hidden: MLP width (fab-torch GMM: 80 = 40 per dimension × 2).
        base_scale: initial std of the base in the flow's coordinates (fab-torch: 1.0).
        generator: CPU generator for the random rotations (network weights use torch's default init, so
            build the flow under a seeded ``torch.random.fork_rng`` for reproducibility).
        dtype: parameter dtype (built in it, so that the initial rotations are orthogonal to its precision).
    """

    exact_sample_log_prob = True

    def __init__(
        self,
        dim: int,
        n_layers: int = 15,
        hidden: int = 80,
        base_scale: float = 1.0,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if dim < 2 or n_layers < 1 or hidden < 1 or base_scale <= 0:
            raise ValueError(
                f"RealNVP needs dim >= 2, n_layers >= 1, hidden >= 1, base_scale > 0; "
                f"got dim={dim}, n_layers={n_layers}, hidden={hidden}, base_scale={base_scale}"
            )
        self.dim = dim
        self.base_loc = nn.Parameter(torch.zeros(dim, dtype=dtype))
        self.base_log_scale = nn.Parameter(torch.full((dim,), math.log(base_scale), dtype=dtype))
        layers: list[nn.Module] = []
        for _ in range(n_layers):
            layers.append(AffineCoupling(dim, hidden).to(dtype))
            layers.append(InvertibleLinearLU(dim, generator, dtype))
        self.layers = nn.ModuleList(layers)

    # --------------------------------------------------------------- base distribution
    def base_log_prob(self, z: Tensor) -> Tensor:
        u = (z - self.base_loc) * torch.exp(-self.base_log_scale)
        return -0.5 * (u**2).sum(-1) - self.base_log_scale.sum() - 0.5 * self.dim * math.log(2 * math.pi)

    def _param(self) -> Tensor:
        return self.base_loc

    # --------------------------------------------------------------- transforms
    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Base → data: (x [B, dim], log|det ∂x/∂z| [B])."""
        logdet = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        x = z
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Data → base: (z [B, dim], log|det ∂z/∂x| [B])."""
        logdet = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        z = x
        for layer in reversed(self.layers):
            z, ld = layer.inverse(z)
            logdet = logdet + ld
        return z, logdet

    def log_prob(self, x: Tensor) -> Tensor:
        """log q(x): [B, dim] -> [B]."""
        z, logdet = self.inverse(x)
        return self.base_log_prob(z) + logdet

    def sample_and_log_prob(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n samples [n, dim] and their log q [n] (one forward pass)."""
        p = self._param()
        eps = torch.randn(n, self.dim, generator=generator, dtype=p.dtype, device=p.device)
        z = self.base_loc + torch.exp(self.base_log_scale) * eps
        x, logdet = self.forward(z)
        return x, self.base_log_prob(z) - logdet

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.sample_and_log_prob(n, generator)[0]


# ===================================================================== particle flow


class MeanFreeGaussian:
    """Isotropic Gaussian restricted to centred configurations of n particles in d dims.

    Density over the (n − 1)·d-dimensional subspace: log N = −|x|²/(2σ²) − (n−1)d/2 · log(2πσ²), x centred.
    """

    def __init__(self, n_particles: int, spatial_dim: int, scale: float = 1.0) -> None:
        if n_particles < 2 or spatial_dim < 1 or scale <= 0:
            raise ValueError(
                f"MeanFreeGaussian needs n_particles >= 2, spatial_dim >= 1, scale > 0; got "
                f"{n_particles}, {spatial_dim}, {scale}"
            )
        self.n, self.d, self.scale = n_particles, spatial_dim, scale
        self.dof = (n_particles - 1) * spatial_dim

    def center(self, x: Tensor) -> Tensor:
        p = x.reshape(*x.shape[:-1], self.n, self.d)
        return (p - p.mean(-2, keepdim=True)).reshape(x.shape)

    def log_prob(self, x: Tensor) -> Tensor:
        return -0.5 * (x**2).sum(-1) / self.scale**2 - 0.5 * self.dof * math.log(2 * math.pi * self.scale**2)

    def sample(
        self, n: int, generator: torch.Generator | None, dtype: torch.dtype, device: torch.device
    ) -> Tensor:
        eps = torch.randn(n, self.n * self.d, generator=generator, dtype=dtype, device=device)
        return self.center(eps) * self.scale


class IsotropicGaussian:
    """N(0, σ² I) on R^dim with the interface of ``MeanFreeGaussian`` (``center`` is the identity): the base
    of a continuous flow on a non-particle target."""

    def __init__(self, dim: int, scale: float = 1.0) -> None:
        if dim < 1 or scale <= 0:
            raise ValueError(f"IsotropicGaussian needs dim >= 1, scale > 0; got {dim}, {scale}")
        self.dim, self.scale, self.dof = dim, scale, dim

    def center(self, x: Tensor) -> Tensor:
        return x

    def log_prob(self, x: Tensor) -> Tensor:
        return -0.5 * (x**2).sum(-1) / self.scale**2 - 0.5 * self.dof * math.log(2 * math.pi * self.scale**2)

    def sample(
        self, n: int, generator: torch.Generator | None, dtype: torch.dtype, device: torch.device
    ) -> Tensor:
        return torch.randn(n, self.dim, generator=generator, dtype=dtype, device=device) * self.scale


VectorField = Callable[[Tensor, Tensor], Tensor]


class EquivariantCNF(nn.Module):
    """Continuous flow dx/dt = v(t, x), t: 0 (base) → 1 (data), on centred particle coordinates.

    Args:
        field: an ``nn.Module`` with ``forward(t [B], x [B, n·d]) -> [B, n·d]`` (E(n)-equivariant, centred).
        n_particles, spatial_dim: particle layout.
        n_steps: RK4 steps on [0, 1].
        base_scale: std of the mean-free Gaussian base.
        divergence: "exact" (one backward pass per coordinate), "hutchinson" (one Rademacher probe per
            evaluation — an unbiased but noisy log q), or "auto" (exact for dim ≤ 64).

    ``log_prob`` integrates backwards from x to the base. It is differentiable in x (so HMC can use
    ∇ log q) at the price of double back-propagation.

    Options (used by ``fab@bnem``, BNEM's FFJORD flow):
    - ``n_particles=None``: a non-particle flow on R^spatial_dim with an isotropic Gaussian base (``field``
      e.g. ``methods.nets.TimeMLP``).
    - ``coord_scale`` s: the flow lives on y = x/s (BNEM's GMM-40: its data normalisation 50);
      log q(x) = log q_y(x/s) − dof·log s.
    - ``centre=False``: the density of a particle flow is not restricted to centred x. With a centred field
      the centre of mass c is carried unchanged to the base, so log q(x) = log q(x − c) − n|c|²/(2σ²): the
      density of BNEM's flow (its ``MeanFreePrior.log_prob`` does not centre) on uncentred AIS proposals.
    - ``sample_steps``: RK4 steps of the sampling integration (None: ``n_steps``). BNEM samples with one RK4
      step in training mode while its log q integrates 24; ``log_prob`` always uses ``n_steps``.
    - ``rk="3/8"``: Kutta's 3/8-rule RK4 (torchdiffeq's ``rk4``) instead of the classic one.
    - ``probe="gaussian_fixed"``: Hutchinson with one uncentred N(0, I) probe per integration (FFJORD's
      ``before_odeint``) instead of a fresh centred Rademacher probe per field evaluation.
    """

    #: the log q returned with samples (forward integration) equals ``log_prob`` (backward integration) only
    #: up to the RK4 error
    exact_sample_log_prob = False

    def __init__(
        self,
        field: nn.Module,
        n_particles: int | None,
        spatial_dim: int,
        n_steps: int = 10,
        base_scale: float = 1.0,
        divergence: str = "auto",
        coord_scale: float = 1.0,
        centre: bool = True,
        sample_steps: int | None = None,
        rk: str = "classic",
        probe: str = "rademacher",
    ) -> None:
        super().__init__()
        if rk not in ("classic", "3/8") or probe not in ("rademacher", "gaussian_fixed"):
            raise ValueError(f"rk must be 'classic' or '3/8', probe 'rademacher' or 'gaussian_fixed'; got "
                             f"{rk!r}, {probe!r}")
        self.rk, self.probe = rk, probe
        if divergence not in ("exact", "hutchinson", "auto"):
            raise ValueError(f"divergence must be 'exact', 'hutchinson' or 'auto', got {divergence!r}")
        if n_steps < 1 or (sample_steps is not None and sample_steps < 1):
            raise ValueError(f"n_steps and sample_steps must be >= 1, got {n_steps}, {sample_steps}")
        if coord_scale <= 0:
            raise ValueError(f"coord_scale must be > 0, got {coord_scale}")
        self.field = field
        self.base: MeanFreeGaussian | IsotropicGaussian
        if n_particles is None:
            self.base = IsotropicGaussian(spatial_dim, base_scale)
            self.dim = spatial_dim
        else:
            self.base = MeanFreeGaussian(n_particles, spatial_dim, base_scale)
            self.dim = n_particles * spatial_dim
        self.n_steps = n_steps
        self.sample_steps = sample_steps
        self.coord_scale = float(coord_scale)
        self.centre = centre
        # log|dy/dx| on the space the density lives on (the centred slice, or all of R^dim without centring)
        self._log_jac = -(self.base.dof if centre else self.dim) * math.log(self.coord_scale)
        self.exact = divergence == "exact" or (divergence == "auto" and self.dim <= 64)
        self._probe_gen: torch.Generator | None = None

    def _param(self) -> Tensor:
        return next(self.parameters())

    def set_probe_generator(self, generator: torch.Generator | None) -> None:
        """Generator for the Hutchinson probes (default: torch's global generator)."""
        self._probe_gen = generator

    def _v_and_div(
        self, t: float, x: Tensor, create_graph: bool, probe: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """v(t, x) [B, D] and its divergence [B]; the graph is kept when ``create_graph``. Hutchinson uses
        ``probe`` if given (a probe fixed over one integration), else a fresh centred Rademacher probe."""
        with torch.enable_grad():
            xin = x if x.requires_grad else x.detach().requires_grad_(True)
            tt = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
            with stored_activations():  # an EGNN field is differentiated once per coordinate / twice
                v = self.field(tt, xin)
            if self.exact:
                div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
                for i in range(self.dim):
                    (g,) = torch.autograd.grad(
                        v[:, i].sum(), xin, create_graph=create_graph, retain_graph=True
                    )
                    div = div + g[:, i]
            elif probe is not None:
                eps = probe
                (g,) = torch.autograd.grad((v * eps).sum(), xin, create_graph=create_graph, retain_graph=True)
                div = (g * eps).sum(-1)
            else:
                eps = (
                    torch.randint(0, 2, x.shape, generator=self._probe_gen, device=x.device).to(x.dtype) * 2
                    - 1
                )
                eps = self.base.center(eps)
                (g,) = torch.autograd.grad((v * eps).sum(), xin, create_graph=create_graph, retain_graph=True)
                div = (g * eps).sum(-1)
        if not create_graph:
            v, div = v.detach(), div.detach()
        return v, div

    def _ctr(self, x: Tensor) -> Tensor:
        return self.base.center(x) if self.centre else x

    def _integrate(
        self, x: Tensor, forward: bool, create_graph: bool, n_steps: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """RK4 from t=0→1 (forward) or 1→0 in ``n_steps`` (default ``self.n_steps``) steps; returns
        (x_end, ∫ div v dt along the path, signed with dt)."""
        steps = self.n_steps if n_steps is None else n_steps
        h = 1.0 / steps
        dt = h if forward else -h
        t = 0.0 if forward else 1.0
        acc = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        pr: Tensor | None = None
        if self.probe == "gaussian_fixed" and not self.exact:  # FFJORD: one N(0, I) probe per integration
            pr = torch.randn(x.shape, generator=self._probe_gen, dtype=x.dtype, device=x.device)
        if self.rk == "3/8":  # torchdiffeq's "rk4" (rk4_alt_step_func), as BNEM's FFJORD integrates
            for _ in range(steps):
                k1, d1 = self._v_and_div(t, x, create_graph, pr)
                k2, d2 = self._v_and_div(t + dt / 3, x + dt / 3 * k1, create_graph, pr)
                k3, d3 = self._v_and_div(t + 2 * dt / 3, x + dt * (k2 - k1 / 3), create_graph, pr)
                k4, d4 = self._v_and_div(t + dt, x + dt * (k1 - k2 + k3), create_graph, pr)
                x = x + dt / 8 * (k1 + 3 * k2 + 3 * k3 + k4)
                acc = acc + dt / 8 * (d1 + 3 * d2 + 3 * d3 + d4)
                t = t + dt
            return x, acc
        for _ in range(steps):
            k1, d1 = self._v_and_div(t, x, create_graph)
            k2, d2 = self._v_and_div(t + dt / 2, x + dt / 2 * k1, create_graph)
            k3, d3 = self._v_and_div(t + dt / 2, x + dt / 2 * k2, create_graph)
            k4, d4 = self._v_and_div(t + dt, x + dt * k3, create_graph)
            x = x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            acc = acc + dt / 6 * (d1 + 2 * d2 + 2 * d3 + d4)
            t = t + dt
        return x, acc

    def log_prob(self, x: Tensor) -> Tensor:
        """log q(x) [B] for centred x [B, n·d] (differentiable in x and the parameters)."""
        create_graph = torch.is_grad_enabled()
        y = x / self.coord_scale if self.coord_scale != 1.0 else x
        y = self._ctr(y)
        z, acc = self._integrate(y, forward=False, create_graph=create_graph)
        # d log q / dt = −div v  ⇒  log q1(x) = log q0(z) − ∫_0^1 div dt = log q0(z) + acc
        # (acc integrates from 1 to 0)
        return self.base.log_prob(self._ctr(z)) + acc + self._log_jac

    def sample_and_log_prob(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        p = self._param()
        z = self.base.sample(n, generator, p.dtype, p.device)
        create_graph = torch.is_grad_enabled()
        y, acc = self._integrate(z, forward=True, create_graph=create_graph, n_steps=self.sample_steps)
        x = self.base.center(y)
        if self.coord_scale != 1.0:
            x = x * self.coord_scale
        return x, self.base.log_prob(z) - acc + self._log_jac

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        with torch.no_grad():
            return self.sample_and_log_prob(n, generator)[0]
