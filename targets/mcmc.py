"""Batched MCMC kernels over many parallel chains, with tempering, adaptation and diagnostics.

All chains live in one ``ChainState``: positions ``x`` [C, dim], the (untempered) energies E(x) [C], their
gradients ∇E(x) [C, dim] (gradient kernels only), a per-chain inverse temperature ``beta`` [C] (the chain
targets π_β ∝ exp(−β E)) and a per-chain step size ``step_size`` [C]. Every kernel draws all of its randomness
from the ``torch.Generator`` it is given (on the chains' device) and evaluates energies only through
``model.energy(x)`` / ``model.energy_and_grad(x)``, so ``model`` can be a ``Target`` or a harness
``CountingTarget`` (each call is then counted: one kernel step = C energy (and gradient) evaluations;
HMC = C·L).

Kernels (one step, all chains at once, state updated in place, return the accept mask [C] bool):

- ``rwm_step``   random-walk Metropolis, x' = x + h ξ.
- ``mala_step``  Metropolis-adjusted Langevin, x' = x − (h²/2) β∇E(x) + h ξ.
- ``hmc_step``   Hamiltonian Monte Carlo, unit mass, L leapfrog steps of size h.

``project`` (optional, e.g. ``target.center`` for particle systems) is applied to the Gaussian noise and the
momenta; for energies invariant under the projected-out directions (translations) the chains then stay in
the centred subspace and the kernels are exact there.

Tools around the kernels:

- ``StepSizeAdapter``  Robbins–Monro adaptation of log h toward a target acceptance, per chain or pooled over
  groups of chains (e.g. per temperature). Use it only during burn-in: adapting while sampling breaks
  detailed balance.
- ``geometric_ladder`` / ``ReplicaExchange``  parallel tempering with K temperatures × M replicas laid out as
  C = K·M chains (chain c = k·M + m); swaps exchange *states* between adjacent temperatures, so each chain
  index keeps its temperature (and its adapted step size).
- ``AcceptanceStats``  running per-chain acceptance counts.
- ``integrated_autocorr_time`` / ``effective_sample_size``  FFT autocorrelation averaged over chains with
  Sokal's automatic window.
- ``run_chains``  a small driver: burn-in with adaptation, then sampling with thinning, recording a scalar
  trace (energy) for diagnostics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = [
    "TARGET_ACCEPT",
    "AcceptanceStats",
    "ChainState",
    "EnergyModel",
    "ReplicaExchange",
    "RunResult",
    "StepSizeAdapter",
    "effective_sample_size",
    "geometric_ladder",
    "hmc_step",
    "init_state",
    "integrated_autocorr_time",
    "kernel_step",
    "mala_step",
    "run_chains",
    "rwm_step",
]

#: conventional optimal acceptance rates (Roberts & Rosenthal; Beskos et al. for HMC)
TARGET_ACCEPT = {"rwm": 0.234, "mala": 0.574, "hmc": 0.65}

Projection = Callable[[Tensor], Tensor]


class EnergyModel(Protocol):
    """Anything with ``energy(x) [C, dim] -> [C]`` and ``energy_and_grad(x) -> ([C], [C, dim])``."""

    def energy(self, x: Tensor) -> Tensor: ...

    def energy_and_grad(self, x: Tensor) -> tuple[Tensor, Tensor]: ...


@dataclass
class ChainState:
    """State of C parallel chains.

    x [C, dim]; energy [C] = E(x) (untempered); grad [C, dim] = ∇E(x) or None (RWM);
    beta [C] inverse temperatures; step_size [C] kernel step sizes (same units as x).
    """

    x: Tensor
    energy: Tensor
    grad: Tensor | None
    beta: Tensor
    step_size: Tensor

    @property
    def n_chains(self) -> int:
        return self.x.shape[0]

    def select(self, idx: Tensor) -> ChainState:
        """A new state holding the chains ``idx`` (x, energy, grad, beta and step size)."""
        g = None if self.grad is None else self.grad[idx]
        return ChainState(self.x[idx], self.energy[idx], g, self.beta[idx], self.step_size[idx])


def _as_chain_tensor(v: float | Tensor, C: int, like: Tensor, name: str) -> Tensor:
    t = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        t = t.expand(C).clone()
    if t.shape != (C,):
        raise ValueError(f"{name} must be a scalar or a tensor of shape [{C}], got {list(t.shape)}")
    if not bool((t > 0).all()):
        raise ValueError(f"{name} must be positive")
    return t


def init_state(
    model: EnergyModel,
    x: Tensor,
    beta: float | Tensor = 1.0,
    step_size: float | Tensor = 0.1,
    with_grad: bool = True,
) -> ChainState:
    """Evaluate E (and ∇E if ``with_grad``) at the starting points x [C, dim] and build a ``ChainState``."""
    if x.ndim != 2:
        raise ValueError(f"chains must be a [C, dim] tensor, got shape {list(x.shape)}")
    x = x.detach().clone()
    C = x.shape[0]
    if with_grad:
        e, g = model.energy_and_grad(x)
    else:
        with torch.no_grad():
            e, g = model.energy(x), None
    return ChainState(
        x, e.detach(), g, _as_chain_tensor(beta, C, x, "beta"), _as_chain_tensor(step_size, C, x, "step_size")
    )


def _noise(state: ChainState, generator: torch.Generator, project: Projection | None) -> Tensor:
    xi = torch.randn(state.x.shape, generator=generator, device=state.x.device, dtype=state.x.dtype)
    return project(xi) if project is not None else xi


def _accept(log_alpha: Tensor, generator: torch.Generator) -> Tensor:
    u = torch.rand(log_alpha.shape, generator=generator, device=log_alpha.device, dtype=log_alpha.dtype)
    # NaN log-alpha (non-finite proposal energy) is rejected
    return torch.log(u) < torch.nan_to_num(log_alpha, nan=-math.inf)


def _safe_energy_and_grad(model: EnergyModel, x: Tensor) -> tuple[Tensor, Tensor]:
    """energy_and_grad that never raises on a non-finite proposal: such rows get E = +inf (rejected)."""
    finite = torch.isfinite(x).all(-1)
    if bool(finite.all()):
        return model.energy_and_grad(x)
    e = torch.full(x.shape[:1], math.inf, dtype=x.dtype, device=x.device)
    g = torch.zeros_like(x)
    if bool(finite.any()):
        e_f, g_f = model.energy_and_grad(x[finite])
        e[finite], g[finite] = e_f, g_f
    return e, g


def _safe_energy(model: EnergyModel, x: Tensor) -> Tensor:
    finite = torch.isfinite(x).all(-1)
    with torch.no_grad():
        if bool(finite.all()):
            return model.energy(x)
        e = torch.full(x.shape[:1], math.inf, dtype=x.dtype, device=x.device)
        if bool(finite.any()):
            e[finite] = model.energy(x[finite])
    return e


def _update(state: ChainState, acc: Tensor, x: Tensor, e: Tensor, g: Tensor | None) -> None:
    a = acc.unsqueeze(-1)
    state.x = torch.where(a, x, state.x)
    state.energy = torch.where(acc, e, state.energy)
    if g is not None and state.grad is not None:
        state.grad = torch.where(a, g, state.grad)


def rwm_step(
    model: EnergyModel, state: ChainState, generator: torch.Generator, project: Projection | None = None
) -> Tensor:
    """Random-walk Metropolis: x' = x + h ξ, accept with min(1, exp(−β(E' − E))). Returns accepted [C]."""
    h = state.step_size.unsqueeze(-1)
    x_new = state.x + h * _noise(state, generator, project)
    e_new = _safe_energy(model, x_new)
    acc = _accept(-state.beta * (e_new - state.energy), generator)
    _update(state, acc, x_new, e_new, None)
    return acc


def mala_step(
    model: EnergyModel, state: ChainState, generator: torch.Generator, project: Projection | None = None
) -> Tensor:
    """MALA: x' = x − (h²/2)·β∇E(x) + h ξ with the Metropolis–Hastings correction. Returns accepted [C]."""
    if state.grad is None:
        raise ValueError("mala_step needs a ChainState with gradients (init_state(..., with_grad=True))")
    h = state.step_size.unsqueeze(-1)
    b = state.beta.unsqueeze(-1)
    half_h2 = 0.5 * h * h
    x_new = state.x - half_h2 * b * state.grad + h * _noise(state, generator, project)
    e_new, g_new = _safe_energy_and_grad(model, x_new)
    # log q(x | x') − log q(x' | x), q(y | x) = N(y; x − (h²/2)β∇E(x), h² I)
    fwd = ((x_new - state.x + half_h2 * b * state.grad) ** 2).sum(-1)
    bwd = ((state.x - x_new + half_h2 * b * g_new) ** 2).sum(-1)
    h2 = state.step_size**2
    log_alpha = -state.beta * (e_new - state.energy) - (bwd - fwd) / (2 * h2)
    acc = _accept(log_alpha, generator)
    _update(state, acc, x_new, e_new, g_new)
    return acc


