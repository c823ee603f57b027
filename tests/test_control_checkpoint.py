"""PIS / DDS with ``checkpoint_steps`` (recompute each SDE step's control in backward): the same loss and
gradients as storing every step's activations, and a seeded training step is unchanged."""

import pytest
import torch

import targets
from harness.budget import CountingTarget
from methods import METHODS
from methods.control import simulate


def _method(name, ckpt):
    M = METHODS.get(name)
    cfg = M.Config.for_target("dw4", **M.Config.preset("smoke", "dw4")).replace(
        network="egnn", hidden=16, n_layers=2, n_steps=6, batch_size=8, checkpoint_steps=ckpt
    )
    return M(CountingTarget(targets.get("dw4")), cfg, torch.device("cpu"), torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["pis", "dds"])
def test_checkpointed_steps_give_the_same_gradients(name):
    grads = []
    for ckpt in (False, True):
        m = _method(name, ckpt)
        path = simulate(m.net, m.initial_states(8), m.coef, m.work.score, m.generator, m.center,
                        score_from_step=m.score_from_step, checkpoint_steps=ckpt)
        loss = (path.running + m.terminal_cost(path.y, differentiable=True)).mean()
        loss.backward()
        pg = [p.grad.clone() for p in m.net.parameters() if p.grad is not None]
        grads.append((float(loss.detach()), pg))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    assert len(grads[0][1]) == len(grads[1][1])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["pis", "dds"])
def test_seeded_train_steps_unchanged_by_checkpointing(name):
    logs = []
    for ckpt in (False, True):
        m = _method(name, ckpt)
        logs.append([m.train_step()["loss"] for _ in range(2)])
    assert logs[0] == pytest.approx(logs[1], rel=1e-5)
