"""FIFO replay buffer of samples (and optionally their energies), as DEM's ``SimpleBuffer``.

Keeps the newest ``max_length`` rows (oldest dropped first); ``sample`` draws uniformly *with replacement*
using the caller's ``torch.Generator``. Storage is one contiguous tensor in insertion order (oldest first).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class ReplayBuffer:
    """FIFO buffer of x [N, dim] (and energies [N] if given with every ``add``)."""

    def __init__(self, dim: int, max_length: int = 10_000, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if dim < 1 or max_length < 1:
            raise ValueError(
                f"ReplayBuffer needs dim >= 1 and max_length >= 1, got dim={dim}, max_length={max_length}"
            )
        self.dim, self.max_length = dim, max_length
        self.device, self.dtype = torch.device(device), dtype
        self.x = torch.empty(0, dim, dtype=dtype, device=self.device)
        self.energy: Tensor | None = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def add(self, x: Tensor, energy: Tensor | None = None) -> None:
        """Append rows x [n, dim] (and energies [n]); drops the oldest beyond ``max_length``."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"ReplayBuffer.add expects x of shape [n, {self.dim}], got {list(x.shape)}")
        if len(self) > 0 and (energy is None) != (self.energy is None):
            raise ValueError("ReplayBuffer.add: pass energies with every add or with none")
        x = x.detach().to(self.device, self.dtype)
        self.x = torch.cat([self.x, x])[-self.max_length :]
        if energy is not None:
            if energy.shape != (x.shape[0],):
                raise ValueError(f"energy must have shape [{x.shape[0]}], got {list(energy.shape)}")
            e = energy.detach().to(self.device, self.dtype)
            old = self.energy if self.energy is not None else e.new_empty(0)
            self.energy = torch.cat([old, e])[-self.max_length :]

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        """n rows drawn uniformly with replacement: (x [n, dim], energy [n] or None)."""
        if len(self) == 0:
            raise ValueError("cannot sample from an empty ReplayBuffer")
        idx = torch.randint(0, len(self), (n,), generator=generator, device=self.device)
        return self.x[idx], (self.energy[idx] if self.energy is not None else None)

    def latest(self, n: int) -> Tensor:
        """The newest n rows [min(n, len), dim] in insertion order."""
        return self.x[-n:] if n > 0 else self.x[:0]

    def state_dict(self) -> dict[str, Any]:
        return {"x": self.x.clone(), "energy": None if self.energy is None else self.energy.clone(),
                "max_length": self.max_length}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["x"].ndim != 2 or state["x"].shape[1] != self.dim:
            shape = list(state["x"].shape)
            raise ValueError(f"buffer state has x of shape {shape}, expected [N, {self.dim}]")
        self.max_length = int(state["max_length"])
        self.x = state["x"].to(self.device, self.dtype).clone()
        e = state.get("energy")
        self.energy = None if e is None else e.to(self.device, self.dtype).clone()
