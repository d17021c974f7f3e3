"""``posttrain rm``: train a reward model on preference pairs (Bradley–Terry), export it.

Phase 2 of docs/PIPELINE.md (Ouyang et al. 2022): collect comparisons (a prompt, a chosen and a rejected response), train a
model that scores the chosen one higher, check its accuracy on held-out pairs, and use it as
the reward of RL (``rewards.model``). The loss is ``algorithms.preference.bradley_terry_loss``
(InstructGPT eq. 1, optional per-pair margin as in Llama 2, optional reward centring).

The model is a causal LM with a scalar head (``posttrain.models.scalar_head``); its score is read at
the last token of each response (the end-of-turn token). The pairs are read, rendered with the
same chat template as SFT data, audited and planned by ``data.preference`` (over-long pairs
are dropped, not cut: cutting removes the score token); both sides of a pair always share a
micro-batch, so a pair's loss is computed inside one forward pass.

Everything else is the machinery every trainer shares, not copied: collation,
``train.steps`` (state, schedule, resume, end of step), ``train.loop.optimizer_step`` (AdamW,
schedule per optimizer step, clipping, accumulation as a plain sum of step-normalised
shares), ``train.checkpoint`` (atomic checkpoints, exact resume, HF export) and
``train.distributed`` (FSDP2). The step loss is normalised by the number of pairs in the
whole optimizer step, so it does not depend on how the step is split into micro-batches or
ranks (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from posttrain.algorithms.preference import bradley_terry_loss
from posttrain.config import RMConfig
from posttrain.data.batching import MicroBatch, StepPlan, collate
from posttrain.data.mixture import source_metrics
from posttrain.data.preference import PairKeys, PreferencePair, load_preference_data, make_pair_planner, pair_length
from posttrain.errors import ConfigError
from posttrain.hub import check_push_target
from posttrain.log import say
from posttrain.models import load_tokenizer
from posttrain.models.scalar_head import (
    export_pad_token_id,
    export_tokenizer,
    gather_scores,
    load_scalar_head_model,
    make_head_trainable,
    score_positions,
    token_values,
    train_top_layers_only,
)
from posttrain.train import checkpoint as ckpt
from posttrain.train.distributed import DistInfo, all_reduce_sum, init_distributed, shutdown_distributed
from posttrain.train.logging import Progress, optimizer_step_metrics, run_metrics_logger
from posttrain.models.prepare import apply_lora
from posttrain.train.loop import MicroResult, autocast_context, is_due, optimizer_step, seed_everything
from posttrain.train.session import RunSession, guard_step, open_run
from posttrain.train.steps import (TrainerState, advance, announce_run, build_optimizer_and_scheduler, check_schedule,
                                   check_warmup_before_max_steps, end_step, lockstep_micro_batches, place_for_training,
                                   restore_state, summarise_pairs, write_eval)

PAIR_METRICS = ("accuracy", "margin", "reward/chosen", "reward/rejected")


@dataclass
class PairMicroBatch:
    """One forward pass over ``pairs`` pairs: rows [c0, r0, c1, r1, ...] of ``batch``.

    rows_N, columns_N: [2P] position of each sequence's score token; margin_P: [P].
    """

    batch: MicroBatch
    rows_N: torch.Tensor
    columns_N: torch.Tensor
    margin_P: torch.Tensor
    groups: list[str | None] = field(default_factory=list)

    @property
    def pairs(self) -> int:
        return self.margin_P.numel()

    def to(self, device: torch.device | str) -> "PairMicroBatch":
        return PairMicroBatch(self.batch.to(device), self.rows_N.to(device), self.columns_N.to(device),
                              self.margin_P.to(device), self.groups)


@dataclass
class RMResult:
    run_dir: Path
    final_dir: Path | None
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    val_metrics: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- the loop


def run_rm(config: RMConfig, *, pairs: tuple[list, list] | None = None) -> RMResult:
    """Train; returns the run directory, final/ (HF format), the logged metrics (rank 0).

    ``pairs``: optional pre-rendered (train, val) ``PreferencePair`` lists (tests). The run
    holds its directory's lock and stops cleanly on SIGTERM / Ctrl-C (``train.session``).
    """
    check_settings(config)
    with RunSession("rm", config) as session:
        return _run_rm(config, session, pairs)


def _run_rm(config: RMConfig, session: RunSession, pairs: tuple[list, list] | None) -> RMResult:
    info = init_distributed()
    seed_everything(config.train.seed + info.rank)
    tokenizer = load_tokenizer(config.model.name, config.model.chat_template)
    train_pairs, val_pairs = pairs if pairs is not None else load_preference_data(
        config.data, tokenizer, seed=config.train.seed, keys=pair_keys(config), verbose=info.is_main)
    planner = make_pair_planner(train_pairs, config.train, info.world_size)
    total_steps = planner.total_steps(config.train.epochs, config.train.max_steps)
    warmup_steps = check_schedule(config, total_steps, has_val=bool(val_pairs))
    run, resume_path = open_run("rm", config, info, total_steps=total_steps)
    pad_id = _pad_id(tokenizer)
    model = build_model(config, info, pad_id)
    optimizer, scheduler = build_optimizer_and_scheduler(model, config.optim, total_steps, warmup_steps)
    state = restore_state(resume_path, model, optimizer, scheduler, info)
    announce(config, info, model, train_pairs, val_pairs, total_steps, warmup_steps, resume_path)
    history: list[dict[str, Any]] = []
    val_metrics: dict[str, float] = {}
    with (
        run_metrics_logger(run, config.run, info.is_main) as logger,
        Progress(total_steps, "rm", enabled=info.is_main and config.run.progress, initial=state.step,
                 keys=("loss", "accuracy", "val/accuracy", "lr")) as progress,
    ):
        start = source_metrics(config.data.train, train_pairs, lambda pair: pair.chosen.source)
        if state.step == 0 and start:  # a mixture's pairs per source
            history.append(logger.log(start, step=0))
        for plan in planner.iter_plans(state.step, total_steps):
            micro_batches = [pair_micro_batch([train_pairs[i] for i in mb], config.train.packing, pad_id).to(info.device)
                             for mb in plan.micro_batches[info.rank]]
            result = optimizer_step(
                model, optimizer, scheduler, micro_batches,
                lambda m, b: pair_loss(m, b, step_pairs=plan.trained_sequences,
                                       center_rewards_coef=config.rm.center_rewards_coef),
                precision=config.train.precision, device=info.device, max_grad_norm=config.optim.max_grad_norm,
                world_size=info.world_size, reduce_sum=lambda v: all_reduce_sum(v, info),
            )
            state = advance(state, plan, result)
            state.nonfinite_skipped = guard_step("rm", state.step, result, state.nonfinite_skipped, config.train,
                                                 run.checkpoints, info)
            metrics = step_metrics(plan, result, state, summarise_pairs(result.micro, info, PAIR_METRICS), train_pairs)
            if val_pairs and (is_due(state.step, config.train.eval_every, total_steps) or state.step == total_steps):
                val_metrics = evaluate_pairs(model, val_pairs, config, info, pad_id)
                metrics.update(val_metrics)
            end_step(session, config, state, total_steps, metrics, history, logger, progress, run, info,
                     (model, optimizer, scheduler))
    if val_pairs and not val_metrics:  # resumed at the very end: nothing was evaluated in this process
        val_metrics = evaluate_pairs(model, val_pairs, config, info, pad_id)
    if info.is_main:
        write_eval(run.eval, val_metrics, len(val_pairs), name="rm_val.json")
    final = ckpt.export_hf(model, export_tokenizer(tokenizer), run.final, info, merge_lora=config.lora.merge_on_export,
                           rebuild=lambda: build_model(config, info, pad_id, unsharded=True))
    if info.is_main:
        summary = "  ".join(f"{k}={val_metrics[k]:.4g}" for k in ("val/accuracy", "val/loss", "val/margin")
                            if k in val_metrics)
        say(f"rm: {state.step} steps in {state.elapsed_s:.0f}s; {summary}; final model in {final}")
    shutdown_distributed()
    return RMResult(run.path, final, state.step, history, val_metrics)


# ----------------------------------------------------------------------------- settings and micro-batches


def check_settings(config: RMConfig) -> None:
    """Refuse settings that cannot work before anything loads (one-line ConfigError)."""
    check_warmup_before_max_steps(config.optim.warmup_steps, config.train.max_steps)
    check_push_target(config.run.push_to_hub)


def pair_keys(config: RMConfig) -> PairKeys:
    """The row keys the reward model reads besides the pair: ``rm.margin_key``, ``rm.group_key``."""
    return PairKeys(margin=config.rm.margin_key, group=config.rm.group_key)


def pair_micro_batch(pairs: Sequence[PreferencePair], packing: bool, pad_token_id: int) -> PairMicroBatch:
    """Collate pairs as [c0, r0, c1, r1, ...] (an empty list gives a filler micro-batch)."""
    sequences = [side for pair in pairs for side in (pair.chosen, pair.rejected)]
    batch = collate(sequences, packing=packing, pad_token_id=pad_token_id)
    if sequences:
        rows, columns = score_positions(sequences, batch)
    else:
        rows = columns = torch.zeros(0, dtype=torch.long)
    margin = torch.tensor([pair.margin for pair in pairs], dtype=torch.float32)
    return PairMicroBatch(batch, rows, columns, margin, [pair.group for pair in pairs])


# ----------------------------------------------------------------------------- loss


def pair_scores(model: torch.nn.Module, micro: PairMicroBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen [P], rejected [P], all values [B, T]) of one micro-batch."""
    values_BT = token_values(model, micro.batch)
    scores_N = gather_scores(values_BT, micro.rows_N, micro.columns_N).reshape(-1, 2)
    return scores_N[:, 0], scores_N[:, 1], values_BT


