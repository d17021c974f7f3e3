"""Policy-gradient losses: PPO-clip for the policy, clipped value loss for the critic, and
an entropy bonus. Every token loss is reduced with ``aggregate`` so ``loss_agg_mode`` and
its step-wide normalisers are shared with SFT.

The PPO/GRPO objective: maximise E[min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t)]
with r_t = pi(a_t) / pi_old(a_t) (Schulman et al. 2017, "Proximal Policy Optimization",
eq. 7). Options:
- separate ``clip_low`` / ``clip_high`` ("clip-higher", DAPO: Yu et al. 2025 §3.1; e.g.
  0.2 / 0.28 keeps low-probability tokens explorable);
- dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games", eq. 5): for
  A < 0 the loss is bounded by -c * A, so one token with a huge ratio cannot dominate.

GRPO (Shao et al. 2024) is this loss with group advantages and the KL as a separate loss
term (``kl.kl_estimate`` aggregated with ``aggregate``). Deviation from the papers: the
log-ratio is clamped to [-20, 20] before exp (no effect on any sane ratio; avoids inf).

Two more policy losses share the same inputs, metrics and ``loss_agg_mode``:
- GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", eq. 5-7): the importance
  ratio of a sequence is its length-normalised likelihood ratio
  s_i = exp(mean_t log(pi / pi_old)), clipped per sequence, so every token of a sequence
  shares one ratio and one clip decision. ``importance_level="token"`` is the paper's
  GSPO-token (eq. 13): s_i,t = sg[s_i] * pi(y_t) / sg[pi(y_t)], same value as s_i but each
  token's gradient is its own, which matters when advantages differ within a sequence.
  The paper aggregates per sequence (``seq-mean-token-mean``); the mode stays a setting
  here. With per-sequence advantages both levels give the same loss and gradient.
- CISPO (MiniMax-M1 report, Chen et al. 2025, eq. 4-5): the token's importance weight is
  clipped and stop-gradient'ed, and multiplies the REINFORCE term A * log pi, so a clipped
  token keeps its gradient (PPO's clip zeroes it). The report sets no lower bound in
  practice (a large ``clip_low``) and tunes ``clip_high``.

All inputs are [B, T] padded (sequence = row) unless ``sequence_index`` is given, in which
case any matching shape works (packed rows). Metrics are detached floats over THIS call's
trained tokens. Imports only torch.
"""

from __future__ import annotations

from typing import Callable
from dataclasses import dataclass

import torch

from posttrain.algorithms.aggregate import aggregate_token_losses, masked_mean

_MAX_LOG_RATIO = 20.0


def _sequence_index(like: torch.Tensor, sequence_index: torch.Tensor | None):
    if sequence_index is not None:
        return sequence_index
    if like.dim() == 2:
        B, T = like.shape
        return torch.arange(B, device=like.device).unsqueeze(1).expand(B, T)
    return None


