"""PPO-clip, value loss and entropy bonus: hand-computed values and gradients."""

import math

import pytest
import torch

from posttrain.algorithms.policy import entropy_bonus, ppo_policy_loss, value_loss

# five tokens in one row, plus one masked token with a crazy ratio
ADV = torch.tensor([[1.0, 1.0, -1.0, -1.0, 2.0, 5.0]])
RATIO = torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.0, 100.0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 0]])
OLD = torch.zeros(1, 6)


def _logp():
    return RATIO.log().clone().requires_grad_()


def test_clip_higher_values_metrics_and_gradients():
    logp = _logp()
    loss, m = ppo_policy_loss(logp, OLD, ADV, MASK, clip_low=0.2, clip_high=0.28,
                              step_trained_tokens=5, step_sequences=1)
    # tok0 A=1 r=1.5 -> clipped -1.28; tok1 A=1 r=.5 -> -0.5; tok2 A=-1 r=.5 -> clipped .8
    # tok3 A=-1 r=1.5 -> 1.5; tok4 A=2 r=1 -> -2
    assert loss.item() == pytest.approx((-1.28 - 0.5 + 0.8 + 1.5 - 2.0) / 5)
    assert m["clip_frac"] == pytest.approx(2 / 5)
    assert m["dual_clip_frac"] == 0.0
    assert m["ratio/mean"] == pytest.approx((1.5 + 0.5 + 0.5 + 1.5 + 1.0) / 5)
    assert (m["ratio/min"], m["ratio/max"]) == pytest.approx((0.5, 1.5))  # masked 100 ignored
    expected_kl = (2 * (0.5 - math.log(1.5)) + 2 * (-0.5 - math.log(0.5))) / 5
    assert m["approx_kl"] == pytest.approx(expected_kl, rel=1e-5)
    (grad,) = torch.autograd.grad(loss, logp)
    # d(-A r)/dlogp = -A r on unclipped tokens; clipped and masked tokens: exactly 0
    expected = torch.tensor([[0.0, -0.5, 0.0, 1.5, -2.0, 0.0]]) / 5
    torch.testing.assert_close(grad, expected)


def test_symmetric_clip_defaults_to_clip_low():
    loss, m = ppo_policy_loss(_logp(), OLD, ADV, MASK, clip_low=0.2,
                              step_trained_tokens=5, step_sequences=1)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5 - 2.0) / 5)


def test_dual_clip_bounds_negative_advantage_tokens():
    logp = _logp()
    loss, m = ppo_policy_loss(logp, OLD, ADV, MASK, clip_low=0.2, clip_high=0.28,
                              dual_clip_c=1.4, step_trained_tokens=5, step_sequences=1)
    # tok3: min(1.5, -A * 1.4 = 1.4) = 1.4, and no gradient
    assert loss.item() == pytest.approx((-1.28 - 0.5 + 0.8 + 1.4 - 2.0) / 5)
    assert m["dual_clip_frac"] == pytest.approx(1 / 5)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, torch.tensor([[0.0, -0.5, 0.0, 0.0, -2.0, 0.0]]) / 5)
    with pytest.raises(ValueError):
        ppo_policy_loss(logp, OLD, ADV, MASK, dual_clip_c=1.0, step_trained_tokens=5,
                        step_sequences=1)


def test_on_policy_first_step_is_policy_gradient():
    """ratio == 1: loss = -mean(A), gradient = -A / n on every trained token."""
    logp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    adv = torch.tensor([[0.5, -1.0, 2.0]])
    loss, m = ppo_policy_loss(logp, logp.detach(), adv, torch.ones(1, 3),
                              step_trained_tokens=3, step_sequences=1)
    assert loss.item() == pytest.approx(-1.5 / 3)
    assert m["clip_frac"] == 0.0 and m["approx_kl"] == 0.0
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, -adv / 3)


def test_seq_mean_token_mean_mode_and_packed_sequence_index():
    logp = torch.zeros(1, 4, requires_grad=True)  # ratio 1
    adv = torch.tensor([[1.0, 3.0, 10.0, 0.0]])
    seq = torch.tensor([[0, 0, 1, 1]])
    loss, _ = ppo_policy_loss(logp, torch.zeros(1, 4), adv, torch.ones(1, 4),
                              loss_agg_mode="seq-mean-token-mean", sequence_index=seq,
                              step_trained_tokens=4, step_sequences=2)
    assert loss.item() == pytest.approx(-((1 + 3) / 2 + (10 + 0) / 2) / 2)


def test_value_loss_clipping():
    values = torch.tensor([[0.5, 0.1, 3.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0, 0.0]])
    returns = torch.tensor([[1.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, m = value_loss(values, old, returns, mask, clip_range=0.2,
                         step_trained_tokens=2, step_sequences=1)
    # tok0: unclipped .25, clipped (0.2-1)^2=.64 -> .64 (no grad); tok1: within range .81
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)
    assert m["vf_clip_frac"] == pytest.approx(0.5)
    assert m["value/error"] == pytest.approx((0.25 + 0.81) / 2)
    (grad,) = torch.autograd.grad(loss, values)
    torch.testing.assert_close(grad, torch.tensor([[0.0, (0.1 - 1.0) / 2, 0.0]]))
    plain, _ = value_loss(values, old, returns, mask, clip_range=None,
                          step_trained_tokens=2, step_sequences=1)
    assert plain.item() == pytest.approx(0.5 * (0.25 + 0.81) / 2)


def test_entropy_bonus():
    entropy = torch.tensor([[1.0, 2.0, 9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    loss, m = entropy_bonus(entropy, mask, 0.01, step_trained_tokens=2, step_sequences=1)
    assert loss.item() == pytest.approx(-0.01 * 1.5)
    assert m["entropy"] == pytest.approx(1.5)
    (grad,) = torch.autograd.grad(loss, entropy)
    torch.testing.assert_close(grad, torch.tensor([[-0.005, -0.005, 0.0]]))