def pair_loss(model: torch.nn.Module, micro: PairMicroBatch, *, step_pairs: float,
              center_rewards_coef: float) -> MicroResult:
    """This micro-batch's share of the step's Bradley–Terry loss (sum of shares = step mean),
    with its pair metrics weighted by its pairs."""
    chosen_P, rejected_P, values_BT = pair_scores(model, micro)
    loss, metrics = bradley_terry_loss(chosen_P, rejected_P, margin_P=micro.margin_P,
                                       centering_coef=center_rewards_coef, step_pairs=step_pairs)
    if micro.pairs == 0:  # filler micro-batch: keep the graph connected for FSDP's collectives
        loss = loss + 0.0 * values_BT.sum()
    return MicroResult(loss, float(micro.pairs), metrics)


@torch.no_grad()
def evaluate_pairs(model: torch.nn.Module, pairs: Sequence[PreferencePair], config: RMConfig, info: DistInfo,
                   pad_token_id: int) -> dict[str, float]:
    """val/loss, val/accuracy, val/margin, val/reward/* over every held-out pair (and
    val/accuracy/<group> per value of ``rm.group_key``), split over ranks in lock-step."""
    mine = lockstep_micro_batches([pair_length(p, config.train.packing) for p in pairs],
                                  config.train.micro_batch_tokens, config.train.packing, info)
    groups = sorted({p.group for p in pairs if p.group is not None})
    sums = {key: 0.0 for key in ("loss", *PAIR_METRICS, "pairs")}
    group_sums = {g: [0.0, 0.0] for g in groups}  # correct, count
    was_training = model.training
    model.eval()
    try:
        for indices in mine:
            micro = pair_micro_batch([pairs[i] for i in indices], config.train.packing, pad_token_id).to(info.device)
            with autocast_context(config.train.precision, info.device):
                chosen_P, rejected_P, _ = pair_scores(model, micro)
            _, metrics = bradley_terry_loss(chosen_P, rejected_P, margin_P=micro.margin_P,
                                            centering_coef=config.rm.center_rewards_coef)
            for key in sums:
                sums[key] += metrics[key] * (metrics["pairs"] if key != "pairs" else 1.0)
            correct = (chosen_P > rejected_P).tolist()
            for group, right in zip(micro.groups, correct):
                if group is not None:
                    group_sums[group][0] += float(right)
                    group_sums[group][1] += 1.0
    finally:
        model.train(was_training)
    keys = list(sums)
    totals = all_reduce_sum([sums[k] for k in keys] + [v for g in groups for v in group_sums[g]], info)
    reduced = dict(zip(keys, totals[: len(keys)]))
    count = max(reduced["pairs"], 1.0)
    result = {f"val/{key}": reduced[key] / count for key in ("loss", *PAIR_METRICS)}
    result["val/pairs"] = int(reduced["pairs"])
    for k, group in enumerate(groups):
        correct, seen = totals[len(keys) + 2 * k: len(keys) + 2 * k + 2]
        result[f"val/accuracy/{group}"] = correct / max(seen, 1.0)
    return result


