"""Target interface: a Boltzmann density p(x) ∝ exp(−E(x)) at kT = 1.

Conventions (see docs/architecture.md):
- ``energy`` returns E(x) (never a log-density); ``log_prob`` = −E.
- Samples are flat ``[batch, dim]`` tensors; particle targets also expose ``[batch, n, d]`` views.
- Every public entry point validates its input and raises ``ValueError`` naming what is wrong.
- The public entry points (``energy``, ``energy_and_grad``, ``log_prob``, ``score``, ``laplacian``,
  ``interatomic_distances``) accept a torch tensor *or* a NumPy array: NumPy in, NumPy out (float64 unless
  the input is float32; integer arrays are converted to float64), and a single configuration ``[dim]`` as
  NumPy gives a scalar energy / a ``[dim]`` gradient.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor


def _all_finite(x: Tensor) -> bool:
    """Whether a non-empty floating tensor has no NaN or inf, cheaply on the hot path of every energy call: a
    sum is finite only if every term is, so a finite sum decides in one vectorised pass; only a non-finite sum
    (a NaN/inf entry, or an overflow of finite ones) takes the exact elementwise test."""
    if not x.is_contiguous() and x.ndim == 2 and x.t().is_contiguous():
        x = x.t()  # coordinate planes: reduce in memory order (a strided reduction is ~10x slower)
    if bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


class NonFiniteInputError(ValueError):
    """An energy was asked for at a configuration containing NaN or inf (a diverged sampler)."""


class Target(ABC):
    """Base class of all targets. Subclasses set the class attributes and implement ``_energy``."""

    name: ClassVar[str]
    display_name: ClassVar[str]
    dim: int
    n_particles: int | None = None
    spatial_dim: int | None = None
    length_scale: float = 1.0
    #: splits available from ``reference``
    splits: ClassVar[tuple[str, ...]] = ("test", "val")

    # ------------------------------------------------------------------ validation
    def check_input(self, x: Tensor) -> Tensor:
        """Validate a batch of configurations: a floating tensor of shape [B, dim], finite."""
        if not isinstance(x, Tensor):
            raise ValueError(
                f"{self.name}: expected a torch.Tensor or NumPy array of shape [batch, {self.dim}], "
                f"got {type(x)}"
            )
        if x.ndim != 2 or x.shape[-1] != self.dim:
            raise ValueError(
                f"{self.name}: expected shape [batch, {self.dim}], got {list(x.shape)}"
                + (" (flatten particles with x.reshape(B, -1))" if x.ndim == 3 else "")
            )
        if not x.is_floating_point():
            raise ValueError(f"{self.name}: expected a floating-point tensor, got dtype {x.dtype}")
        if x.numel() and not _all_finite(x):
            raise NonFiniteInputError(f"{self.name}: input contains NaN or inf")
        return x

    # ------------------------------------------------------------------ NumPy in, NumPy out
    def _as_tensor(self, x: Any) -> tuple[Any, str | None]:
        """(tensor, how to convert the result back): None for tensors, "batch" / "single" for NumPy."""
        if isinstance(x, Tensor) or not isinstance(x, (np.ndarray, np.generic)):
            return x, None
        a = np.asarray(x)
        if a.dtype.kind in "iub":
            a = a.astype(np.float64)
        elif a.dtype.kind != "f":
            raise ValueError(f"{self.name}: expected a floating-point array, got dtype {a.dtype}")
        single = a.ndim == 1 and a.shape[0] == self.dim
        t = torch.from_numpy(np.ascontiguousarray(a[None] if single else a))
        return t, ("single" if single else "batch")

    @staticmethod
    def _back(y: Any, how: str | None) -> Any:
        if how is None:
            return y
        if isinstance(y, tuple):
            return tuple(Target._back(v, how) for v in y)
        a = y.detach().cpu().numpy()
        return a[0] if how == "single" else a

    # ------------------------------------------------------------------ energies
    @abstractmethod
    def _energy(self, x: Tensor) -> Tensor:
        """E(x) for validated x [B, dim] -> [B]; differentiable torch ops only."""

    def _energy_and_grad(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Default: autograd. Families override with analytic forces."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            e = self._energy(xg)
            (g,) = torch.autograd.grad(e.sum(), xg)
        return e.detach(), g

    def energy(self, x: Tensor) -> Tensor:
        """E(x): [B, dim] -> [B] (dimensionless, kT = 1). Differentiable if x requires grad. NumPy arrays are
        accepted too (NumPy result)."""
        x, how = self._as_tensor(x)
        if how is not None:
            with torch.no_grad():
                return self._back(self._energy(self.check_input(x)), how)
        return self._energy(self.check_input(x))

    def energy_and_grad(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(E(x) [B], ∇E(x) [B, dim]), detached from any graph (NumPy in, NumPy out)."""
        x, how = self._as_tensor(x)
        return self._back(self._energy_and_grad(self.check_input(x)), how)

    def _laplacian(self, x: Tensor) -> Tensor:
        """Default: exact trace of the autograd Hessian (dim backward passes). Families override."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self._energy(xg).sum(), xg, create_graph=True)
            lap = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
            for k in range(x.shape[1]):
                (h,) = torch.autograd.grad(g[:, k].sum(), xg, retain_graph=True)
                lap = lap + h[:, k]
        return lap.detach()

    def laplacian(self, x: Tensor) -> Tensor:
        """ΔE(x) = tr ∇²E(x): [B, dim] -> [B] (for the temperature check β̂ = E[ΔE] / E[|∇E|²])."""
        x, how = self._as_tensor(x)
        return self._back(self._laplacian(self.check_input(x)), how)

    def log_prob(self, x: Tensor) -> Tensor:
        """Unnormalised log-density −E(x) [B] (GMM-40: normalised)."""
        return -self.energy(x)

    def score(self, x: Tensor) -> Tensor:
        """∇ log p(x) = −∇E(x) [B, dim]."""
        return -self.energy_and_grad(x)[1]

    # ------------------------------------------------------------------ reference samples
    def reference(self, split: str = "test", n: int | None = None, source: str | None = None) -> Tensor:
        """Reference samples [N, dim] (float32, CPU, centred for particle targets). ``n`` takes the first n.

        ``source`` forces "published", "generated" or "exact" (default: the first available; see
        targets/reference.py)."""
        from targets import reference_data as _ref

        return _ref.load_reference(self, split, n, source)

    def reference_info(self, split: str = "test", source: str | None = None) -> dict[str, Any]:
        """Provenance of a reference split: source (published / generated / exact), file, sha256, ..."""
        from targets import reference_data as _ref

        return _ref.reference_info(self, split, source)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"


class ParticleTarget(Target):
    """n particles in d dimensions, flat coordinates [B, n·d]; energies invariant under E(d) × S_n."""

    n_particles: int
    spatial_dim: int

    def __init__(self) -> None:
        self.dim = self.n_particles * self.spatial_dim
        iu = torch.triu_indices(self.n_particles, self.n_particles, offset=1)
        self._pair_i, self._pair_j = iu[0], iu[1]

    @property
    def n_pairs(self) -> int:
        return self.n_particles * (self.n_particles - 1) // 2

    @property
    def n_dof(self) -> int:
        """Degrees of freedom of centred configurations: (n − 1)·d."""
        return (self.n_particles - 1) * self.spatial_dim

    def as_particles(self, x: Tensor) -> Tensor:
        """[B, n·d] -> [B, n, d] (a view)."""
        return x.reshape(*x.shape[:-1], self.n_particles, self.spatial_dim)

    def center(self, x: Tensor) -> Tensor:
        """Remove the centre of mass: [B, n·d] -> [B, n·d]."""
        p = self.as_particles(x)
        return (p - p.mean(dim=-2, keepdim=True)).reshape(x.shape)

    def pair_indices(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(i, j) index tensors of all i<j pairs, each [n(n−1)/2]."""
        if self._pair_i.device != device:
            self._pair_i, self._pair_j = self._pair_i.to(device), self._pair_j.to(device)
        return self._pair_i, self._pair_j

    def pair_vectors(self, x: Tensor) -> Tensor:
        """x_i − x_j for all i<j pairs: [B, n·d] -> [B, P, d]."""
        p = self.as_particles(x)
        i, j = self.pair_indices(x.device)
        return p[:, i] - p[:, j]

    def interatomic_distances(self, x: Tensor) -> Tensor:
        """|x_i − x_j| for all i<j pairs: [B, n·d] -> [B, n(n−1)/2] (NumPy in, NumPy out)."""
        x, how = self._as_tensor(x)
        x = self.check_input(x)
        return self._back(self.pair_vectors(x).norm(dim=-1), how)

    def scatter_pair_forces(self, coef: Tensor, diff: Tensor) -> Tensor:
        """Gradient from pair terms: given c_ij = (dφ/dr)/r [B, P] and diff = x_i − x_j [B, P, d],
        returns ∇_x Σ_{i<j} φ(r_ij) as [B, n, d]."""
        i, j = self.pair_indices(diff.device)
        f = coef.unsqueeze(-1) * diff
        shape = (diff.shape[0], self.n_particles, self.spatial_dim)
        g = torch.zeros(shape, dtype=diff.dtype, device=diff.device)
        g.index_add_(1, i, f)
        g.index_add_(1, j, -f)
        return g
