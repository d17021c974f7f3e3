"""Packed advantage estimators (``ADVANTAGE_ESTIMATORS``): hand-computed values on a tiny batch
with groups and sequences of unequal size, a sequence with no trained token and a KL term;
bit-identity with the [P, G] grid functions; agreement with the padded [B, T] formulation
(kept below as slow references) on random inputs; whitening."""

import math
import statistics

import pytest
import torch

from posttrain.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageOptions,
    Advantages,
    gae_estimator,
    grpo_advantages,
    reinforce_pp_estimator,
    rloo_advantages,
    whiten_advantages,
    zero_variance_group_fraction,
)
from posttrain.algorithms.aggregate import masked_mean, masked_var

# ----------------------------------------------------------------------------- padded references
# The [B, T] formulation the packed estimators replace: response_mask_BT is 1 on trained tokens,
# 0 on padding and on masked spans inside a response, which the recursions skip.


def reference_token_level_rewards(sequence_rewards_B, response_mask_BT, kl_BT=None, kl_coef=0.0):
    mask = (response_mask_BT != 0).float()
    B, T = mask.shape
    positions = torch.arange(T).expand(B, T)
    last = torch.where(mask > 0, positions, torch.full_like(positions, -1)).max(dim=1).values
    rewards = torch.zeros_like(mask)
    has_token = last >= 0
    rows = torch.arange(B)[has_token]
    rewards[rows, last[has_token]] = sequence_rewards_B.float()[has_token]
    if kl_BT is not None and kl_coef:
        rewards = rewards - kl_coef * kl_BT.float() * mask
    return rewards


def reference_discounted_returns(token_rewards_BT, response_mask_BT, gamma):
    mask = response_mask_BT != 0
    rewards = token_rewards_BT.float()
    B, T = rewards.shape
    returns = torch.zeros_like(rewards)
    running = torch.zeros(B)
    for t in range(T - 1, -1, -1):
        updated = rewards[:, t] + gamma * running
        running = torch.where(mask[:, t], updated, running)
        returns[:, t] = torch.where(mask[:, t], updated, torch.zeros_like(updated))
    return returns


def reference_normalize(advantages_BT, response_mask_BT, epsilon=1e-8):
    adv = advantages_BT.float()
    mask = response_mask_BT != 0
    centred = adv - masked_mean(adv.double(), mask).float()
    std = masked_var(centred, mask).sqrt()
    return torch.where(mask, centred / (std + epsilon), torch.zeros_like(centred))


