"""The tensor side of an RL step: log-probs and values of the sampled tokens, advantages,
and the PPO-style policy and critic updates. The math lives in ``posttrain.algorithms``
(advantages, policy, kl, aggregate, sft); this module only lays the samples out and calls it.

Layout: samples are packed padding-free (``data.batching.collate_packed``) into micro-batches
within ``train.micro_batch_tokens``; the model runs to its final hidden states
(``models.prepare.forward_hidden``) and log-probs / entropies are computed only at the positions
that predict response tokens, chunk by chunk (``algorithms.sft``). In every micro-batch the
gathered response tokens come out in sample order, so each sample's per-token tensors
(``old_logp``, ``advantages``...) are simply concatenated to line up with them.

Log-probs are computed at the sampling temperature (logits / T), the distribution the
tokens were drawn from. A step's normalisers (trained tokens, sequences) span its whole
mini-batch (``algorithms.aggregate``), so how it is split into micro-batches never changes
the loss or the gradient.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from posttrain.algorithms.advantages import (
    gae_advantages,
    grpo_advantages,
    normalize_advantages,
    reinforce_plus_plus_advantages,
    rloo_advantages,
    token_level_rewards,
)
from posttrain.algorithms.aggregate import aggregate_token_losses
from posttrain.algorithms.kl import kl_estimate
from posttrain.algorithms.policy import POLICY_LOSSES, PolicyLossOptions, entropy_bonus, value_loss
from posttrain.data.batching import MicroBatch, collate_packed, collate_shared_prompt, split_into_micro_batches
from posttrain.train.distributed import DistInfo, all_gather_objects, all_reduce_max, all_reduce_sum
from posttrain.models.logprobs import response_token_logprobs, response_token_values
from posttrain.train.loop import MicroResult, autocast_context, optimizer_step
from posttrain.train.rl_rollouts import RolloutSample

# ----------------------------------------------------------------------------- layout


def pack_micro_batches(samples: Sequence[RolloutSample], micro_batch_tokens: int, pad_token_id: int,
                       share_prompt: bool = False) -> list[tuple[list[RolloutSample], MicroBatch]]:
    """Split samples into packed micro-batches within the token budget (order inside each
    micro-batch = the order of its sample list): ``plan_micro_batches`` then
    ``collate_rollouts``."""
    return [(chunk, collate_rollouts(chunk, pad_token_id, share_prompt))
            for chunk in plan_micro_batches(samples, micro_batch_tokens, share_prompt)]


def plan_micro_batches(samples: Sequence[RolloutSample], micro_batch_tokens: int,
                       share_prompt: bool = False) -> list[list[RolloutSample]]:
    """Which samples go into which micro-batch (no tensors built).

    Plain: every sample is its own packed sequence (first-fit decreasing by length).
    ``share_prompt``: samples are grouped by prompt ids and each group costs its prompt once;
    micro-batches are filled in order, and a group larger than the budget is split, each part
    paying for its own copy of the prompt (one completion always gets a micro-batch).
    """
    if not share_prompt:
        lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
        bins = split_into_micro_batches(list(range(len(samples))), lengths, micro_batch_tokens, packing=True)
        return [[samples[i] for i in indices] for indices in bins]
    groups: dict[tuple[int, ...], list[RolloutSample]] = {}
    for sample in samples:
        groups.setdefault(tuple(sample.prompt_ids), []).append(sample)
    parts: list[list[RolloutSample]] = []
    for prompt, members in groups.items():
        part: list[RolloutSample] = []
        cost = len(prompt)
        for sample in members:
            if part and cost + len(sample.response_ids) > micro_batch_tokens:
                parts.append(part)
                part, cost = [], len(prompt)
            part.append(sample)
            cost += len(sample.response_ids)
        parts.append(part)
    bins: list[list[RolloutSample]] = []
    bin_cost = 0
    for part in parts:
        cost = len(part[0].prompt_ids) + sum(len(s.response_ids) for s in part)
        if not bins or bin_cost + cost > micro_batch_tokens:
            bins.append([])
            bin_cost = 0
        bins[-1].extend(part)
        bin_cost += cost
    return bins


def collate_rollouts(chunk: Sequence[RolloutSample], pad_token_id: int, share_prompt: bool = False) -> MicroBatch:
    """One micro-batch's tensors: one packed sequence per sample, or (``share_prompt``) each
    run of consecutive samples with the same prompt ids as one shared-prompt group."""
    if not share_prompt:
        return collate_packed(chunk, pad_token_id)
    groups: list[tuple[list[int], list[list[int]], list[list[int] | None]]] = []
    for sample in chunk:
        if not groups or groups[-1][0] != sample.prompt_ids:
            groups.append((sample.prompt_ids, [], []))
        groups[-1][1].append(sample.response_ids)
        groups[-1][2].append(sample.response_mask)
    return collate_shared_prompt(groups)


def split_per_sample(values_N: torch.Tensor, samples: Sequence[RolloutSample]) -> list[torch.Tensor]:
    return list(torch.split(values_N.detach().float().cpu(), [s.trained_length for s in samples]))


def concat_field(samples: Sequence[RolloutSample], name: str, device: torch.device) -> torch.Tensor:
    return torch.cat([getattr(s, name) for s in samples]).to(device)


# ----------------------------------------------------------------------------- rollout-time passes


@torch.no_grad()
def compute_rollout_tensors(samples: Sequence[RolloutSample], *, policy: torch.nn.Module | None,
                            reference: Callable[[], Any] | None, critic: torch.nn.Module | None,
                            temperature: float, chunk_size: int, micro_batch_tokens: int, pad_token_id: int,
                            precision: str, device: torch.device, share_prompt: bool = False) -> dict[str, float]:
    """Fill ``old_logp`` (policy given), ``ref_logp`` (reference given) and ``values``
    (critic given) of every sample, without gradients.

    ``reference`` is a context-manager factory returning the reference module (LoRA: the
    policy with its adapter disabled; otherwise a frozen copy). Returns the engine-vs-trainer
    log-prob gap metrics when the engine reported log-probs.
    """
    gaps: list[torch.Tensor] = []
    for chunk, batch in pack_micro_batches(samples, micro_batch_tokens, pad_token_id, share_prompt):
        batch = batch.to(device)
        with autocast_context(precision, device):
            if policy is not None:
                was_training = policy.training
                policy.eval()
                logp = response_token_logprobs(policy, batch, temperature=temperature, chunk_size=chunk_size,
                                               with_entropy=False).logp
                policy.train(was_training)
                for sample, values in zip(chunk, split_per_sample(logp, chunk)):
                    sample.old_logp = values
                    if sample.engine_logp is not None:
                        gaps.append(torch.tensor(sample.engine_logp, dtype=torch.float32) - values)
            if reference is not None:
                with reference() as ref_model:
                    ref_logp = response_token_logprobs(ref_model, batch, temperature=temperature,
                                                       chunk_size=chunk_size, with_entropy=False).logp
                for sample, values in zip(chunk, split_per_sample(ref_logp, chunk)):
                    sample.ref_logp = values
            if critic is not None:
                values_N = response_token_values(critic, batch)
                for sample, values in zip(chunk, split_per_sample(values_N, chunk)):
                    sample.values = values
    return logprob_gap_metrics(gaps)


def logprob_gap_metrics(gaps: Sequence[torch.Tensor]) -> dict[str, float]:
    """Engine log-prob minus trainer log-prob of the same sampled tokens."""
    if not gaps:
        return {}
    gap = torch.cat(list(gaps))
    return {"logprob_gap/mean_abs": gap.abs().mean().item(), "logprob_gap/max_abs": gap.abs().max().item(),
            "logprob_gap/mean": gap.mean().item()}


# ----------------------------------------------------------------------------- advantages


def sequence_kl(sample: RolloutSample, estimator: str, clamp: float | None) -> torch.Tensor:
    """Per-token KL estimate to the reference at rollout time, clamped to [-clamp, clamp]: [R]."""
    return kl_estimate(sample.old_logp, sample.ref_logp, estimator, clamp=clamp)


def pad_token_tensors(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad [R_i] tensors into ([B, R], mask [B, R])."""
    width = max(t.numel() for t in tensors)
    out = torch.zeros(len(tensors), width)
    mask = torch.zeros(len(tensors), width)
    for row, t in enumerate(tensors):
        out[row, : t.numel()] = t
        mask[row, : t.numel()] = 1
    return out, mask


