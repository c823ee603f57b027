"""Annealed importance sampling from a flow q towards g ∝ p^α q^{1−α} (FAB; Midgley et al. 2023).

Intermediate densities (linear β spacing β_j = j/(n_int+1), j = 0..n_int+1):

    log π_β = ((1 − β) + β(1 − α)) log q + βα log p = (1 − αβ) log q + αβ log p.

A chain starts at x ~ q with log w = log π_{β_1} − log q; for j = 1..n_int it applies a π_{β_j}-invariant
transition (random-walk Metropolis or HMC) and adds log π_{β_{j+1}}(x) − log π_{β_j}(x). Log-weights are
accumulated in float64. log p = −E comes from the counted target only: per chain one evaluation at the start
and one per Metropolis step / per leapfrog step (HMC reuses the gradient at the current point), i.e.
1 + n_int·n_steps energy evaluations (HMC: as many gradient evaluations). The HMC gradient is that of the
annealed density for any α: ∇ log π_β = (1 − αβ) ∇ log q + αβ ∇ log p (fab-torch hard-codes 2β for the
second coefficient, which is only right for α = 2).

For particle targets pass ``project`` (the target's ``center``): proposals and momenta are centred, so the
chains stay on the (n−1)·d-dimensional subspace on which the flow density is defined.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor


class Flow(Protocol):
    def sample_and_log_prob(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]: ...
    def log_prob(self, x: Tensor) -> Tensor: ...


def intermediate_coefficients(beta: float, alpha: float) -> tuple[float, float]:
    """(c_q, c_p) with log π_β = c_q log q + c_p log p."""
    return (1.0 - beta) + beta * (1.0 - alpha), beta * alpha


def beta_schedule(n_intermediate: int) -> list[float]:
    """Linear spacing [0, 1/(n+1), ..., 1] (n_intermediate + 2 values)."""
    if n_intermediate < 0:
        raise ValueError(f"n_intermediate must be >= 0, got {n_intermediate}")
    m = n_intermediate + 1
    return [j / m for j in range(m + 1)]


def adapt_step(step: float, accept: float, target: float, factor: float | None = None) -> float:
    """Update a step size from one pass's acceptance.

    - Default (``factor`` None): a Robbins–Monro-style update, log ε += accept − target.
    - ``factor`` f: the fixed multiplicative rule of fab-torch (f = 1.05) and fab-jax (f = 1.02): ε × f if
      accept > target, else ε / f.

    From a badly scaled start (DW-4: ε₀ = 1, acceptance 0), shrinking ε tenfold takes 4 passes with the
    default (×0.52 per pass at acceptance 0, ×1.42 at acceptance 1). The multiplicative rule needs 47 passes
    at f = 1.05 and 117 at f = 1.02. Both settle at the target.
    """
    if factor is None:
        return step * math.exp(accept - target)
    return step * factor if accept > target else step / factor


@dataclass
class ChainState:
    """Per-chain cached quantities: x [B, D], log q, log p [B] and (HMC) their gradients [B, D]."""

    x: Tensor
    log_q: Tensor
    log_p: Tensor
    grad_q: Tensor | None = None
    grad_p: Tensor | None = None

    def log_pi(self, beta: float, alpha: float) -> Tensor:
        cq, cp = intermediate_coefficients(beta, alpha)
        return cq * self.log_q + cp * self.log_p

    def grad_log_pi(self, beta: float, alpha: float) -> Tensor:
        assert self.grad_q is not None and self.grad_p is not None
        cq, cp = intermediate_coefficients(beta, alpha)
        return cq * self.grad_q + cp * self.grad_p


def _where(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return torch.where(mask.reshape(-1, *([1] * (a.ndim - 1))), a, b)


class _Evaluator:
    """Evaluates log q (flow) and log p = −E (counted target), with gradients for HMC."""

    def __init__(self, flow: Flow, target: Any, with_grad: bool) -> None:
        self.flow, self.target, self.with_grad = flow, target, with_grad

    def __call__(self, x: Tensor, log_q: Tensor | None = None) -> ChainState:
        x = x.detach()
        finite = torch.isfinite(x).all(-1)
        xs = torch.where(finite.unsqueeze(-1), x, torch.zeros_like(x))
        if self.with_grad:
            with torch.enable_grad():
                xg = xs.requires_grad_(True)
                lq = self.flow.log_prob(xg)
                (gq,) = torch.autograd.grad(lq.sum(), xg)
            e, ge = self.target.energy_and_grad(xs)
            lq, gq = lq.detach(), gq.detach()
            gp = -ge.to(x.dtype)
        else:
            with torch.no_grad():
                lq = self.flow.log_prob(xs) if log_q is None else log_q.detach()
            e = self.target.energy(xs).detach()
            gq = gp = None
        lp = -e.to(x.dtype)
        bad = ~finite | ~torch.isfinite(lq) | ~torch.isfinite(lp)
        ninf = torch.full_like(lp, -float("inf"))
        lq, lp = torch.where(bad, ninf, lq), torch.where(bad, ninf, lp)
        if gq is not None and gp is not None:
            gq = _where(bad, torch.zeros_like(gq), torch.nan_to_num(gq))
            gp = _where(bad, torch.zeros_like(gp), torch.nan_to_num(gp))
        return ChainState(x, lq, lp, gq, gp)


class Metropolis:
    """Random-walk Metropolis: ``n_steps`` Gaussian proposals of std ``step_size`` per intermediate density.

    ``adapt``: after every pass, the step size moves towards ``target_accept`` (``adapt_step``, with
    ``adapt_factor`` as HMC's; the published GMM setting does not adapt).

    Options of the fab-torch ``Metropolis`` operator as BNEM's FAB runs it (``fab@bnem``, docs/fab.md):
    - ``min_step_size``: a ladder of step sizes within each transition: update k of n uses its own step,
      initially linspace(``step_size``, ``min_step_size``, n_steps)[k] (the same ladder for every
      intermediate density). Each update is still an exact Metropolis step for π_β.
    - ``adapt_per_update``: adapt each (intermediate, update) step size right after its update, from the
      batch mean of min(1, π(y)/π(x)) (the acceptance *probability*, not the realised rate), by
      ``adapt_step`` (fab-torch: ×/÷ 1.05 towards 0.65).
    - ``max_log_ratio``: reject every proposal whose log π ratio exceeds it. fab-torch computes the ratio as
      exp(Δ) and maps +inf to 0, so in float32 any proposal with Δ > log(float32 max) ≈ 88.72 is rejected.
      This breaks detailed balance for such moves (the reverse move is allowed), so the kernel is only
      π-invariant where no move has Δ above the threshold; it is there to reproduce the published runs.
    - ``stale_reference``: the acceptance ratio of every update compares the proposal with π_β at the state
      the *transition started from*, not at the current state (fab-torch computes ``x_prev_log_prob`` once
      before its update loop and never refreshes it). Only the first update is then an exact Metropolis
      step; the kernel is **not** π-invariant. Reproduces the published runs only.
    """

    needs_grad = False

    def __init__(
        self,
        n_intermediate: int,
        step_size: float = 5.0,
        n_steps: int = 1,
        adapt: bool = False,
        target_accept: float = 0.65,
        adapt_factor: float | None = None,
        min_step_size: float | None = None,
        adapt_per_update: bool = False,
        max_log_ratio: float | None = None,
        stale_reference: bool = False,
    ) -> None:
        if step_size <= 0 or n_steps < 1:
            raise ValueError(f"Metropolis needs step_size > 0 and n_steps >= 1, got {step_size}, {n_steps}")
        if min_step_size is not None and not min_step_size > 0:
            raise ValueError(f"Metropolis min_step_size must be > 0 (or None), got {min_step_size}")
        if adapt_factor is not None and not adapt_factor > 1:
            raise ValueError(f"Metropolis adapt_factor must be > 1 (or None), got {adapt_factor}")
        self.n_steps = n_steps
        self.adapt = adapt
        self.adapt_factor = adapt_factor
        self.target_accept = target_accept
        self.adapt_per_update = adapt_per_update
        self.max_log_ratio = max_log_ratio
        self.stale_reference = stale_reference
        n = max(n_intermediate, 1)
        if min_step_size is None:
            #: [n_int]: one step size per intermediate density
            self.step_sizes = torch.full((n,), float(step_size), dtype=torch.float64)
        else:
            #: [n_int, n_steps]: one step size per intermediate density and update (the fab-torch ladder)
            ladder = torch.linspace(float(step_size), float(min_step_size), n_steps, dtype=torch.float64)
            self.step_sizes = ladder.repeat(n, 1)
        self.last_accept = torch.zeros(n, dtype=torch.float64)

    @property
    def evals_per_transition(self) -> int:
        return self.n_steps

    def transition(
        self,
        s: ChainState,
        j: int,
        beta: float,
        alpha: float,
        ev: _Evaluator,
        gen: torch.Generator,
        project: Callable[[Tensor], Tensor] | None,
    ) -> ChainState:
        ladder = self.step_sizes.ndim == 2
        acc_total = 0.0
        start_log_pi = s.log_pi(beta, alpha)
        for k in range(self.n_steps):
            eps = float(self.step_sizes[j, k]) if ladder else float(self.step_sizes[j])
            noise = torch.randn(s.x.shape, generator=gen, dtype=s.x.dtype, device=s.x.device)
            if project is not None:
                noise = project(noise)
            prop = ev(s.x + eps * noise)
            ref = start_log_pi if self.stale_reference else s.log_pi(beta, alpha)
            log_ratio = prop.log_pi(beta, alpha) - ref
            ok = torch.isfinite(prop.log_p) & ~torch.isnan(log_ratio)
            if self.max_log_ratio is not None:
                ok = ok & (log_ratio <= self.max_log_ratio)
            u = torch.rand(s.x.shape[0], generator=gen, dtype=s.x.dtype, device=s.x.device)
            accept = (torch.log(u) < log_ratio) & ok
            s = ChainState(
                _where(accept, prop.x, s.x),
                torch.where(accept, prop.log_q, s.log_q),
                torch.where(accept, prop.log_p, s.log_p),
            )
            acc_total += float(accept.double().mean())
            if self.adapt and self.adapt_per_update:
                # the batch mean of min(1, π(y)/π(x)); rejected-by-rule proposals count as 0
                p_acc = torch.where(ok, log_ratio.double().clamp(max=0.0).exp(), torch.zeros_like(log_ratio,
                                    dtype=torch.float64))
                idx = (j, k) if ladder else (j,)
                self.step_sizes[idx] = adapt_step(
                    float(self.step_sizes[idx]), float(p_acc.mean()), self.target_accept, self.adapt_factor
                )
        rate = acc_total / self.n_steps
        self.last_accept[j] = rate
        if self.adapt and not self.adapt_per_update:
            self.step_sizes[j] = self.step_sizes[j] * (
                adapt_step(1.0, rate, self.target_accept, self.adapt_factor)
            )
        return s

    def state_dict(self) -> dict[str, Any]:
        return {"step_sizes": self.step_sizes.clone(), "last_accept": self.last_accept.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_sizes = state["step_sizes"].clone().to(torch.float64)
        self.last_accept = state["last_accept"].clone().to(torch.float64)


class HMC:
    """Hamiltonian Monte Carlo with ``n_leapfrog`` steps (unit mass), one trajectory per intermediate density.

    Step sizes are per intermediate density, adapted after every pass towards ``target_accept`` (0.65, as
    fab-torch's ``p_accept`` tuning) by ``adapt_step`` (``adapt_factor``: None for the default rule, 1.02 for
    fab-jax's). Gradients driving the dynamics are clamped to ±``max_grad`` (fab-torch: 1e3); this keeps the
    leapfrog map reversible and volume-preserving, so the Metropolis correction (with the exact log π) still
    makes the kernel exact.
    """

    needs_grad = True

    def __init__(
        self,
        n_intermediate: int,
        step_size: float = 1.0,
        n_leapfrog: int = 5,
        adapt: bool = True,
        target_accept: float = 0.65,
        max_grad: float = 1e3,
        adapt_factor: float | None = None,
    ) -> None:
        if step_size <= 0 or n_leapfrog < 1:
            raise ValueError(f"HMC needs step_size > 0 and n_leapfrog >= 1, got {step_size}, {n_leapfrog}")
        if adapt_factor is not None and not adapt_factor > 1:
            raise ValueError(f"HMC adapt_factor must be > 1 (or None), got {adapt_factor}")
        self.n_leapfrog = n_leapfrog
        self.adapt = adapt
        self.adapt_factor = adapt_factor
        self.target_accept = target_accept
        self.max_grad = max_grad
        self.step_sizes = torch.full((max(n_intermediate, 1),), float(step_size), dtype=torch.float64)
        self.last_accept = torch.zeros_like(self.step_sizes)

    @property
    def evals_per_transition(self) -> int:
        return self.n_leapfrog

    def transition(
        self,
        s: ChainState,
        j: int,
        beta: float,
        alpha: float,
        ev: _Evaluator,
        gen: torch.Generator,
        project: Callable[[Tensor], Tensor] | None,
    ) -> ChainState:
        eps = float(self.step_sizes[j])
        p0 = torch.randn(s.x.shape, generator=gen, dtype=s.x.dtype, device=s.x.device)
        if project is not None:
            p0 = project(p0)

        def force(st: ChainState) -> Tensor:
            g = st.grad_log_pi(beta, alpha).clamp(-self.max_grad, self.max_grad)
            return project(g) if project is not None else g

        p = p0 + 0.5 * eps * force(s)
        cur = s
        for i in range(self.n_leapfrog):
            cur = ev(cur.x + eps * p)
            if i < self.n_leapfrog - 1:
                p = p + eps * force(cur)
        p = p + 0.5 * eps * force(cur)
        h0 = s.log_pi(beta, alpha) - 0.5 * (p0**2).sum(-1)
        h1 = cur.log_pi(beta, alpha) - 0.5 * (p**2).sum(-1)
        log_ratio = h1 - h0
        u = torch.rand(s.x.shape[0], generator=gen, dtype=s.x.dtype, device=s.x.device)
        accept = (torch.log(u) < log_ratio) & torch.isfinite(cur.log_p) & torch.isfinite(cur.log_q)
        assert (
            s.grad_q is not None
            and cur.grad_q is not None
            and s.grad_p is not None
            and cur.grad_p is not None
        )
        out = ChainState(
            _where(accept, cur.x, s.x),
            torch.where(accept, cur.log_q, s.log_q),
            torch.where(accept, cur.log_p, s.log_p),
            _where(accept, cur.grad_q, s.grad_q),
            _where(accept, cur.grad_p, s.grad_p),
        )
        rate = float(accept.double().mean())
        self.last_accept[j] = rate
        if self.adapt:
            eps_j = float(self.step_sizes[j])
            self.step_sizes[j] = adapt_step(eps_j, rate, self.target_accept, self.adapt_factor)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"step_sizes": self.step_sizes.clone(), "last_accept": self.last_accept.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_sizes = state["step_sizes"].clone().to(torch.float64)
        self.last_accept = state["last_accept"].clone().to(torch.float64)


Transition = Metropolis | HMC


@dataclass
class AISResult:
    """x [B, D] (detached), log_w [B] float64 (−inf for chains that hit a non-finite value), log_q [B] of
    the flow at the final x (under the flow that produced the chain), accept [n_int] acceptance rates, log_p
    [B] = −E at the final x (no further evaluation)."""

    x: Tensor
    log_w: Tensor
    log_q: Tensor
    accept: Tensor
    log_p: Tensor | None = None


class AnnealedImportanceSampler:
    """AIS from ``flow`` (q) to p^α q^{1−α} with ``transition`` at each of ``n_intermediate`` densities.

    ``target`` must be the counted target (``energy`` / ``energy_and_grad``); ``project`` centres particle
    coordinates.
    """

    def __init__(
        self,
        flow: Flow,
        target: Any,
        transition: Transition,
        n_intermediate: int,
        alpha: float = 2.0,
        project: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.flow, self.target, self.transition = flow, target, transition
        self.n_intermediate = n_intermediate
        self.betas = beta_schedule(n_intermediate)
        self.alpha = alpha
        self.project = project

    def run(self, n: int, generator: torch.Generator) -> AISResult:
        """Run n chains; costs n·(1 + n_int·steps) counted target evaluations."""
        ev = _Evaluator(self.flow, self.target, self.transition.needs_grad)
        with torch.no_grad():
            x0, lq0 = self.flow.sample_and_log_prob(n, generator)
        # a flow whose sampling-time log q is only approximately its log_prob (the CNF's forward vs backward
        # integration) is re-evaluated, so that every log q in a chain comes from the same function
        reuse = not self.transition.needs_grad and getattr(self.flow, "exact_sample_log_prob", True)
        s = ev(x0, lq0 if reuse else None)
        a = self.alpha
        log_w = (s.log_pi(self.betas[1], a) - s.log_q).double()
        for j in range(1, self.n_intermediate + 1):
            s = self.transition.transition(s, j - 1, self.betas[j], a, ev, generator, self.project)
            inc = s.log_pi(self.betas[j + 1], a).double() - s.log_pi(self.betas[j], a).double()
            log_w = log_w + inc
        bad = ~torch.isfinite(log_w) | ~torch.isfinite(s.log_q) | ~torch.isfinite(s.log_p)
        log_w = torch.where(bad, torch.full_like(log_w, -float("inf")), log_w)
        acc = self.transition.last_accept[: self.n_intermediate].clone()
        return AISResult(s.x.detach(), log_w, s.log_q.detach(), acc, s.log_p.detach())


def alpha_div_loss(log_q: Tensor, log_w: Tensor) -> Tensor:
    """FAB surrogate loss −Σ_i softmax(log w)_i log q_θ(x_i) for AIS samples x_i (weights detached).

    For α-divergence D_α ∝ ∫ p^α q^{1−α}, its gradient is (α − 1)⁻¹ ∇_θ log ∫ p^α q_θ^{1−α}
    (the AIS samples/weights estimate expectations under g ∝ p^α q^{1−α}).
    """
    w = torch.softmax(log_w.detach().double(), dim=0).to(log_q.dtype)
    keep = torch.isfinite(log_w)
    return -(w[keep] * log_q[keep]).sum()


def log_weights_ess(log_w: Tensor) -> float:
    """Normalised effective sample size (Σw)²/(n Σw²) in [0, 1] of importance log-weights [n]."""
    lw = log_w.double()
    lw = torch.where(torch.isfinite(lw), lw, torch.full_like(lw, -float("inf")))
    if not bool(torch.isfinite(lw).any()):
        return 0.0
    return float(torch.exp(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0)) / lw.numel())