def reference_gae(token_rewards_BT, values_BT, response_mask_BT, gamma, lam):
    mask = response_mask_BT != 0
    rewards = token_rewards_BT.float()
    values = values_BT.float()
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(B)
    next_advantage = torch.zeros(B)
    for t in range(T - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        m = mask[:, t]
        advantages[:, t] = torch.where(m, advantage, torch.zeros_like(advantage))
        next_advantage = torch.where(m, advantage, next_advantage)
        next_value = torch.where(m, values[:, t], next_value)
    returns = torch.where(mask, advantages + values, torch.zeros_like(advantages))
    return advantages, returns


# ----------------------------------------------------------------------------- a tiny batch
# Two prompt groups of unequal size: group 0 = sequences 0, 1, 2 (sequence 2 has no trained
# token), group 1 = sequences 3, 4. Token counts 2, 1, 0, 3, 1 -> N = 7.
REWARDS_S = torch.tensor([1.0, 0.0, 0.0, 2.0, 4.0])
GROUP_INDEX_S = torch.tensor([0, 0, 0, 1, 1])
SEQUENCE_INDEX_N = torch.tensor([0, 0, 1, 3, 3, 3, 4])
KL_N = torch.tensor([0.2, 0.2, 0.4, 0.0, 0.2, 0.2, 0.8])
VALUES_N = torch.tensor([0.5, 1.0, 0.0, 0.2, 0.4, 1.0, 2.0])
# kl_coef 0.5 takes 0.5 * (0.4, 0.4, 0, 0.4, 0.8) from the rewards: 0.8, -0.2, 0, 1.8, 3.6.
# Group 0 mean 0.2 -> centred 0.6, -0.4, -0.2; group 1 mean 2.7 -> centred -0.9, 0.9.
KL_OPTIONS = AdvantageOptions(gamma=0.5, lam=0.5, kl_coef=0.5)


def run_tiny(name: str, options: AdvantageOptions = KL_OPTIONS) -> Advantages:
    return ADVANTAGE_ESTIMATORS[name].estimate(REWARDS_S, GROUP_INDEX_S, SEQUENCE_INDEX_N, options, kl_N=KL_N,
                                               values_N=VALUES_N)


def test_registry_names_and_needs():
    assert set(ADVANTAGE_ESTIMATORS) == {"grpo", "dr_grpo", "rloo", "reinforce_pp", "gae"}
    assert [name for name, e in ADVANTAGE_ESTIMATORS.items() if e.needs_values] == ["gae"]
    assert [name for name, e in ADVANTAGE_ESTIMATORS.items() if e.whole_batch] == ["reinforce_pp"]


def test_grpo_hand_computed():
    std0, std1 = math.sqrt((0.36 + 0.16 + 0.04) / 2) + 1e-6, math.sqrt(0.81 * 2) + 1e-6  # unbiased
    expected = [0.6 / std0, 0.6 / std0, -0.4 / std0, -0.9 / std1, -0.9 / std1, -0.9 / std1, 0.9 / std1]
    out = run_tiny("grpo")
    torch.testing.assert_close(out.advantages, torch.tensor(expected))
    assert out.returns is None


def test_dr_grpo_hand_computed():
    out = run_tiny("dr_grpo")
    torch.testing.assert_close(out.advantages, torch.tensor([0.6, 0.6, -0.4, -0.9, -0.9, -0.9, 0.9]))


def test_rloo_hand_computed():
    # 0.8 - mean(-0.2, 0), -0.2 - mean(0.8, 0), 1.8 - 3.6, 3.6 - 1.8
    out = run_tiny("rloo")
    torch.testing.assert_close(out.advantages, torch.tensor([0.9, 0.9, -0.6, -1.8, -1.8, -1.8, 1.8]))


def test_group_estimators_without_kl_ignore_kl_n():
    out = run_tiny("dr_grpo", AdvantageOptions(kl_coef=0.0))
    # rewards 1, 0, 0 (mean 1/3) and 2, 4 (mean 3)
    torch.testing.assert_close(out.advantages, torch.tensor([2 / 3, 2 / 3, -1 / 3, -1.0, -1.0, -1.0, 1.0]))


def test_reinforce_pp_hand_computed():
    # token rewards (outcome on the last token, minus 0.5 * KL): -0.1, 0.9 | -0.2 | 0, -0.1, 1.9 | 3.6
    # returns, gamma 0.5: 0.35, 0.9 | -0.2 | 0.425, 0.85, 1.9 | 3.6; then whitened over all 7
    returns = [0.35, 0.9, -0.2, 0.425, 0.85, 1.9, 3.6]
    mean, std = statistics.mean(returns), statistics.stdev(returns)
    out = run_tiny("reinforce_pp")
    torch.testing.assert_close(out.advantages, torch.tensor([(g - mean) / std for g in returns]))
    assert out.returns is None


def test_gae_hand_computed():
    # deltas r_t + 0.5 V_{t+1} - V_t: -0.1, -0.1 | -0.2 | 0, 0, 0.9 | 1.6; A_t = delta_t + 0.25 A_{t+1}
    out = run_tiny("gae")
    advantages = [-0.125, -0.1, -0.2, 0.05625, 0.225, 0.9, 1.6]
    torch.testing.assert_close(out.advantages, torch.tensor(advantages))
    torch.testing.assert_close(out.returns, torch.tensor(advantages) + VALUES_N)


def test_gae_lambda_one_returns_are_discounted_returns():
    out = run_tiny("gae", AdvantageOptions(gamma=0.5, lam=1.0, kl_coef=0.5))
    torch.testing.assert_close(out.returns, torch.tensor([0.35, 0.9, -0.2, 0.425, 0.85, 1.9, 3.6]))


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_output_shapes(name):
    out = run_tiny(name)
    assert out.advantages.shape == SEQUENCE_INDEX_N.shape and out.advantages.dtype == torch.float32
    if ADVANTAGE_ESTIMATORS[name].needs_values:
        assert out.returns.shape == SEQUENCE_INDEX_N.shape and out.returns.dtype == torch.float32
    else:
        assert out.returns is None


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_empty_batch(name):
    nothing = torch.zeros(0, dtype=torch.long)
    out = ADVANTAGE_ESTIMATORS[name].estimate(torch.zeros(0), nothing, nothing, KL_OPTIONS, kl_N=torch.zeros(0),
                                              values_N=torch.zeros(0))
    assert out.advantages.shape == (0,)


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_sequences_without_trained_tokens(name):
    nothing = torch.zeros(0, dtype=torch.long)
    out = ADVANTAGE_ESTIMATORS[name].estimate(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), nothing, KL_OPTIONS,
                                              kl_N=torch.zeros(0), values_N=torch.zeros(0))
    assert out.advantages.shape == (0,)


