"""Advantage estimators against hand-computed values."""

import math

import pytest
import torch

from posttrain.algorithms.advantages import (
    discounted_returns,
    gae_advantages,
    grpo_advantages,
    normalize_advantages,
    reinforce_plus_plus_advantages,
    rloo_advantages,
    token_level_rewards,
    zero_variance_group_fraction,
)


def test_grpo_and_dr_grpo():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    adv = grpo_advantages(rewards)
    s = 0.5 / math.sqrt(1 / 3)  # mean 0.5, unbiased std sqrt(1/3)
    torch.testing.assert_close(adv[0], torch.tensor([s, -s, -s, s]), rtol=1e-5, atol=1e-5)
    assert torch.all(adv[1] == 0)  # zero-variance group: no signal, no nan
    biased = grpo_advantages(rewards, unbiased_std=False)
    torch.testing.assert_close(biased[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), rtol=1e-5,
                               atol=1e-5)
    dr = grpo_advantages(rewards, scale_by_std=False)
    assert dr[0].tolist() == [0.5, -0.5, -0.5, 0.5]
    assert zero_variance_group_fraction(rewards) == 0.5
    assert grpo_advantages(torch.tensor([[3.0]])).item() == 0.0  # group of one


def test_rloo():
    adv = rloo_advantages(torch.tensor([[1.0, 0.0, 0.0], [2.0, 4.0, 6.0]]))
    assert adv[0].tolist() == [1.0, -0.5, -0.5]
    assert adv[1].tolist() == [-3.0, 0.0, 3.0]  # 2-5, 4-4, 6-3
    with pytest.raises(ValueError):
        rloo_advantages(torch.tensor([[1.0]]))


def test_token_level_rewards_last_token_and_kl_penalty():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    kl = torch.full((3, 4), 0.1)
    r = token_level_rewards(torch.tensor([2.0, 3.0, 5.0]), mask, kl_BT=kl, kl_coef=0.5)
    expected = torch.tensor([[-0.05, 1.95, 0, 0], [-0.05, -0.05, -0.05, 2.95], [0, 0, 0, 0]])
    torch.testing.assert_close(r, expected)


def test_discounted_returns_skip_masked_tokens():
    r = torch.tensor([[0.0, 1.0, 7.0, 2.0]])
    mask = torch.tensor([[1, 1, 0, 1]])
    assert discounted_returns(r, mask, gamma=0.5).tolist() == [[1.0, 2.0, 0.0, 2.0]]


def test_reinforce_plus_plus():
    r = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    mask = torch.ones(2, 3)
    adv = reinforce_plus_plus_advantages(r, mask)
    s = 0.5 / math.sqrt(0.3)  # returns [1,1,1,0,0,0]: mean .5, unbiased std sqrt(.3)
    torch.testing.assert_close(adv, torch.tensor([[s, s, s], [-s, -s, -s]]), rtol=1e-5,
                               atol=1e-5)
    # gamma < 1 discounts earlier tokens: returns [.81, .9, 1] before normalising
    adv_g = reinforce_plus_plus_advantages(r, mask, gamma=0.9)
    assert adv_g[0, 0] < adv_g[0, 1] < adv_g[0, 2]


def test_normalize_advantages_ignores_masked():
    adv = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 0]])
    out = normalize_advantages(adv, mask)
    s = 1 / math.sqrt(2)  # values 1, 3: mean 2, unbiased std sqrt(2)
    torch.testing.assert_close(out, torch.tensor([[-s, s, 0.0]]), rtol=1e-5, atol=1e-5)


def test_gae_hand_computed():
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3)
    adv, ret = gae_advantages(r, v, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.4, 0.3]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0]]))
    # gamma .9, lam .5: deltas 0.04, 0.03, 0.3 -> A2 .3, A1 .03+.45*.3, A0 .04+.45*A1
    adv, ret = gae_advantages(r, v, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.11425, 0.165, 0.3]]))
    torch.testing.assert_close(ret, torch.tensor([[0.61425, 0.765, 1.0]]))


def test_gae_skips_interior_masked_span_and_padding():
    r = torch.tensor([[0.0, 0.0, 5.0, 1.0, 9.0]])
    v = torch.tensor([[0.5, 0.6, 9.0, 0.7, 9.0]])
    mask = torch.tensor([[1, 1, 0, 1, 0]])
    adv, ret = gae_advantages(r, v, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.11425, 0.165, 0.0, 0.3, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.61425, 0.765, 0.0, 1.0, 0.0]]))


def test_gae_lambda_one_returns_equal_discounted_returns():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(4, 7, generator=g)
    v = torch.randn(4, 7, generator=g)
    mask = (torch.rand(4, 7, generator=g) > 0.3).long()
    _, ret = gae_advantages(r, v, mask, gamma=0.95, lam=1.0)
    torch.testing.assert_close(ret, discounted_returns(r, mask, gamma=0.95), rtol=1e-5,
                               atol=1e-5)


def test_advantages_carry_no_gradient():
    v = torch.tensor([[0.5, 0.6]], requires_grad=True)
    adv, ret = gae_advantages(torch.tensor([[0.0, 1.0]]), v, torch.ones(1, 2))
    assert not adv.requires_grad and not ret.requires_grad


@pytest.mark.parametrize("value", [0.1, 0.3, 0.7])
def test_equal_non_round_returns_whiten_to_zero(value):
    """All-equal returns carry no signal. In float32 the batch mean of 0.7s is off by a
    rounding error, the std is as small, and their ratio used to give every token an
    advantage of order 1 (0.84 for 0.7) with one sign."""
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    returns = torch.full((3, 5), value) * mask
    assert normalize_advantages(returns, mask).abs().max().item() < 1e-6
    token_rewards = token_level_rewards(torch.full((3,), value), mask)
    assert reinforce_plus_plus_advantages(token_rewards, mask).abs().max().item() < 1e-6
    adv, _ = gae_advantages(token_rewards, torch.zeros(3, 5), mask, gamma=1.0, lam=1.0)  # A_t = 0.7 everywhere
    assert normalize_advantages(adv, mask).abs().max().item() < 1e-6
    assert grpo_advantages(torch.full((4, 6), value)).abs().max().item() < 1e-6


def test_whitening_keeps_real_spread_and_float32():
    mask = torch.ones(1, 4)
    out = normalize_advantages(torch.tensor([[0.7, 0.7, 0.7, 0.8]]), mask)
    assert out.dtype == torch.float32
    assert out[0, 3].item() == pytest.approx(1.5, abs=1e-3)  # one outlier in four: (x - mean) / std = 1.5
