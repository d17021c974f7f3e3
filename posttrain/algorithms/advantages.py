"""Advantage estimators for on-policy RL on language models.

PPO/GRPO (docs/PIPELINE.md, phase 3): each sampled response gets a scalar reward; an
advantage says how much better than expected each response (or token) was. All functions
run under ``torch.no_grad()``: advantages are constants for the policy loss.

Layout: packed, like the policy losses. ``S`` sequences (sampled responses), each with one
outcome reward and the index of its prompt group; ``N`` trained tokens of all sequences
laid end to end, with ``sequence_index_N`` naming each token's sequence (non-decreasing).
Only trained tokens are present: tokens inside a response that the policy did not generate
(tool output) and padding are never in ``N``.

Every estimator has one signature (``AdvantageEstimator``) and is a line of
``ADVANTAGE_ESTIMATORS``:
- ``grpo``: GRPO (Shao et al. 2024, DeepSeekMath, §4.1.2 outcome supervision):
  A_i = (r_i - mean(r)) / (std(r) + eps) within each prompt's group (unbiased std, as
  torch.std, TRL and veRL; a group of one gets 0).
- ``dr_grpo``: Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): GRPO
  without the std division (question-difficulty bias).
- ``rloo``: RLOO (Ahmadian et al. 2024, "Back to Basics"): the baseline of each sample is
  the mean reward of the OTHER samples of its group (groups of at least two).
- ``reinforce_pp``: REINFORCE++ (Hu 2025): per-token discounted returns of token-level
  rewards (outcome reward on the last token minus a per-token KL penalty), whitened over the
  whole batch (no critic, no groups). The paper also clips rewards/advantages; this does not.
- ``gae``: GAE (Schulman et al. 2016) with a learned critic, for PPO; also returns the value
  targets (returns = advantages + values). Not whitened: ``whiten_advantages`` does that.

The three group estimators give each sequence one scalar, broadcast to its tokens; with a
KL estimate and ``kl_coef`` a sequence's reward first loses kl_coef * sum_t KL_t. The
token-level estimators put the KL penalty on each token (Ziegler et al. 2019; Ouyang et al.
2022). Their recursions step from one trained token to the next trained token of the same
sequence: a masked span inside a response (tool output) is skipped, not a step, so the
return and the bootstrap value pass through it undiscounted. V after the last trained token
is 0: the episode ends with the response.

``grpo_advantages`` and ``rloo_advantages`` are the same math on a [P, G] grid (P prompts, G
completions each); the group estimators use them when the groups are contiguous and of equal
size, so those results are bit-identical to the grid form. Imports only torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


_GRPO_EPSILON = 1e-6  # added to the group std (a group whose rewards are all equal gets 0)


@dataclass(frozen=True)
class AdvantageOptions:
    """The scalars an estimator may read (each estimator reads the ones its docstring names).

    gamma: discount of the token-level estimators (1.0 in the REINFORCE++ LLM setting).
    lam: GAE lambda (1 = Monte Carlo returns minus V, 0 = TD(0)).
    kl_coef: weight beta of the KL penalty in the reward when ``kl_N`` is given; 0 = none.
    """

    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.0


@dataclass
class Advantages:
    """What an estimator returns.

    advantages: [N] float32, one per trained token, in the order of ``sequence_index_N``.
    returns: [N] float32 value targets for the critic (``gae``), else None.
    """

    advantages: torch.Tensor
    returns: torch.Tensor | None = None


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
    rewards = rewards_PG.double()  # see whiten_advantages: float32 means of equal values round
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


def _check_packed(rewards_S: torch.Tensor, group_index_S: torch.Tensor, sequence_index_N: torch.Tensor,
                  **token_tensors: torch.Tensor | None) -> None:
    """Raise ValueError unless the inputs have the packed shapes the estimators document."""
    if rewards_S.dim() != 1 or group_index_S.shape != rewards_S.shape:
        raise ValueError(f"expected rewards_S and group_index_S of one shape [S], got {tuple(rewards_S.shape)} "
                         f"and {tuple(group_index_S.shape)}")
    if sequence_index_N.dim() != 1:
        raise ValueError(f"expected sequence_index_N [N], got shape {tuple(sequence_index_N.shape)}")
    for name, tensor in token_tensors.items():
        if tensor is not None and tensor.shape != sequence_index_N.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, sequence_index_N {tuple(sequence_index_N.shape)}")
    if group_index_S.numel() and int(group_index_S.min()) < 0:
        raise ValueError("group_index_S must be >= 0")
    if sequence_index_N.numel() == 0:
        return
    if bool((sequence_index_N[1:] < sequence_index_N[:-1]).any()):
        raise ValueError("sequence_index_N must be non-decreasing (each sequence's tokens together, in order)")
    if int(sequence_index_N[0]) < 0 or int(sequence_index_N[-1]) >= rewards_S.numel():
        raise ValueError(f"sequence_index_N must lie in [0, {rewards_S.numel()}) (one reward per sequence)")


def _token_counts(sequence_index_N: torch.Tensor, sequences: int) -> torch.Tensor:
    """[S] int64 trained tokens of each sequence (0 for a sequence with none)."""
    return torch.bincount(sequence_index_N, minlength=sequences)


def _last_of_sequence(sequence_index_N: torch.Tensor) -> torch.Tensor:
    """[N] bool: the token is the last trained token of its sequence."""
    is_last = torch.ones_like(sequence_index_N, dtype=torch.bool)
    is_last[:-1] = sequence_index_N[1:] != sequence_index_N[:-1]
    return is_last


def _sequence_rewards(rewards_S: torch.Tensor, sequence_index_N: torch.Tensor, options: AdvantageOptions,
                      kl_N: torch.Tensor | None) -> torch.Tensor:
    """[S] float32 rewards, each minus kl_coef * the sum of its tokens' KL (with ``kl_N``).

    Each sequence's KL is summed on its own contiguous slice (a per-sequence ``sum``), so the
    sum is the one the sequence's own KL tensor gives."""
    rewards = rewards_S.float()
    if kl_N is None or not options.kl_coef:
        return rewards
    lengths = _token_counts(sequence_index_N, rewards.numel()).tolist()
    kl_sums = torch.stack([segment.sum() for segment in kl_N.float().split(lengths)])
    return rewards - options.kl_coef * kl_sums


