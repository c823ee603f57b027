"""Learning-rate rules shared by the methods that cannot hand their optimiser to ``torch.optim.lr_scheduler``
(a scaled or scheduled lr of their own: PIS/DDS's ``lr_scale``, FAB's warm-up/cosine)."""

from __future__ import annotations


def plateau_update(best: float, bad: int, value: float, patience: int,
                   threshold: float = 1e-4) -> tuple[float, int, bool]:
    """One check of torch's ``ReduceLROnPlateau`` (mode min, relative ``threshold``, no cooldown).

    Returns the new best value, the new count of checks without improvement, and whether the lr is to be
    reduced now (after more than ``patience`` checks without improvement; the count then restarts at 0).
    A check improves if ``value < best·(1 − threshold)``; NaN never does."""
    if value < best * (1 - threshold):
        return value, 0, False
    bad += 1
    if bad > patience:
        return best, 0, True
    return best, bad, False
