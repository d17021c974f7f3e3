"""Advantage estimators for on-policy RL on language models.

PPO/GRPO (docs/PIPELINE.md, phase 3): each sampled response gets a scalar reward; an
advantage says how much better than expected each response (or token) was. All functions
run under ``torch.no_grad()``: advantages are constants for the policy loss.

Shapes: ``P`` prompts, ``G`` completions per prompt (group_size), ``B`` responses, ``T``
response tokens. ``response_mask_BT`` is 1 on tokens the policy generated and is trained
on (0 on padding and on masked spans inside a response, such as tool outputs).

Implemented:
- ``grpo_advantages``: GRPO (Shao et al. 2024, DeepSeekMath, §4.1.2 outcome supervision):
  A_i = (r_i - mean(r)) / (std(r) + eps) within each prompt's group; with
  ``scale_by_std=False`` it is Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like
  Training"), which removes the std division (question-difficulty bias).
- ``rloo_advantages``: RLOO (Ahmadian et al. 2024, "Back to Basics"): the baseline of each
  sample is the mean reward of the OTHER G-1 samples of its group.
- ``reinforce_plus_plus_advantages``: REINFORCE++ (Hu 2025): per-token discounted returns
  of token-level rewards (outcome reward on the last token minus a per-token KL penalty,
  ``token_level_rewards``), normalised over the whole batch (no critic, no groups).
- ``gae_advantages``: GAE (Schulman et al. 2016) with a learned critic, for PPO; also
  returns the value targets (returns = advantages + values).

Deviation shared by the token-level estimators: masked tokens INSIDE a response (tool
output) are skipped, not treated as steps: the return and the bootstrap value pass through
them undiscounted, so the last generated token before the span bootstraps from the value of
the first generated token after it. Padding at the end behaves as the episode end.

Sequence-level advantages ([P, G] or [B]) are broadcast to tokens with
``broadcast_to_tokens``. Imports only torch.
"""

from __future__ import annotations

import torch

from posttrain.algorithms.aggregate import masked_mean, masked_var


@torch.no_grad()
def grpo_advantages(
    rewards_PG: torch.Tensor,
    *,
    scale_by_std: bool = True,
    epsilon: float = 1e-6,
    unbiased_std: bool = True,
) -> torch.Tensor:
    """GRPO group-normalised advantages (Dr. GRPO with ``scale_by_std=False``).

    Args:
        rewards_PG: [P, G] scalar reward of each completion, one row per prompt.
        scale_by_std: divide by the group's std + epsilon (GRPO); False = Dr. GRPO.
        epsilon: added to the std (a group whose rewards are all equal gets advantage 0).
        unbiased_std: Bessel-corrected std (as torch.std, TRL and veRL); a group of one
            then has std 0 here instead of nan.

    Returns:
        [P, G] float32 advantages, one per completion.
    """
    if rewards_PG.dim() != 2:
        raise ValueError(f"expected rewards [P, G], got shape {tuple(rewards_PG.shape)}")
    rewards = rewards_PG.double()  # see normalize_advantages: float32 means of equal values round
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale_by_std:
        return centred.float()
    G = rewards.shape[1]
    if G > 1:
        std = rewards.std(dim=1, keepdim=True, unbiased=unbiased_std)
    else:
        std = torch.zeros_like(rewards)
    return (centred / (std + epsilon)).float()


@torch.no_grad()
def zero_variance_group_fraction(rewards_PG: torch.Tensor) -> float:
    """Fraction of groups whose rewards are all equal (they carry no GRPO/RLOO signal;
    DAPO's dynamic sampling drops them). rewards_PG: [P, G]."""
    if rewards_PG.numel() == 0:
        return 0.0
    equal = (rewards_PG == rewards_PG[:, :1]).all(dim=1)
    return equal.float().mean().item()


@torch.no_grad()
def rloo_advantages(rewards_PG: torch.Tensor) -> torch.Tensor:
    """RLOO leave-one-out advantages: A_i = r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean).

    Args:
        rewards_PG: [P, G] rewards, G >= 2.

    Returns:
        [P, G] float32 advantages.
    """
    rewards = rewards_PG.float()
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"RLOO needs rewards [P, G] with G >= 2, got {tuple(rewards.shape)}")
    G = rewards.shape[1]
    others_mean = (rewards.sum(dim=1, keepdim=True) - rewards) / (G - 1)
    return rewards - others_mean


@torch.no_grad()
def broadcast_to_tokens(
    sequence_advantages: torch.Tensor, response_mask_BT: torch.Tensor
) -> torch.Tensor:
    """Give every trained token its sequence's advantage.

    Args:
        sequence_advantages: [B] or [P, G] (flattened row-major to B = P * G).
        response_mask_BT: [B, T] 0/1.

    Returns:
        [B, T] float32, 0 where the mask is 0.
    """
    adv_B = sequence_advantages.reshape(-1).float()
    return adv_B[:, None] * (response_mask_BT != 0).float()