def _equal_contiguous_group_size(group_index_S: torch.Tensor) -> int | None:
    """G when the groups are 0..P-1 in order, each G sequences long (a [P, G] grid), else None."""
    groups = int(group_index_S.max()) + 1
    size, remainder = divmod(group_index_S.numel(), groups)
    if remainder:
        return None
    grid = torch.arange(groups, device=group_index_S.device).repeat_interleave(size)
    return size if torch.equal(group_index_S, grid) else None


def _group_sums(values_S: torch.Tensor, group_index_S: torch.Tensor) -> torch.Tensor:
    """[P] sum of ``values_S`` over each group (P = largest group index + 1)."""
    groups = int(group_index_S.max()) + 1
    return values_S.new_zeros(groups).index_add_(0, group_index_S, values_S)


def _group_normalised(rewards_S: torch.Tensor, group_index_S: torch.Tensor, *, scale_by_std: bool) -> torch.Tensor:
    """[S] float32 GRPO (``scale_by_std``) or Dr. GRPO advantage of each sequence in its group.

    Computed in float64 like ``grpo_advantages`` (see ``whiten_advantages``: float32 means of
    equal values round); groups of any size, a group of one gets 0. Contiguous groups of one
    size (the trainer's layout) go through ``grpo_advantages`` on the [P, G] grid, so they get
    exactly its result."""
    size = _equal_contiguous_group_size(group_index_S)
    if size is not None:
        return grpo_advantages(rewards_S.reshape(-1, size), scale_by_std=scale_by_std,
                               epsilon=_GRPO_EPSILON).reshape(-1)
    rewards = rewards_S.double()
    counts = _group_sums(torch.ones_like(rewards), group_index_S)
    means = _group_sums(rewards, group_index_S) / counts
    centred = rewards - means[group_index_S]
    if not scale_by_std:
        return centred.float()
    squares = _group_sums(centred * centred, group_index_S)
    variances = torch.where(counts > 1, squares / (counts - 1).clamp(min=1), torch.zeros_like(squares))
    return (centred / (variances.sqrt()[group_index_S] + _GRPO_EPSILON)).float()


