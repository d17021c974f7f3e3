"""Bradley–Terry loss against hand-computed values."""

import math

import pytest
import torch

from posttrain.algorithms.preference import bradley_terry_loss


def _nls(x):  # -log sigmoid(x)
    return math.log1p(math.exp(-x))


def test_hand_computed_loss_and_metrics():
    chosen = torch.tensor([2.0, 0.0, 1.0])
    rejected = torch.tensor([1.0, 1.0, 1.0])
    loss, m = bradley_terry_loss(chosen, rejected)
    expected = (_nls(1.0) + _nls(-1.0) + _nls(0.0)) / 3  # (0.3133 + 1.3133 + 0.6931) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["accuracy"] == pytest.approx(1 / 3)  # the tie counts as wrong
    assert m["margin"] == pytest.approx(0.0)
    assert m["reward/chosen"] == pytest.approx(1.0)
    assert m["pairs"] == 3.0


def test_margin_and_centering():
    chosen = torch.tensor([2.0, 0.5])
    rejected = torch.tensor([1.0, -0.5])
    margin = torch.tensor([0.5, 2.0])
    loss, m = bradley_terry_loss(chosen, rejected, margin_P=margin, centering_coef=0.1)
    expected = (_nls(0.5) + 0.1 * 9.0 + _nls(-1.0) + 0.1 * 0.0) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["accuracy"] == 1.0  # accuracy ignores the margin
    assert m["margin"] == pytest.approx(1.0)


def test_gradient_pushes_chosen_up_and_rejected_down():
    chosen = torch.tensor([0.0], requires_grad=True)
    rejected = torch.tensor([0.0], requires_grad=True)
    loss, _ = bradley_terry_loss(chosen, rejected)
    loss.backward()
    # d/dr_c -log sigma(r_c - r_r) = -(1 - sigma(0)) = -0.5
    assert chosen.grad.item() == pytest.approx(-0.5)
    assert rejected.grad.item() == pytest.approx(0.5)


def test_step_pairs_makes_micro_batches_sum_to_full_batch():
    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(6, generator=g), torch.randn(6, generator=g)
    full, _ = bradley_terry_loss(chosen, rejected, centering_coef=0.01)
    parts = sum(
        bradley_terry_loss(chosen[i : i + 2], rejected[i : i + 2], centering_coef=0.01,
                           step_pairs=6)[0]
        for i in (0, 2, 4)
    )
    assert parts.item() == pytest.approx(full.item(), rel=1e-6)


def test_large_reward_gap_is_finite():
    loss, _ = bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([200.0]))
    assert loss.item() == pytest.approx(400.0)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3))
