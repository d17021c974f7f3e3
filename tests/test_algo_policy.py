"""PPO-clip, GSPO, CISPO, value loss and entropy bonus: hand-computed values and gradients."""

import math

import pytest
import torch

from posttrain.algorithms.policy import (
    POLICY_LOSSES,
    PolicyLossOptions,
    cispo_policy_loss,
    entropy_bonus,
    gspo_policy_loss,
    ppo_policy_loss,
    sequence_mean_per_token,
    value_loss,
)

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


# GSPO: two packed sequences of unequal length (2 and 3 trained tokens) plus a masked token
# with a crazy ratio that must not enter the sequence mean.
GSPO_LOG_RATIO = torch.tensor([math.log(2.0), 0.0, math.log(0.5), 0.0, 0.0, math.log(100.0)])
GSPO_SEQ = torch.tensor([0, 0, 1, 1, 1, 1])
GSPO_MASK = torch.tensor([1, 1, 1, 1, 1, 0])
S0, S1 = math.sqrt(2.0), 2.0 ** (-1.0 / 3.0)  # exp(mean log ratio): 1.414, 0.794


def _gspo(advantages, importance_level="sequence", **kw):
    logp = GSPO_LOG_RATIO.clone().requires_grad_()
    loss, m = gspo_policy_loss(logp, torch.zeros(6), advantages, GSPO_MASK, clip_low=0.25,
                               clip_high=0.28, importance_level=importance_level,
                               sequence_index=GSPO_SEQ, step_trained_tokens=5, step_sequences=2, **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss, m, grad


def test_sequence_mean_per_token_ignores_masked_tokens():
    got = sequence_mean_per_token(GSPO_LOG_RATIO, GSPO_MASK, GSPO_SEQ)
    torch.testing.assert_close(got, torch.tensor([math.log(S0)] * 2 + [math.log(S1)] * 4))


def test_gspo_sequence_ratio_values_clip_and_gradient():
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, -1.0, 7.0])
    loss, m, grad = _gspo(adv)
    # seq0: A=1, s=1.414 > 1.28 -> clipped at -1.28, no gradient;
    # seq1: A=-1, s=0.794 inside [0.75, 1.28] -> loss +0.794 per token, d/dlogp_t = s1 / 3
    assert loss.item() == pytest.approx((-1.28 + S1) / 2, rel=1e-6)
    assert m["clip_frac"] == pytest.approx(2 / 5)
    assert (m["ratio/min"], m["ratio/max"]) == pytest.approx((S1, S0), rel=1e-6)
    assert m["ratio/mean"] == pytest.approx((2 * S0 + 3 * S1) / 5, rel=1e-6)
    expected = torch.tensor([0.0, 0.0, S1 / 6, S1 / 6, S1 / 6, 0.0])
    torch.testing.assert_close(grad, expected)


def test_gspo_token_level_equals_sequence_level_with_sequence_advantages():
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, -1.0, 7.0])
    seq_loss, _, seq_grad = _gspo(adv, "sequence")
    tok_loss, _, tok_grad = _gspo(adv, "token")
    assert tok_loss.item() == pytest.approx(seq_loss.item(), rel=1e-6)
    torch.testing.assert_close(tok_grad, seq_grad)


def test_gspo_token_level_gives_each_token_its_own_advantage():
    adv = torch.tensor([1.0, 1.0, -1.0, -2.0, -1.0, 7.0])  # advantages differ inside seq1
    seq_loss, _, seq_grad = _gspo(adv, "sequence")
    tok_loss, _, tok_grad = _gspo(adv, "token")
    # same value: mean over seq1's tokens of -A_t * s1 = (4/3) s1
    assert seq_loss.item() == pytest.approx((-1.28 + 4 / 3 * S1) / 2, rel=1e-6)
    assert tok_loss.item() == pytest.approx(seq_loss.item(), rel=1e-6)
    # sequence level: every token of seq1 gets d/dlogp_t = (4/3) s1 * (1/3) / 2
    torch.testing.assert_close(seq_grad[2:5], torch.full((3,), 4 / 9 * S1 / 2))
    # token level (GSPO-token): token t gets -A_t * s1 / 3 / 2
    torch.testing.assert_close(tok_grad[2:5], torch.tensor([1.0, 2.0, 1.0]) * S1 / 6)
    assert tok_grad[:2].abs().sum() == 0 and tok_grad[5] == 0


