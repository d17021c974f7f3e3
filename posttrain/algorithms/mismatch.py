"""Correction of the rollout/trainer mismatch: importance weights between the behaviour policy
(the engine that sampled the tokens, at the weights it had then) and the proximal policy (the
trainer's weights at the start of this step's update).

The two differ even at the same weights (another kernel, another precision, a separate
server), and by whole updates when samples are generated ahead of training (asynchronous
steps, ``rl.max_staleness``). Decoupled PPO (Hilton et al. 2022; AReaL, Fu et al. 2025) keeps
the trust region around the proximal policy and moves the off-policy part into a weight:

    loss_t = w_t * surrogate(pi_theta / pi_prox, A_t),    w_t ~ pi_prox(y_t) / pi_behav(y_t)

How ``w`` is bounded (``MismatchOptions.correction``):

- ``tis``: truncated importance sampling (Yao et al. 2025, "Your efficient RL framework
  secretly brings you off-policy RL training"): ``w = min(ratio, cap)``.
- ``mis``: masked importance sampling (IcePop, Ling Team 2025): ``w = ratio`` where
  ``low <= ratio <= high``, 0 elsewhere: the tokens the two policies disagree on most are not
  trained at all.
- ``none``: ``w = 1`` (the metrics are still computed).

``level``: ``token`` uses each token's ratio; ``sequence`` uses the geometric mean of the
sequence's token ratios, ``exp(mean_t log ratio_t)``, on every token of the sequence (a whole
sequence is truncated or masked together). Masked tokens keep their place in the step's
normalisers, so the loss stays independent of how a step is split (``algorithms.aggregate``).

Both log-probs must be of the same distribution: the trainer's at the sampling temperature
(``log_softmax(logits / T)``) and the engine's after the same temperature scaling (vLLM's
``processed_logprobs``), docs/METRICS.md "Mismatch".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

MISMATCH_CORRECTIONS = ("none", "tis", "mis")
MISMATCH_LEVELS = ("token", "sequence")
_MAX_LOG_RATIO = 20.0


@dataclass(frozen=True)
class MismatchOptions:
    """How the behaviour/proximal importance weight is bounded (module docstring)."""

    correction: Literal["none", "tis", "mis"] = "tis"
    level: Literal["token", "sequence"] = "token"
    cap: float = 2.0  # tis: weights above are truncated to it
    low: float = 0.5  # mis: ratios below are masked
    high: float = 2.0  # mis: ratios above are masked

    def __post_init__(self) -> None:
        if self.correction not in MISMATCH_CORRECTIONS or self.level not in MISMATCH_LEVELS:
            raise ValueError(f"unknown mismatch correction {self.correction!r} / level {self.level!r}")
        if self.cap <= 0 or not 0 <= self.low <= 1 <= self.high:
            raise ValueError(f"mismatch bounds need cap > 0 and low <= 1 <= high, got {self}")


def sequence_mean(values_N: torch.Tensor, sequence_index_N: torch.Tensor) -> torch.Tensor:
    """Each token's sequence mean of ``values_N``, broadcast back to the tokens.

    Args:
        values_N: [N] float values of packed tokens.
        sequence_index_N: [N] int64 sequence id per token (any ids, gaps allowed).

    >>> sequence_mean(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([0, 0, 4])).tolist()
    [2.0, 2.0, 5.0]
    """
    ids, inverse = torch.unique(sequence_index_N, return_inverse=True)
    sums = torch.zeros(len(ids), dtype=values_N.dtype, device=values_N.device).index_add_(0, inverse, values_N)
    counts = torch.zeros(len(ids), dtype=values_N.dtype, device=values_N.device).index_add_(
        0, inverse, torch.ones_like(values_N))
    return (sums / counts)[inverse]


def mismatch_weights(proximal_logp_N: torch.Tensor, behaviour_logp_N: torch.Tensor,
                     sequence_index_N: torch.Tensor, options: MismatchOptions
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The per-token importance weight of decoupled PPO and the mismatch metrics.

    Args:
        proximal_logp_N: [N] log pi_prox of the sampled tokens (the trainer, no grad).
        behaviour_logp_N: [N] log pi_behav of the same tokens (the engine that sampled them).
        sequence_index_N: [N] sequence id per token (``level: sequence``).
        options: ``MismatchOptions``.

    Returns:
        ``(weight_N, metrics)``: ``weight_N`` [N] float32, detached; metrics (0-d tensors):
        ``mismatch/kl_k3`` (k3 estimate of KL(pi_behav || pi_prox), mean of r - 1 - log r with
        r = pi_prox / pi_behav per token), ``mismatch/is_ratio/mean|min|max`` (the ratio at
        ``level``, before bounding), ``mismatch/weight/mean``, ``mismatch/truncated_frac``
        (tis) or ``mismatch/masked_frac`` (mis): the share of tokens bounded.
    """
    log_ratio = (proximal_logp_N.detach().float() - behaviour_logp_N.detach().float()).clamp(
        -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    token_ratio = torch.exp(log_ratio)
    if options.level == "sequence":
        ratio = torch.exp(sequence_mean(log_ratio, sequence_index_N))
    else:
        ratio = token_ratio
    metrics = {
        "mismatch/kl_k3": (token_ratio - 1.0 - log_ratio).mean(),
        "mismatch/is_ratio/mean": ratio.mean(),
        "mismatch/is_ratio/min": ratio.min(),
        "mismatch/is_ratio/max": ratio.max(),
    }
    if options.correction == "tis":
        bounded = ratio > options.cap
        weight = ratio.clamp(max=options.cap)
        metrics["mismatch/truncated_frac"] = bounded.float().mean()
    elif options.correction == "mis":
        bounded = (ratio < options.low) | (ratio > options.high)
        weight = torch.where(bounded, torch.zeros_like(ratio), ratio)
        metrics["mismatch/masked_frac"] = bounded.float().mean()
    else:
        weight = torch.ones_like(ratio)
    metrics["mismatch/weight/mean"] = weight.mean()
    return weight, metrics