@pytest.mark.parametrize("name", ["reinforce_pp", "gae"])
def test_zero_length_sequence_leaves_token_estimators_unchanged(name):
    without = ADVANTAGE_ESTIMATORS[name].estimate(
        REWARDS_S[[0, 1, 3, 4]], GROUP_INDEX_S[[0, 1, 3, 4]], torch.tensor([0, 0, 1, 2, 2, 2, 3]), KL_OPTIONS,
        kl_N=KL_N, values_N=VALUES_N)
    with_empty = run_tiny(name)
    torch.testing.assert_close(with_empty.advantages, without.advantages, rtol=0, atol=0)


def test_sequence_advantage_reaches_every_token_of_its_sequence():
    out = run_tiny("dr_grpo", AdvantageOptions())
    per_sequence = {}
    for sequence, advantage in zip(SEQUENCE_INDEX_N.tolist(), out.advantages.tolist()):
        per_sequence.setdefault(sequence, set()).add(advantage)
    assert all(len(values) == 1 for values in per_sequence.values()) and set(per_sequence) == {0, 1, 3, 4}


def test_rloo_group_of_one_raises():
    with pytest.raises(ValueError):
        ADVANTAGE_ESTIMATORS["rloo"].estimate(REWARDS_S, torch.tensor([0, 0, 0, 1, 2]), SEQUENCE_INDEX_N,
                                              AdvantageOptions())
    with pytest.raises(ValueError):
        ADVANTAGE_ESTIMATORS["rloo"].estimate(torch.tensor([1.0]), torch.tensor([0]), torch.tensor([0]),
                                              AdvantageOptions())


def test_grpo_group_of_one_gets_zero():
    for groups in (torch.tensor([0]), torch.tensor([0, 1, 1])):
        out = ADVANTAGE_ESTIMATORS["grpo"].estimate(torch.tensor([3.0, 1.0, 2.0])[: groups.numel()], groups,
                                                    torch.arange(groups.numel()), AdvantageOptions())
        assert out.advantages[0].item() == 0.0


def test_gae_needs_values_and_bad_layouts_raise():
    with pytest.raises(ValueError, match="values_N"):
        gae_estimator(REWARDS_S, GROUP_INDEX_S, SEQUENCE_INDEX_N, AdvantageOptions())
    with pytest.raises(ValueError, match="non-decreasing"):
        reinforce_pp_estimator(REWARDS_S, GROUP_INDEX_S, torch.tensor([1, 0]), AdvantageOptions())
    with pytest.raises(ValueError, match="lie in"):
        reinforce_pp_estimator(REWARDS_S, GROUP_INDEX_S, torch.tensor([0, 5]), AdvantageOptions())
    with pytest.raises(ValueError, match="shape"):
        reinforce_pp_estimator(REWARDS_S, GROUP_INDEX_S, SEQUENCE_INDEX_N, KL_OPTIONS, kl_N=torch.zeros(3))


