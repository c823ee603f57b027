"""Exponential moving average of a network's parameters, shared by every method that samples with one."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``model`` ← β·``model`` + (1 − β)·``net`` per update (parameters), buffers copied from ``net``.

    ``model`` starts as a frozen deep copy of ``net`` (the 2024 BNEM code; DEM's EMAWrapper likewise).
    """

    def __init__(self, net: nn.Module, beta: float) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {beta}")
        self.model = copy.deepcopy(net).requires_grad_(False)
        self.beta = beta

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        for pe, p in zip(self.model.parameters(), net.parameters()):
            pe.mul_(self.beta).add_(p.detach(), alpha=1.0 - self.beta)
        for be, b in zip(self.model.buffers(), net.buffers()):
            be.copy_(b)
