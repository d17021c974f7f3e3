"""Preference losses: Bradley–Terry for reward models, and DPO / IPO / SimPO for training a
policy directly on (chosen, rejected) pairs.

Reward models (docs/PIPELINE.md, phase 2): the model scores both responses of a pair and is trained
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

Direct preference optimisation (``preference_optimization_loss``), from the summed response
log-probs of the policy (and of a frozen reference):

- ``sigmoid``: DPO, Rafailov et al. 2023, eq. 7: -log sigma(beta * [(pi_c - ref_c) - (pi_r - ref_r)]).
  ``label_smoothing`` eps > 0 is conservative DPO (Mitchell 2023, "A note on DPO with noisy
  preferences"; TRL's ``label_smoothing``): the label is flipped with probability eps,
  (1 - eps) * -log sigma(beta h) + eps * -log sigma(-beta h).
- ``ipo``: IPO, Azar et al. 2023, eq. 17: (h - 1 / (2 beta))^2. Deviation, as in TRL: h is
  computed from log-probs AVERAGED over each response's tokens, not summed.
- ``simpo``: SimPO, Meng et al. 2024, eq. 6: reference-free and length-normalised,
  -log sigma(beta * (pi_c / |y_c| - pi_r / |y_r|) - gamma), with label smoothing as above
  (TRL ``CPOTrainer(loss_type="simpo")``; its ``simpo_gamma`` is this gamma).

Optional NLL on the chosen side (``rpo_alpha``), RPO: Pang et al. 2024, "Iterative Reasoning
Preference Optimization", eq. 2 (TRL's ``rpo_alpha``): loss_p += alpha * NLL_p with
NLL_p = -pi_c / |y_c|, the chosen response's negative log-likelihood averaged over ITS OWN
tokens (then averaged over pairs like the preference term). Deviation: TRL averages over all
chosen tokens of the batch at once; a per-pair mean keeps the loss independent of how a step
is split into micro-batches. It keeps the likelihood of the preferred answer from falling
while the margin grows (DPO on summed log-probs can otherwise win by shortening both sides).

The implicit rewards logged (TRL's ``rewards/*``) are beta * (pi - ref) for DPO and IPO
(the quantities h is built from) and beta * pi / |y| for SimPO.

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


PREFERENCE_LOSS_TYPES = ("sigmoid", "ipo", "simpo")


def sequence_logp_sums(token_logps_N: torch.Tensor, sequence_index_N: torch.Tensor,
                       num_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of token log-probs and token count.

    Args:
        token_logps_N: [N] log-prob of each trained token (gradients flow).
        sequence_index_N: [N] int64 sequence of each token, in ``0..num_sequences - 1``.
        num_sequences: S.

    Returns:
        (logp_sum_S [S] float32, token_count_S [S] float32).

    >>> sequence_logp_sums(torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([0, 0, 2]), 3)
    (tensor([-3.0000,  0.0000, -0.5000]), tensor([2., 0., 1.]))
    """
    index = sequence_index_N.to(torch.long)
    values = token_logps_N.float()
    sums = torch.zeros(num_sequences, dtype=values.dtype, device=values.device).index_add(0, index, values)
    counts = torch.zeros(num_sequences, dtype=values.dtype, device=values.device).index_add(
        0, index, torch.ones_like(values.detach()))
    return sums, counts


