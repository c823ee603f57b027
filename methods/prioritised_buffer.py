"""FAB's prioritised replay buffer (Midgley et al. 2023, appendix; fab-torch ``PrioritisedReplayBuffer``).

Holds AIS samples x with their AIS log-weights log w and the flow log-density log q_old at the time they were
generated, in a ring of ``max_length`` entries. ``sample`` draws a batch *without replacement* with
probability ∝ w (Gumbel top-k), ``adjust`` applies the weight correction after a gradient step: for the AIS
target g ∝ p^α q^{1−α}, when q_old becomes q_new the weight of a stored point changes by
(1 − α)(log q_new − log q_old).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class PrioritisedReplayBuffer:
    """Ring buffer of (x [N, dim], log_w [N] float64, log_q_old [N]).

    Args:
        dim: sample dimension.
        max_length: capacity (fab-torch GMM: 12 800).
        min_length: ``can_sample`` is False below this many entries (fab-torch GMM: 1 280).
    """

    def __init__(
        self,
        dim: int,
        max_length: int,
        min_length: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not 0 < min_length <= max_length:
            raise ValueError(f"need 0 < min_length <= max_length, got min {min_length}, max {max_length}")
        self.dim, self.max_length, self.min_length = dim, max_length, min_length
        self.x = torch.zeros(max_length, dim, dtype=dtype, device=device)
        self.log_w = torch.full((max_length,), -float("inf"), dtype=torch.float64, device=device)
        self.log_q_old = torch.zeros(max_length, dtype=dtype, device=device)
        self.length = 0
        self.ptr = 0

    @property
    def can_sample(self) -> bool:
        return self.length >= self.min_length

    def add(self, x: Tensor, log_w: Tensor, log_q: Tensor) -> None:
        """Insert a batch (oldest entries are overwritten). Non-finite log w or log q gets log w = −inf."""
        n = x.shape[0]
        if x.ndim != 2 or x.shape[1] != self.dim or log_w.shape != (n,) or log_q.shape != (n,):
            raise ValueError(
                f"add expects x [n, {self.dim}], log_w [n], log_q [n]; got {list(x.shape)}, "
                f"{list(log_w.shape)}, {list(log_q.shape)}"
            )
        if n > self.max_length:
            x, log_w, log_q = x[-self.max_length :], log_w[-self.max_length :], log_q[-self.max_length :]
            n = self.max_length
        lw = log_w.detach().to(torch.float64)
        ok = torch.isfinite(lw) & torch.isfinite(log_q) & torch.isfinite(x).all(-1)
        lw = torch.where(ok, lw, torch.full_like(lw, -float("inf")))
        idx = (self.ptr + torch.arange(n, device=self.x.device)) % self.max_length
        self.x[idx] = torch.where(ok.unsqueeze(-1), x.detach(), torch.zeros_like(x)).to(self.x.dtype)
        self.log_w[idx] = lw
        self.log_q_old[idx] = torch.where(ok, log_q.detach(), torch.zeros_like(log_q)).to(
            self.log_q_old.dtype
        )
        self.ptr = int((self.ptr + n) % self.max_length)
        self.length = min(self.length + n, self.max_length)

    def sample(self, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``batch`` distinct entries drawn ∝ w: (x, log_w, log_q_old, indices).

        Uses Gumbel top-k (successive sampling without replacement); raises ValueError if fewer than
        ``batch`` entries have a finite weight.
        """
        if not self.can_sample:
            raise ValueError(f"buffer holds {self.length} < min_length {self.min_length} entries")
        lw = self.log_w[: self.length]
        n_finite = int(torch.isfinite(lw).sum())
        if n_finite < batch:
            raise ValueError(f"buffer has only {n_finite} entries with finite weight, asked for {batch}")
        u = torch.rand(self.length, generator=generator, dtype=torch.float64, device=lw.device)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
        idx = torch.topk(lw + gumbel, batch).indices
        return self.x[idx], self.log_w[idx], self.log_q_old[idx], idx

    def adjust(self, idx: Tensor, log_w_adjust: Tensor, log_q_new: Tensor) -> None:
        """log w[idx] += log_w_adjust; log q_old[idx] = log_q_new (non-finite results get log w = −inf)."""
        new = self.log_w[idx] + log_w_adjust.detach().to(torch.float64)
        ok = torch.isfinite(new) & torch.isfinite(log_q_new)
        self.log_w[idx] = torch.where(ok, new, torch.full_like(new, -float("inf")))
        self.log_q_old[idx] = torch.where(ok, log_q_new.detach(), self.log_q_old[idx]).to(
            self.log_q_old.dtype
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "x": self.x.clone(),
            "log_w": self.log_w.clone(),
            "log_q_old": self.log_q_old.clone(),
            "length": self.length,
            "ptr": self.ptr,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["x"].shape != self.x.shape:
            raise ValueError(
                f"buffer state has shape {list(state['x'].shape)}, expected {list(self.x.shape)}"
            )
        self.x = state["x"].clone().to(self.x.device)
        self.log_w = state["log_w"].clone().to(self.log_w.device)
        self.log_q_old = state["log_q_old"].clone().to(self.log_q_old.device)
        self.length, self.ptr = int(state["length"]), int(state["ptr"])