def hmc_step(
    model: EnergyModel,
    state: ChainState,
    generator: torch.Generator,
    n_leapfrog: int = 5,
    project: Projection | None = None,
) -> Tensor:
    """HMC, unit mass, ``n_leapfrog`` leapfrog steps of size h on the potential βE. Returns accepted [C].

    Costs ``n_leapfrog`` energy-and-gradient evaluations per chain.
    """
    if state.grad is None:
        raise ValueError("hmc_step needs a ChainState with gradients (init_state(..., with_grad=True))")
    if n_leapfrog < 1:
        raise ValueError(f"n_leapfrog must be >= 1, got {n_leapfrog}")
    h = state.step_size.unsqueeze(-1)
    b = state.beta.unsqueeze(-1)
    p0 = _noise(state, generator, project)
    x, g = state.x, state.grad
    p = p0 - 0.5 * h * b * g
    e = state.energy
    for k in range(n_leapfrog):
        x = x + h * p
        e, g = _safe_energy_and_grad(model, x)
        if k < n_leapfrog - 1:
            p = p - h * b * g
    p = p - 0.5 * h * b * g
    log_alpha = -state.beta * (e - state.energy) - 0.5 * ((p**2).sum(-1) - (p0**2).sum(-1))
    acc = _accept(log_alpha, generator)
    _update(state, acc, x, e, g)
    return acc


