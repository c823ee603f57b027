"""Adjoint Sampling (AS; Havens et al., ICML 2025, arXiv 2504.11713) and the adjoint-matching pieces it shares
with ASBS (``methods.asbs``), written from the papers and the study notes of the public code
(facebookresearch/adjoint_samplers, root commit a972860; ../shared/reference/asbs-reference-code.md).

Base process (``methods.sde.ForwardVESDE``): zero drift, dX = g(t) dW on t ∈ [0, 1] with the geometric VE
coefficient g(t) = σ_min σ_d^{1−t} sqrt(2 ln σ_d) (noise largest at t = 0), V = ∫_0^1 g² = σ_max² − σ_min².
The sampler is the controlled SDE dX = g(t)² u_θ(t, X) dt + g(t) dW from a source μ_0 (AS: a delta at 0),
integrated by Euler–Maruyama on ``nfe`` uniform time points (mean-free noise and centre-of-mass removal after
every step for particle systems). Samples are X_1.

Adjoint matching (the code's ``AdjointVEMatcher``): with zero base drift and no state cost the lean adjoint is
constant in time, a(t) = a_1 = ∇g(X_1), so the buffer stores only (X_0, X_1, a_1), and

    loss(θ) = mean_{batch × dims} (u_θ(t, X_t) + a_1)²,  t ~ U(0, 1),  X_t ~ base bridge(X_0, X_1, t)

(the "reciprocal projection": X_t ~ N((1 − κ)X_0 + κX_1, V κ(1 − κ)), κ = v(t)/V, mean-free for particles;
plain MSE, which with the g² in the drift is the paper's λ_t = 1/σ_t² weighting). AS's terminal cost is
g(x) = E(x) + log p_1^base(x), so a_1 = clip(∇E(X_1)) + ∇log p_1^base(X_1) = clip(∇E(X_1)) − X_1/(V + s_0²)
(s_0 = 0 for the delta source; the code's ``GraphScoreGradTermCost``). ∇E is clipped per particle to norm
≤ ``max_grad_e_norm`` (100) and its centre of mass removed (GMM-40: the whole vector); the fixed point
u*(t, x) = −E[a_1 | X_t = x] is the optimal control, whose terminal law is the target (tested in closed form
on a Gaussian in tests/test_adjoint.py).

Outer loop (the code's ``train_one_epoch``): an *epoch* is ``steps_per_epoch`` (100) optimiser steps. At its
start ``n_new_per_epoch`` paths of the current controlled SDE (simulated in batches of ``resample_chunk``) go
into a FIFO buffer of the newest ``buffer_size`` (10 000) rows, with a_1 frozen at insertion; the steps then
read batches of ``batch_size`` in the order of the code's shuffled DataLoader over the buffer repeated
``duplicates`` times (a fresh permutation per pass and per epoch, the last batch of a pass partial). One Adam
(lr 1e-4, no weight decay, no gradient clipping, no EMA, no schedule).

Networks: particles — the shared ``EGNN`` (5 layers × 128, attention, tanh with coords_range 15/L, sum
aggregation, node feature t: the code's ``EGNN_dynamics``, a copy of DEM's); other targets — the shared
``TimeMLP`` (iDEM's GMM network) with its read-out zero-initialised (the code's FourierMLP zero-inits its last
layer).

GMM-40 is not in the public code (its only non-particle config is a 1-D demo with a FourierMLP): we add it
with the TimeMLP (3 blocks × 128) in iDEM's normalised coordinates y = x / 50 (``normalize``), σ_max = 1 in
those units (base terminal std 50 in x, covering the ±40 box), nfe 200, and the energy-gradient clip at 1000
(whole vector, y units = 20 in x units; 100 would clip in-mode samples beyond ~2.6 mode std). Our choice,
documented in docs/adjoint.md.

Where the code departs from its configs (``VARIANTS["published"]``): ``resample_size`` 1000 is divided by the
batch in the code (``1000 // 512 = 1`` batch), so it adds 512 paths per epoch; our default adds the configured
1000 (LJ-55: 200 either way). The DW-4 AS launch script overrides σ_max = 2 (config) with 1.5.

Counting: every a_1 costs one counted energy+gradient evaluation (``energy_and_grad`` of the counting target),
``n_new_per_epoch`` per epoch; sampling costs none; network forward passes (rows) go to
``usage.network_evals``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from methods.base import AT_LEAST_1, POSITIVE, Method, MethodConfig, Range
from methods.buffer import ReplayBuffer
from methods.idem import clip_score
from methods.nets import EGNN, TimeMLP
from methods.registry import METHODS
from methods.sde import DeltaSource, ForwardVESDE, GaussianPrior, MeanFreeGaussianPrior, harmonic_prior

# ------------------------------------------------------------------------------------------------ pieces


def clipped_energy_grad(target: Any, y: Tensor, scale: float, max_norm: float | None) -> Tensor:
    """∇_y E(scale·y) [B, dim] from the (counting) target, clipped to norm ≤ ``max_norm`` per particle
    (particle targets, then centre of mass removed) or per row (others); the code's ``grad_E`` of
    ``Graph*GradTermCost``."""
    _, g = target.energy_and_grad(y * scale if scale != 1.0 else y)
    g = g.to(y.dtype) * scale
    spatial = getattr(target, "spatial_dim", None) if getattr(target, "n_particles", None) else None
    if max_norm is not None:
        g = clip_score(g, max_norm, spatial)
    return target.center(g) if spatial else g


def as_terminal_adjoint(grad_e: Tensor, x1: Tensor, base_var1: float) -> Tensor:
    """AS's a_1 = ∇E(x1) + ∇log p_1^base(x1) = ∇E − x1 / base_var1 ([B, dim]); base_var1 = V + s_0² is the
    variance of the uncontrolled process at t = 1 from a zero-mean Gaussian (or delta, s_0 = 0) source."""
    return grad_e - x1 / base_var1


def adjoint_matching_loss(u: Tensor, a1: Tensor) -> Tensor:
    """mean over batch × dims of (u + a_1)² (the regression of u(t, X_t) onto −a_1): scalar."""
    return ((u + a1) ** 2).mean()


def build_network(target: Any, network: str, hidden: int, n_layers: int, emb_size: int) -> nn.Module:
    """The controller (or corrector) u(t [B], x [B, dim]) -> [B, dim]: the shared EGNN for particle targets
    (output mean-free), the shared TimeMLP with a zero read-out otherwise."""
    if network == "egnn":
        if getattr(target, "n_particles", None) is None:
            raise ValueError(f"network 'egnn' needs a particle target; {target.name} is not one (use 'mlp')")
        return EGNN(target.n_particles, target.spatial_dim, hidden=hidden, n_layers=n_layers)
    if network == "mlp":
        net = TimeMLP(target.dim, hidden=hidden, n_blocks=n_layers, emb_size=emb_size)
        last = net.net[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        return net
    raise ValueError(f"network must be 'egnn' or 'mlp', got {network!r}")


# ------------------------------------------------------------------------------------------------ config
_PUBLISHED_SOURCE = "facebookresearch/adjoint_samplers @ a972860 (asbs-reference-code.md)"

# The `cpu` grid (≈ 20 min per cell on one core; per-step times measured in docs/adjoint.md). Departures from
# the published settings, the same for AS and ASBS: EGNN 3 × 32 instead of 5 × 128; nfe 100 on DW-4 and
# GMM-40 (published / ours 200), 50 on LJ (published 1000: the evaluations sample 5000 / 2000 paths); lr 5e-4
# instead of 1e-4 (1–3 % of the published optimiser steps); smaller batches with the published ratio of new
# paths per optimiser step (5.12; LJ-55 2) kept by shorter epochs, and a buffer that keeps a path for the
# published number of epochs (10 000 / 512 ≈ 20; LJ-55 50).
CPU_PRESETS: dict[str, dict[str, Any]] = {
    "gmm40": dict(nfe=100, batch_size=256, n_new_per_epoch=256, resample_chunk=256, steps_per_epoch=50,
                  buffer_size=5120, lr=5e-4),
    "dw4": dict(hidden=32, n_layers=3, nfe=100, batch_size=256, n_new_per_epoch=256, resample_chunk=256,
                steps_per_epoch=50, buffer_size=5120, lr=5e-4, sample_chunk=1000),
    "lj13": dict(hidden=32, n_layers=3, nfe=50, batch_size=128, n_new_per_epoch=128, resample_chunk=128,
                 steps_per_epoch=25, buffer_size=2560, lr=5e-4, sample_chunk=500),
    "lj55": dict(hidden=32, n_layers=3, nfe=50, batch_size=32, n_new_per_epoch=20, resample_chunk=20,
                 steps_per_epoch=10, buffer_size=1000, lr=5e-4, sample_chunk=250),
}
# counted quality budgets (optimiser steps) and a wall-clock guard (status `timeout` if reached first). Steps
# for ≈ 8–12 min of training at the measured per-step times (2-core machine at load 4–6: GMM-40 0.013 s,
# DW-4 0.047 s, LJ-13 0.16–0.23 s, LJ-55 0.70–0.86 s); LJ-55's evaluations alone exceed the cell time
# (docs/adjoint.md)
CPU_BUDGETS: dict[str, dict[str, Any]] = {
    "gmm40": dict(steps=40_000, guard_seconds=3600.0),
    "dw4": dict(steps=15_000, guard_seconds=3600.0),
    "lj13": dict(steps=3_000, guard_seconds=3600.0),
    "lj55": dict(steps=600, guard_seconds=3600.0),
}


@dataclasses.dataclass(frozen=True)
class ASConfig(MethodConfig):
    """Adjoint Sampling hyper-parameters. Defaults: the code's shared settings (configs/train.yaml,
    configs/model/egnn.yaml, configs/sde/graph_ve.yaml) with the DW-4 experiment's SDE; ``PER_TARGET`` holds
    configs/experiment/{dw4,lj13,lj55}_as.yaml."""

    network: Literal["egnn", "mlp"] = "egnn"
    hidden: int = 128
    n_layers: int = 5  # EGNN layers, or TimeMLP residual blocks
    emb_size: int = 128  # TimeMLP sinusoidal embedding size (mlp only)
    sigma_min: float = 1e-3
    sigma_max: float = 2.0
    nfe: int = 200  # time points of the uniform grid: nfe − 1 Euler steps (the code's `nfe`)
    source: Literal["delta", "harmonic", "gauss"] = "delta"
    # harmonic: the code's `scale` (std scale·sqrt(2/3), methods.sde.harmonic_prior); gauss: the std
    source_scale: float = 1.0
    batch_size: int = 512  # train_batch_size
    n_new_per_epoch: int = 1000  # the configs' resample_size (the code adds 512: VARIANTS["published"])
    resample_chunk: int = 512  # resample_batch_size: paths simulated at once
    steps_per_epoch: int = 100  # train_itr_per_epoch
    buffer_size: int = 10_000
    duplicates: int = 10  # the DataLoader's dataset is the buffer repeated this many times
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_e_norm: float | None = 100.0  # per-particle clip of ∇E (None: off)
    normalize: bool = False  # work in x / target.length_scale (GMM-40)
    sample_chunk: int = 2000  # paths simulated at once by sample() (eval_batch_size; LJ-55 1000)

    RANGES: ClassVar[dict[str, Range]] = {
        "nfe": Range(2), "n_new_per_epoch": AT_LEAST_1, "resample_chunk": AT_LEAST_1,
        "duplicates": AT_LEAST_1, "source_scale": POSITIVE, "max_grad_e_norm": POSITIVE,
    }

    # configs/experiment/{dw4,lj13,lj55}_as.yaml (+ configs/problem/*.yaml, configs/train.yaml) at a972860
    PER_TARGET: ClassVar[dict[str, dict[str, Any]]] = {
        # not in the public code: ours (module docstring, docs/adjoint.md)
        "gmm40": dict(network="mlp", hidden=128, n_layers=3, normalize=True, sigma_max=1.0, nfe=200,
                      max_grad_e_norm=1000.0),
        "dw4": dict(sigma_max=2.0, nfe=200, duplicates=10),  # dw4_as.yaml (scripts/dw4.sh: σ_max 1.5)
        "lj13": dict(sigma_max=2.0, nfe=1000, duplicates=25),  # lj13_as.yaml
        # lj55_as.yaml: resample/train batch 200, resample_size 200, eval in batches of 1000
        "lj55": dict(sigma_max=2.0, nfe=1000, duplicates=25, batch_size=200, n_new_per_epoch=200,
                     resample_chunk=200, sample_chunk=1000),
    }
    VARIANTS: ClassVar[dict[str, dict[str, Any]]] = {
        "published": {
            "description": "as the public code runs: `resample_size // resample_batch_size` = 1000 // 512 "
            "= 1 batch, i.e. 512 new paths per epoch (LJ-55 200), and the DW-4 launch script's sigma_max 1.5",
            "source": f"{_PUBLISHED_SOURCE}: adjoint_samplers/train_loop.py, scripts/dw4.sh",
            "overrides": {"*": dict(n_new_per_epoch=512), "dw4": dict(n_new_per_epoch=512, sigma_max=1.5),
                          "lj55": dict(n_new_per_epoch=200)},
        },
    }
    PRESETS: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {
        # plumbing only: a cell runs in seconds
        "smoke": {"*": dict(hidden=16, n_layers=2, emb_size=8, nfe=8, batch_size=16, n_new_per_epoch=16,
                            resample_chunk=16, steps_per_epoch=2, buffer_size=64, duplicates=2,
                            sample_chunk=256)},
        "cpu": CPU_PRESETS,
    }
    BUDGETS: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {
        "smoke": {"*": dict(steps=6)},
        "cpu": CPU_BUDGETS,
        # num_epochs × train_itr_per_epoch: DW-4 5000 × 100, LJ 4000 × 100 (GMM-40: ours, as DW-4)
        "paper": {"*": dict(steps=500_000), "lj13": dict(steps=400_000), "lj55": dict(steps=400_000)},
    }

    def __post_init__(self) -> None:
        if self.network not in ("egnn", "mlp"):
            raise ValueError(f"{type(self).__qualname__}.network must be 'egnn' or 'mlp', "
                             f"got {self.network!r}")
        if self.source not in ("delta", "harmonic", "gauss"):
            raise ValueError(f"{type(self).__qualname__}.source must be 'delta', 'harmonic' or 'gauss', "
                             f"got {self.source!r}")


# ------------------------------------------------------------------------------------------------ method
@METHODS.register("as")
class AdjointSampling(Method):
    """Adjoint Sampling on any registered target (EGNN controller for particles, TimeMLP otherwise)."""

    name = "as"
    display_name = "AS"
    Config = ASConfig
    config: ASConfig

    def __init__(self, target: Any, config: ASConfig, device: torch.device | str, generator: torch.Generator):
        super().__init__(target, config, device, generator)
        c = config
        self.particles = getattr(target, "n_particles", None) is not None
        self.dim = target.dim
        self.scale = float(target.length_scale) if c.normalize else 1.0
        self.center = target.center if self.particles else None
        self.sde = ForwardVESDE(c.sigma_min, c.sigma_max, self.center)
        self.source = self._make_source()
        # parameters from a seed drawn from the run's generator (global RNG untouched)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = build_network(target, c.network, c.hidden, c.n_layers, c.emb_size).to(self.device)
            self._build_extra_networks()
        self.opt = torch.optim.Adam(self._param_groups())
        self.buffer = ReplayBuffer(3 * self.dim, c.buffer_size, self.device)
        self.step = 0
        self._order: Tensor | None = None  # index order of the current DataLoader pass
        self._pos = 0

    # -- hooks (ASBS overrides)
    def _build_extra_networks(self) -> None:
        """Networks besides the controller, created inside the seeded block (ASBS: the corrector)."""

    def _param_groups(self) -> list[dict[str, Any]]:
        c = self.config
        return [{"params": list(self.net.parameters()), "lr": c.lr, "weight_decay": c.weight_decay}]

    def stage(self, epoch: int) -> str:
        """Which matching problem epoch ``epoch`` trains: always "adjoint" for AS."""
        return "adjoint"

    def terminal_adjoint(self, x1: Tensor, epoch: int) -> Tensor:
        """a_1 [B, dim] at terminal states x1 (working coordinates): counted, clipped ∇E + ∇log p_1^base."""
        g = clipped_energy_grad(self.target, x1, self.scale, self.config.max_grad_e_norm)
        return as_terminal_adjoint(g, x1, self.sde.total_var + self._source_var())

    # -- helpers
    def _make_source(self) -> Any:
        c, t = self.config, self.target
        if c.source == "delta":
            return DeltaSource(self.dim, self.device)
        if c.source == "harmonic":
            if not self.particles:
                raise ValueError(f"{self.name}: source 'harmonic' needs a particle target; "
                                 f"{t.name} is not one")
            return harmonic_prior(t.n_particles, t.spatial_dim, c.source_scale, self.device)
        if self.particles:
            return MeanFreeGaussianPrior(t.n_particles, t.spatial_dim, c.source_scale, self.device)
        return GaussianPrior(self.dim, c.source_scale, self.device)

    def _source_var(self) -> float:
        """Per-coordinate variance s_0² of the source (0 for the delta)."""
        return 0.0 if self.config.source == "delta" else float(self.source.scale) ** 2

    def _count_net(self, n: int) -> None:
        usage = getattr(self.target, "usage", None)
        if usage is not None:
            usage.network_evals += int(n)

    def _control(self, t: Tensor, x: Tensor) -> Tensor:
        return self.net(t, x)

    @torch.no_grad()
    def simulate(self, n: int, chunk: int) -> tuple[Tensor, Tensor]:
        """(x0, x1) [n, dim] each: n paths of the current controlled SDE (working coordinates)."""
        x0s, x1s = [], []
        for i in range(0, n, chunk):
            x0 = self.source.sample(min(chunk, n - i), self.generator)
            x0s.append(x0)
            x1s.append(self.sde.integrate(self._control, x0, self.config.nfe, self.generator,
                                          self._count_net))
        if not x0s:
            e = torch.empty(0, self.dim, device=self.device)
            return e, e
        return torch.cat(x0s), torch.cat(x1s)

    def _populate(self, stage: str, epoch: int) -> dict[str, float]:
        """Add ``n_new_per_epoch`` fresh paths to the stage's buffer (their a_1 frozen now)."""
        c = self.config
        norms = []
        for i in range(0, c.n_new_per_epoch, c.resample_chunk):
            x0, x1 = self.simulate(min(c.resample_chunk, c.n_new_per_epoch - i), c.resample_chunk)
            a1 = self.terminal_adjoint(x1, epoch).detach()
            self.buffer.add(torch.cat([x0, x1, a1], dim=1))
            norms.append(a1.norm(dim=-1))
        return {"a1_norm": float(torch.cat(norms).mean()) if norms else float("nan")}

    def _buffer_for(self, stage: str) -> ReplayBuffer:
        return self.buffer

    def _next_rows(self, buffer: ReplayBuffer) -> Tensor:
        """The next batch of buffer rows in the code's DataLoader order: passes over the buffer repeated
        ``duplicates`` times in a fresh random order, consecutive batches, the last one of a pass partial."""
        c = self.config
        n = len(buffer)
        total = n * c.duplicates
        if self._order is None or self._pos >= total:
            self._order = torch.randperm(total, generator=self.generator, device=self.generator.device) % n
            self._order = self._order.to(self.device)
            self._pos = 0
        rows = self._order[self._pos : self._pos + c.batch_size]
        self._pos += c.batch_size
        return rows

    def _loss(self, stage: str, data: Tensor) -> Tensor:
        """The adjoint matching loss on buffer rows data [B, 3·dim] = (x0, x1, a1)."""
        x0, x1, a1 = data.split(self.dim, dim=1)
        t = torch.rand(x0.shape[0], generator=self.generator, device=self.device, dtype=x0.dtype)
        xt = self.sde.bridge_sample(t, x0, x1, self.generator)
        self._count_net(x0.shape[0])
        return adjoint_matching_loss(self.net(t, xt), a1)

    # -- Method interface
    def train_step(self) -> dict[str, float]:
        c = self.config
        epoch = self.step // c.steps_per_epoch
        stage = self.stage(epoch)
        logs: dict[str, float] = {}
        if self.step % c.steps_per_epoch == 0:  # a new epoch: fresh paths, a new DataLoader
            logs.update(self._populate(stage, epoch))
            self._order, self._pos = None, 0
        buffer = self._buffer_for(stage)
        data = buffer.x[self._next_rows(buffer)]
        loss = self._loss(stage, data)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step += 1
        logs.update(loss=float(loss.detach()), epoch=float(epoch),
                    corrector_stage=float(stage == "corrector"), buffer_size=float(len(buffer)))
        return logs

    def sample(self, n: int) -> Tensor:
        """n samples [n, dim] (target coordinates, centred for particles) of the controlled SDE."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        _, x1 = self.simulate(n, self.config.sample_chunk)
        x = x1 * self.scale
        if self.center is not None:
            x = self.center(x)
        return x.detach().to(torch.get_default_dtype())

    def diagnostics(self) -> dict[str, float]:
        c = self.config
        epoch = max(self.step - 1, 0) // c.steps_per_epoch
        return {"buffer_size": float(len(self.buffer)), "optimizer_steps": float(self.step),
                "epoch": float(epoch)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "net": self.net.state_dict(),
            "opt": self.opt.state_dict(),
            "buffer": self.buffer.state_dict(),
            "step": self.step,
            "order": None if self._order is None else self._order.clone(),
            "pos": self._pos,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.buffer.load_state_dict(state["buffer"])
        self.step = int(state["step"])
        order = state.get("order")
        self._order = None if order is None else order.to(self.device).clone()
        self._pos = int(state["pos"])
        self.generator.set_state(state["generator"])
