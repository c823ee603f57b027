"""FAB: flow annealed importance sampling bootstrap (Midgley et al., ICLR 2023) as method ``fab``.

A normalising flow q_θ is trained by minimising the α-divergence D_α(p‖q) (α = 2), whose gradient
−E_g[∇ log q_θ] with g ∝ p^α q^{1−α} is estimated with AIS samples from q towards g (``methods.ais``),
stored in a prioritised replay buffer (``methods.prioritised_buffer``) and re-used for several gradient steps
with the weight correction (1 − α)(log q_new − log q_old).

One ``train_step`` is one optimiser step. With the buffer (the published setting) an AIS batch of
``batch_size`` chains is generated before every ``n_updates_per_ais`` steps (and, first, enough batches to
reach ``buffer_min``); without it every step uses a fresh AIS batch and the loss −Σ softmax(log w) log q_θ(x).

Flows: ``realnvp`` (GMM-40; works in the target's raw coordinates like fab-torch, base N(loc, diag(scale²))
with trainable loc and log-scale, initial scale ``base_scale``) and ``egnn_cnf`` for particle targets (an
E(n)-equivariant continuous flow on the shared ``methods.nets.EGNN``; mean-free Gaussian base).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
from torch import Tensor

from methods.ais import HMC, AnnealedImportanceSampler, Metropolis, alpha_div_loss, log_weights_ess
from methods.base import Method, MethodConfig
from methods.flows import EquivariantCNF, RealNVP
from methods.prioritised_buffer import PrioritisedReplayBuffer
from methods.registry import METHODS

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# smoke-grid particle flows: one RK4 step of a one-layer EGNN, one HMC intermediate with 2 leapfrog steps
_TINY_CNF = {"cnf_steps": 1, "hidden": 16, "n_layers": 1, "n_intermediate": 1, "n_inner": 2}


@dataclasses.dataclass(frozen=True)
class FABConfig(MethodConfig):
    """Hyper-parameters of FAB. Defaults are the fab-torch GMM settings (``experiments/config/gmm.yaml`` run
    with ``use_buffer=True prioritised_buffer=True``, α = 2, 1 intermediate distribution)."""

    alpha: float = 2.0
    # --- AIS
    n_intermediate: int = 1
    transition: Literal["metropolis", "hmc"] = "metropolis"
    n_inner: int = 1  # Metropolis steps per intermediate density, or HMC leapfrog steps
    step_size: float = 5.0
    adapt_step_size: bool = False
    target_accept: float = 0.65
    max_grad: float = 1e3  # HMC gradient clamp (fab-torch max_grad)
    # --- flow
    flow: Literal["realnvp", "egnn_cnf"] = "realnvp"
    n_layers: int = 15
    hidden: int = 80
    base_scale: float = 1.0
    cnf_steps: int = 8  # RK4 steps of the continuous flow
    cnf_divergence: Literal["auto", "exact", "hutchinson"] = "auto"
    dtype: Literal["float32", "float64"] = "float64"
    # --- optimisation
    batch_size: int = 128
    lr: float = 1e-4
    grad_clip: float = 100.0
    # --- prioritised replay buffer
    use_buffer: bool = True
    buffer_max: int = 12_800
    buffer_min: int = 1_280
    n_updates_per_ais: int = 4
    w_adjust_max_clip: float | None = None
    # --- sampling / diagnostics
    sample_mode: Literal["flow", "resample"] = "flow"
    diag_samples: int = 1024

    PER_TARGET = {
        # fab-torch experiments/config/gmm.yaml (README command: use_buffer=True prioritised_buffer=True),
        # 1 intermediate density as in the FAB paper's GMM experiment; flow in raw coordinates, base N(0, I).
        "gmm40": {},
        # se3-augmented-coupling-flows examples/config/dw4_fab.yaml + fab/default.yaml: 2 intermediates, HMC
        # (1 outer × 5 leapfrog, ε0 1.0, tuned to p_accept 0.65), batch 128, buffer 512/64 batches, 8 updates
        # per AIS pass, w-adjust clip 10. Flow: our EGNN CNF instead of the augmented coupling flow, its base
        # scale 2 matched to the DW-4 coordinate spread (reference coordinate std 1.8; not a published value).
        "dw4": {
            "flow": "egnn_cnf",
            "n_intermediate": 2,
            "transition": "hmc",
            "n_inner": 5,
            "step_size": 1.0,
            "adapt_step_size": True,
            "batch_size": 128,
            "lr": 2e-4,
            "buffer_max": 512 * 128,
            "buffer_min": 64 * 128,
            "n_updates_per_ais": 8,
            "w_adjust_max_clip": 10.0,
            "dtype": "float32",
            "hidden": 64,
            "n_layers": 3,
            "base_scale": 2.0,
        },
        # EACF lj13_fab.yaml: 8 intermediates, batch 1024; the rest as DW-4.
        "lj13": {
            "flow": "egnn_cnf",
            "n_intermediate": 8,
            "transition": "hmc",
            "n_inner": 5,
            "step_size": 1.0,
            "adapt_step_size": True,
            "batch_size": 1024,
            "lr": 2e-4,
            "buffer_max": 512 * 1024,
            "buffer_min": 64 * 1024,
            "n_updates_per_ais": 8,
            "w_adjust_max_clip": 10.0,
            "dtype": "float32",
            "hidden": 64,
            "n_layers": 3,
            "base_scale": 1.0,
        },
        # no published FAB setting for LJ-55: the LJ-13 one with a smaller batch.
        "lj55": {
            "flow": "egnn_cnf",
            "n_intermediate": 8,
            "transition": "hmc",
            "n_inner": 5,
            "step_size": 0.5,
            "adapt_step_size": True,
            "batch_size": 128,
            "lr": 2e-4,
            "buffer_max": 512 * 128,
            "buffer_min": 8 * 128,
            "n_updates_per_ais": 8,
            "w_adjust_max_clip": 10.0,
            "dtype": "float32",
            "hidden": 64,
            "n_layers": 3,
            "base_scale": 1.0,
            "cnf_divergence": "hutchinson",
        },
    }
    PRESETS = {
        # a few seconds per cell on a CPU: tiny flows, batches and buffers (plumbing only)
        "smoke": {
            "*": {"batch_size": 32, "buffer_max": 256, "buffer_min": 64, "diag_samples": 128},
            "gmm40": {"n_layers": 4, "hidden": 32},
            "dw4": {
                "cnf_steps": 1,
                "hidden": 16,
                "n_layers": 2,
                "batch_size": 16,
                "buffer_min": 16,
                "buffer_max": 128,
                "diag_samples": 64,
            },
            "lj13": {
                **_TINY_CNF,
                "cnf_divergence": "hutchinson",
                "batch_size": 16,
                "buffer_min": 16,
                "diag_samples": 32,
            },
            "lj55": {**_TINY_CNF, "batch_size": 8, "buffer_min": 8, "buffer_max": 64, "diag_samples": 16},
        },
        "cpu": {
            # GMM-40: the published flow, AIS and buffer, but fewer optimiser steps than published fit in a
            # CPU hour: a base scaled to the problem (σ = 20 in raw coordinates; the means spread over
            # [−40, 40]²), lr 1e-3, and the weight-adjustment clip 10 of the FAB authors' particle configs
            # (without it lr 1e-3 made buffer weights blow up: skipped steps, see docs/fab.md)
            "gmm40": {"base_scale": 20.0, "lr": 1e-3, "w_adjust_max_clip": 10.0},
            # DW-4: a small continuous flow (2 RK4 steps) and batch 64 — the HMC-AIS with the flow's
            # log-density gradient (double back-propagation through the CNF) dominates the cost
            "dw4": {
                "cnf_steps": 2,
                "hidden": 32,
                "n_layers": 3,
                "batch_size": 64,
                "buffer_min": 512,
                "buffer_max": 8192,
                "lr": 1e-3,
            },
        },
    }
    BUDGETS = {
        "smoke": {"*": {"steps": 4, "wall_seconds": 60}},
        "cpu": {"gmm40": {"steps": 5_000, "wall_seconds": 1800}, "dw4": {"wall_seconds": 1800}},
        # fab-torch GMM: 2e7 flow forward passes = 52 076 AIS iterations × 4 buffer steps
        "paper": {"gmm40": {"steps": 208_304}, "dw4": {"steps": 20_000 * 8}, "lj13": {"steps": 14_000 * 8}},
    }

    def __post_init__(self) -> None:
        checks = {
            "alpha": self.alpha > 0,
            "n_intermediate": self.n_intermediate >= 1,
            "n_inner": self.n_inner >= 1,
            "step_size": self.step_size > 0,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "n_layers": self.n_layers >= 1,
            "hidden": self.hidden >= 1,
            "base_scale": self.base_scale > 0,
            "cnf_steps": self.cnf_steps >= 1,
            "n_updates_per_ais": self.n_updates_per_ais >= 1,
            "buffer_min": 0 < self.buffer_min <= self.buffer_max,
            "diag_samples": self.diag_samples >= 2,
            "target_accept": 0 < self.target_accept < 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"FABConfig: invalid values for {bad}: {[getattr(self, k) for k in bad]}")
        if self.use_buffer and self.buffer_min < self.batch_size:
            raise ValueError(
                f"FABConfig: buffer_min ({self.buffer_min}) must be >= batch_size ({self.batch_size})"
            )


def _derive_seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())


@METHODS.register("fab")
class FAB(Method):
    name = "fab"
    display_name = "FAB"
    Config = FABConfig

    def __init__(self, target: Any, config: FABConfig, device: torch.device, generator: torch.Generator):
        super().__init__(target, config, device, generator)
        c = config
        self.dtype = _DTYPES[c.dtype]
        self.particles = getattr(target, "n_particles", None) is not None
        if c.flow == "realnvp" and self.particles:
            raise ValueError(f"fab: flow 'realnvp' is not equivariant; use flow='egnn_cnf' for {target.name}")
        if c.flow == "egnn_cnf" and not self.particles:
            raise ValueError(
                f"fab: flow 'egnn_cnf' needs a particle target; use flow='realnvp' for {target.name}"
            )
        seed = _derive_seed(generator)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            init_gen = torch.Generator().manual_seed(seed)
            self.flow = self._build_flow(init_gen)
        self.flow.to(device=self.device, dtype=self.dtype)
        if isinstance(self.flow, EquivariantCNF):
            self.flow.set_probe_generator(generator)
        project = target.center if self.particles else None
        if c.transition == "hmc":
            trans: Metropolis | HMC = HMC(
                c.n_intermediate, c.step_size, c.n_inner, c.adapt_step_size, c.target_accept, c.max_grad
            )
        else:
            trans = Metropolis(c.n_intermediate, c.step_size, c.n_inner, c.adapt_step_size, c.target_accept)
        self.ais = AnnealedImportanceSampler(self.flow, target, trans, c.n_intermediate, c.alpha, project)
        self.optimizer = torch.optim.Adam(self.flow.parameters(), lr=c.lr)
        self.buffer = (
            PrioritisedReplayBuffer(target.dim, c.buffer_max, c.buffer_min, self.device, self.dtype)
            if c.use_buffer
            else None
        )
        self.n_steps = 0
        self.n_skipped = 0
        self.n_ais_batches = 0
        self._last_ais_ess = float("nan")
        self._last_accept = float("nan")

    def _build_flow(self, gen: torch.Generator) -> torch.nn.Module:
        c, t = self.config, self.target
        if c.flow == "realnvp":
            return RealNVP(t.dim, c.n_layers, c.hidden, c.base_scale, generator=gen, dtype=self.dtype)
        from methods.nets import EGNN

        field = EGNN(t.n_particles, t.spatial_dim, hidden=c.hidden, n_layers=c.n_layers)
        return EquivariantCNF(
            field, t.n_particles, t.spatial_dim, c.cnf_steps, c.base_scale, c.cnf_divergence
        )

    # ------------------------------------------------------------------ training
    def _run_ais(self) -> tuple[Tensor, Tensor, Tensor]:
        self.flow.eval()
        res = self.ais.run(self.config.batch_size, self.generator)
        self.n_ais_batches += 1
        self._last_ais_ess = log_weights_ess(res.log_w)
        self._last_accept = float(res.accept.mean())
        return res.x, res.log_w, res.log_q

    def _fill_buffer(self) -> None:
        assert self.buffer is not None
        while not self.buffer.can_sample:
            self.buffer.add(*self._run_ais())

    def _log_q_finite(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """log q_θ(x) with a graph, on the rows where it is finite: (log_q [k], mask [B]).

        A row whose log q overflows (a stale buffer point far outside the flow's support) would poison the
        gradient (0 · inf = NaN through ``torch.where``), so the pass is redone without those rows.
        """
        log_q = self.flow.log_prob(x)
        rows = torch.isfinite(log_q)
        if not bool(rows.all()):
            log_q = self.flow.log_prob(x[rows]) if bool(rows.any()) else log_q[rows]
        return log_q, rows

    def _optimise(self, loss: Tensor) -> tuple[float, bool]:
        """Adam step on ``loss`` with the gradient clipped to norm ``grad_clip``; False if skipped.

        Overflow-safe clipping: back-propagates loss·s with s = 1/max(1, |loss|) and rescales, which gives
        exactly the clipped gradient of ``loss`` — but stays finite when a stale buffer point with an
        astronomically small (finite) log q (seen on GMM-40: log q ≈ −5e298 at |x| < 50 after a
        coupling layer's scale blew up there) makes the raw gradient overflow. Without this such a point,
        drawn again at every step, made ~30 % of the steps skip.
        """
        self.optimizer.zero_grad(set_to_none=True)
        lv = float(loss.detach())
        if not math.isfinite(lv):
            return lv, False
        s = 1.0 / max(1.0, abs(lv))
        (loss * s).backward()
        params = [p for p in self.flow.parameters() if p.grad is not None]
        n = float(torch.nn.utils.get_total_norm([p.grad for p in params])) if params else 0.0
        if not math.isfinite(n):
            self.optimizer.zero_grad(set_to_none=True)
            return lv, False
        clip = self.config.grad_clip
        factor = clip / n if n > clip * s else 1.0 / s  # true norm n/s > clip: clip; else undo the scaling
        for p in params:
            p.grad.mul_(factor)
        self.optimizer.step()
        return lv, True

    def train_step(self) -> dict[str, float]:
        c = self.config
        self.flow.train()
        if self.buffer is None:
            x, log_w, _ = self._run_ais()
            self.flow.train()
            keep = torch.isfinite(log_w)
            log_q, rows = self._log_q_finite(x[keep])
            loss = alpha_div_loss(log_q, log_w[keep][rows])
            lv, ok = self._optimise(loss)
        else:
            self._fill_buffer()
            if self.n_steps % c.n_updates_per_ais == 0:
                self.buffer.add(*self._run_ais())
            self.flow.train()
            x, _, log_q_old, idx = self.buffer.sample(c.batch_size, self.generator)
            log_q, rows = self._log_q_finite(x)
            log_w_adj = (1.0 - c.alpha) * (log_q.detach() - log_q_old[rows])
            w_adj = torch.exp(log_w_adj)
            if c.w_adjust_max_clip is not None:
                w_adj = w_adj.clamp(max=c.w_adjust_max_clip)
            loss = -(w_adj * log_q).sum() / max(int(rows.sum()), 1)
            lv, ok = self._optimise(loss)
            # points whose log q is no longer finite get weight 0 (log w = −inf) and are never drawn again
            adj_all = torch.full_like(log_q_old, -float("inf"))
            adj_all[rows] = log_w_adj
            lq_all = log_q_old.clone()
            lq_all[rows] = log_q.detach()
            self.buffer.adjust(idx, adj_all, lq_all)
        self.n_steps += 1
        self.n_skipped += int(not ok)
        return {
            "loss": lv,
            "ais_ess": self._last_ais_ess,
            "ais_accept": self._last_accept,
            "step_size": float(self.ais.transition.step_sizes.mean()),
        }

    # ------------------------------------------------------------------ sampling
    def _flow_samples(self, n: int) -> tuple[Tensor, Tensor]:
        self.flow.eval()
        with torch.no_grad():
            x, log_q = self.flow.sample_and_log_prob(n, self.generator)
        return x, log_q

    def _importance_log_weights(self, x: Tensor, log_q: Tensor) -> Tensor:
        """log p − log q [n] (float64) on flow samples; counted energy evaluations; −inf where non-finite."""
        ok = torch.isfinite(x).all(-1) & torch.isfinite(log_q)
        xs = torch.where(ok.unsqueeze(-1), x, torch.zeros_like(x))
        with torch.no_grad():
            lw = -self.target.energy(xs).double() - log_q.double()
        return torch.where(ok & torch.isfinite(lw), lw, torch.full_like(lw, -float("inf")))

    def sample(self, n: int) -> Tensor:
        """n samples [n, dim] in target coordinates: flow samples, or (``sample_mode='resample'``) n flow
        samples resampled multinomially ∝ p/q (n counted energy evaluations)."""
        if n < 1:
            raise ValueError(f"sample: n must be >= 1, got {n}")
        x, log_q = self._flow_samples(n)
        if self.config.sample_mode == "resample":
            lw = self._importance_log_weights(x, log_q)
            if bool(torch.isfinite(lw).any()):
                probs = torch.softmax(lw, 0)
                idx = torch.multinomial(probs.to(x.device), n, replacement=True, generator=self.generator)
                x = x[idx]
        if self.particles:
            x = self.target.center(x)
        return x.detach().float()

    def diagnostics(self) -> dict[str, float]:
        """log Z (IS estimate from ``diag_samples`` flow samples, energies counted) and normalised ESS of the
        importance weights p/q, plus AIS / buffer state."""
        n = self.config.diag_samples
        x, log_q = self._flow_samples(n)
        lw = self._importance_log_weights(x, log_q)
        log_z = float(torch.logsumexp(lw, 0) - math.log(n))
        return {
            "log_z": log_z,
            "ess": log_weights_ess(lw),
            "ais_ess": self._last_ais_ess,
            "ais_accept": self._last_accept,
            "step_size": float(self.ais.transition.step_sizes.mean()),
            "skipped_steps": float(self.n_skipped),
            "ais_batches": float(self.n_ais_batches),
            "frac_nonfinite": float((~torch.isfinite(lw)).double().mean()),
        }

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "flow": self.flow.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "transition": self.ais.transition.state_dict(),
            "buffer": self.buffer.state_dict() if self.buffer is not None else None,
            "n_steps": self.n_steps,
            "n_skipped": self.n_skipped,
            "n_ais_batches": self.n_ais_batches,
            "last": [self._last_ais_ess, self._last_accept],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.flow.load_state_dict(state["flow"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ais.transition.load_state_dict(state["transition"])
        if self.buffer is not None:
            if state["buffer"] is None:
                raise ValueError("fab: checkpoint has no buffer but the config uses one")
            self.buffer.load_state_dict(state["buffer"])
        self.n_steps, self.n_skipped = int(state["n_steps"]), int(state["n_skipped"])
        self.n_ais_batches = int(state["n_ais_batches"])
        self._last_ais_ess, self._last_accept = (float(v) for v in state["last"])
