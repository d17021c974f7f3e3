"""Mismatch correction (``algorithms.mismatch``) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algorithms.mismatch import MismatchOptions, mismatch_weights, sequence_mean
from posttrain.algorithms.policy import POLICY_LOSSES, PolicyLossOptions

# proximal - behaviour log-ratios: ratios 0.25, 1, 3 (sequence 0) and 1.5 (sequence 1)
RATIOS = [0.25, 1.0, 3.0, 1.5]
BEHAVIOUR = torch.tensor([-1.0, -2.0, -0.5, -3.0])
PROXIMAL = BEHAVIOUR + torch.log(torch.tensor(RATIOS))
INDEX = torch.tensor([0, 0, 0, 1])


def test_truncated_is_caps_token_ratios():
    weight, metrics = mismatch_weights(PROXIMAL, BEHAVIOUR, INDEX, MismatchOptions("tis", cap=2.0))
    torch.testing.assert_close(weight, torch.tensor([0.25, 1.0, 2.0, 1.5]))
    assert metrics["mismatch/truncated_frac"].item() == pytest.approx(0.25)
    assert metrics["mismatch/is_ratio/max"].item() == pytest.approx(3.0)
    assert metrics["mismatch/is_ratio/min"].item() == pytest.approx(0.25)
    assert metrics["mismatch/is_ratio/mean"].item() == pytest.approx(sum(RATIOS) / 4)
    k3 = sum(r - 1 - math.log(r) for r in RATIOS) / 4  # KL(behav || prox), samples from behav
    assert metrics["mismatch/kl_k3"].item() == pytest.approx(k3, rel=1e-6)
    assert metrics["mismatch/weight/mean"].item() == pytest.approx((0.25 + 1 + 2 + 1.5) / 4)


def test_masked_is_token_level_zeroes_ratios_outside_the_bounds():
    weight, metrics = mismatch_weights(PROXIMAL, BEHAVIOUR, INDEX, MismatchOptions("mis", low=0.5, high=2.0))
    torch.testing.assert_close(weight, torch.tensor([0.0, 1.0, 0.0, 1.5]))
    assert metrics["mismatch/masked_frac"].item() == pytest.approx(0.5)


def test_masked_is_sequence_level_uses_the_geometric_mean():
    geometric = (0.25 * 1.0 * 3.0) ** (1 / 3)  # 0.9086: sequence 0 is kept as a whole
    weight, metrics = mismatch_weights(PROXIMAL, BEHAVIOUR, INDEX,
                                       MismatchOptions("mis", level="sequence", low=0.95, high=2.0))
    torch.testing.assert_close(weight, torch.tensor([0.0, 0.0, 0.0, 1.5]))  # 0.9086 < 0.95: masked
    assert metrics["mismatch/masked_frac"].item() == pytest.approx(0.75)
    weight, _ = mismatch_weights(PROXIMAL, BEHAVIOUR, INDEX, MismatchOptions("mis", level="sequence", low=0.5))
    torch.testing.assert_close(weight, torch.tensor([geometric] * 3 + [1.5]))


def test_no_correction_weights_one_and_still_measures():
    weight, metrics = mismatch_weights(PROXIMAL, BEHAVIOUR, INDEX, MismatchOptions("none"))
    assert torch.equal(weight, torch.ones(4))
    assert metrics["mismatch/is_ratio/max"].item() == pytest.approx(3.0)


def test_equal_policies_give_unit_weights_and_zero_kl():
    weight, metrics = mismatch_weights(BEHAVIOUR, BEHAVIOUR, INDEX, MismatchOptions("tis"))
    assert torch.equal(weight, torch.ones(4)) and metrics["mismatch/kl_k3"].item() == 0.0


def test_sequence_mean_with_gaps_in_ids():
    assert sequence_mean(torch.tensor([1.0, 3.0, 5.0, 7.0]), torch.tensor([3, 3, 9, 9])).tolist() == [2, 2, 6, 6]


def test_bad_options_are_refused():
    with pytest.raises(ValueError):
        MismatchOptions("clip")
    with pytest.raises(ValueError):
        MismatchOptions("mis", low=1.5)


@pytest.mark.parametrize("name", ["ppo_clip", "cispo"])
def test_weighted_policy_loss_equals_weight_times_token_loss(name):
    """The weight multiplies each token's surrogate; the normaliser (trained tokens) is unchanged.
    (gspo's ratio is a mean over the sequence's trained tokens, so one token alone is another loss.)"""
    torch.manual_seed(0)
    logp = (BEHAVIOUR + 0.1 * torch.randn(4)).requires_grad_()
    advantages = torch.tensor([1.0, 1.0, 1.0, -0.5])
    weight = torch.tensor([0.0, 1.0, 2.0, 1.5])
    kwargs = dict(loss_agg_mode="token-mean", step_trained_tokens=4.0, step_sequences=2.0, sequence_index=INDEX)
    options = PolicyLossOptions(importance_level="token")
    weighted, _ = POLICY_LOSSES[name](logp, PROXIMAL, advantages, torch.ones(4), options, token_weight=weight,
                                      **kwargs)
    parts = []
    for t in range(4):  # one token at a time: its own loss, normalised by the same 4 tokens
        mask = torch.zeros(4)
        mask[t] = 1.0
        part, _ = POLICY_LOSSES[name](logp, PROXIMAL, advantages, mask, options, **kwargs)
        parts.append(weight[t] * part)
    torch.testing.assert_close(weighted, torch.stack(parts).sum())