def test_advantages_carry_no_gradient():
    values = VALUES_N.clone().requires_grad_()
    out = gae_estimator(REWARDS_S, GROUP_INDEX_S, SEQUENCE_INDEX_N, KL_OPTIONS, kl_N=KL_N, values_N=values)
    assert not out.advantages.requires_grad and not out.returns.requires_grad


# ----------------------------------------------------------------------------- against the grid and the padding


def random_batch(seed: int, prompts: int, group_size: int, max_length: int):
    """Per-sequence rewards, token KL and values of a [P, G] batch with random lengths (some 0)
    and random masked spans; returns the sequences' trained-token tensors and their masks."""
    g = torch.Generator().manual_seed(seed)
    S = prompts * group_size
    rewards_S = torch.randint(0, 3, (S,), generator=g).float() / 2 + torch.rand(S, generator=g) * 0.1
    lengths = torch.randint(0, max_length + 1, (S,), generator=g)
    masks = [(torch.rand(int(n), generator=g) > 0.25).float() for n in lengths]
    kls = [torch.rand(int(m.sum()), generator=g) * 0.3 for m in masks]
    values = [torch.randn(int(m.sum()), generator=g) for m in masks]
    return rewards_S, masks, kls, values


def pad_rows(rows, width):
    out = torch.zeros(len(rows), width)
    for row, values in enumerate(rows):
        out[row, : values.numel()] = values
    return out


def scatter_to_mask(trained_rows, masks, width):
    """Place each sequence's trained-token values at its mask's 1s in a [B, width] grid."""
    out = torch.zeros(len(masks), width)
    for row, (values, mask) in enumerate(zip(trained_rows, masks)):
        out[row, : mask.numel()][mask != 0] = values
    return out


def packed_layout(masks):
    counts = torch.tensor([int(m.sum()) for m in masks])
    return torch.repeat_interleave(torch.arange(len(masks)), counts)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kl_coef", [0.0, 0.3])
