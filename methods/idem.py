"""iDEM: iterated Denoising Energy Matching (Akhound-Sadegh et al., ICML 2024, arXiv 2402.06121).

Faithful to the published code (jarridrb/DEM, see ../shared/reference/idem-reference-code.md §4–§5):

- VE geometric noise schedule h(t) = σmin²(σd^{2t} − 1); the network s_θ(t, x_t) regresses the Monte-Carlo
  score estimator S_K(x_t, t) = ∇ log (1/K) Σ_k exp(−E(x_t + σ_t ε_k)) = −Σ_k w_k ∇E(x_t + σ_t ε_k),
  w = softmax_k(−E(x_t + σ_t ε_k)). The published code differentiates through ``logsumexp`` with autograd
  (``torch.func.grad`` in ``vmap``); we use the identical self-normalised form with the target's analytic
  forces (``energy_and_grad``), in batches of at most ``estimator_chunk_rows`` perturbed configurations.
  Perturbations with a non-finite energy or force get weight 0 (the published code would produce NaN).
- Target-score clipping: per particle to norm ≤ ``max_score_norm`` (20) for particle systems, the whole vector
  (≤ 70, normalised units) for GMM-40; coefficient min(1, max/(|s| + 1e-6)).
- Loss λ(t)·mean_dims (s_θ − S_K)², λ = h(t) + 1e-3 (GMM) or 1; Adam, gradient-norm clip 0.5.
- Outer loop: every ``steps_per_epoch`` (100) optimiser steps, ``num_samples_per_epoch`` samples from the
  network's reverse SDE (Euler–Maruyama, 1000 steps, per-target ``diffusion_scale``, mean removal after every
  step) go into a FIFO buffer (10 000) sampled uniformly with replacement. Buffer initialisation (on the first
  ``train_step``): 1024 prior samples (particles) or, GMM-40, 1024 samples of the reverse SDE driven by the
  clipped estimator itself (``init_from_prior=False``; the expensive part of a GMM run).
- GMM-40 works in x / ``target.length_scale`` (50) (DEM's ``data_normalization_factor``); samples are returned
  in target coordinates. Energies are evaluated at the unnormalised points (no Jacobian term: a constant).
- LJ-55: ``negative_time_steps`` (10) steps x ← x + 1e-4·clip(−∇E(x)) (whole-vector norm ≤ 20, mean removed)
  after t = 0 in ``sample`` (test-time generation only, as the code at HEAD; before DEM PR #3 the flag was
  ignored, so the paper's LJ-55 numbers may have been produced without them).
- pDEM: ``use_buffer=False`` trains on prior samples instead of buffer samples (no outer loop).

- DEM's ReduceLROnPlateau on ``val/loss`` (``lr_plateau``; the paper preset of DW-4, LJ-13 and LJ-55): the
  training loss on val-split rows every 10 epochs (LJ-55: 5), lr × 0.1 after 10 checks without improvement.
Counting: one optimiser step costs B·K energy+gradient evaluations (through the counted target); a buffer
refresh costs ``num_samples_per_epoch`` energy evaluations (the buffer stores energies, as DEM's does);
network forward passes are added to ``target.usage.network_evals`` (configurations).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from methods.base import AT_LEAST_1, NON_NEGATIVE, UNIT_OPEN, Method, MethodConfig, Range
from methods.buffer import ReplayBuffer
from methods.ema import EMA
from methods.nets import EGNN, TimeMLP
from methods.noise import GeometricNoiseSchedule
from methods.registry import METHODS
from methods.sde import GaussianPrior, MeanFreeGaussianPrior, integrate_reverse_sde

EnergyGradFn = Callable[[Tensor], tuple[Tensor, Tensor]]


# ----------------------------------------------------------------------------------------------- estimator
def mc_score_estimate(
    energy_and_grad: EnergyGradFn,
    x_t: Tensor,
    sigma: Tensor,
    n_samples: int,
    generator: torch.Generator | None = None,
    chunk_rows: int = 131_072,
    sub_rows: int = 8192,
    planar: bool = False,
) -> Tensor:
    """S_K(x_t, t) = −Σ_k softmax_k(−E(y_k)) ∇E(y_k), y_k = x_t + σ ε_k: x_t [B, D], σ [B] -> [B, D].

    The noise ε [rows, K, D] is drawn per block of ``chunk_rows`` // K rows (this fixes the random stream);
    within a block, rows are processed ``sub_rows`` // K at a time (at least one row): perturbation, one
    ``energy_and_grad`` call and the weighted sum stay in cache. ``energy_and_grad`` maps [N, D] -> (E [N],
    ∇E [N, D]); with ``planar`` it is handed y as a transposed view of contiguous coordinate planes [D, N]
    (the layout of the DW-4 and GMM-40 kernels, ``Target.planar_kernel``) and may answer in either layout.
    Exactly B·K configurations are evaluated.

    Perturbations with a non-finite energy or gradient get weight 0 (a row whose K perturbations are all
    non-finite gets score 0). On a CPU the weighted sum is formed first and that masked form is used only for
    a sub-block whose energies or sum are not finite (a non-finite gradient always makes the sum non-finite);
    elsewhere the masked form is used throughout.
    """
    if x_t.ndim != 2:
        raise ValueError(f"x_t must be [batch, dim], got {list(x_t.shape)}")
    if n_samples < 1:
        raise ValueError(f"n_samples (K) must be >= 1, got {n_samples}")
    B, D = x_t.shape
    K = n_samples
    sigma = sigma.to(x_t.dtype).reshape(-1)
    if sigma.shape[0] != B:
        raise ValueError(f"sigma must have shape [{B}], got {list(sigma.shape)}")
    rows = max(1, chunk_rows // K)
    fast = x_t.device.type == "cpu"  # the fast path branches on a finiteness check: a sync elsewhere
    srows = max(1, sub_rows // K) if fast else rows
    out = torch.empty_like(x_t)
    for i in range(0, B, rows):
        b = min(rows, B - i)
        eps = torch.randn(b, K, D, generator=generator, dtype=x_t.dtype, device=x_t.device)
        for j in range(0, b, srows):
            c = min(srows, b - j)
            r = slice(i + j, i + j + c)
            xs, ss, es = x_t[r], sigma[r].reshape(c, 1, 1), eps[j : j + c]
            if planar:
                yt = x_t.new_empty(D, c, K)
                torch.addcmul(xs.t().unsqueeze(-1), ss.reshape(1, c, 1), es.permute(2, 0, 1), out=yt)
                y = yt.view(D, c * K).t()
            else:
                y = torch.addcmul(xs.unsqueeze(1), ss, es).view(c * K, D)
            e, g = energy_and_grad(y)
            e, g = e.reshape(c, K), g.reshape(c, K, D)
            # a sum is finite only if every term is: one reduction each decides the fast path
            if fast and bool(e.sum().isfinite()):
                s = _weighted_sum(torch.softmax(e.neg(), dim=1), g)
                if bool(s.sum().isfinite()):
                    out[r] = s.neg_()
                    continue
            out[r] = _masked_score(e, g)
    return out


def _weighted_sum(w: Tensor, g: Tensor) -> Tensor:
    """Σ_k w[c, k] g[c, k, :] -> [c, D], for g row-major or a view of coordinate planes [D, c, K]."""
    gp = g.permute(2, 0, 1)
    if gp.is_contiguous():  # planes: a multiply and a reduction over the contiguous K axis
        return (gp * w).sum(-1).t()
    return torch.bmm(w.unsqueeze(1), g).squeeze(1)


def _masked_score(e: Tensor, g: Tensor) -> Tensor:
    """−Σ_k softmax_k(−e) g_k over the perturbations with finite energy and gradient: [c, K], [c, K, D]."""
    ok = torch.isfinite(e) & torch.isfinite(g).all(-1)
    logw = torch.where(ok, -e, torch.full_like(e, -torch.inf))
    w = torch.softmax(logw, dim=1).nan_to_num(0.0)  # all K non-finite: zero score
    g = torch.where(ok.unsqueeze(-1), g, torch.zeros_like(g))
    return -torch.bmm(w.unsqueeze(1), g.contiguous()).squeeze(1)


def clip_score(s: Tensor, max_norm: float, spatial_dim: int | None = None) -> Tensor:
    """Rescale to norm ≤ max_norm per particle ([B, n·d] as [B, n, d]) or per row: [B, D] -> [B, D]."""
    v = s.reshape(s.shape[0], -1, spatial_dim) if spatial_dim else s.unsqueeze(1)
    norm = v.norm(dim=-1, keepdim=True)
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return (v * coef).reshape(s.shape)


# ----------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class Config(MethodConfig):
    """iDEM hyper-parameters; defaults are DEM's; ``PER_TARGET`` holds the published experiment settings."""

    net: Literal["mlp", "egnn"] = "egnn"
    hidden: int = 128
    n_layers: int = 3  # EGNN layers, or residual blocks of the MLP
    sigma_min: float = 1e-5
    sigma_max: float = 3.0
    num_mc_samples: int = 100  # K
    batch_size: int = 512  # num_samples_to_sample_from_buffer
    steps_per_epoch: int = 100  # optimiser steps between buffer refreshes
    num_samples_per_epoch: int = 1000  # new reverse-SDE samples per refresh
    num_init_samples: int = 1024
    init_from_prior: bool = True
    init_sde_steps: int | None = None  # estimator-driven init SDE steps (None: sde_steps)
    init_mc_samples: int | None = None  # K of the estimator-driven init (None: num_mc_samples)
    buffer_max_length: int = 10_000
    max_score_norm: float = 20.0
    clip_per_particle: bool = True  # False: clip the whole vector (GMM)
    lambda_weighting: Literal["none", "h"] = "none"  # "h": λ(t) = h(t) + 1e-3
    lr: float = 1e-3
    grad_clip: float = 0.5
    sde_steps: int = 1000
    diffusion_scale: float = 1.0
    negative_time_steps: int = 0
    negative_time_dt: float = 1e-4
    negative_time_clip: float = 20.0
    use_buffer: bool = True  # False: pDEM
    normalize: bool = False  # work in x / target.length_scale (GMM-40)
    estimator_chunk_rows: int = 131_072  # max perturbed configurations per energy call
    sample_chunk: int = 1024  # max rows per reverse-SDE integration
    # EMA of the score network, updated every optimiser step; when set, the EMA network drives the model's
    # reverse SDE (buffer refreshes and ``sample``). DEM's ``use_ema`` (EMAWrapper, decay 0.999) is off in
    # every published iDEM experiment (None here); BNEM's iDEM fork samples with an EMA model.
    ema_decay: float | None = None
    # DEM's ReduceLROnPlateau (configs/model/dem.yaml: factor 0.1, patience 10, monitor val/loss, stepped
    # every check_val_every_n_epoch = 10 epochs; LJ-55 5): every ``plateau_check_steps`` optimiser steps the
    # DEM loss is computed on ``plateau_val_size`` rows of the target's **val** split (noised as in training,
    # K-sample estimator: B·K counted energy+gradient evaluations) and the learning rate is cut by
    # ``plateau_factor`` after ``plateau_patience`` checks without improvement. Off (constant lr) unless set:
    # the paper preset turns it on for the particle targets.
    lr_plateau: bool = False
    plateau_factor: float = 0.1
    plateau_patience: int = 10
    plateau_check_steps: int = 1000
    plateau_val_size: int = 512
    RANGES: ClassVar[dict[str, Range]] = {
        "plateau_factor": UNIT_OPEN, "plateau_patience": NON_NEGATIVE, "plateau_check_steps": AT_LEAST_1,
        "plateau_val_size": AT_LEAST_1,
    }

    # Source: jarridrb/DEM configs/experiment/{gmm,dw4,lj13,lj55}_idem.yaml over configs/model/dem.yaml
    # (HEAD 8e95319; see ../shared/reference/idem-reference-code.md §4).
    PER_TARGET: ClassVar[dict[str, dict[str, Any]]] = {
        "gmm40": dict(
            net="mlp",
            n_layers=3,
            sigma_min=1e-5,
            sigma_max=1.0,
            num_mc_samples=500,
            batch_size=512,
            num_samples_per_epoch=1000,
            init_from_prior=False,
            max_score_norm=70.0,
            clip_per_particle=False,
            lambda_weighting="h",
            lr=5e-4,
            sde_steps=1000,
            diffusion_scale=1.0,
            normalize=True,
        ),
        "dw4": dict(
            net="egnn",
            n_layers=3,
            sigma_min=1e-5,
            sigma_max=3.0,
            num_mc_samples=1000,
            batch_size=512,
            num_samples_per_epoch=1000,
            max_score_norm=20.0,
            lr=1e-3,
            diffusion_scale=1.0,
        ),
        "lj13": dict(
            net="egnn",
            n_layers=5,
            sigma_min=0.01,
            sigma_max=2.0,
            num_mc_samples=1000,
            batch_size=512,
            num_samples_per_epoch=1000,
            max_score_norm=20.0,
            lr=1e-3,
            diffusion_scale=0.9,
        ),
        "lj55": dict(
            net="egnn",
            n_layers=5,
            sigma_min=0.5,
            sigma_max=4.0,
            num_mc_samples=100,
            batch_size=128,
            num_samples_per_epoch=128,
            max_score_norm=20.0,
            lr=1e-3,
            diffusion_scale=0.5,
            negative_time_steps=10,
            sample_chunk=128,
        ),
    }
    #: the configuration behind the BNEM poster's iDEM row (MethodConfig.VARIANTS; docs/reproduction.md)
    VARIANTS: ClassVar[dict[str, dict[str, Any]]] = {
        "bnem": {
            "description": "iDEM as BNEM's fork ran it for its tables: σ_min 1e-4, λ(t) = h(t) + 1e-3 "
            "weighting everywhere, K 1000 (GMM 100), LJ-13 σ_max 6 and diffusion 1.0, LJ-55 without "
            "negative-time steps, GMM lr 1e-3 and 100 SDE steps, sampling from an EMA network (decay 0.999 "
            "per step: DEM's EMAWrapper default; the fork's exact decay is not checked); early stopping on "
            "val E-W2 is the `bnem` selection rule",
            "source": "tonyauyeung/BNEM configs/model/dem.yaml and configs/experiment/*_idem.yaml (HEAD); "
            "bnem-reference-code.md §3",
            "overrides": {
                "*": dict(lambda_weighting="h", num_mc_samples=1000, ema_decay=0.999),
                "gmm40": dict(sigma_min=1e-4, num_mc_samples=100, lr=1e-3, sde_steps=100),
                "dw4": dict(sigma_min=1e-4),
                "lj13": dict(sigma_min=1e-4, sigma_max=6.0, diffusion_scale=1.0),
                "lj55": dict(negative_time_steps=0),
            },
        },
    }
    PRESETS: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {
        # plumbing only: a cell runs in seconds on a CPU
        "smoke": {
            "*": dict(
                hidden=16,
                n_layers=2,
                num_mc_samples=8,
                batch_size=16,
                steps_per_epoch=5,
                num_samples_per_epoch=16,
                num_init_samples=32,
                sde_steps=10,
                init_sde_steps=10,
                negative_time_steps=0,
                sample_chunk=256,
            )
        },
        # DEM's ReduceLROnPlateau on val/loss for the particle targets (configs/model/dem.yaml; validation
        # every 10 epochs, LJ-55 every 5: configs/experiment/lj55_idem.yaml check_val_every_n_epoch)
        "paper": {
            "dw4": dict(lr_plateau=True),
            "lj13": dict(lr_plateau=True),
            "lj55": dict(lr_plateau=True, plateau_check_steps=500),
        },
        # 2-core CPU, well under an hour per cell (see docs/idem.md for the measurements behind these)
        "cpu": {
            "gmm40": dict(
                num_mc_samples=100,
                batch_size=256,
                sde_steps=100,
                init_sde_steps=100,
                num_samples_per_epoch=500,
                # sample with an EMA of the network (DEM has an EMAWrapper, off in the paper config): the raw
                # network's GMM-40 samples swing between x-W2 9.0 and 15.6 from one epoch to the next at
                # 20k-40k steps; an EMA over ~5000 steps settles them (0.999: 5.7-9.3; docs/idem.md)
                ema_decay=0.9998,
            ),
            "dw4": dict(num_mc_samples=100, batch_size=128, sde_steps=100, num_samples_per_epoch=250),
            # LJ: DW-4's cost settings with a smaller EGNN (published 5 x 128) and, on LJ-55, K 50 and a
            # 50-step SDE grid; the published σ, clipping and diffusion scale stay (0.54 s per step measured
            # on LJ-13 with two other jobs per core; the records hold the quiet-core times)
            "lj13": dict(num_mc_samples=100, batch_size=128, sde_steps=100, init_sde_steps=100,
                         num_samples_per_epoch=250, hidden=64, n_layers=3),
            "lj55": dict(num_mc_samples=50, batch_size=64, sde_steps=50, init_sde_steps=50,
                         num_samples_per_epoch=64, num_init_samples=256, hidden=32, n_layers=2,
                         negative_time_steps=0),
        },
    }
    BUDGETS: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {
        "smoke": {"*": dict(steps=10)},
        # GMM-40: 25 000 steps take ~10 min on one free core (0.023 s per step)
        "cpu": {"*": dict(steps=5000), "gmm40": dict(steps=25_000), "lj13": dict(steps=3000),
                "lj55": dict(steps=1000)},
        # 1000 epochs × 100 steps (LJ-55: 2000 epochs)
        "paper": {"*": dict(steps=100_000), "lj55": dict(steps=200_000)},
    }

    def __post_init__(self) -> None:
        positive = (
            "hidden",
            "n_layers",
            "num_mc_samples",
            "batch_size",
            "steps_per_epoch",
            "num_samples_per_epoch",
            "num_init_samples",
            "buffer_max_length",
            "sde_steps",
            "estimator_chunk_rows",
            "sample_chunk",
        )
        for k in positive:
            if getattr(self, k) < 1:
                raise ValueError(f"iDEM Config.{k} must be >= 1, got {getattr(self, k)}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"iDEM Config.ema_decay must be in [0, 1) or None, got {self.ema_decay}")
        for k in ("init_sde_steps", "init_mc_samples"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise ValueError(f"iDEM Config.{k} must be >= 1 or None, got {v}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(
                f"iDEM Config needs 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}"
            )
        if self.net not in ("mlp", "egnn"):
            raise ValueError(f"iDEM Config.net must be 'mlp' or 'egnn', got {self.net!r}")
        if self.lambda_weighting not in ("none", "h"):
            raise ValueError(
                f"iDEM Config.lambda_weighting must be 'none' or 'h', got {self.lambda_weighting!r}"
            )
        if self.negative_time_steps < 0 or self.diffusion_scale < 0:
            raise ValueError("iDEM Config.negative_time_steps and diffusion_scale must be >= 0")


# ----------------------------------------------------------------------------------------------- method
@METHODS.register("idem")
class IDEM(Method):
    """iDEM (and pDEM with ``use_buffer=False``) on any registered target."""

    name = "idem"
    display_name = "iDEM"
    Config = Config

    def __init__(self, target: Any, config: Config, device: torch.device | str, generator: torch.Generator):
        super().__init__(target, config, device, generator)
        c = config
        self.particles = target.n_particles is not None
        if c.net == "egnn" and not self.particles:
            raise ValueError(f"iDEM: net='egnn' needs a particle target, {target.name} is not; use net='mlp'")
        self.dim = target.dim
        self.scale = float(target.length_scale) if c.normalize else 1.0
        self.schedule = GeometricNoiseSchedule(c.sigma_min, c.sigma_max)
        if self.particles:
            self.prior: GaussianPrior = MeanFreeGaussianPrior(
                target.n_particles, target.spatial_dim, self.schedule.prior_scale, self.device
            )
        else:
            self.prior = GaussianPrior(self.dim, self.schedule.prior_scale, self.device)
        # parameters are initialised from a seed drawn from the run's generator (global RNG left untouched)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if c.net == "egnn":
                net: torch.nn.Module = EGNN(
                    target.n_particles, target.spatial_dim, hidden=c.hidden, n_layers=c.n_layers
                )
            else:
                net = TimeMLP(self.dim, hidden=c.hidden, n_blocks=c.n_layers)
        self.net = net.to(self.device)
        self.ema = EMA(self.net, c.ema_decay) if c.ema_decay is not None else None
        self.ema_net = self.ema.model if self.ema is not None else None
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=c.lr)
        self.plateau = (
            torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, mode="min", factor=c.plateau_factor, patience=c.plateau_patience
            )
            if c.lr_plateau
            else None
        )
        self.buffer = ReplayBuffer(self.dim, c.buffer_max_length, self.device)
        self.step = 0
        self.initialised = False

    # ------------------------------------------------------------------ helpers
    def _center(self, x: Tensor) -> Tensor:
        return self.prior.center(x) if self.particles else x

    def _count_net(self, n: int) -> None:
        usage = getattr(self.target, "usage", None)
        if usage is not None:
            usage.network_evals += int(n)

    def _energy_and_grad(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Energy and gradient in working coordinates y = x / scale: E(scale·y), scale·∇E(scale·y)."""
        if self.scale == 1.0:
            return self.target.energy_and_grad(y)
        e, g = self.target.energy_and_grad(y * self.scale)
        return e, g * self.scale

    def _energy(self, y: Tensor) -> Tensor:
        with torch.no_grad():
            return self.target.energy(y * self.scale if self.scale != 1.0 else y)

    def estimate_score(self, x_t: Tensor, t: Tensor, n_samples: int | None = None) -> Tensor:
        """Clipped MC score target S_K(x_t, t) in working coordinates: x_t [B, dim], t [B] -> [B, dim]."""
        c = self.config
        sigma = self.schedule.sigma(t.double()).to(x_t.dtype)
        s = mc_score_estimate(
            self._energy_and_grad,
            x_t,
            sigma,
            n_samples or c.num_mc_samples,
            self.generator,
            c.estimator_chunk_rows,
            int(getattr(self.target, "kernel_chunk", 8192)),
            bool(getattr(self.target, "planar_kernel", False)),
        )
        spatial = self.target.spatial_dim if (self.particles and c.clip_per_particle) else None
        return clip_score(s, c.max_score_norm, spatial)

    def _net_score(self, t: Tensor, x: Tensor) -> Tensor:
        self._count_net(x.shape[0])
        return self.net(t, x)

    def _sampler_score(self, t: Tensor, x: Tensor) -> Tensor:
        """Score of the model's reverse SDE: the EMA network when ``ema_decay`` is set, else the network."""
        self._count_net(x.shape[0])
        return (self.ema_net if self.ema_net is not None else self.net)(t, x)

    def _generate(self, n: int, score: Callable[[Tensor, Tensor], Tensor], n_steps: int) -> Tensor:
        """n reverse-SDE samples (working coordinates) from the prior, in chunks of ``sample_chunk``."""
        c = self.config
        out = []
        for i in range(0, n, c.sample_chunk):
            x1 = self.prior.sample(min(c.sample_chunk, n - i), self.generator)
            out.append(
                integrate_reverse_sde(
                    score,
                    x1,
                    self.schedule,
                    n_steps,
                    c.diffusion_scale,
                    self.generator,
                    self._center if self.particles else None,
                )
            )
        return torch.cat(out) if out else torch.empty(0, self.dim, device=self.device)

    def _model_samples(self, n: int) -> Tensor:
        self.net.eval()
        with torch.no_grad():
            x = self._generate(n, self._sampler_score, self.config.sde_steps)
        self.net.train()
        return x

    def _add_to_buffer(self, x: Tensor) -> None:
        self.buffer.add(x, self._energy(x))

    def _init_buffer(self) -> None:
        c = self.config
        if c.use_buffer:
            if c.init_from_prior:
                x = self.prior.sample(c.num_init_samples, self.generator)
            else:
                k = c.init_mc_samples or c.num_mc_samples
                with torch.no_grad():
                    x = self._generate(
                        c.num_init_samples,
                        lambda t, y: self.estimate_score(y, t, k),
                        c.init_sde_steps or c.sde_steps,
                    )
            self._add_to_buffer(x)
        self.initialised = True

    def _negative_time(self, x: Tensor) -> Tensor:
        c = self.config
        for _ in range(c.negative_time_steps):
            _, g = self._energy_and_grad(x)
            x = self._center(x + c.negative_time_dt * clip_score(-g, c.negative_time_clip))
        return x

    def _dem_loss(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        """The DEM regression loss at clean configurations x0 [B, dim] (normalised units): (loss, target)."""
        c = self.config
        B = x0.shape[0]
        t = torch.rand(B, generator=self.generator, device=self.device)
        h = self.schedule.h(t.double()).to(x0.dtype)
        noise = torch.randn(x0.shape, generator=self.generator, device=self.device, dtype=x0.dtype)
        x_t = self._center(x0 + h.sqrt().unsqueeze(-1) * noise)
        with torch.no_grad():
            target = self.estimate_score(x_t, t)
        pred = self._net_score(t, x_t)
        lam = h + 1e-3 if c.lambda_weighting == "h" else torch.ones_like(h)
        return (lam * ((pred - target) ** 2).mean(-1)).mean(), target

    def val_loss(self) -> float:
        """DEM's ``val/loss``: the training loss on the first ``plateau_val_size`` rows of the val split."""
        x0 = self.target.reference("val")[: self.config.plateau_val_size].to(self.device) / self.scale
        with torch.no_grad():
            loss, _ = self._dem_loss(self._center(x0.to(torch.get_default_dtype())))
        return float(loss)

    # ------------------------------------------------------------------ Method interface
    def train_step(self) -> dict[str, float]:
        c = self.config
        if not self.initialised:
            self._init_buffer()
        B = c.batch_size
        if c.use_buffer:
            x0, _ = self.buffer.sample(B, self.generator)
        else:
            x0 = self.prior.sample(B, self.generator)
        loss, target = self._dem_loss(x0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), c.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.net)
        self.step += 1
        logs = {
            "loss": float(loss.detach()),
            "grad_norm": float(grad_norm),
            "target_norm": float(target.norm(dim=-1).mean()),
        }
        if c.use_buffer and self.step % c.steps_per_epoch == 0:
            self._add_to_buffer(self._model_samples(c.num_samples_per_epoch))
            logs["buffer_size"] = float(len(self.buffer))
        if self.plateau is not None and self.step % c.plateau_check_steps == 0:
            logs["val_loss"] = self.val_loss()
            self.plateau.step(logs["val_loss"])
            logs["lr"] = float(self.optimizer.param_groups[0]["lr"])
        return logs

    def sample(self, n: int) -> Tensor:
        """n samples [n, dim] of the network's reverse SDE (+ negative-time steps), target coordinates."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        x = self._model_samples(n)
        if self.config.negative_time_steps:
            x = self._negative_time(x)
        x = x * self.scale
        return self._center(x).detach()

    def state_dict(self) -> dict[str, Any]:
        return {
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "buffer": self.buffer.state_dict(),
            "step": self.step,
            "initialised": self.initialised,
            "generator": self.generator.get_state(),
            **({"ema_net": self.ema_net.state_dict()} if self.ema_net is not None else {}),
            **({"plateau": self.plateau.state_dict()} if self.plateau is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        if self.ema_net is not None:
            self.ema_net.load_state_dict(state["ema_net"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.plateau is not None:
            self.plateau.load_state_dict(state["plateau"])
        self.buffer.load_state_dict(state["buffer"])
        self.step = int(state["step"])
        self.initialised = bool(state["initialised"])
        if "generator" in state:
            self.generator.set_state(state["generator"])

    def diagnostics(self) -> dict[str, float]:
        d = {"buffer_size": float(len(self.buffer)), "optimizer_steps": float(self.step)}
        if self.buffer.energy is not None and len(self.buffer):
            d["buffer_mean_energy"] = float(self.buffer.energy.mean())
        return d
