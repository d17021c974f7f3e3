"""The update of an RL step: ``ppo_epochs`` passes over the step's samples in mini-batches, one
optimizer step each, for the critic (gae) and then the policy. The math lives in
``posttrain.algorithms`` (the policy loss named by ``rl.policy_loss`` in
``algorithms.policy.POLICY_LOSSES``, kl, aggregate); this module lays the samples out
(``train.rl_layout``) and calls it.

With ``ptx:`` (PPO-ptx, ``train.rl_ptx``) each policy optimizer step also trains its drawn SFT
rows: their micro-batches join the step's, their loss is ``ptx.coef`` x their own token mean.

A step's normalisers (trained tokens, sequences) span its whole mini-batch
(``algorithms.aggregate``), so how it is split into micro-batches or ranks never changes the
loss or the gradient. ``loss_agg_mode: sum`` (Dr. GRPO) is divided by the first mini-batch's
trained sequences x ``rollout.max_new_tokens``, a constant of the step.

Data parallel: this rank's samples are dealt into its share of each mini-batch; a mini-batch
empty on every rank is skipped everywhere, so all ranks take the same optimizer steps. The
normalisers are summed over ranks, each share's loss is multiplied by ``world_size`` (FSDP
averages gradients), every rank runs as many micro-batches as the busiest one (a one-token
filler whose loss is multiplied by 0) and the metrics cover every rank's micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from posttrain.algorithms.aggregate import aggregate_token_losses
from posttrain.algorithms.kl import kl_estimate
from posttrain.algorithms.mismatch import mismatch_weights
from posttrain.algorithms.policy import POLICY_LOSSES, entropy_bonus, value_loss
from posttrain.data.batching import MicroBatch
from posttrain.models.logprobs import response_token_logprobs, response_token_values
from posttrain.train.distributed import DistInfo, all_gather_objects, all_reduce_max, all_reduce_sum
from posttrain.train.loop import MicroResult, optimizer_step
from posttrain.train.rl_layout import concat_field, filler_sample, mini_batches, pack_micro_batches, reshuffle
from posttrain.train.rl_logprobs import logprob_gap_metrics
from posttrain.train.rl_ptx import PtxMix, PtxStep, ptx_micro_loss, ptx_step
from posttrain.train.rl_samples import RolloutBatch, RolloutSample
from posttrain.train.rl_settings import CriticLossSettings, LossSettings, UpdateSettings

MicroItem = tuple[list[RolloutSample], MicroBatch]


@dataclass
class Trainables:
    """The policy (and critic) with their optimizers and schedulers, and the reference."""

    policy: torch.nn.Module
    optimizer: Any
    scheduler: Any
    reference: Any = None  # None or a context-manager factory yielding the reference module
    critic: torch.nn.Module | None = None
    critic_optimizer: Any = None
    critic_scheduler: Any = None


@dataclass(frozen=True)
class PolicyObjective:
    """The policy loss of one step: its settings and this step's two values."""

    settings: LossSettings
    kl_coef: float  # the KL term's weight in the loss (0 when the KL is a reward)
    sum_normaliser: float  # loss_agg_mode 'sum' divides the loss by this
    ptx: PtxMix | None = None  # PPO-ptx: SFT rows whose loss joins every optimizer step (train.rl_ptx)


@dataclass(frozen=True)
class StepNormalisers:
    """Trained tokens and sequences of a whole mini-batch (every rank's)."""

    tokens: float
    sequences: float


