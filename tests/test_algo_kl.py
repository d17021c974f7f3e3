"""KL estimators and controllers."""

import math

import pytest
import torch

from posttrain.algorithms.kl import (
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    make_kl_controller,
)

LN2 = math.log(2.0)


def test_hand_computed_estimators():
    logp = torch.tensor([math.log(0.5), math.log(0.25)])
    ref = torch.tensor([math.log(0.25), math.log(0.25)])
    # token 0: log r = ref - logp = -ln 2, r = 0.5
    k1 = kl_estimate(logp, ref, "k1")
    k2 = kl_estimate(logp, ref, "k2")
    k3 = kl_estimate(logp, ref, "k3")
    assert k1.tolist() == pytest.approx([LN2, 0.0], abs=1e-6)
    assert k2.tolist() == pytest.approx([0.5 * LN2**2, 0.0], abs=1e-6)
    assert k3.tolist() == pytest.approx([0.5 + LN2 - 1.0, 0.0], abs=1e-6)


def test_k1_and_k3_are_unbiased_estimates_of_true_kl():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    true_kl = (p * (p / q).log()).sum().item()
    samples = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logp, ref = p.log()[samples], q.log()[samples]
    for estimator in ("k1", "k3"):
        assert kl_estimate(logp, ref, estimator).mean().item() == pytest.approx(true_kl, rel=0.02)
    assert kl_estimate(logp, ref, "k3").min() >= 0
    assert kl_estimate(logp, ref, "k3").var() < kl_estimate(logp, ref, "k1").var()


def test_gradients_and_clamp():
    logp = torch.tensor([math.log(0.5), -30.0], requires_grad=True)
    ref = torch.tensor([math.log(0.25), -1.0])
    k3 = kl_estimate(logp, ref, "k3", clamp=10.0)
    assert k3[1].item() == 10.0  # exp(29) clamped
    (grad,) = torch.autograd.grad(k3.sum(), logp)
    assert grad[0].item() == pytest.approx(1 - 0.5)  # 1 - pi_ref / pi
    assert grad[1].item() == 0.0
    (g1,) = torch.autograd.grad(kl_estimate(logp, ref, "k1").sum(), logp)
    assert g1.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k4")


def test_adaptive_controller_follows_ziegler_rule_and_resumes():
    ctl = AdaptiveKLController(0.1, target_kl=6.0, horizon=10_000)
    ctl.update(12.0, n_steps=256)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))
    ctl.update(5.4, n_steps=256)  # error -0.1
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 0.0256) * (1 - 0.1 * 0.0256))
    restored = AdaptiveKLController(1.0, target_kl=1.0, horizon=1.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.update(1.0, 10) == ctl.update(1.0, 10)


def test_fixed_controller_and_factory():
    ctl = make_kl_controller(0.05)
    assert isinstance(ctl, FixedKLController)
    assert ctl.update(100.0, 64) == 0.05
    other = FixedKLController(0.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05
    assert isinstance(make_kl_controller(0.1, target_kl=1.0, horizon=100), AdaptiveKLController)
    with pytest.raises(ValueError):
        make_kl_controller(0.1, target_kl=1.0)