def kernel_step(
    kind: str,
    model: EnergyModel,
    state: ChainState,
    generator: torch.Generator,
    project: Projection | None = None,
    n_leapfrog: int = 5,
) -> Tensor:
    """Dispatch one step of ``kind`` in {"rwm", "mala", "hmc"}; returns accepted [C]."""
    if kind == "rwm":
        return rwm_step(model, state, generator, project)
    if kind == "mala":
        return mala_step(model, state, generator, project)
    if kind == "hmc":
        return hmc_step(model, state, generator, n_leapfrog, project)
    raise ValueError(f"unknown MCMC kernel {kind!r}; valid kernels: rwm, mala, hmc")


# ------------------------------------------------------------------------------------------ adaptation
class StepSizeAdapter:
    """Robbins–Monro adaptation of log step sizes toward ``target_accept``.

    log h ← log h + rate_t · (ā − target), rate_t = rate / (1 + t)^decay, where ā is the acceptance of the
    current step averaged over each group of chains (``groups`` [C] integer ids, e.g. the temperature index;
    None = every chain adapts on its own). Step sizes are clamped to [min_step, max_step].
    """

    def __init__(
        self,
        target_accept: float,
        groups: Tensor | None = None,
        rate: float = 0.05,
        decay: float = 0.0,
        min_step: float = 1e-6,
        max_step: float = 10.0,
    ) -> None:
        if not 0.0 < target_accept < 1.0:
            raise ValueError(f"target_accept must be in (0, 1), got {target_accept}")
        self.target_accept = target_accept
        self.groups = groups
        self.rate, self.decay = rate, decay
        self.min_step, self.max_step = min_step, max_step
        self.t = 0

    def update(self, state: ChainState, accepted: Tensor) -> None:
        """Adapt ``state.step_size`` in place from this step's accept mask [C]."""
        a = accepted.to(state.step_size.dtype)
        if self.groups is not None:
            g = self.groups.to(a.device)
            n_groups = int(g.max()) + 1
            sums = torch.zeros(n_groups, dtype=a.dtype, device=a.device).index_add_(0, g, a)
            counts = torch.zeros(n_groups, dtype=a.dtype, device=a.device)
            counts.index_add_(0, g, torch.ones_like(a))
            a = (sums / counts)[g]
        lr = self.rate / (1.0 + self.t) ** self.decay
        state.step_size = (state.step_size.log() + lr * (a - self.target_accept)).exp().clamp(
            self.min_step, self.max_step
        )
        self.t += 1


