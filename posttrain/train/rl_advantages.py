"""Advantages of an RL step: the estimator named by ``rl.advantage``
(``algorithms.advantages.ADVANTAGE_ESTIMATORS``) over the step's samples, packed: one entry per
trained token, ``sequence_index`` naming its sample, ``group_index`` each sample's prompt group.

With the KL as a reward (``rl.kl_in: reward``) each token's KL estimate to the reference at
rollout time, clamped to ``rl.kl_clamp``, enters the estimator (``AdvantageOptions.kl_coef``).

Data parallel: group-relative estimators need only the group and run where it lives;
estimators that need the whole batch's statistics (``whole_batch``, or whitening) run on every
rank's samples gathered in global prompt order, so K ranks compute exactly what one process
computes.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from posttrain.algorithms.advantages import ADVANTAGE_ESTIMATORS, whiten_advantages
from posttrain.algorithms.kl import kl_estimate
from posttrain.train.distributed import DistInfo, all_gather_objects, all_reduce_max, all_reduce_sum
from posttrain.train.rl_samples import RolloutBatch, RolloutSample, in_prompt_order, without_tensors
from posttrain.train.rl_settings import AdvantageSettings


def advantages(batch: RolloutBatch, settings: AdvantageSettings, kl_coef: float, info: DistInfo) -> dict[str, float]:
    """Fill this rank's samples' advantages (and returns); returns their stats over every rank."""
    if not info.distributed:
        return compute_advantages(batch.groups, settings, kl_coef)
    if not settings.whole_batch:
        compute_advantages(batch.groups, settings, kl_coef)
        return global_advantage_stats(batch.samples, info)
    inputs = ("old_logp", "ref_logp", "values")  # with reward, length and trained: what compute_advantages reads
    parts = all_gather_objects([[without_tensors(s, keep=inputs) for s in group] for group in batch.groups], info)
    metrics = compute_advantages(in_prompt_order(parts), settings, kl_coef)
    for sample, filled in zip(batch.samples, [s for group in parts[info.rank] for s in group]):
        sample.advantages, sample.returns = filled.advantages, filled.returns
    return metrics


@torch.no_grad()
def compute_advantages(groups: Sequence[Sequence[RolloutSample]], settings: AdvantageSettings,
                       kl_coef: float) -> dict[str, float]:
    """Fill ``advantages`` (and ``returns`` when the estimator gives them) of every sample,
    one entry per trained token; returns their stats over the trained samples."""
    samples = [s for group in groups for s in group]
    estimator = ADVANTAGE_ESTIMATORS[settings.estimator]
    lengths = torch.tensor([s.trained_length for s in samples], dtype=torch.long)
    sequence_index_N = torch.repeat_interleave(torch.arange(len(samples)), lengths)
    group_index_S = torch.tensor([g for g, group in enumerate(groups) for _ in group], dtype=torch.long)
    rewards_S = torch.tensor([s.reward for s in samples], dtype=torch.float32)
    kl_in_reward = settings.kl_in_reward and kl_coef > 0
    kl_N = torch.cat([sequence_kl(s, settings) for s in samples]) if kl_in_reward and samples else None
    values_N = torch.cat([s.values for s in samples]) if estimator.needs_values and samples else None
    options = replace(settings.options, kl_coef=kl_coef if kl_in_reward else 0.0)
    out = estimator.estimate(rewards_S, group_index_S, sequence_index_N, options, kl_N=kl_N, values_N=values_N)
    advantages_N = whiten_advantages(out.advantages) if settings.whiten else out.advantages
    sizes = lengths.tolist()
    for sample, values in zip(samples, torch.split(advantages_N, sizes)):
        sample.advantages = values.clone()
    if out.returns is not None:
        for sample, values in zip(samples, torch.split(out.returns, sizes)):
            sample.returns = values.clone()
    flat = torch.cat([s.advantages for s in samples if s.trained] or [torch.zeros(1)])
    return {"adv/mean": flat.mean().item(), "adv/std": flat.std().item() if flat.numel() > 1 else 0.0,
            "adv/min": flat.min().item(), "adv/max": flat.max().item()}


def sequence_kl(sample: RolloutSample, settings: AdvantageSettings) -> torch.Tensor:
    """Per-token KL estimate to the reference at rollout time, clamped to [-clamp, clamp]: [R]."""
    return kl_estimate(sample.old_logp, sample.ref_logp, settings.kl_estimator, clamp=settings.kl_clamp)


def global_advantage_stats(samples: Sequence[RolloutSample], info: DistInfo) -> dict[str, float]:
    """``adv/mean``, ``adv/std`` (unbiased), ``adv/min``, ``adv/max`` over every rank's trained tokens."""
    trained = [s.advantages.double() for s in samples if s.trained]
    flat = torch.cat(trained) if trained else torch.zeros(0, dtype=torch.float64)
    count, total, squares = all_reduce_sum([float(flat.numel()), flat.sum().item(), (flat ** 2).sum().item()], info)
    inf = float("inf")
    neg_low, high = all_reduce_max([-flat.min().item() if flat.numel() else -inf,
                                    flat.max().item() if flat.numel() else -inf], info)
    if count == 0:
        return {"adv/mean": 0.0, "adv/std": 0.0, "adv/min": 0.0, "adv/max": 0.0}
    mean = total / count
    variance = max(0.0, (squares - count * mean * mean) / (count - 1)) if count > 1 else 0.0
    return {"adv/mean": mean, "adv/std": variance ** 0.5, "adv/min": -neg_low, "adv/max": high}
