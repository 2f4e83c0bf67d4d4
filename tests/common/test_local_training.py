"""common/training.py: local step budget from epochs, learning-rate schedule, FedProx term."""

import math

import numpy as np
import pytest
import torch

from fedge.common.lora import apply_lora
from fedge.common.model import build_model
from fedge.common.scope import set_trainable, trainable_state
from fedge.common.synthetic import make_av_dataset
from fedge.common.training import local_step_budget, lr_factor, proximal_term, train_steps


def test_local_epochs_scale_the_steps_with_the_devices_data():
    assert local_step_budget(1000, local_steps=5, local_epochs=0.0, batch_size=32) == 5  # off: fixed steps
    assert local_step_budget(320, local_steps=1, local_epochs=2.0, batch_size=32) == 20
    assert local_step_budget(330, local_steps=1, local_epochs=1.0, batch_size=32) == 11  # a partial batch counts
    assert local_step_budget(320, local_steps=1, local_epochs=1.0, batch_size=16, grad_accum=2) == 10
    assert local_step_budget(10, local_steps=4, local_epochs=1.0, batch_size=32) == 4  # the floor
    assert local_step_budget(10_000, local_steps=4, local_epochs=1.0, batch_size=32, max_local_steps=50) == 50


def test_cosine_schedule_starts_at_one_and_decays_towards_zero():
    assert lr_factor(0, 10, "constant") == lr_factor(9, 10, "constant") == 1.0
    f = [lr_factor(t, 10, "cosine") for t in range(10)]
    assert f[0] == 1.0 and all(a > b for a, b in zip(f, f[1:])) and f[-1] < 0.03
    assert math.isclose(lr_factor(5, 10, "cosine"), 0.5)
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, 10, "step")


def test_proximal_term_and_its_gradient_match_the_reference():
    w = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    w0 = torch.tensor([0.5, 0.0, 3.0])
    term = proximal_term([w], [w0])
    term.backward()
    ref = 0.5 * np.sum((np.array([1.0, -2.0, 3.0]) - np.array([0.5, 0.0, 3.0])) ** 2)
    assert math.isclose(float(term), ref, rel_tol=1e-6)
    np.testing.assert_allclose(w.grad.numpy(), [0.5, -2.0, 0.0])  # d/dw = w - w0


def _drift(**kw):
    m = set_trainable(apply_lora(build_model(seed=0, dim=16, expert_hidden=16), rank=2, alpha=4.0), "partial")
    before = trainable_state(m, "partial")
    data = make_av_dataset(16, seed=1)
    train_steps(m, data, steps=4, batch_size=8, lr=0.01, seed=0, **kw)
    after = trainable_state(m, "partial")
    return math.sqrt(sum(float(((after[k] - before[k]) ** 2).sum()) for k in before))


def test_fedprox_keeps_the_weights_nearer_the_received_ones_and_cosine_moves_less():
    free = _drift()
    assert _drift(prox_mu=100.0) < 0.5 * free
    assert _drift(lr_schedule="cosine") < free