def test_group_estimators_equal_the_grid_functions_bit_for_bit(seed, kl_coef):
    prompts, group_size = 5, 4
    rewards_S, masks, kls, _ = random_batch(seed, prompts, group_size, 9)
    rewards_PG = rewards_S.reshape(prompts, group_size).clone()
    if kl_coef:
        rewards_PG -= kl_coef * torch.tensor([[kls[p * group_size + i].sum().item() for i in range(group_size)]
                                              for p in range(prompts)])
    group_index_S = torch.arange(prompts).repeat_interleave(group_size)
    options = AdvantageOptions(kl_coef=kl_coef)
    sequence_index_N, kl_N = packed_layout(masks), torch.cat(kls)
    grid = {"grpo": grpo_advantages(rewards_PG), "dr_grpo": grpo_advantages(rewards_PG, scale_by_std=False),
            "rloo": rloo_advantages(rewards_PG)}
    for name, advantages_PG in grid.items():
        out = ADVANTAGE_ESTIMATORS[name].estimate(rewards_S, group_index_S, sequence_index_N, options, kl_N=kl_N)
        assert torch.equal(out.advantages, advantages_PG.reshape(-1)[sequence_index_N]), name


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_do_not_need_contiguous_groups(name):
    prompts, group_size = 4, 3
    rewards_S, masks, kls, _ = random_batch(7, prompts, group_size, 6)
    group_index_S = torch.arange(prompts).repeat_interleave(group_size)
    estimate = ADVANTAGE_ESTIMATORS[name].estimate
    grid = estimate(rewards_S, group_index_S, packed_layout(masks), KL_OPTIONS, kl_N=torch.cat(kls))
    order = torch.randperm(prompts * group_size, generator=torch.Generator().manual_seed(0))
    shuffled_masks = [masks[i] for i in order]
    shuffled = estimate(rewards_S[order], group_index_S[order], packed_layout(shuffled_masks), KL_OPTIONS,
                        kl_N=torch.cat([kls[i] for i in order]))
    per_sequence_grid = torch.split(grid.advantages, [int(m.sum()) for m in masks])
    expected = torch.cat([per_sequence_grid[i] for i in order])
    torch.testing.assert_close(shuffled.advantages, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kl_coef", [0.0, 0.2])
@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.7)])
def test_token_estimators_equal_the_padded_formulation(seed, kl_coef, gamma, lam):
    rewards_S, masks, kls, values = random_batch(seed, 4, 3, 12)
    width = max(m.numel() for m in masks)
    mask_BT = pad_rows(masks, width)
    kl_BT, values_BT = scatter_to_mask(kls, masks, width), scatter_to_mask(values, masks, width)
    token_rewards_BT = reference_token_level_rewards(rewards_S, mask_BT, kl_BT=kl_BT, kl_coef=kl_coef)
    reinforce_BT = reference_normalize(reference_discounted_returns(token_rewards_BT, mask_BT, gamma), mask_BT)
    gae_BT, returns_BT = reference_gae(token_rewards_BT, values_BT, mask_BT, gamma, lam)
    trained = mask_BT != 0

    options = AdvantageOptions(gamma=gamma, lam=lam, kl_coef=kl_coef)
    inputs = (rewards_S, torch.arange(4).repeat_interleave(3), packed_layout(masks), options)
    reinforce = reinforce_pp_estimator(*inputs, kl_N=torch.cat(kls))
    gae = gae_estimator(*inputs, kl_N=torch.cat(kls), values_N=torch.cat(values))
    assert torch.allclose(reinforce.advantages, reinforce_BT[trained], rtol=0, atol=1e-6)
    assert torch.allclose(gae.advantages, gae_BT[trained], rtol=0, atol=1e-6)
    assert torch.allclose(gae.returns, returns_BT[trained], rtol=0, atol=1e-6)
    assert torch.allclose(whiten_advantages(gae.advantages), reference_normalize(gae_BT, mask_BT)[trained],
                          rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- whitening


def test_whiten_hand_computed():
    s = 1 / math.sqrt(2)  # values 1, 3: mean 2, unbiased std sqrt(2)
    torch.testing.assert_close(whiten_advantages(torch.tensor([1.0, 3.0])), torch.tensor([-s, s]))
    out = whiten_advantages(torch.tensor([0.7, 0.7, 0.7, 0.8]))
    assert out.dtype == torch.float32
    assert out[3].item() == pytest.approx(1.5, abs=1e-3)  # one outlier in four: (x - mean) / std = 1.5
    assert whiten_advantages(torch.tensor([5.0])).tolist() == [0.0]
    assert whiten_advantages(torch.zeros(0)).shape == (0,)


@pytest.mark.parametrize("value", [0.1, 0.3, 0.7])
def test_equal_non_round_rewards_give_zero_advantages(value):
    """All-equal rewards carry no signal. In float32 the batch mean of 0.7s is off by a
    rounding error, the std is as small, and their ratio would give every token an advantage
    of order 1 with one sign."""
    sequence_index_N = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    rewards_S = torch.full((3,), value)
    groups = torch.zeros(3, dtype=torch.long)
    assert whiten_advantages(torch.full((11,), value)).abs().max().item() < 1e-6
    reinforce = reinforce_pp_estimator(rewards_S, groups, sequence_index_N, AdvantageOptions())
    assert reinforce.advantages.abs().max().item() < 1e-6
    gae = gae_estimator(rewards_S, groups, sequence_index_N, AdvantageOptions(lam=1.0), values_N=torch.zeros(11))
    assert whiten_advantages(gae.advantages).abs().max().item() < 1e-6  # A_t = value everywhere
    grid_groups = torch.arange(4).repeat_interleave(6)
    grpo = ADVANTAGE_ESTIMATORS["grpo"].estimate(torch.full((24,), value), grid_groups, torch.arange(24),
                                                 AdvantageOptions())
    assert grpo.advantages.abs().max().item() < 1e-6


def test_zero_variance_group_fraction():
    assert zero_variance_group_fraction(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])) == 0.5
    assert zero_variance_group_fraction(torch.zeros(0, 4)) == 0.0