def update(models: Trainables, batch: RolloutBatch, settings: UpdateSettings, step: int, kl_coef: float,
           info: DistInfo, ptx: PtxMix | None = None) -> dict[str, float]:
    """Critic (when there is one) then policy updates over ``ppo_epochs`` passes of mini-batches;
    ``ptx``: SFT rows whose supervised loss joins each of the policy's optimizer steps."""
    batches = mini_batches(batch.groups, settings.mini_batches, seed=settings.seed * 7919 + step,
                           keep_empty=info.distributed)
    sizes = [float(len(b)) for b in batches]
    if info.distributed:
        sizes = all_reduce_sum(sizes, info)
        batches = [b for b, size in zip(batches, sizes) if size > 0]
        sizes = [size for size in sizes if size > 0]
    if not batches:
        return {}
    metrics: dict[str, float] = {}
    if models.critic is not None and settings.critic is not None:
        critic_metrics = update_model(models.critic, models.critic_optimizer, models.critic_scheduler, batches,
                                      settings.critic, settings, step, info)
        metrics.update({f"critic/{k}": v for k, v in critic_metrics.items()})
        if step < settings.critic.warmup_steps:
            return metrics
    loss = settings.loss
    objective = PolicyObjective(loss, kl_coef=kl_coef if loss.kl_in_loss else 0.0,
                                sum_normaliser=float(max(1, int(sizes[0])) * loss.sum_tokens_per_sequence), ptx=ptx)
    metrics.update(update_model(models.policy, models.optimizer, models.scheduler, batches, objective, settings,
                                step, info))
    return metrics


def update_model(model: torch.nn.Module, optimizer: Any, scheduler: Any, batches: Sequence[list[RolloutSample]],
                 objective: PolicyObjective | CriticLossSettings, settings: UpdateSettings, step: int,
                 info: DistInfo | None = None) -> dict[str, float]:
    """``ppo_epochs`` passes; one optimizer step per mini-batch; returns averaged metrics.

    ``objective`` is the policy's (``policy_micro_loss``) or the critic's (``critic_micro_loss``);
    each micro-batch returns a ``MicroResult`` whose metric tensors are read once, after the
    last optimizer step. ``nonfinite_steps`` counts the optimizer steps not applied because
    their loss or gradient norm was NaN/inf. ``batches`` are this rank's shares of the global
    mini-batches (as many on every rank; a share may be empty).
    """
    distributed = info is not None and info.distributed
    world_size = info.world_size if info is not None else 1
    filler = None
    if distributed:
        chunk, micro = pack_micro_batches([filler_sample(settings.layout.pad_token_id)], settings.layout)[0]
        filler = (chunk, micro.to(settings.device))
    step_results: list[list[MicroResult]] = []
    grad_norms, losses, lrs = [], [], []
    nonfinite = 0
    mix = objective.ptx if isinstance(objective, PolicyObjective) else None
    for epoch in range(settings.ppo_epochs):
        for mini in batches if epoch == 0 else reshuffle(batches, settings.seed + step + epoch):
            normalisers = StepNormalisers(float(sum(s.trained_length for s in mini)), float(len(mini)))
            items = [(chunk, batch.to(settings.device)) for chunk, batch in pack_micro_batches(mini, settings.layout)]
            rows = None if mix is None else ptx_step(mix, step, len(losses), info.rank if distributed else 0,
                                                     world_size, settings.device)
            if rows is not None:
                items += rows.micro_batches
            if distributed:
                normalisers = StepNormalisers(*all_reduce_sum([normalisers.tokens, normalisers.sequences], info))
                items += [filler] * (int(all_reduce_max([float(len(items))], info)[0]) - len(items))

            def loss_of(m: torch.nn.Module, item: MicroItem | MicroBatch, normalisers: StepNormalisers = normalisers,
                        rows: PtxStep | None = rows) -> MicroResult:
                if isinstance(item, MicroBatch):  # one of the step's SFT rows (PPO-ptx)
                    return ptx_micro_loss(m, item, mix, rows)
                result = micro_loss(m, item, objective, normalisers)
                if item is filler:  # keeps FSDP's collectives in step; adds nothing
                    return MicroResult(result.loss * 0.0, 0.0)
                return result

            result = optimizer_step(
                model, optimizer, scheduler, items, loss_of,
                precision=settings.precision, device=settings.device, max_grad_norm=settings.max_grad_norm,
                world_size=world_size, reduce_sum=(lambda values: all_reduce_sum(values, info)) if distributed else None)
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


def micro_loss(model: torch.nn.Module, item: MicroItem, objective: PolicyObjective | CriticLossSettings,
               normalisers: StepNormalisers) -> MicroResult:
    if isinstance(objective, CriticLossSettings):
        return critic_micro_loss(model, item, objective, normalisers)
    return policy_micro_loss(model, item, objective, normalisers)