@dataclass
class AcceptanceStats:
    """Per-chain running counts of accepted / proposed moves."""

    accepted: Tensor
    proposed: int = 0

    @classmethod
    def zeros(cls, n_chains: int, device: torch.device | str = "cpu") -> AcceptanceStats:
        return cls(torch.zeros(n_chains, dtype=torch.float64, device=device))

    def update(self, accepted: Tensor) -> None:
        self.accepted += accepted.to(self.accepted.dtype)
        self.proposed += 1

    @property
    def rate(self) -> Tensor:
        """Per-chain acceptance rate [C] (NaN before the first step)."""
        return self.accepted / self.proposed if self.proposed else torch.full_like(self.accepted, math.nan)


# ------------------------------------------------------------------------------------------- tempering
def geometric_ladder(n_temps: int, t_max: float, t_min: float = 1.0) -> Tensor:
    """Temperatures T_k = t_min·(t_max/t_min)^(k/(K−1)), k = 0..K−1 (float64 [K]); K = 1 gives [t_min]."""
    if n_temps < 1:
        raise ValueError(f"n_temps must be >= 1, got {n_temps}")
    if t_min <= 0 or t_max < t_min:
        raise ValueError(f"need 0 < t_min <= t_max, got t_min={t_min}, t_max={t_max}")
    if n_temps == 1:
        return torch.tensor([t_min], dtype=torch.float64)
    k = torch.arange(n_temps, dtype=torch.float64)
    return t_min * (t_max / t_min) ** (k / (n_temps - 1))


