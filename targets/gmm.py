"""GMM-40: the 2-D mixture of 40 isotropic Gaussians of FAB / iDEM / NEM / BNEM.

Construction (fab-torch ``GMM(dim=2, n_mixes=40, loc_scaling=40, log_var_scaling=1.0)`` after
``torch.manual_seed(0)``): means = (rand(40, 2) − 0.5)·2·40, per-dimension std softplus(1) = 1.3132616,
equal weights, *normalised* density. We draw the means from a private generator seeded with 0, which gives
the same CPU mt19937 stream as ``torch.manual_seed(0); torch.rand(40, 2)`` without touching the global RNG
(drawn in float32 whatever the default dtype: a float64 draw gives a different stream).
fab-torch also sets log p = −inf below −1e4 (|x − μ| ≳ 186 from every mean); we keep the smooth density
there (finite gradients) — it only differs far outside the [−50, 50]² box any method samples in.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from targets.base import Target
from targets.registry import TARGETS


def gmm40_means() -> Tensor:
    """The 40 means [40, 2] (float64), identical to ``torch.manual_seed(0); (rand(40,2)-0.5)*2*40``."""
    g = torch.Generator().manual_seed(0)
    return ((torch.rand(40, 2, generator=g, dtype=torch.float32) - 0.5) * 2 * 40).double()


@TARGETS.register("gmm40")
class GMM40(Target):
    name = "gmm40"
    display_name = "GMM-40"
    length_scale = 50.0  # iDEM's data_normalization_factor: methods work in x / 50
    splits = ("test", "val", "train")

    def __init__(self, n_modes: int = 40, loc_scaling: float = 40.0) -> None:
        if n_modes != 40 or loc_scaling != 40.0:
            raise ValueError("GMM-40 is defined with n_modes=40, loc_scaling=40 only")
        self.dim = 2
        self.n_modes = 40
        self.means = gmm40_means()  # [40, 2] float64
        self.std = float(F.softplus(torch.tensor(1.0, dtype=torch.float64)))  # 1.3132616...
        self._cache: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def _means(self, x: Tensor) -> Tensor:
        key = (x.dtype, x.device)
        if key not in self._cache:
            self._cache[key] = self.means.to(dtype=x.dtype, device=x.device)
        return self._cache[key]

    def _log_norm(self) -> float:
        return -math.log(self.n_modes) - 0.5 * self.dim * math.log(2 * math.pi * self.std**2)

    def _logits(self, x: Tensor) -> Tensor:
        """Per-component log N(x; μ_k, s²I) − log 40 without the constant: [B, 40]."""
        d2 = ((x.unsqueeze(-2) - self._means(x)) ** 2).sum(-1)
        return -0.5 * d2 / self.std**2

    @staticmethod
    def _lse(logits: Tensor) -> Tensor:
        """logsumexp over components [B, 40] -> [B, 1], exponents clamped at −80: torch's exp takes a slow
        (denormal) path far below that; the clamp changes the result by at most 40·e⁻⁸⁰ relative."""
        m = logits.max(-1, keepdim=True).values
        return m + torch.exp((logits - m).clamp_min(-80.0)).sum(-1, keepdim=True).log()

    def _energy(self, x: Tensor) -> Tensor:
        return -(self._lse(self._logits(x)).squeeze(-1) + self._log_norm())

    #: the estimator may hand ``_energy_and_grad`` coordinate planes (see ``_energy_and_grad``)
    planar_kernel = True
    #: configurations per kernel call (and per iDEM estimator sub-block): [40, N] work planes of 0.6 MiB; the
    #: fastest of 1k-16k on the 2-core Zen 5 VM (docs/timing.md)
    kernel_chunk = 4096

    def _energy_and_grad(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(E [N], ∇E [N, 2]) on coordinate planes [2, N] with the components along the outer axis (reductions
        over the 40 components are plane additions), in cache-sized chunks. The gradient has the layout of
        ``x``: a planar view (``x.t()`` contiguous) gives a planar view back, row-major input row-major
        output."""
        x = x.detach()
        n = x.shape[0]
        if n > 1 and x.t().is_contiguous():
            e, gt = self._planes(x.t())
            return e, gt.t()
        e = x.new_empty(n)
        g = torch.empty_like(x, memory_format=torch.contiguous_format)
        for i in range(0, n, self.kernel_chunk):
            j = min(n, i + self.kernel_chunk)
            ec, gt = self._planes(x[i:j].t().contiguous())
            e[i:j] = ec
            g[i:j] = gt.t()
        return e, g

    def _planes(self, xt: Tensor) -> tuple[Tensor, Tensor]:
        """E [N] and ∇E planes [2, N] from xt [2, N]: logits l_k = −|x − μ_k|²/(2s²), E = −logsumexp_k l_k −
        log-normaliser, ∇E = Σ_k w_k (x − μ_k)/s² = (x − Σ_k w_k μ_k)/s² with w = softmax(l). Exponents are
        clamped at −80 below the maximum (torch's exp is slow on denormals; the clamp changes E and ∇E by at
        most 40·e⁻⁸⁰ relative)."""
        mu = self._means(xt)  # [40, 2]
        s2 = self.std**2
        d1 = xt[1] - mu[:, 1:2]
        logits = (xt[0] - mu[:, 0:1]).square_().add_(d1.square_()).mul_(-0.5 / s2)  # [40, N]
        m = logits.amax(0)
        p = logits.sub_(m).clamp_min_(-80.0).exp_()  # exp(l − max l)
        z = p.sum(0)
        e = (z.log() + m).add_(self._log_norm()).neg_()
        g = xt.new_empty(2, xt.shape[1])
        pm = torch.empty_like(p)
        for k in range(2):  # Σ_k p_k μ_k as plane sums: the same summation order at every batch size
            torch.sum(torch.mul(p, mu[:, k : k + 1], out=pm), 0, out=g[k])
        g.div_(z).sub_(xt).mul_(-1.0 / s2)  # (x − Σ_k w_k μ_k)/s²
        return e, g

    def _laplacian(self, x: Tensor) -> Tensor:
        """ΔE [B] = D/s² − tr Cov_w(μ)/s⁴ with responsibilities w (Hessian (I − Cov_w(μ)/s²)/s²)."""
        x = x.detach()
        logits = self._logits(x)
        w = torch.softmax(logits, dim=-1)
        mu = self._means(x)
        m = w @ mu
        tr_cov = w @ (mu * mu).sum(-1) - (m * m).sum(-1)
        return self.dim / self.std**2 - tr_cov / self.std**4

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Exact samples [n, 2] (float32): component uniformly, then Gaussian noise."""
        k = torch.randint(0, self.n_modes, (n,), generator=generator)
        eps = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.std * eps).float()