@torch.no_grad()
def compute_advantages(groups: Sequence[Sequence[RolloutSample]], *, algorithm: str, kl_in_reward: bool,
                       kl_coef: float, kl_estimator: str, gamma: float, lam: float,
                       whiten: bool, kl_clamp: float | None = 10.0) -> dict[str, float]:
    """Fill ``advantages`` (and ``returns`` for ppo) of every sample; returns their stats.

    grpo / dr_grpo / rloo: one scalar per sample from its group, broadcast to its tokens;
    with the KL in the reward, a sample's reward first loses beta * sum_t KL_t.
    reinforce_pp / ppo: token-level rewards (outcome on the last token minus beta * KL_t),
    then batch-normalised discounted returns (REINFORCE++) or GAE with the critic (PPO).
    """
    samples = [s for group in groups for s in group]
    if algorithm in ("grpo", "dr_grpo", "rloo"):
        rewards = torch.tensor([[s.reward for s in group] for group in groups], dtype=torch.float32)
        if kl_in_reward and kl_coef:
            rewards -= kl_coef * torch.tensor([[sequence_kl(s, kl_estimator, kl_clamp).sum().item() for s in group]
                                               for group in groups])
        if algorithm == "rloo":
            adv_PG = rloo_advantages(rewards)
        else:
            adv_PG = grpo_advantages(rewards, scale_by_std=algorithm == "grpo")
        for sample, advantage in zip(samples, adv_PG.reshape(-1).tolist()):
            sample.advantages = torch.full((sample.trained_length,), advantage)
    else:
        mask = pad_token_tensors([torch.ones(s.trained_length) for s in samples])[1]
        kl_BT = None
        if kl_in_reward and kl_coef:
            kl_BT = pad_token_tensors([sequence_kl(s, kl_estimator, kl_clamp) for s in samples])[0]
        token_rewards = token_level_rewards(torch.tensor([s.reward for s in samples]), mask, kl_BT=kl_BT,
                                            kl_coef=kl_coef)
        if algorithm == "reinforce_pp":
            adv_BT = reinforce_plus_plus_advantages(token_rewards, mask, gamma=gamma)
            returns_BT = None
        else:
            values_BT = pad_token_tensors([s.values for s in samples])[0]
            adv_BT, returns_BT = gae_advantages(token_rewards, values_BT, mask, gamma=gamma, lam=lam)
            if whiten:
                adv_BT = normalize_advantages(adv_BT, mask)
        for row, sample in enumerate(samples):
            n = sample.trained_length
            sample.advantages = adv_BT[row, :n].clone()
            if returns_BT is not None:
                sample.returns = returns_BT[row, :n].clone()
    flat = torch.cat([s.advantages for s in samples if s.trained] or [torch.zeros(1)])
    return {"adv/mean": flat.mean().item(), "adv/std": flat.std().item() if flat.numel() > 1 else 0.0,
            "adv/min": flat.min().item(), "adv/max": flat.max().item()}