class ReplicaExchange:
    """Replica-exchange swaps for chains laid out as [K temperatures, M replicas] (C = K·M, c = k·M + m).

    ``betas`` [K] inverse temperatures (β_0 = 1 is the target). ``swap(state, generator)`` proposes, for every
    replica m and alternately the even / odd adjacent pairs (k, k+1), to exchange the states of chains
    (k, m) and (k+1, m), accepted with min(1, exp((β_k − β_{k+1})(E_k − E_{k+1}))). Positions, energies and
    gradients move; ``beta`` and ``step_size`` stay with the chain index.
    """

    def __init__(self, betas: Tensor, n_replicas: int) -> None:
        if betas.ndim != 1 or betas.numel() < 1:
            raise ValueError("betas must be a 1-D tensor [K]")
        self.betas = betas
        self.K, self.M = betas.numel(), n_replicas
        self.n_swaps = 0
        self.swap_accepted = torch.zeros(max(self.K - 1, 0), dtype=torch.float64)
        self.swap_proposed = torch.zeros(max(self.K - 1, 0), dtype=torch.float64)

    def chain_betas(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
        """The per-chain inverse temperatures [K·M] for ``init_state``."""
        return self.betas.to(dtype=dtype, device=device).repeat_interleave(self.M)

    def temperature_index(self, device: torch.device | str = "cpu") -> Tensor:
        """Per-chain temperature index [K·M] (for ``StepSizeAdapter(groups=...)``)."""
        return torch.arange(self.K, device=device).repeat_interleave(self.M)

    def swap(self, state: ChainState, generator: torch.Generator) -> Tensor:
        """One round of swaps (even pairs on even calls, odd pairs on odd calls); returns accepted [P, M]."""
        if state.n_chains != self.K * self.M:
            raise ValueError(f"state has {state.n_chains} chains, expected K·M = {self.K}·{self.M}")
        start = self.n_swaps % 2
        self.n_swaps += 1
        lo = torch.arange(start, self.K - 1, 2, device=state.x.device)
        if lo.numel() == 0:
            return torch.zeros(0, self.M, dtype=torch.bool, device=state.x.device)
        hi = lo + 1
        E = state.energy.view(self.K, self.M)
        b = self.betas.to(dtype=E.dtype, device=E.device)
        log_a = (b[lo] - b[hi]).unsqueeze(-1) * (E[lo] - E[hi])
        acc = _accept(log_a, generator)  # [P, M]
        # chain indices of the two partners
        m = torch.arange(self.M, device=E.device)
        ci = (lo.unsqueeze(-1) * self.M + m)[acc]
        cj = (hi.unsqueeze(-1) * self.M + m)[acc]
        for name in ("x", "energy", "grad"):
            t = getattr(state, name)
            if t is None:
                continue
            t = t.clone()
            t[ci], t[cj] = t[cj].clone(), t[ci].clone()
            setattr(state, name, t)
        self.swap_accepted.index_add_(0, lo.cpu(), acc.sum(-1).double().cpu())
        n_prop = torch.full((lo.numel(),), float(self.M), dtype=torch.float64)
        self.swap_proposed.index_add_(0, lo.cpu(), n_prop)
        return acc

    @property
    def swap_rates(self) -> Tensor:
        """Acceptance rate of swaps between temperatures k and k+1, [K−1]."""
        return self.swap_accepted / self.swap_proposed.clamp_min(1)


# ----------------------------------------------------------------------------------------- diagnostics
def _autocorr(series: Tensor) -> Tensor:
    """Normalised autocorrelation ρ(t) [T] of a [T, C] series, averaged over chains (FFT, float64)."""
    y = series.double()
    T = y.shape[0]
    y = y - y.mean(0, keepdim=True)
    n = 1 << (2 * T - 1).bit_length()
    f = torch.fft.rfft(y, n=n, dim=0)
    acov = torch.fft.irfft(f * f.conj(), n=n, dim=0)[:T].mean(-1) / T
    return acov / acov[0] if acov[0] > 0 else torch.ones_like(acov)


def integrated_autocorr_time(series: Tensor, c: float = 5.0) -> float:
    """Integrated autocorrelation time τ of a scalar trace [T] or [T, C] (chains pooled), in steps.

    τ = 1 + 2 Σ_{t=1}^{W} ρ(t), with Sokal's automatic window: the smallest W with W ≥ c·τ(W). The
    autocorrelation is averaged over chains (each centred on its own mean). τ ≥ 1 up to noise; a trace
    shorter than a few τ underestimates it.
    """
    if series.ndim == 1:
        series = series.unsqueeze(-1)
    if series.ndim != 2 or series.shape[0] < 2:
        raise ValueError(f"series must be [T] or [T, C] with T >= 2, got shape {list(series.shape)}")
    rho = _autocorr(series)
    taus = 2.0 * torch.cumsum(rho, 0) - 1.0  # τ(W) = 1 + 2 Σ_{1..W} ρ = 2 Σ_{0..W} ρ − 1
    w = torch.arange(len(taus), dtype=taus.dtype)
    ok = w >= c * taus
    idx = int(torch.argmax(ok.to(torch.int8))) if bool(ok.any()) else len(taus) - 1
    return float(max(taus[idx].item(), 1e-12))


def effective_sample_size(series: Tensor, c: float = 5.0) -> float:
    """ESS = T·C / τ of a scalar trace [T] or [T, C]."""
    if series.ndim == 1:
        series = series.unsqueeze(-1)
    return series.shape[0] * series.shape[1] / integrated_autocorr_time(series, c)


# ---------------------------------------------------------------------------------------------- driver
@dataclass
class RunResult:
    """Output of ``run_chains``.

    samples [S, C, dim]: the kept states of every chain (S = n_samples); energies [S, C];
    trace [T, C]: energies at every sampling step (for τ / ESS); acceptance: per-chain rates over the sampling
    phase [C]; burnin_acceptance [C]; step_size [C] (final, adapted); swap_rates [K−1] (replica exchange).
    """

    samples: Tensor
    energies: Tensor
    trace: Tensor
    acceptance: Tensor
    burnin_acceptance: Tensor
    step_size: Tensor
    state: ChainState
    swap_rates: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)