def test_gspo_is_split_invariant_over_sequences():
    adv = torch.tensor([1.0, 1.0, -1.0, -2.0, -1.0, 7.0])
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "sum"):
        logp = GSPO_LOG_RATIO.clone().requires_grad_()
        whole, _ = gspo_policy_loss(logp, torch.zeros(6), adv, GSPO_MASK, clip_low=0.25, clip_high=0.28,
                                    sequence_index=GSPO_SEQ, loss_agg_mode=mode,
                                    step_trained_tokens=5, step_sequences=2)
        (g_whole,) = torch.autograd.grad(whole, logp)
        logp = GSPO_LOG_RATIO.clone().requires_grad_()
        parts = sum(gspo_policy_loss(logp[sl], torch.zeros(6)[sl], adv[sl], GSPO_MASK[sl], clip_low=0.25,
                                     clip_high=0.28, sequence_index=GSPO_SEQ[sl] - GSPO_SEQ[sl][0],
                                     loss_agg_mode=mode, step_trained_tokens=5, step_sequences=2)[0]
                    for sl in (slice(0, 2), slice(2, 6)))
        (g_parts,) = torch.autograd.grad(parts, logp)
        assert parts.item() == pytest.approx(whole.item(), rel=1e-6), mode
        torch.testing.assert_close(g_parts, g_whole)


def test_gspo_padded_rows_are_sequences_and_bad_level_is_refused():
    logp = torch.tensor([[math.log(2.0), 0.0, 0.0], [math.log(0.5), 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss, _ = gspo_policy_loss(logp, torch.zeros(2, 3), torch.ones(2, 3), mask, clip_low=0.5, clip_high=0.5,
                               step_trained_tokens=5, step_sequences=2)
    assert loss.item() == pytest.approx(-(S0 + S1) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="importance_level"):
        gspo_policy_loss(logp, torch.zeros(2, 3), torch.ones(2, 3), mask, importance_level="group",
                         step_trained_tokens=5, step_sequences=2)


def test_cispo_clipped_weight_keeps_gradient_under_stop_gradient():
    logp = torch.tensor([[math.log(1.5), math.log(0.5), 0.0, math.log(3.0)]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 2.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, m = cispo_policy_loss(logp, torch.zeros(1, 4), adv, mask, clip_low=1.0, clip_high=0.28,
                                step_trained_tokens=3, step_sequences=1)
    # weights sg[clip(r)] = 1.28 (clipped), 0.5, 1.0; loss_t = -w * A * logp
    expected = (-1.28 * math.log(1.5) + 0.5 * math.log(0.5) + 0.0) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["clip_frac"] == pytest.approx(1 / 3)
    (grad,) = torch.autograd.grad(loss, logp)
    # d/dlogp = -w * A / 3: the clipped token keeps -1.28 / 3 (PPO would give it 0); no
    # gradient flows through the weight (else token 1 would get A*w*(1 + logp) terms)
    torch.testing.assert_close(grad, torch.tensor([[-1.28 / 3, 0.5 / 3, -2.0 / 3, 0.0]]))


def test_cispo_and_ppo_have_the_same_gradient_on_policy():
    logp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    adv = torch.tensor([[0.5, -1.0, 2.0]])
    cispo, _ = cispo_policy_loss(logp, logp.detach(), adv, torch.ones(1, 3), step_trained_tokens=3, step_sequences=1)
    (g_cispo,) = torch.autograd.grad(cispo, logp)
    ppo, _ = ppo_policy_loss(logp, logp.detach(), adv, torch.ones(1, 3), step_trained_tokens=3, step_sequences=1)
    (g_ppo,) = torch.autograd.grad(ppo, logp)
    torch.testing.assert_close(g_cispo, g_ppo)


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_every_registered_loss_is_the_policy_gradient_on_policy(name):
    """At ratio 1 with one advantage per sequence, any policy loss's gradient is the plain
    policy gradient -A / n on trained tokens and 0 on masked ones (packed, unequal lengths)."""
    logp = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.5, -9.0], requires_grad=True)
    adv = torch.tensor([0.5, 0.5, -2.0, -2.0, -2.0, 4.0])
    mask = torch.tensor([1, 1, 1, 1, 1, 0])
    seq = torch.tensor([0, 0, 1, 1, 1, 1])
    loss, metrics = POLICY_LOSSES[name](logp, logp.detach(), adv, mask, PolicyLossOptions(clip_high=0.28),
                                        loss_agg_mode="token-mean", step_trained_tokens=5, step_sequences=2,
                                        sequence_index=seq)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, torch.where(mask.bool(), -adv / 5, torch.zeros(6)))
    assert {"pg_loss", "clip_frac", "ratio/mean", "ratio/min", "ratio/max", "approx_kl"} <= set(metrics)
    assert metrics["clip_frac"] == 0.0 and metrics["ratio/mean"] == pytest.approx(1.0)
