"""FAB's prioritised replay buffer: sampling ∝ w without replacement, ring overwrite, weight adjustment."""

from __future__ import annotations

import math

import pytest
import torch

from methods.prioritised_buffer import PrioritisedReplayBuffer


def _filled(weights: list[float], max_length: int = 16) -> PrioritisedReplayBuffer:
    buf = PrioritisedReplayBuffer(2, max_length, 1, dtype=torch.float64)
    n = len(weights)
    x = torch.arange(2 * n, dtype=torch.float64).reshape(n, 2)
    buf.add(x, torch.log(torch.tensor(weights, dtype=torch.float64)), torch.zeros(n, dtype=torch.float64))
    return buf


def test_single_draws_are_proportional_to_weights() -> None:
    w = [1.0, 2.0, 3.0, 4.0, 0.0]  # zero weight = log w −inf: never drawn
    buf = _filled(w)
    g = torch.Generator().manual_seed(0)
    n = 6000
    counts = torch.zeros(5)
    for _ in range(n):
        counts[buf.sample(1, g)[3]] += 1
    p = torch.tensor(w) / sum(w)
    se = torch.sqrt(p * (1 - p) / n)
    assert counts[4] == 0
    assert bool(((counts / n - p).abs() <= 4 * se + 1e-12).all()), counts / n


def test_batches_are_without_replacement_and_follow_successive_sampling() -> None:
    w = [1.0, 1.0, 8.0]
    buf = _filled(w)
    g = torch.Generator().manual_seed(1)
    n = 6000
    first_two_contains_0 = 0
    for _ in range(n):
        idx = buf.sample(2, g)[3]
        assert len(set(idx.tolist())) == 2
        first_two_contains_0 += int(0 in idx.tolist())
    # P(0 in a 2-draw without replacement ∝ w) = w0/W + Σ_{j≠0} (w_j/W)(w0/(W − w_j))
    W = sum(w)
    p0 = w[0] / W + (w[1] / W) * (w[0] / (W - w[1])) + (w[2] / W) * (w[0] / (W - w[2]))
    se = math.sqrt(p0 * (1 - p0) / n)
    assert abs(first_two_contains_0 / n - p0) < 4 * se


def test_ring_overwrites_oldest_and_min_length() -> None:
    buf = PrioritisedReplayBuffer(1, max_length=4, min_length=3)
    assert not buf.can_sample
    with pytest.raises(ValueError, match="min_length"):
        buf.sample(1, torch.Generator())
    buf.add(torch.tensor([[1.0], [2.0]]), torch.zeros(2), torch.zeros(2))
    assert not buf.can_sample
    buf.add(torch.tensor([[3.0], [4.0], [5.0]]), torch.zeros(3), torch.zeros(3))
    assert buf.can_sample and buf.length == 4
    assert sorted(buf.x[:, 0].tolist()) == [2.0, 3.0, 4.0, 5.0]


def test_non_finite_entries_are_never_drawn() -> None:
    buf = PrioritisedReplayBuffer(1, 8, 2)
    buf.add(
        torch.tensor([[1.0], [float("nan")], [3.0]]),
        torch.tensor([0.0, 0.0, float("nan")]),
        torch.zeros(3),
    )
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        assert buf.sample(1, g)[3].tolist() == [0]
    with pytest.raises(ValueError, match="finite weight"):
        buf.sample(2, g)


def test_adjust_updates_weights_and_log_q() -> None:
    buf = _filled([1.0, 1.0, 1.0])
    idx = torch.tensor([0, 2])
    buf.adjust(
        idx, torch.tensor([math.log(3.0), -float("inf")]), torch.tensor([5.0, 6.0], dtype=torch.float64)
    )
    assert float(buf.log_w[0]) == pytest.approx(math.log(3.0))
    assert float(buf.log_q_old[0]) == 5.0
    assert math.isinf(float(buf.log_w[2]))
    assert float(buf.log_w[1]) == 0.0


def test_state_dict_round_trip_gives_identical_draws() -> None:
    buf = _filled([1.0, 2.0, 3.0, 4.0, 5.0])
    other = PrioritisedReplayBuffer(2, 16, 1, dtype=torch.float64)
    other.load_state_dict(buf.state_dict())
    a = buf.sample(3, torch.Generator().manual_seed(5))
    b = other.sample(3, torch.Generator().manual_seed(5))
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    with pytest.raises(ValueError, match="shape"):
        PrioritisedReplayBuffer(3, 16, 1).load_state_dict(buf.state_dict())


def test_bad_sizes() -> None:
    with pytest.raises(ValueError, match="min_length"):
        PrioritisedReplayBuffer(2, 4, 8)
    buf = PrioritisedReplayBuffer(2, 4, 1)
    with pytest.raises(ValueError, match="add expects"):
        buf.add(torch.zeros(3, 3), torch.zeros(3), torch.zeros(3))