def run_chains(
    model: EnergyModel,
    x0: Tensor,
    generator: torch.Generator,
    kind: str = "mala",
    n_burnin: int = 1000,
    n_samples: int = 100,
    thin: int = 10,
    step_size: float | Tensor = 0.05,
    target_accept: float | None = None,
    beta: float | Tensor = 1.0,
    exchange: ReplicaExchange | None = None,
    swap_every: int = 1,
    adapt_groups: Tensor | None = None,
    adapt_rate: float = 0.05,
    project: Projection | None = None,
    n_leapfrog: int = 5,
    progress: Callable[[int], None] | None = None,
    on_step: Callable[[int, ChainState], None] | None = None,
) -> RunResult:
    """Burn in (adapting step sizes toward ``target_accept``; default per kernel), then run n_samples·thin
    steps with fixed step sizes, keeping every ``thin``-th state. x0 [C, dim]; returns a ``RunResult``.

    With ``exchange``, chains follow its [K, M] layout (``beta`` is then taken from it) and swaps are proposed
    every ``swap_every`` steps in both phases. ``progress(k)`` is called after each block of k steps;
    ``on_step(t, state)`` after every sampling-phase step t (e.g. to accumulate running averages).
    """
    if kind not in TARGET_ACCEPT:
        raise ValueError(f"unknown MCMC kernel {kind!r}; valid kernels: {', '.join(TARGET_ACCEPT)}")
    if n_burnin < 0 or n_samples < 1 or thin < 1:
        raise ValueError("need n_burnin >= 0, n_samples >= 1, thin >= 1")
    if exchange is not None:
        beta = exchange.chain_betas(x0.dtype, x0.device)
        if adapt_groups is None:
            adapt_groups = exchange.temperature_index(x0.device)
    state = init_state(model, x0, beta=beta, step_size=step_size, with_grad=kind != "rwm")
    adapter = StepSizeAdapter(target_accept or TARGET_ACCEPT[kind], groups=adapt_groups, rate=adapt_rate)
    C = state.n_chains
    burn_stats = AcceptanceStats.zeros(C, x0.device)

    def one(step: int) -> Tensor:
        acc = kernel_step(kind, model, state, generator, project, n_leapfrog)
        if exchange is not None and (step + 1) % swap_every == 0:
            exchange.swap(state, generator)
        return acc

    for t in range(n_burnin):
        acc = one(t)
        adapter.update(state, acc)
        burn_stats.update(acc)
        if progress is not None:
            progress(1)
    if exchange is not None:  # swap statistics of the sampling phase only
        exchange.swap_accepted.zero_()
        exchange.swap_proposed.zero_()
    stats = AcceptanceStats.zeros(C, x0.device)
    samples, energies, trace = [], [], []
    for t in range(n_samples * thin):
        acc = one(n_burnin + t)
        stats.update(acc)
        trace.append(state.energy.detach().clone())
        if on_step is not None:
            on_step(t, state)
        if (t + 1) % thin == 0:
            samples.append(state.x.detach().clone())
            energies.append(state.energy.detach().clone())
        if progress is not None:
            progress(1)
    return RunResult(
        samples=torch.stack(samples),
        energies=torch.stack(energies),
        trace=torch.stack(trace),
        acceptance=stats.rate,
        burnin_acceptance=burn_stats.rate,
        step_size=state.step_size.clone(),
        state=state,
        swap_rates=None if exchange is None else exchange.swap_rates.clone(),
    )
