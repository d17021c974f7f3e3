"""DPO (sigmoid, label smoothing), IPO and SimPO losses against hand-computed values, their
gradients (reference stop-grad, the direction of the push) and the step-share normaliser."""

import doctest
import math

import pytest
import torch

from posttrain.algorithms import preference
from posttrain.algorithms.preference import (
    preference_optimization_loss,
    sequence_logp_sums,
)


def _nls(x):  # -log sigmoid(x)
    return math.log1p(math.exp(-x))


# policy (summed) log-probs of two pairs, reference log-probs, response lengths
CHOSEN, REJECTED = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.0])
REF_CHOSEN, REF_REJECTED = torch.tensor([-1.5, -3.0]), torch.tensor([-1.5, -2.5])
CHOSEN_TOKENS, REJECTED_TOKENS = torch.tensor([2.0, 3.0]), torch.tensor([4.0, 2.0])


def test_dpo_sigmoid_by_hand():
    # pair 0: h = (-1 + 1.5) - (-2 + 1.5) = 1.0; pair 1: h = 0 - 0.5 = -0.5; beta = 0.5
    loss, m = preference_optimization_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.5)
    assert loss.item() == pytest.approx((_nls(0.5) + _nls(-0.25)) / 2, rel=1e-6)
    assert m["rewards/chosen"] == pytest.approx((0.25 + 0.0) / 2)
    assert m["rewards/rejected"] == pytest.approx((-0.25 + 0.25) / 2)
    assert m["rewards/margins"] == pytest.approx((0.5 - 0.25) / 2)
    assert m["rewards/accuracies"] == 0.5
    assert m["logps/chosen"] == pytest.approx(-2.0) and m["logps/rejected"] == pytest.approx(-2.0)
    assert m["pairs"] == 2.0


def test_policy_equal_to_reference_gives_log_2_and_ties():
    loss, m = preference_optimization_loss(CHOSEN, REJECTED, CHOSEN, REJECTED, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert m["rewards/accuracies"] == 0.0 and m["rewards/margins"] == 0.0  # ties count as wrong


def test_conservative_dpo_label_smoothing_by_hand():
    loss, _ = preference_optimization_loss(CHOSEN[:1], REJECTED[:1], REF_CHOSEN[:1], REF_REJECTED[:1],
                                           beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * _nls(0.5) + 0.1 * _nls(-0.5), rel=1e-6)  # 0.524077
    assert loss.item() == pytest.approx(0.524077, abs=1e-6)


def test_ipo_by_hand_uses_per_token_means():
    # pair 0: policy means -0.5, -0.5; reference means -0.75, -0.375 -> h = 0 - (-0.375) = 0.375
    # pair 1: policy means -1, -1; reference means -1, -1.25 -> h = 0 - 0.25 = -0.25
    loss, m = preference_optimization_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, chosen_tokens_P=CHOSEN_TOKENS,
                                           rejected_tokens_P=REJECTED_TOKENS, loss_type="ipo", beta=0.5)
    assert loss.item() == pytest.approx(((0.375 - 1.0) ** 2 + (-0.25 - 1.0) ** 2) / 2, rel=1e-6)
    assert m["logps/chosen"] == pytest.approx(-0.75) and m["rewards/chosen"] == pytest.approx(0.5 * (0.25 + 0.0) / 2)


def test_simpo_by_hand_is_reference_free():
    # per-token means: pair 0 -0.5 vs -0.5, pair 1 -1 vs -1; beta 2, gamma 1 -> -log sigma(0 - 1) both
    loss, m = preference_optimization_loss(CHOSEN, REJECTED, chosen_tokens_P=CHOSEN_TOKENS,
                                           rejected_tokens_P=REJECTED_TOKENS, loss_type="simpo", beta=2.0,
                                           simpo_gamma=1.0)
    assert loss.item() == pytest.approx(_nls(-1.0), rel=1e-6)  # log(1 + e) = 1.313262
    assert m["rewards/chosen"] == pytest.approx(2.0 * (-0.5 - 1.0) / 2)
    smoothed, _ = preference_optimization_loss(CHOSEN, REJECTED, chosen_tokens_P=CHOSEN_TOKENS,
                                               rejected_tokens_P=REJECTED_TOKENS, loss_type="simpo", beta=2.0,
                                               simpo_gamma=1.0, label_smoothing=0.2)
    assert smoothed.item() == pytest.approx(0.8 * _nls(-1.0) + 0.2 * _nls(1.0), rel=1e-6)


