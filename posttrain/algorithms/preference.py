"""Bradley–Terry loss for reward models trained on (chosen, rejected) pairs.

Seed 000, Phase 2 (reward model): the model scores both responses of a pair and is trained
so that the chosen one scores higher. Bradley & Terry (1952) model
P(chosen > rejected) = sigma(r_c - r_r); the loss is its negative log-likelihood, as in
Ouyang et al. 2022 (InstructGPT, eq. 1).

Extensions (both optional, both off by default):
- per-pair ``margin`` m: loss = -log sigma(r_c - r_r - m) (Llama 2, Touvron et al. 2023,
  §3.2.2: larger margin for clearly-better pairs);
- reward centring: + coef * mean((r_c + r_r)^2), pushing the pair's mean reward towards 0
  so the scale stays anchored (Eisenstein et al. 2023, "Helping or Herding?"; TRL's
  ``center_rewards_coefficient``). Deviation: the same formula as TRL, applied to the pair
  sum rather than to each reward separately.

Normalisation: by default a mean over the pairs in the call. Pass ``step_pairs`` (pairs in
the whole optimizer step, all micro-batches and ranks) to get this micro-batch's share, so
that summing shares reproduces the one-big-batch loss (see ``aggregate``).

Imports only torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_rewards_P: torch.Tensor,
    rejected_rewards_P: torch.Tensor,
    *,
    margin_P: torch.Tensor | None = None,
    centering_coef: float = 0.0,
    step_pairs: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Pairwise reward-model loss and its metrics.

    Args:
        chosen_rewards_P: [P] scalar reward of each pair's chosen response.
        rejected_rewards_P: [P] reward of the rejected response of the same pair.
        margin_P: optional [P] (or scalar) margin required between chosen and rejected.
        centering_coef: weight of the reward-centring term mean((r_c + r_r)^2); 0 disables.
        step_pairs: pairs in the whole optimizer step; None = the P pairs given.

    Returns:
        ``(loss, metrics)``: loss is a 0-dim tensor
        sum_p [-logsigmoid(r_c - r_r - m) + coef * (r_c + r_r)^2] / step_pairs.
        metrics (floats, this call's pairs): ``loss``, ``accuracy`` (fraction with
        r_c > r_r; ties count as wrong), ``margin`` (mean r_c - r_r), ``reward/chosen``,
        ``reward/rejected`` (means), ``pairs``.
    """
    if chosen_rewards_P.shape != rejected_rewards_P.shape:
        raise ValueError(
            f"chosen {tuple(chosen_rewards_P.shape)} and rejected "
            f"{tuple(rejected_rewards_P.shape)} rewards must have the same shape")
    chosen = chosen_rewards_P.reshape(-1).float()
    rejected = rejected_rewards_P.reshape(-1).float()
    pairs = chosen.numel()
    difference = chosen - rejected
    logits = difference if margin_P is None else difference - margin_P.reshape(-1).float()
    per_pair = -F.logsigmoid(logits)
    if centering_coef:
        per_pair = per_pair + centering_coef * (chosen + rejected) ** 2
    normaliser = float(pairs if step_pairs is None else step_pairs)
    loss = per_pair.sum() / max(normaliser, 1.0)
    with torch.no_grad():
        metrics = {
            "loss": (per_pair.sum() / max(pairs, 1)).item(),
            "accuracy": (difference > 0).float().mean().item() if pairs else 0.0,
            "margin": difference.mean().item() if pairs else 0.0,
            "reward/chosen": chosen.mean().item() if pairs else 0.0,
            "reward/rejected": rejected.mean().item() if pairs else 0.0,
            "pairs": float(pairs),
        }
    return loss, metrics
