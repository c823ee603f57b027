"""ReplayBuffer: FIFO semantics, sampling with replacement, reproducibility, state round trip."""

import pytest
import torch

from methods.buffer import ReplayBuffer


def test_fifo_keeps_newest_rows_in_order():
    b = ReplayBuffer(dim=2, max_length=5)
    for k in range(4):  # rows 0..7 in batches of 2
        rows = torch.arange(2 * k, 2 * k + 2, dtype=torch.float32)
        b.add(rows[:, None].repeat(1, 2), energy=rows)
    assert len(b) == 5
    torch.testing.assert_close(b.x[:, 0], torch.tensor([3.0, 4, 5, 6, 7]))
    torch.testing.assert_close(b.energy, torch.tensor([3.0, 4, 5, 6, 7]))
    torch.testing.assert_close(b.latest(2)[:, 0], torch.tensor([6.0, 7.0]))


def test_sample_uniform_with_replacement_and_reproducible():
    b = ReplayBuffer(dim=1, max_length=10)
    b.add(torch.arange(10.0)[:, None], energy=-torch.arange(10.0))
    x1, e1 = b.sample(20000, torch.Generator().manual_seed(3))
    x2, _ = b.sample(20000, torch.Generator().manual_seed(3))
    assert torch.equal(x1, x2)
    torch.testing.assert_close(e1, -x1[:, 0])  # energies travel with their rows
    counts = torch.bincount(x1[:, 0].long(), minlength=10).double()
    assert counts.min() > 0
    # chi-square against uniform, 9 dof: 99.9% quantile is 27.9
    chi2 = ((counts - 2000) ** 2 / 2000).sum()
    assert chi2 < 27.9
    xs, _ = b.sample(50, torch.Generator().manual_seed(0))
    assert xs.shape == (50, 1)  # more than stored: only possible with replacement


def test_state_dict_round_trip_and_errors():
    b = ReplayBuffer(dim=3, max_length=7)
    b.add(torch.randn(9, 3))
    c = ReplayBuffer(dim=3, max_length=100)
    c.load_state_dict(b.state_dict())
    assert torch.equal(b.x, c.x) and c.max_length == 7 and c.energy is None
    with pytest.raises(ValueError, match="shape"):
        b.add(torch.randn(2, 4))
    with pytest.raises(ValueError, match="energies"):
        b.add(torch.randn(2, 3), energy=torch.zeros(2))
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer(dim=3).sample(1)