def _masked_min_max(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached 0-d (min, max) over the masked entries (0, 0 when none); no device sync."""
    keep = mask != 0
    if keep.numel() == 0:
        zero = values.new_zeros(())
        return zero, zero
    low = torch.where(keep, values, torch.full_like(values, float("inf"))).min()
    high = torch.where(keep, values, torch.full_like(values, float("-inf"))).max()
    present = keep.any()
    return torch.where(present, low, 0.0).detach(), torch.where(present, high, 0.0).detach()


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip_c: float | None = None,
    loss_agg_mode: str = "token-mean",
    step_trained_tokens: float,
    step_sequences: float,
    sequence_index: torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip surrogate (to minimise), with clip-higher and optional dual clip.

    per token: ratio = exp(logp - old_logp)
        l = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))
        if dual_clip_c and A < 0: l = min(l, -A * dual_clip_c)

    Args:
        logp: [B, T] log pi(token) under the policy being trained (carries grad).
        old_logp: [B, T] log-probs of the same tokens under the policy that sampled them.
        advantages: [B, T] per-token advantages (``advantages.ADVANTAGE_ESTIMATORS`` give
            sequence-level ones on every token of the sequence).
        loss_mask: [B, T] 0/1 trained tokens (masked tokens get exactly zero gradient).
        clip_low, clip_high: ratio bounds 1 - clip_low, 1 + clip_high (clip_high None =
            clip_low: symmetric PPO).
        dual_clip_c: lower bound constant c > 1 for negative advantages (None: off).
        loss_agg_mode, step_trained_tokens, step_sequences: see ``aggregate``.
        sequence_index: sequence id per token for packed layouts (None: row = sequence).
        token_weight: optional per-token weight.

    Returns:
        ``(loss, metrics)``: loss is this micro-batch's share of the step loss; metrics
        (detached 0-d tensors: reading them is left to the caller, once per step, so the
        loss never waits on the device): ``pg_loss``, ``clip_frac`` (trained tokens where the ratio clip is active),
        ``dual_clip_frac``, ``ratio/mean``, ``ratio/min``, ``ratio/max``, ``approx_kl``
        (k3 estimate of KL(pi_old || pi): mean of (ratio - 1) - log ratio).
    """
    log_ratio = _token_log_ratio(logp, old_logp)
    token_loss, ratio, clip_active, dual_active = _clipped_surrogate(
        log_ratio, advantages, clip_low=clip_low, clip_high=clip_high, dual_clip_c=dual_clip_c)
    loss = aggregate_token_losses(
        token_loss, loss_mask, _sequence_index(token_loss, sequence_index), loss_agg_mode,
        step_trained_tokens=step_trained_tokens, step_sequences=step_sequences,
        token_weight_N=token_weight,
    )
    return loss, _policy_metrics(loss, ratio, log_ratio, clip_active, dual_active, loss_mask)


def _token_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor:
    """log(pi / pi_old) per token in fp32, clamped to [-20, 20] (grad flows through logp)."""
    return (logp.float() - old_logp.detach().float()).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)