# ----------------------------------------------------------------------------- updates


def mini_batches(groups: Sequence[Sequence[RolloutSample]], count: int, seed: int,
                 keep_empty: bool = False) -> list[list[RolloutSample]]:
    """Shuffle whole groups (seeded), then deal the samples into ``count`` equal mini-batches
    (as equal as they can be when ``count`` does not divide them).

    With a mini-batch size that is a multiple of the group size, groups stay whole. Samples
    excluded from the loss (overlong filtering) are left out; empty mini-batches are dropped,
    unless ``keep_empty`` (data parallel: a rank's share of a mini-batch may be empty while
    another rank's is not), which always returns ``count`` lists.
    """
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    flat = [s for g in order for s in groups[g]]
    bounds = [len(flat) * k // count for k in range(count + 1)]
    chunks = [[s for s in flat[start: end] if s.trained] for start, end in zip(bounds[:-1], bounds[1:])]
    return chunks if keep_empty else [chunk for chunk in chunks if chunk]


@dataclass
class LossSettings:
    """Scalars the policy loss needs (no config object enters the math)."""

    policy_loss: str  # a name in algorithms.policy.POLICY_LOSSES
    policy_options: PolicyLossOptions
    loss_agg_mode: str
    kl_coef: float
    kl_estimator: str
    kl_in_loss: bool
    entropy_coef: float
    temperature: float
    chunk_size: int
    sum_normaliser: float  # 'sum' mode: divide by this (Dr. GRPO: sequences x max_new_tokens)
    kl_clamp: float | None = 10.0  # each token's KL estimate clamped to [-kl_clamp, kl_clamp]; None = unbounded


def policy_micro_loss(model: torch.nn.Module, item: tuple[list[RolloutSample], MicroBatch], *,
                      settings: LossSettings, step_tokens: float, step_sequences: float) -> MicroResult:
    """This micro-batch's share of the policy loss: ``settings.policy_loss`` + beta * KL + entropy bonus, its
    trained (sampled) token count, metrics as tensors and the engine-vs-trainer log-prob gap."""
    samples, batch = item
    device = batch.input_ids.device
    tokens = response_token_logprobs(model, batch, temperature=settings.temperature, chunk_size=settings.chunk_size,
                                     with_entropy=True)
    logp = tokens.logp
    mask = torch.ones_like(logp)
    old_logp = concat_field(samples, "old_logp", device) if samples[0].old_logp is not None else logp.detach()
    advantages = concat_field(samples, "advantages", device)
    common = dict(loss_agg_mode=settings.loss_agg_mode, step_trained_tokens=step_tokens,
                  step_sequences=step_sequences, sequence_index=tokens.sequence_index)
    loss, metrics = POLICY_LOSSES[settings.policy_loss](logp, old_logp, advantages, mask, settings.policy_options,
                                                        **common)
    if settings.kl_coef and settings.kl_in_loss:
        kl = kl_estimate(logp, concat_field(samples, "ref_logp", device), settings.kl_estimator,
                         clamp=settings.kl_clamp)
        kl_loss = aggregate_token_losses(kl, mask, tokens.sequence_index, settings.loss_agg_mode,
                                         step_trained_tokens=step_tokens, step_sequences=step_sequences)
        loss = loss + settings.kl_coef * kl_loss
        metrics["kl"] = kl.detach().mean()
    elif samples[0].ref_logp is not None:
        metrics["kl"] = kl_estimate(logp.detach(), concat_field(samples, "ref_logp", device),
                                    settings.kl_estimator, clamp=settings.kl_clamp).mean()
    entropy = tokens.entropy
    if settings.entropy_coef:
        bonus, entropy_metrics = entropy_bonus(entropy, mask, settings.entropy_coef, **common)
        loss = loss + bonus
    else:
        entropy_metrics = {"entropy": entropy.detach().mean()}
    metrics.update(entropy_metrics)
    if settings.loss_agg_mode == "sum":
        loss = loss / settings.sum_normaliser
    gap = None
    if samples[0].engine_logp is not None and samples[0].old_logp is None:
        engine_logp = torch.tensor([v for s in samples for v in s.engine_logp], dtype=torch.float32, device=device)
        gap = engine_logp - logp.detach().float()
    return MicroResult(loss, float(logp.numel()), metrics, token_gap=gap)


def critic_micro_loss(model: torch.nn.Module, item: tuple[list[RolloutSample], MicroBatch], *, value_clip: float | None,
                      loss_agg_mode: str, step_tokens: float, step_sequences: float) -> MicroResult:
    """This micro-batch's share of the clipped value loss."""
    samples, batch = item
    device = batch.input_ids.device
    values = response_token_values(model, batch)
    sequence_index = torch.repeat_interleave(torch.arange(len(samples), device=device),
                                             torch.tensor([s.trained_length for s in samples], device=device))
    loss, metrics = value_loss(values, concat_field(samples, "values", device), concat_field(samples, "returns", device),
                               torch.ones_like(values), clip_range=value_clip,
                               loss_agg_mode="token-mean" if loss_agg_mode == "sum" else loss_agg_mode,
                               step_trained_tokens=step_tokens, step_sequences=step_sequences,
                               sequence_index=sequence_index)
    return MicroResult(loss, float(values.numel()), metrics)


LOSS_SHARE_KEYS = ("pg_loss", "vf_loss")  # a micro-batch's share of its optimizer step's loss


@dataclass
class MicroRecord:
    """One micro-batch of an update, read back from the device: which optimizer step it
    belonged to, its trained tokens, its metrics and its log-prob gap (engine - trainer)."""

    step: int
    tokens: float
    metrics: dict[str, float]
    token_gap: torch.Tensor | None = None


def read_micro_results(steps: Sequence[Sequence[MicroResult]]) -> list[MicroRecord]:
    """Every micro-batch's metric tensors of an update, read with one device transfer."""
    flat = [(step, micro) for step, results in enumerate(steps) for micro in results]
    keys = [sorted(micro.metrics) for _, micro in flat]
    tensors = [torch.as_tensor(micro.metrics[key], dtype=torch.float32).reshape(())
               for (_, micro), names in zip(flat, keys) for key in names]
    values = iter(torch.stack([v.to(tensors[0].device) for v in tensors]).tolist() if tensors else [])
    return [MicroRecord(step, micro.count, {key: next(values) for key in names},
                        None if micro.token_gap is None else micro.token_gap.cpu())
            for (step, micro), names in zip(flat, keys)]


def weighted_mean_metrics(records: Sequence[MicroRecord]) -> dict[str, float]:
    """Token-weighted mean of each metric over micro-batches (min / max for ratio extremes).

    Loss shares (``LOSS_SHARE_KEYS``, already divided by step-wide normalisers) are summed
    within their optimizer step and averaged over steps, so they do not depend on how a step
    was split into micro-batches or ranks.
    """
    out: dict[str, float] = {}
    total = sum(r.tokens for r in records) or 1.0
    keys = {k for r in records for k in r.metrics}
    for key in keys:
        present = [r for r in records if key in r.metrics]
        if key in LOSS_SHARE_KEYS:
            per_step: dict[int, float] = {}
            for r in present:
                per_step[r.step] = per_step.get(r.step, 0.0) + r.metrics[key]
            out[key] = sum(per_step.values()) / len(per_step)
        elif key.endswith("/min"):
            out[key] = min(r.metrics[key] for r in present)
        elif key.endswith("/max"):
            out[key] = max(r.metrics[key] for r in present)
        else:
            weight = sum(r.tokens for r in present) or total
            out[key] = sum(r.metrics[key] * r.tokens for r in present) / weight
    out.update(logprob_gap_metrics([r.token_gap for r in records if r.token_gap is not None]))
    return out


def update_model(model: torch.nn.Module, optimizer: Any, scheduler: Any, batches: Sequence[list[RolloutSample]],
                 loss_fn: Callable[..., tuple[torch.Tensor, dict[str, float]]], *, ppo_epochs: int, seed: int,
                 micro_batch_tokens: int, pad_token_id: int, precision: str, device: torch.device,
                 max_grad_norm: float | None, world_size: int = 1, share_prompt: bool = False,
                 info: DistInfo | None = None, filler: Any = None) -> dict[str, float]:
    """``ppo_epochs`` passes; one optimizer step per mini-batch; returns averaged metrics.

    ``loss_fn(model, item, step_tokens=, step_sequences=)`` is ``policy_micro_loss`` or
    ``critic_micro_loss`` with its settings bound; each returns a ``MicroResult`` whose
    metric tensors are read once, after the last optimizer step. ``nonfinite_steps`` counts the
    optimizer steps not applied because their loss or gradient norm was NaN/inf.

    Data parallel (``info`` with several ranks): ``batches`` are this rank's shares of the
    global mini-batches (as many on every rank; a share may be empty). The normalisers are
    summed over ranks, each share's loss is multiplied by ``world_size`` (FSDP averages
    gradients), every rank runs as many micro-batches as the busiest one (the ``filler`` item,
    a one-token sample whose loss is multiplied by 0, makes up the difference) and the
    metrics cover every rank's micro-batches.
    """
    distributed = info is not None and info.distributed
    step_results: list[list[MicroResult]] = []
    grad_norms, losses, lrs = [], [], []
    nonfinite = 0
    for epoch in range(ppo_epochs):
        for index, mini in enumerate(batches if epoch == 0 else _reshuffle(batches, seed + epoch)):
            step_tokens = float(sum(s.trained_length for s in mini))
            step_sequences = float(len(mini))
            items = [(chunk, batch.to(device)) for chunk, batch in
                     pack_micro_batches(mini, micro_batch_tokens, pad_token_id, share_prompt)]
            if distributed:
                step_tokens, step_sequences = all_reduce_sum([step_tokens, step_sequences], info)
                items += [filler] * (int(all_reduce_max([float(len(items))], info)[0]) - len(items))

            def micro_loss(m, item, step_tokens=step_tokens, step_sequences=step_sequences):
                result = loss_fn(m, item, step_tokens=step_tokens, step_sequences=step_sequences)
                if item is filler:  # keeps FSDP's collectives in step; adds nothing
                    return MicroResult(result.loss * 0.0, 0.0)
                return result

            result = optimizer_step(
                model, optimizer, scheduler, items, micro_loss,
                precision=precision, device=device, max_grad_norm=max_grad_norm, world_size=world_size,
                reduce_sum=(lambda values: all_reduce_sum(values, info)) if distributed else None)
            step_results.append([micro for micro, item in zip(result.micro, items) if item is not filler])
            grad_norms.append(result.grad_norm)
            lrs.append(result.lr)
            losses.append(result.loss)
            nonfinite += not result.finite  # that update was not applied (train.loop.optimizer_step)
    records = read_micro_results(step_results)
    if distributed:
        records = [record for part in all_gather_objects(records, info) for record in part]
    metrics = weighted_mean_metrics(records)
    metrics["loss"] = sum(losses) / len(losses)
    metrics["grad_norm"] = sum(grad_norms) / len(grad_norms)
    metrics["optimizer_steps"] = len(losses)
    metrics["nonfinite_steps"] = nonfinite
    metrics["lr"] = lrs[0]
    return metrics


def _reshuffle(batches: Sequence[list[RolloutSample]], seed: int) -> list[list[RolloutSample]]:
    """Later epochs see the same samples in a new (seeded) mini-batch order."""
    order = list(range(len(batches)))
    random.Random(seed).shuffle(order)
    return [batches[i] for i in order]
