"""Advantage estimators against hand-computed values."""

import math

import pytest
import torch

from posttrain.algorithms.advantages import (
    grpo_advantages,
    rloo_advantages,
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