def _clipped_surrogate(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float | None,
    dual_clip_c: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token for any importance ratio exp(log_ratio).

    Returns ``(token_loss, ratio, clip_active, dual_active)``, all shaped like ``log_ratio``;
    ``clip_active`` marks tokens where the clipped branch is the larger loss (zero gradient).
    """
    if clip_high is None:
        clip_high = clip_low
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
    advantages = advantages.detach().float()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    token_loss = torch.maximum(unclipped, clipped)
    if dual_clip_c is not None:
        dual_bound = -advantages * dual_clip_c
        dual_active = (advantages < 0) & (token_loss > dual_bound)
        token_loss = torch.where(dual_active, dual_bound, token_loss)
    else:
        dual_active = torch.zeros_like(advantages, dtype=torch.bool)
    return token_loss, ratio, clipped > unclipped, dual_active


def _policy_metrics(loss: torch.Tensor, ratio: torch.Tensor, token_log_ratio: torch.Tensor,
                    clip_active: torch.Tensor, dual_active: torch.Tensor,
                    loss_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The metrics every policy loss reports, detached, over this call's trained tokens;
    ``approx_kl`` is the k3 estimate from the token log-ratio whatever ratio the loss uses."""
    with torch.no_grad():
        ratio_min, ratio_max = _masked_min_max(ratio, loss_mask)
        token_log_ratio = token_log_ratio.detach()
        return {
            "pg_loss": loss.detach(),
            "clip_frac": masked_mean(clip_active.float(), loss_mask),
            "dual_clip_frac": masked_mean(dual_active.float(), loss_mask),
            "ratio/mean": masked_mean(ratio.detach(), loss_mask),
            "ratio/min": ratio_min,
            "ratio/max": ratio_max,
            "approx_kl": masked_mean(torch.exp(token_log_ratio) - 1.0 - token_log_ratio, loss_mask),
        }


def sequence_mean_per_token(values: torch.Tensor, loss_mask: torch.Tensor,
                            sequence_index: torch.Tensor) -> torch.Tensor:
    """Each sequence's mean of ``values`` over its trained tokens, written back to every
    token of that sequence (0 for a sequence with no trained token); differentiable.

    Args:
        values: [N] (or any shape) per-token values.
        loss_mask: same shape, 0/1 trained tokens (only these enter a mean).
        sequence_index: same shape, int sequence id per token (>= 0; gaps allowed).

    >>> sequence_mean_per_token(torch.tensor([1., 3., 10., 7.]), torch.tensor([1, 1, 1, 0]),
    ...                         torch.tensor([0, 0, 1, 1])).tolist()
    [2.0, 2.0, 10.0, 10.0]
    """
    flat = values.reshape(-1)
    trained = loss_mask.reshape(-1) != 0
    seq = sequence_index.reshape(-1).to(torch.long)
    if seq.numel() == 0:
        return values.clone()
    n_slots = int(seq.max()) + 1
    kept = torch.where(trained, flat, torch.zeros_like(flat))
    sums = torch.zeros(n_slots, dtype=flat.dtype, device=flat.device).index_add(0, seq, kept)
    counts = torch.zeros(n_slots, dtype=flat.dtype, device=flat.device).index_add(0, seq, trained.to(flat.dtype))
    return (sums / counts.clamp(min=1.0))[seq].reshape(values.shape)


GSPO_IMPORTANCE_LEVELS = ("sequence", "token")


def gspo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float | None = 4e-4,
    importance_level: str = "sequence",
    loss_agg_mode: str = "seq-mean-token-mean",
    step_trained_tokens: float,
    step_sequences: float,
    sequence_index: torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO: PPO's clipped surrogate with a length-normalised sequence importance ratio.

    per sequence i: log s_i = (1 / |y_i|) sum_{t trained} (logp_t - old_logp_t)
    per token of i:  l_t = max(-A_t s, -A_t clip(s, 1 - clip_low, 1 + clip_high))
        s = s_i                                   (importance_level "sequence")
        s = exp(logp_t - sg[logp_t] + sg[log s_i]) (importance_level "token": GSPO-token)
    then ``loss_agg_mode`` over trained tokens. Defaults are the paper's (§5.1: clip 3e-4 /
    4e-4, sequence-level aggregation). The log-ratio of each token is clamped to [-20, 20].

    Args:
        logp, old_logp, advantages, loss_mask, loss_agg_mode, step_trained_tokens,
        step_sequences, sequence_index, token_weight: as in ``ppo_policy_loss``. A sequence
            must not be split across calls (its ratio is a mean over all its tokens).
        clip_low, clip_high: ratio bounds (clip_high None = clip_low).
        importance_level: "sequence" or "token".

    Returns:
        ``(loss, metrics)`` with ``ppo_policy_loss``'s metric names; ``ratio/*`` are the
        sequence ratios seen by each trained token, ``approx_kl`` the token-level k3.
    """
    if importance_level not in GSPO_IMPORTANCE_LEVELS:
        raise ValueError(f"importance_level must be one of {GSPO_IMPORTANCE_LEVELS}, got {importance_level!r}")
    token_log_ratio = _token_log_ratio(logp, old_logp)
    seq_index = _sequence_index(token_log_ratio, sequence_index)
    if seq_index is None:
        raise ValueError("gspo_policy_loss needs sequence_index for a 1-d token layout")
    seq_log_ratio = sequence_mean_per_token(token_log_ratio, loss_mask, seq_index)
    if importance_level == "token":
        logp_f = logp.float()
        seq_log_ratio = logp_f - logp_f.detach() + seq_log_ratio.detach()
    token_loss, ratio, clip_active, dual_active = _clipped_surrogate(
        seq_log_ratio, advantages, clip_low=clip_low, clip_high=clip_high, dual_clip_c=None)
    loss = aggregate_token_losses(
        token_loss, loss_mask, seq_index, loss_agg_mode,
        step_trained_tokens=step_trained_tokens, step_sequences=step_sequences,
        token_weight_N=token_weight,
    )
    return loss, _policy_metrics(loss, ratio, token_log_ratio, clip_active, dual_active, loss_mask)


def cispo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    clip_low: float = 1.0,
    clip_high: float | None = 0.28,
    loss_agg_mode: str = "token-mean",
    step_trained_tokens: float,
    step_sequences: float,
    sequence_index: torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO: REINFORCE weighted by the clipped, stop-gradient importance weight.

    per token: w = sg[clip(pi / pi_old, 1 - clip_low, 1 + clip_high)]
               l = -w * A * logp          (d l / d logp = -w * A, never 0 for a clipped token)
    then ``loss_agg_mode``. ``clip_low`` 1.0 means no lower bound (the report's practice);
    the loss value is not a surrogate of the return, only its gradient is meaningful.

    Args: as in ``ppo_policy_loss`` (no dual clip: a weight bounded above needs none).

    Returns:
        ``(loss, metrics)`` with ``ppo_policy_loss``'s metric names; ``clip_frac`` counts the
        trained tokens whose weight was clipped (they still get gradient).
    """
    if clip_high is None:
        clip_high = clip_low
    token_log_ratio = _token_log_ratio(logp, old_logp)
    ratio = torch.exp(token_log_ratio).detach()
    weight = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    token_loss = -weight * advantages.detach().float() * logp.float()
    loss = aggregate_token_losses(
        token_loss, loss_mask, _sequence_index(token_loss, sequence_index), loss_agg_mode,
        step_trained_tokens=step_trained_tokens, step_sequences=step_sequences,
        token_weight_N=token_weight,
    )
    never = torch.zeros_like(ratio, dtype=torch.bool)
    return loss, _policy_metrics(loss, ratio, token_log_ratio, weight != ratio, never, loss_mask)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    clip_range: float | None = 0.2,
    loss_agg_mode: str = "token-mean",
    step_trained_tokens: float,
    step_sequences: float,
    sequence_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss for the PPO critic (Schulman et al. 2017 baselines code;
    Andrychowicz et al. 2021 discuss when clipping helps).

    per token: v_clip = old + clip(v - old, -clip_range, clip_range)
               l = 0.5 * max((v - R)^2, (v_clip - R)^2)      (plain 0.5 (v - R)^2 if None)

    Args:
        values: [B, T] critic outputs being trained (carries grad).
        old_values: [B, T] critic outputs at rollout time (used for GAE).
        returns: [B, T] value targets (``advantages.gae_estimator``).
        loss_mask: [B, T] 0/1.
        clip_range: how far the new value may move from the old one; None = no clipping.
        loss_agg_mode, step_trained_tokens, step_sequences, sequence_index: see ``aggregate``.

    Returns:
        ``(loss, metrics)`` with ``vf_loss``, ``vf_clip_frac`` (tokens where the clipped
        branch is the larger one), ``value/mean``, ``return/mean``, ``value/error`` (mean
        squared error of the unclipped values).
    """
    values_f = values.float()
    old = old_values.detach().float()
    targets = returns.detach().float()
    unclipped = (values_f - targets) ** 2
    if clip_range is None:
        token_loss = 0.5 * unclipped
        clip_active = torch.zeros_like(unclipped, dtype=torch.bool)
    else:
        values_clipped = old + (values_f - old).clamp(-clip_range, clip_range)
        clipped = (values_clipped - targets) ** 2
        token_loss = 0.5 * torch.maximum(unclipped, clipped)
        clip_active = clipped > unclipped
    loss = aggregate_token_losses(
        token_loss, loss_mask, _sequence_index(token_loss, sequence_index), loss_agg_mode,
        step_trained_tokens=step_trained_tokens, step_sequences=step_sequences,
    )
    with torch.no_grad():
        metrics = {
            "vf_loss": loss.detach(),
            "vf_clip_frac": masked_mean(clip_active.float(), loss_mask),
            "value/mean": masked_mean(values_f, loss_mask),
            "return/mean": masked_mean(targets, loss_mask),
            "value/error": masked_mean(unclipped, loss_mask),
        }
    return loss, metrics


def entropy_bonus(
    entropy: torch.Tensor,
    loss_mask: torch.Tensor,
    coef: float,
    *,
    loss_agg_mode: str = "token-mean",
    step_trained_tokens: float,
    step_sequences: float,
    sequence_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss term -coef * aggregate(entropy): adding it to the loss rewards higher entropy.

    Args:
        entropy: [B, T] per-token entropy of the policy's next-token distribution, with grad
            (``sft.chunked_token_logprobs_and_entropy``).
        loss_mask: [B, T] 0/1.
        coef: bonus weight (0 gives a zero loss that still reports the entropy metric).
        loss_agg_mode, step_trained_tokens, step_sequences, sequence_index: see ``aggregate``.

    Returns:
        ``(loss, metrics)`` with ``entropy`` (masked mean over this call's tokens).
    """
    aggregated = aggregate_token_losses(
        entropy.float(), loss_mask, _sequence_index(entropy, sequence_index), loss_agg_mode,
        step_trained_tokens=step_trained_tokens, step_sequences=step_sequences,
    )
    loss = -coef * aggregated
    with torch.no_grad():
        metrics = {"entropy": masked_mean(entropy.float(), loss_mask)}
    return loss, metrics