def test_gradient_by_hand_and_reference_gets_none():
    """d/d pi_c of -log sigma(beta h) = -beta sigma(-beta h); d/d pi_r = +beta sigma(-beta h);
    the reference log-probs are constants (stop-grad), even when they require grad."""
    chosen = torch.tensor([-1.0], requires_grad=True)
    rejected = torch.tensor([-2.0], requires_grad=True)
    ref_chosen = torch.tensor([-1.5], requires_grad=True)
    ref_rejected = torch.tensor([-1.5], requires_grad=True)
    loss, _ = preference_optimization_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5)
    loss.backward()
    sigma = 1 / (1 + math.exp(0.5))  # sigma(-beta h), beta h = 0.5
    assert chosen.grad.item() == pytest.approx(-0.5 * sigma, rel=1e-6)
    assert rejected.grad.item() == pytest.approx(0.5 * sigma, rel=1e-6)
    assert ref_chosen.grad is None and ref_rejected.grad is None


def test_step_pairs_makes_shares_that_sum_to_the_whole():
    whole, _ = preference_optimization_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.3)
    shares = [preference_optimization_loss(CHOSEN[i:i + 1], REJECTED[i:i + 1], REF_CHOSEN[i:i + 1],
                                           REF_REJECTED[i:i + 1], beta=0.3, step_pairs=2)[0] for i in range(2)]
    assert sum(s.item() for s in shares) == pytest.approx(whole.item(), rel=1e-6)
    empty, m = preference_optimization_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0), torch.zeros(0),
                                            step_pairs=4)
    assert empty.item() == 0.0 and m["pairs"] == 0.0


def test_sequence_sums_route_gradients_to_their_tokens():
    logps = torch.tensor([-1.0, -2.0, -0.5, -0.25], requires_grad=True)
    sums, counts = sequence_logp_sums(logps, torch.tensor([0, 0, 1, 1]), 2)
    assert sums.tolist() == [-3.0, -0.75] and counts.tolist() == [2.0, 2.0]
    (sums * torch.tensor([1.0, 3.0])).sum().backward()
    assert logps.grad.tolist() == [1.0, 1.0, 3.0, 3.0]


@pytest.mark.parametrize("kwargs, message", [
    ({"loss_type": "kto"}, "unknown loss_type"),
    ({"loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing does not apply to ipo"),
    ({"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
    ({"loss_type": "simpo"}, "pass chosen_tokens_P"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        preference_optimization_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, **kwargs)


def test_docstring_examples():
    assert doctest.testmod(preference).failed == 0


def test_rpo_adds_the_per_token_chosen_nll_by_hand():
    # DPO as in test_dpo_sigmoid_by_hand, plus alpha * mean_p(-pi_c / |y_c|):
    # pair 0: -(-1) / 2 = 0.5; pair 1: -(-3) / 3 = 1.0; alpha = 0.5 -> + 0.5 * 0.75
    loss, m = preference_optimization_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.5,
                                           chosen_tokens_P=CHOSEN_TOKENS, rejected_tokens_P=REJECTED_TOKENS,
                                           rpo_alpha=0.5)
    expected = (_nls(0.5) + _nls(-0.25)) / 2 + 0.5 * (0.5 + 1.0) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["loss"] == pytest.approx(expected, rel=1e-6)
    assert m["loss/nll_chosen"] == pytest.approx(0.75)
    assert m["rewards/margins"] == pytest.approx((0.5 - 0.25) / 2)  # the rewards do not change
    assert "loss/nll_chosen" not in preference_optimization_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED)[1]
    # step share: divided by the step's pairs like the preference term
    share, _ = preference_optimization_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.5,
                                            chosen_tokens_P=CHOSEN_TOKENS, rpo_alpha=0.5, step_pairs=4)
    assert share.item() == pytest.approx(expected * 2 / 4, rel=1e-6)


def test_rpo_gradient_raises_the_chosen_log_prob_only():
    chosen = CHOSEN.clone().requires_grad_(True)
    rejected = REJECTED.clone().requires_grad_(True)
    alpha = 2.0
    with_nll, _ = preference_optimization_loss(chosen, rejected, REF_CHOSEN, REF_REJECTED, beta=0.5,
                                               chosen_tokens_P=CHOSEN_TOKENS, rpo_alpha=alpha)
    with_nll.backward()
    grad_c, grad_r = chosen.grad.clone(), rejected.grad.clone()
    chosen.grad = rejected.grad = None
    without, _ = preference_optimization_loss(chosen, rejected, REF_CHOSEN, REF_REJECTED, beta=0.5)
    without.backward()
    # d/d pi_c of alpha * mean_p(-pi_c / |y_c|) = -alpha / (P |y_c|)
    torch.testing.assert_close(grad_c - chosen.grad, -alpha / (2 * CHOSEN_TOKENS))
    torch.testing.assert_close(grad_r, rejected.grad)


def test_rpo_needs_token_counts_and_a_non_negative_alpha():
    with pytest.raises(ValueError, match="chosen_tokens_P"):
        preference_optimization_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, rpo_alpha=1.0)
    with pytest.raises(ValueError, match="rpo_alpha"):
        preference_optimization_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, chosen_tokens_P=CHOSEN_TOKENS,
                                     rpo_alpha=-1.0)