def policy_micro_loss(model: torch.nn.Module, item: MicroItem, objective: PolicyObjective,
                      normalisers: StepNormalisers) -> MicroResult:
    """This micro-batch's share of the policy loss: the registered policy loss + beta * KL +
    entropy bonus, its trained (sampled) token count, metrics as tensors and the
    engine-vs-trainer log-prob gap."""
    samples, batch = item
    settings = objective.settings
    device = batch.input_ids.device
    tokens = response_token_logprobs(model, batch, temperature=settings.temperature, chunk_size=settings.chunk_size,
                                     with_entropy=True)
    logp = tokens.logp
    mask = torch.ones_like(logp)
    old_logp = concat_field(samples, "old_logp", device) if samples[0].old_logp is not None else logp.detach()
    advantages = concat_field(samples, "advantages", device)
    mode, index = settings.loss_agg_mode, tokens.sequence_index
    weight, mismatch_metrics = None, {}
    if settings.mismatch is not None and samples[0].engine_logp is not None:
        # decoupled PPO: the ratio is to the proximal policy (old_logp: the trainer's weights at the start of the
        # update), the weight corrects from the behaviour policy (the engine's log-probs) to it
        weight, mismatch_metrics = mismatch_weights(old_logp, concat_engine_logp(samples, device), index,
                                                    settings.mismatch)
    loss, metrics = POLICY_LOSSES[settings.policy_loss](
        logp, old_logp, advantages, mask, settings.policy_options, loss_agg_mode=mode,
        step_trained_tokens=normalisers.tokens, step_sequences=normalisers.sequences, sequence_index=index,
        token_weight=weight)
    metrics.update(mismatch_metrics)
    if objective.kl_coef:
        kl = kl_estimate(logp, concat_field(samples, "ref_logp", device), settings.kl_estimator,
                         clamp=settings.kl_clamp)
        loss = loss + objective.kl_coef * aggregate_token_losses(
            kl, mask, index, mode, step_trained_tokens=normalisers.tokens, step_sequences=normalisers.sequences)
        metrics["kl"] = kl.detach().mean()
    elif samples[0].ref_logp is not None:
        metrics["kl"] = kl_estimate(logp.detach(), concat_field(samples, "ref_logp", device),
                                    settings.kl_estimator, clamp=settings.kl_clamp).mean()
    entropy = tokens.entropy
    if settings.entropy_coef:
        bonus, entropy_metrics = entropy_bonus(
            entropy, mask, settings.entropy_coef, loss_agg_mode=mode, step_trained_tokens=normalisers.tokens,
            step_sequences=normalisers.sequences, sequence_index=index)
        loss = loss + bonus
    else:
        entropy_metrics = {"entropy": entropy.detach().mean()}
    metrics.update(entropy_metrics)
    if settings.loss_agg_mode == "sum":
        loss = loss / objective.sum_normaliser
    gap = None
    if samples[0].engine_logp is not None and samples[0].old_logp is None:
        gap = concat_engine_logp(samples, device) - logp.detach().float()
    return MicroResult(loss, float(logp.numel()), metrics, token_gap=gap)


def concat_engine_logp(samples: Sequence[RolloutSample], device: torch.device) -> torch.Tensor:
    """[N] float32: the engine's log-probs of every trained token of ``samples``, in order."""
    return torch.tensor([v for s in samples for v in s.engine_logp], dtype=torch.float32, device=device)


def critic_micro_loss(model: torch.nn.Module, item: MicroItem, settings: CriticLossSettings,
                      normalisers: StepNormalisers) -> MicroResult:
    """This micro-batch's share of the clipped value loss."""
    samples, batch = item
    device = batch.input_ids.device
    values = response_token_values(model, batch)
    sequence_index = torch.repeat_interleave(torch.arange(len(samples), device=device),
                                             torch.tensor([s.trained_length for s in samples], device=device))
    loss, metrics = value_loss(values, concat_field(samples, "values", device), concat_field(samples, "returns", device),
                               torch.ones_like(values), clip_range=settings.value_clip,
                               loss_agg_mode=settings.loss_agg_mode, step_trained_tokens=normalisers.tokens,
                               step_sequences=normalisers.sequences, sequence_index=sequence_index)
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