def _leave_one_out(rewards_S: torch.Tensor, group_index_S: torch.Tensor) -> torch.Tensor:
    """[S] float32 RLOO advantage r_i - mean of the other rewards of i's group (groups of >= 2);
    contiguous groups of one size go through ``rloo_advantages`` on the [P, G] grid."""
    size = _equal_contiguous_group_size(group_index_S)
    if size is not None:
        return rloo_advantages(rewards_S.reshape(-1, size)).reshape(-1)
    rewards = rewards_S.float()
    counts = _group_sums(torch.ones_like(rewards), group_index_S)[group_index_S]
    if bool((counts < 2).any()):
        raise ValueError("RLOO needs every group to hold at least two sequences")
    others_mean = (_group_sums(rewards, group_index_S)[group_index_S] - rewards) / (counts - 1)
    return rewards - others_mean


def _reverse_recurrence(terms_N: torch.Tensor, coefficient: float, sequence_index_N: torch.Tensor) -> torch.Tensor:
    """x_t = terms_t + coefficient * x_{t+1} within each sequence, x after its last token = 0.

    Args:
        terms_N: [N] float32.
        coefficient: gamma (discounted returns) or gamma * lam (GAE).
        sequence_index_N: [N] non-decreasing sequence of each token.

    Returns:
        [N] float32. All sequences step together, backwards from their last tokens: step k
        updates the token k places before each sequence's end, one token per sequence, so
        the loop runs (longest sequence) times over vectors of at most S tokens.
    """
    if terms_N.numel() == 0:
        return terms_N.clone()
    last_position_S = torch.cumsum(torch.bincount(sequence_index_N), dim=0) - 1
    steps_from_end_N = last_position_S[sequence_index_N] - torch.arange(terms_N.numel(), device=terms_N.device)
    carried_S = terms_N.new_zeros(last_position_S.numel())
    out = torch.empty_like(terms_N)
    order = torch.argsort(steps_from_end_N, stable=True)
    for tokens in order.split(torch.bincount(steps_from_end_N).tolist()):
        owners = sequence_index_N[tokens]
        value = terms_N[tokens] + coefficient * carried_S[owners]
        out[tokens] = value
        carried_S[owners] = value
    return out


def _token_rewards(rewards_S: torch.Tensor, sequence_index_N: torch.Tensor, options: AdvantageOptions,
                   kl_N: torch.Tensor | None) -> torch.Tensor:
    """[N] float32 r_t = [t is its sequence's last trained token] * R - kl_coef * kl_t.

    (Ziegler et al. 2019; Ouyang et al. 2022; REINFORCE++ eq. for r(s_t, a_t).) A sequence
    with no trained token has nowhere to put its reward and contributes nothing."""
    rewards_N = torch.zeros(sequence_index_N.shape, dtype=torch.float32, device=sequence_index_N.device)
    is_last = _last_of_sequence(sequence_index_N)
    rewards_N[is_last] = rewards_S.float()[sequence_index_N[is_last]]
    if kl_N is not None and options.kl_coef:
        rewards_N = rewards_N - options.kl_coef * kl_N.float()
    return rewards_N


def _group_estimate(rewards_S: torch.Tensor, group_index_S: torch.Tensor, sequence_index_N: torch.Tensor,
                    options: AdvantageOptions, kl_N: torch.Tensor | None, *, estimator: str) -> Advantages:
    """One scalar per sequence from its group (``estimator``: grpo, dr_grpo or rloo), broadcast to its tokens."""
    _check_packed(rewards_S, group_index_S, sequence_index_N, kl_N=kl_N)
    if rewards_S.numel() == 0:
        return Advantages(torch.zeros(0, dtype=torch.float32, device=rewards_S.device))
    rewards = _sequence_rewards(rewards_S, sequence_index_N, options, kl_N)
    if estimator == "rloo":
        advantages_S = _leave_one_out(rewards, group_index_S)
    else:
        advantages_S = _group_normalised(rewards, group_index_S, scale_by_std=estimator == "grpo")
    return Advantages(advantages_S[sequence_index_N])