def preference_optimization_rewards(
    chosen_logps_P: torch.Tensor,
    rejected_logps_P: torch.Tensor,
    reference_chosen_logps_P: torch.Tensor | None,
    reference_rejected_logps_P: torch.Tensor | None,
    *,
    chosen_tokens_P: torch.Tensor | None = None,
    rejected_tokens_P: torch.Tensor | None = None,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The implicit rewards of ``loss_type`` and the log-probs they are built from.

    Args:
        chosen_logps_P, rejected_logps_P: [P] policy log-prob of each response, SUMMED over
            its tokens.
        reference_chosen_logps_P, reference_rejected_logps_P: [P] the same under the frozen
            reference (detached here: no gradient reaches them); None for ``simpo``.
        chosen_tokens_P, rejected_tokens_P: [P] response token counts (``ipo``, ``simpo``).
        loss_type: ``sigmoid`` | ``ipo`` | ``simpo``.
        beta: the inverse temperature.

    Returns:
        (chosen_rewards_P, rejected_rewards_P, chosen_logps_P, rejected_logps_P): rewards
        beta * (pi - ref) (log-probs averaged per token for ``ipo``), beta * pi / |y| for
        ``simpo``; the log-probs returned are the ones used (summed, or per-token means).
    """
    if loss_type not in PREFERENCE_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {PREFERENCE_LOSS_TYPES}")
    chosen, rejected = chosen_logps_P.reshape(-1).float(), rejected_logps_P.reshape(-1).float()
    if chosen.shape != rejected.shape:
        raise ValueError(f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} log-probs differ in shape")
    if loss_type in ("ipo", "simpo"):
        if chosen_tokens_P is None or rejected_tokens_P is None:
            raise ValueError(f"{loss_type} averages log-probs over tokens: pass chosen_tokens_P and rejected_tokens_P")
        chosen_tokens = chosen_tokens_P.reshape(-1).float().clamp(min=1.0)
        rejected_tokens = rejected_tokens_P.reshape(-1).float().clamp(min=1.0)
        chosen, rejected = chosen / chosen_tokens, rejected / rejected_tokens
    if loss_type == "simpo":
        return beta * chosen, beta * rejected, chosen, rejected
    if reference_chosen_logps_P is None or reference_rejected_logps_P is None:
        raise ValueError(f"{loss_type} needs the reference log-probs")
    reference_chosen = reference_chosen_logps_P.reshape(-1).detach().float()
    reference_rejected = reference_rejected_logps_P.reshape(-1).detach().float()
    if loss_type == "ipo":
        reference_chosen, reference_rejected = reference_chosen / chosen_tokens, reference_rejected / rejected_tokens
    return beta * (chosen - reference_chosen), beta * (rejected - reference_rejected), chosen, rejected


def preference_optimization_loss(
    chosen_logps_P: torch.Tensor,
    rejected_logps_P: torch.Tensor,
    reference_chosen_logps_P: torch.Tensor | None = None,
    reference_rejected_logps_P: torch.Tensor | None = None,
    *,
    chosen_tokens_P: torch.Tensor | None = None,
    rejected_tokens_P: torch.Tensor | None = None,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    rpo_alpha: float | None = None,
    step_pairs: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO (``sigmoid``, with label smoothing = conservative DPO), IPO or SimPO loss of P pairs.

    Args: as ``preference_optimization_rewards``, plus
        label_smoothing: eps in [0, 0.5): probability the preference label is flipped
            (``sigmoid`` and ``simpo``; 0 for ``ipo``).
        simpo_gamma: SimPO's target reward margin gamma (in reward units, beta included).
        rpo_alpha: weight of the chosen-side NLL (RPO); None or 0 = off. Needs
            ``chosen_tokens_P`` (per-token normalisation, see ``chosen_nll``).
        step_pairs: pairs in the whole optimizer step; None = the P pairs given.

    Returns:
        ``(loss, metrics)``: loss is sum_p loss_p / step_pairs (0-dim), with h_p =
        (r_c - r_r) / beta from the rewards above:
        sigmoid  (1 - eps) * -log sigma(beta h) + eps * -log sigma(-beta h);
        ipo      (h - 1 / (2 beta))^2;
        simpo    (1 - eps) * -log sigma(beta h - gamma) + eps * -log sigma(-(beta h - gamma)).
        metrics (floats, means over this call's pairs, TRL's names): ``loss``,
        ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` (chosen - rejected),
        ``rewards/accuracies`` (share with r_c > r_r; ties count as wrong),
        ``logps/chosen``, ``logps/rejected`` (the log-probs the loss used), ``pairs``;
        with ``rpo_alpha``, loss_p += alpha * NLL_p and ``loss/nll_chosen`` (mean NLL_p, per
        token, before alpha; ``loss`` includes the weighted term).
    """
    if rpo_alpha is not None and rpo_alpha < 0:
        raise ValueError(f"rpo_alpha must be >= 0, got {rpo_alpha}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("label_smoothing does not apply to ipo")
    chosen_rewards, rejected_rewards, chosen, rejected = preference_optimization_rewards(
        chosen_logps_P, rejected_logps_P, reference_chosen_logps_P, reference_rejected_logps_P,
        chosen_tokens_P=chosen_tokens_P, rejected_tokens_P=rejected_tokens_P, loss_type=loss_type, beta=beta)
    scaled = chosen_rewards - rejected_rewards  # beta * h
    if loss_type == "ipo":
        per_pair = (scaled / beta - 1.0 / (2.0 * beta)) ** 2
    else:
        if loss_type == "simpo":
            scaled = scaled - simpo_gamma
        per_pair = -F.logsigmoid(scaled) * (1.0 - label_smoothing)
        if label_smoothing:
            per_pair = per_pair - F.logsigmoid(-scaled) * label_smoothing
    nll = None
    if rpo_alpha:
        if chosen_tokens_P is None:
            raise ValueError("rpo_alpha normalises the chosen NLL per token: pass chosen_tokens_P")
        nll = chosen_nll(chosen_logps_P, chosen_tokens_P)
        per_pair = per_pair + rpo_alpha * nll
    pairs = per_pair.numel()
    normaliser = float(pairs if step_pairs is None else step_pairs)
    loss = per_pair.sum() / max(normaliser, 1.0)
    with torch.no_grad():
        def mean(values: torch.Tensor) -> float:
            return values.float().mean().item() if pairs else 0.0

        metrics = {
            "loss": (per_pair.sum() / max(pairs, 1)).item(),
            "rewards/chosen": mean(chosen_rewards),
            "rewards/rejected": mean(rejected_rewards),
            "rewards/margins": mean(chosen_rewards - rejected_rewards),
            "rewards/accuracies": mean(chosen_rewards > rejected_rewards),
            "logps/chosen": mean(chosen),
            "logps/rejected": mean(rejected),
            "pairs": float(pairs),
        }
        if nll is not None:
            metrics["loss/nll_chosen"] = mean(nll)
    return loss, metrics


def chosen_nll(chosen_logps_P: torch.Tensor, chosen_tokens_P: torch.Tensor) -> torch.Tensor:
    """[P] per-token NLL of each chosen response, -pi_c / |y_c| (|y_c| clamped to >= 1):
    the RPO term before its weight alpha.

    >>> chosen_nll(torch.tensor([-1.0, -3.0]), torch.tensor([2.0, 3.0]))
    tensor([0.5000, 1.0000])
    """
    tokens = chosen_tokens_P.reshape(-1).float().clamp(min=1.0)
    return -chosen_logps_P.reshape(-1).float() / tokens