# ----------------------------------------------------------------------------- pieces


def build_model(config: RMConfig, info: DistInfo, pad_token_id: int, *, unsharded: bool = False) -> torch.nn.Module:
    """Scalar-head model (fp32 master weights), LoRA (head trained in full), attention, shard."""
    model = load_scalar_head_model(config.model.name, dtype=torch.float32, seed=config.train.seed,
                                   pad_token_id=pad_token_id)
    if config.lora.enabled:
        lora = config.lora
        model = make_head_trainable(apply_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                                               target_modules=lora.target_modules, task_type="SEQ_CLS"))
    if config.rm.train_top_layers is not None:
        try:
            train_top_layers_only(model, config.rm.train_top_layers)
        except ValueError as exc:
            raise ConfigError(f"rm.train_top_layers: {exc}") from None
    if unsharded:
        return model
    return place_for_training(model, info, packing=config.train.packing,
                              attn_implementation=config.model.attn_implementation,
                              gradient_checkpointing=config.model.gradient_checkpointing)


def step_metrics(plan: StepPlan, result: Any, state: TrainerState, pair_metrics: dict[str, float],
                 pairs: Sequence[PreferencePair]) -> dict[str, Any]:
    """The per-step metric line: the shared optimizer-step keys plus the pair metrics.

    The Bradley-Terry loss has no token mask: ``tokens_per_step`` counts every token of
    both sides of the step's pairs (all ranks, padding excluded, unlike ``plan.tokens``,
    which is the planner's micro-batch cost: two padded rows per pair without packing), and
    the effective batch size is ``pairs_per_step``. No ``masked_token_count`` is logged.
    """
    tokens = sum(pairs[i].tokens for i in plan.sample_indices)
    return optimizer_step_metrics(result, step=state.step, epoch=plan.epoch_progress, tokens=tokens, **pair_metrics)


def _pad_id(tokenizer: Any) -> int:
    """Padding id of training batches and of the export (not the end-of-turn token, if possible)."""
    for candidate in (export_pad_token_id(tokenizer), tokenizer.pad_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def announce(config, info, model, train_pairs, val_pairs, total_steps, warmup_steps, resume_path) -> None:
    announce_run("rm", config, info, model, f"{len(train_pairs)} train / {len(val_pairs)} val pairs",
                 sum(p.tokens for p in train_pairs), total_steps, warmup_steps, resume_path)