@torch.no_grad()
def grpo_estimator(rewards_S: torch.Tensor, group_index_S: torch.Tensor, sequence_index_N: torch.Tensor,
                   options: AdvantageOptions, *, kl_N: torch.Tensor | None = None,
                   values_N: torch.Tensor | None = None) -> Advantages:
    """GRPO: A_i = (r_i - mean(r)) / (std(r) + 1e-6) over the sequences of i's group, on every token of i.

    Args:
        rewards_S: [S] outcome reward of each sequence.
        group_index_S: [S] int64 prompt group of each sequence (groups of any size; a group
            of one gets advantage 0).
        sequence_index_N: [N] int64 sequence of each trained token, non-decreasing.
        options: reads ``kl_coef``.
        kl_N: optional [N] per-token KL estimate to the reference; with ``kl_coef`` each
            reward first loses kl_coef * the sum of its sequence's KL.
        values_N: not read.

    Returns:
        ``Advantages`` with advantages [N] float32 and no returns. The statistics are taken in
        float64; the std is unbiased.
    """
    return _group_estimate(rewards_S, group_index_S, sequence_index_N, options, kl_N, estimator="grpo")


@torch.no_grad()
def dr_grpo_estimator(rewards_S: torch.Tensor, group_index_S: torch.Tensor, sequence_index_N: torch.Tensor,
                      options: AdvantageOptions, *, kl_N: torch.Tensor | None = None,
                      values_N: torch.Tensor | None = None) -> Advantages:
    """Dr. GRPO: A_i = r_i - mean(r) over i's group, on every token of i (inputs as ``grpo_estimator``)."""
    return _group_estimate(rewards_S, group_index_S, sequence_index_N, options, kl_N, estimator="dr_grpo")


@torch.no_grad()
def rloo_estimator(rewards_S: torch.Tensor, group_index_S: torch.Tensor, sequence_index_N: torch.Tensor,
                   options: AdvantageOptions, *, kl_N: torch.Tensor | None = None,
                   values_N: torch.Tensor | None = None) -> Advantages:
    """RLOO: A_i = r_i - mean_{j != i in i's group} r_j, on every token of i (inputs as
    ``grpo_estimator``; every group needs at least two sequences, else ValueError)."""
    return _group_estimate(rewards_S, group_index_S, sequence_index_N, options, kl_N, estimator="rloo")


@torch.no_grad()
def reinforce_pp_estimator(rewards_S: torch.Tensor, group_index_S: torch.Tensor, sequence_index_N: torch.Tensor,
                           options: AdvantageOptions, *, kl_N: torch.Tensor | None = None,
                           values_N: torch.Tensor | None = None) -> Advantages:
    """REINFORCE++: discounted returns of the token rewards, whitened over all N tokens.

    Args:
        rewards_S: [S] outcome reward of each sequence, given to its last trained token.
        group_index_S: [S] not read (REINFORCE++ has no groups); checked for shape.
        sequence_index_N: [N] int64 sequence of each trained token, non-decreasing.
        options: reads ``gamma`` and ``kl_coef``.
        kl_N: optional [N] per-token KL estimate; with ``kl_coef`` each token's reward loses
            kl_coef * kl_t.
        values_N: not read.

    Returns:
        ``Advantages`` with advantages [N] float32 (``whiten_advantages`` of
        G_t = sum_{k >= t in t's sequence} gamma^(k - t) r_k) and no returns. The whitening
        makes the result depend on the whole batch.
    """
    _check_packed(rewards_S, group_index_S, sequence_index_N, kl_N=kl_N)
    token_rewards_N = _token_rewards(rewards_S, sequence_index_N, options, kl_N)
    returns_N = _reverse_recurrence(token_rewards_N, options.gamma, sequence_index_N)
    return Advantages(whiten_advantages(returns_N))