@dataclass(frozen=True)
class PolicyLossOptions:
    """The scalars a policy loss may read (each loss reads the ones its docstring names).

    clip_low, clip_high: ratio / weight bounds 1 - clip_low, 1 + clip_high (None = clip_low).
    dual_clip_c: ``ppo_clip`` only; None = off.
    importance_level: ``gspo`` only: "sequence" or "token".
    """

    clip_low: float = 0.2
    clip_high: float | None = None
    dual_clip_c: float | None = None
    importance_level: str = "sequence"


PolicyLoss = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""``loss(logp, old_logp, advantages, loss_mask, options, *, loss_agg_mode,
step_trained_tokens, step_sequences, sequence_index=None) -> (loss, metrics)``: the tensors
as in ``ppo_policy_loss``, ``options`` a ``PolicyLossOptions``; metrics carry at least
``pg_loss``, ``clip_frac``, ``ratio/mean``, ``ratio/min``, ``ratio/max`` and ``approx_kl``."""


def _ppo_clip(logp, old_logp, advantages, loss_mask, options: PolicyLossOptions, **aggregation):
    return ppo_policy_loss(logp, old_logp, advantages, loss_mask, clip_low=options.clip_low,
                           clip_high=options.clip_high, dual_clip_c=options.dual_clip_c, **aggregation)


def _gspo(logp, old_logp, advantages, loss_mask, options: PolicyLossOptions, **aggregation):
    return gspo_policy_loss(logp, old_logp, advantages, loss_mask, clip_low=options.clip_low,
                            clip_high=options.clip_high, importance_level=options.importance_level, **aggregation)


def _cispo(logp, old_logp, advantages, loss_mask, options: PolicyLossOptions, **aggregation):
    return cispo_policy_loss(logp, old_logp, advantages, loss_mask, clip_low=options.clip_low,
                             clip_high=options.clip_high, **aggregation)


POLICY_LOSSES: dict[str, PolicyLoss] = {
    "ppo_clip": _ppo_clip,
    "gspo": _gspo,
    "cispo": _cispo,
}
"""The policy-loss registry: ``rl.policy_loss`` names one. To add a loss, write its pure
function above and add one line here."""
