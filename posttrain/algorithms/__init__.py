"""Pure tensor math of post-training: losses, advantages, KL. Imports only torch; no config
objects, no I/O. Each module's docstring cites the paper it implements and its deviations.

- ``aggregate``   loss_agg_mode with step-wide normalisers (split-invariant losses)
- ``sft``         the single next-token shift; chunked cross-entropy / log-probs / entropy
- ``preference``  Bradley–Terry reward-model loss; DPO (label smoothing), IPO, SimPO
- ``advantages``  GRPO, Dr. GRPO, RLOO, REINFORCE++, GAE on packed tokens (ADVANTAGE_ESTIMATORS)
- ``policy``      PPO-clip (clip-higher, dual clip), GSPO, CISPO, clipped value loss, entropy bonus
- ``kl``          k1/k2/k3 estimators, fixed and adaptive KL coefficient
"""

from posttrain.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageEstimator,
    AdvantageOptions,
    Advantages,
    dr_grpo_estimator,
    gae_estimator,
    grpo_advantages,
    grpo_estimator,
    reinforce_pp_estimator,
    rloo_advantages,
    rloo_estimator,
    whiten_advantages,
    zero_variance_group_fraction,
)
from posttrain.algorithms.aggregate import (
    LOSS_AGG_MODES,
    aggregate_padded_token_losses,
    aggregate_token_losses,
    count_trained,
    count_trained_padded,
    masked_mean,
    masked_sum,
    masked_var,
)
from posttrain.algorithms.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    make_kl_controller,
)
from posttrain.algorithms.policy import (
    GSPO_IMPORTANCE_LEVELS,
    POLICY_LOSSES,
    PolicyLossOptions,
    cispo_policy_loss,
    entropy_bonus,
    gspo_policy_loss,
    ppo_policy_loss,
    sequence_mean_per_token,
    value_loss,
)
from posttrain.algorithms.preference import (
    PREFERENCE_LOSS_TYPES,
    bradley_terry_loss,
    preference_optimization_loss,
    preference_optimization_rewards,
    sequence_logp_sums,
)
from posttrain.algorithms.sft import (
    IGNORE_INDEX,
    NextTokenTargets,
    TrainedPositions,
    chunked_cross_entropy,
    chunked_token_logprobs_and_entropy,
    gather_trained_positions,
    next_token_targets,
    row_sequence_index,
    sequence_index_from_position_ids,
    sft_token_losses,
)

__all__ = [
    "LOSS_AGG_MODES", "aggregate_token_losses", "aggregate_padded_token_losses",
    "count_trained", "count_trained_padded", "masked_mean", "masked_sum", "masked_var",
    "IGNORE_INDEX", "NextTokenTargets", "TrainedPositions", "next_token_targets",
    "sequence_index_from_position_ids", "row_sequence_index", "gather_trained_positions",
    "chunked_cross_entropy", "chunked_token_logprobs_and_entropy", "sft_token_losses",
    "bradley_terry_loss", "PREFERENCE_LOSS_TYPES", "preference_optimization_loss",
    "preference_optimization_rewards", "sequence_logp_sums",
    "ADVANTAGE_ESTIMATORS", "AdvantageEstimator", "AdvantageOptions", "Advantages",
    "grpo_estimator", "dr_grpo_estimator", "rloo_estimator", "reinforce_pp_estimator", "gae_estimator",
    "whiten_advantages",
    "grpo_advantages", "zero_variance_group_fraction", "rloo_advantages",
    "KL_ESTIMATORS", "kl_estimate", "FixedKLController", "AdaptiveKLController",
    "make_kl_controller",
    "ppo_policy_loss", "gspo_policy_loss", "cispo_policy_loss", "GSPO_IMPORTANCE_LEVELS",
    "POLICY_LOSSES", "PolicyLossOptions",
    "sequence_mean_per_token", "value_loss", "entropy_bonus",
]