@torch.no_grad()
def gae_estimator(rewards_S: torch.Tensor, group_index_S: torch.Tensor, sequence_index_N: torch.Tensor,
                  options: AdvantageOptions, *, kl_N: torch.Tensor | None = None,
                  values_N: torch.Tensor | None = None) -> Advantages:
    """GAE with the critic's values, and the critic's value targets.

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1}
    (t + 1 = the next trained token of the same sequence; V and A after its last = 0).

    Args:
        rewards_S, group_index_S, sequence_index_N, kl_N: as ``reinforce_pp_estimator``
            (token rewards: outcome on the last trained token minus kl_coef * kl_t).
        options: reads ``gamma``, ``lam`` and ``kl_coef``.
        values_N: [N] critic values at each trained token (old critic, no grad); required.

    Returns:
        ``Advantages`` with advantages [N] float32 (not whitened) and returns [N] float32 =
        advantages + values.
    """
    if values_N is None:
        raise ValueError("gae needs the critic's values_N")
    _check_packed(rewards_S, group_index_S, sequence_index_N, kl_N=kl_N, values_N=values_N)
    token_rewards_N = _token_rewards(rewards_S, sequence_index_N, options, kl_N)
    values = values_N.float()
    following = torch.cat([values[1:], values.new_zeros(min(values.numel(), 1))])
    next_values = torch.where(_last_of_sequence(sequence_index_N), torch.zeros_like(values), following)
    deltas_N = token_rewards_N + options.gamma * next_values - values
    advantages_N = _reverse_recurrence(deltas_N, options.gamma * options.lam, sequence_index_N)
    return Advantages(advantages_N, returns=advantages_N + values)


@torch.no_grad()
def whiten_advantages(advantages_N: torch.Tensor, epsilon: float = 1e-8) -> torch.Tensor:
    """Whiten advantages over all N trained tokens: (A - mean) / (std + epsilon).

    Args:
        advantages_N: [N].
        epsilon: added to the unbiased std (0 for a single token).

    Returns:
        [N] float32. With several ranks this whitens per rank unless the caller gathers the
        batch first.

    The mean is summed in float64: in float32 the mean of N equal non-round values (0.1,
    0.7...) differs from them by a rounding error, the std is of the same size, and their
    ratio gives every token an advantage of order 1 with one sign. In float64 the sum of
    float32 inputs is exact for any batch that fits in memory, so the mean of equal values
    rounds back to exactly that value and they centre to 0.
    """
    advantages = advantages_N.float()
    count = advantages.numel()
    if count == 0:
        return advantages.clone()
    mean = (advantages.double().sum() / count).float()
    centred = advantages - mean
    variance = ((centred - centred.sum() / count) ** 2).sum() / max(count - 1, 1)
    return centred / (variance.sqrt() + epsilon)


AdvantageEstimate = Callable[..., Advantages]
"""``estimate(rewards_S, group_index_S, sequence_index_N, options, *, kl_N=None, values_N=None)
-> Advantages``: the tensors as in ``grpo_estimator`` / ``gae_estimator``, ``options`` an
``AdvantageOptions``."""


@dataclass(frozen=True)
class AdvantageEstimator:
    """One registry entry: the pure function and what its caller must provide.

    needs_values: the estimator reads a critic's per-token ``values_N`` (and returns value targets).
    whole_batch: the result depends on statistics of the whole batch (all ranks' tokens);
        False = each prompt group alone suffices.
    """

    estimate: AdvantageEstimate
    needs_values: bool
    whole_batch: bool


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "grpo": AdvantageEstimator(grpo_estimator, needs_values=False, whole_batch=False),
    "dr_grpo": AdvantageEstimator(dr_grpo_estimator, needs_values=False, whole_batch=False),
    "rloo": AdvantageEstimator(rloo_estimator, needs_values=False, whole_batch=False),
    "reinforce_pp": AdvantageEstimator(reinforce_pp_estimator, needs_values=False, whole_batch=True),
    "gae": AdvantageEstimator(gae_estimator, needs_values=True, whole_batch=False),
}
"""The advantage-estimator registry: ``rl.advantage`` names one. To add an estimator, write
its pure function above (the ``AdvantageEstimate`` signature) and add one line here."""


# ----------------------------------------------------------------------------- padded [B, T]
# B responses, T response tokens; response_mask_BT is 1 on the tokens the policy generated and
# is trained on (0 on padding and on masked spans inside a response, such as tool outputs).