@torch.no_grad()
def token_level_rewards(
    sequence_rewards_B: torch.Tensor,
    response_mask_BT: torch.Tensor,
    *,
    kl_BT: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """Per-token rewards: the outcome reward on the last trained token, minus a KL penalty.

    r_t = [t == last trained token] * R - kl_coef * kl_t   (Ziegler et al. 2019;
    Ouyang et al. 2022; REINFORCE++ eq. for r(s_t, a_t)).

    Args:
        sequence_rewards_B: [B] scalar reward per response.
        response_mask_BT: [B, T] 0/1; a row with no trained token loses its reward.
        kl_BT: optional [B, T] per-token KL estimate to the reference (``kl.kl_estimate``).
        kl_coef: penalty weight beta.

    Returns:
        [B, T] float32 token rewards, 0 where the mask is 0.
    """
    mask = (response_mask_BT != 0).float()
    B, T = mask.shape
    positions = torch.arange(T, device=mask.device).expand(B, T)
    last = torch.where(mask > 0, positions, torch.full_like(positions, -1)).max(dim=1).values
    rewards = torch.zeros_like(mask)
    has_token = last >= 0
    rows = torch.arange(B, device=mask.device)[has_token]
    rewards[rows, last[has_token]] = sequence_rewards_B.reshape(-1).float()[has_token]
    if kl_BT is not None and kl_coef:
        rewards = rewards - kl_coef * kl_BT.float() * mask
    return rewards


@torch.no_grad()
def discounted_returns(
    token_rewards_BT: torch.Tensor, response_mask_BT: torch.Tensor, gamma: float = 1.0
) -> torch.Tensor:
    """G_t = sum_{k >= t, trained} gamma^(#trained steps from t to k) r_k.

    Args:
        token_rewards_BT: [B, T] rewards (only trained positions count).
        response_mask_BT: [B, T] 0/1; masked tokens are skipped (no discount step).
        gamma: discount.

    Returns:
        [B, T] float32 returns, 0 where the mask is 0.
    """
    mask = response_mask_BT != 0
    rewards = token_rewards_BT.float()
    B, T = rewards.shape
    returns = torch.zeros_like(rewards)
    running = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in range(T - 1, -1, -1):
        updated = rewards[:, t] + gamma * running
        running = torch.where(mask[:, t], updated, running)
        returns[:, t] = torch.where(mask[:, t], updated, torch.zeros_like(updated))
    return returns


@torch.no_grad()
def normalize_advantages(
    advantages_BT: torch.Tensor,
    response_mask_BT: torch.Tensor,
    *,
    shift_mean: bool = True,
    epsilon: float = 1e-8,
) -> torch.Tensor:
    """Whiten advantages over all trained tokens of the batch: (A - mean) / (std + eps).

    Args:
        advantages_BT: [B, T].
        response_mask_BT: [B, T] 0/1.
        shift_mean: subtract the mean (False keeps the mean, only rescales).
        epsilon: added to the (unbiased) std.

    Returns:
        [B, T] float32, 0 where the mask is 0. With several ranks this whitens per rank
        unless the caller gathers the batch first.

    The mean is summed in float64: in float32 the mean of N equal non-round values (0.1,
    0.7...) differs from them by a rounding error, the std is of the same size, and their
    ratio gives every token an advantage of order 1 with one sign. In float64 the sum of
    float32 inputs is exact for any batch that fits in memory, so the mean of equal values
    rounds back to exactly that value and they centre to 0.
    """
    adv = advantages_BT.float()
    mask = response_mask_BT != 0
    mean = masked_mean(adv.double(), mask).float()
    centred = adv - mean
    std = masked_var(centred, mask).sqrt()
    out = centred if shift_mean else adv
    out = out / (std + epsilon)
    return torch.where(mask, out, torch.zeros_like(out))


@torch.no_grad()
def reinforce_plus_plus_advantages(
    token_rewards_BT: torch.Tensor,
    response_mask_BT: torch.Tensor,
    *,
    gamma: float = 1.0,
    epsilon: float = 1e-8,
) -> torch.Tensor:
    """REINFORCE++: discounted per-token returns, normalised over the whole batch.

    Args:
        token_rewards_BT: [B, T] from ``token_level_rewards`` (outcome reward on the last
            token, minus beta * KL per token).
        response_mask_BT: [B, T] 0/1.
        gamma: discount (1.0 in the paper's LLM setting).
        epsilon: added to the batch std.

    Returns:
        [B, T] float32 advantages, 0 where the mask is 0.

    Deviation: the paper also clips rewards/advantages; clip in the caller if wanted.
    """
    returns = discounted_returns(token_rewards_BT, response_mask_BT, gamma)
    return normalize_advantages(returns, response_mask_BT, epsilon=epsilon)


@torch.no_grad()
def gae_advantages(
    token_rewards_BT: torch.Tensor,
    values_BT: torch.Tensor,
    response_mask_BT: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation and the critic's value targets.

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1}
    (V after the last trained token = 0: the episode ends with the response).

    Args:
        token_rewards_BT: [B, T] per-token rewards (``token_level_rewards``).
        values_BT: [B, T] critic values at each response token (old critic, no grad).
        response_mask_BT: [B, T] 0/1; masked tokens are skipped (see module docstring).
        gamma: discount; lam: GAE lambda (1 = Monte Carlo returns minus V, 0 = TD(0)).

    Returns:
        ``(advantages_BT, returns_BT)`` float32, returns = advantages + values; both 0 where
        the mask is 0. Advantages are not whitened (see ``normalize_advantages``).
    """
    mask = response_mask_BT != 0
    rewards = token_rewards_BT.float()
    values = values_BT.float()
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_advantage = torch.zeros_like(next_value)
    for t in range(T - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        m = mask[:, t]
        advantages[:, t] = torch.where(m, advantage, torch.zeros_like(advantage))
        next_advantage = torch.where(m, advantage, next_advantage)
        next_value = torch.where(m, values[:, t], next_value)
    returns = torch.where(mask, advantages + values, torch.zeros_like(advantages))
    return advantages, returns
