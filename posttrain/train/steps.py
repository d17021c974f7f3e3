"""The run machinery every trainer shares around its loss: the settings and schedule checks,
the model placed for training, AdamW with its schedule, the trainer state a checkpoint
restores, held-out passes in lock-step over ranks, the run's opening line and the end of
each optimizer step (log, progress, checkpoint).

``train.sft``, ``train.rm`` and ``train.dpo`` compose these plain functions; no trainer
imports another (``tests/test_trainers_side_by_side.py``). Below this module sits
``train.loop``: seeding, the optimizer and schedule themselves, and one optimizer step over
many micro-batches (docs/ARCHITECTURE.md, "How a step flows").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from posttrain.data.batching import StepPlan, split_across_ranks, split_into_micro_batches
from posttrain.errors import ConfigError, config_key
from posttrain.log import say
from posttrain.models import load_model
from posttrain.models.attention import choose_attention
from posttrain.models.prepare import apply_lora, count_parameters, prepare_for_training, train_top_blocks_only
from posttrain.train import checkpoint as ckpt
from posttrain.train.distributed import DistInfo, all_reduce_sum, shard_model
from posttrain.train.logging import MetricsLogger, Progress
from posttrain.train.loop import MicroResult, StepResult, build_optimizer, build_scheduler, is_due, resolve_warmup_steps
from posttrain.train.session import RunSession


@dataclass
class TrainerState:
    """What a checkpoint records besides tensors (the data position is ``step``)."""

    step: int = 0
    tokens_seen: int = 0
    trained_tokens_seen: int = 0
    elapsed_s: float = 0.0
    nonfinite_skipped: int = 0  # steps skipped for a NaN/inf loss or gradient (train.skip_nonfinite_steps)

    def as_dict(self) -> dict[str, Any]:
        return dict(step=self.step, tokens_seen=self.tokens_seen, trained_tokens_seen=self.trained_tokens_seen,
                    elapsed_s=self.elapsed_s, nonfinite_skipped=self.nonfinite_skipped)


def advance(state: TrainerState, plan: StepPlan, result: StepResult) -> TrainerState:
    """The state after optimizer step ``plan.step``: its tokens and time added."""
    return TrainerState(step=plan.step + 1, tokens_seen=state.tokens_seen + plan.tokens,
                        trained_tokens_seen=state.trained_tokens_seen + plan.trained_tokens,
                        elapsed_s=state.elapsed_s + result.seconds, nonfinite_skipped=state.nonfinite_skipped)


# ----------------------------------------------------------------------------- settings and schedule


def check_warmup_before_max_steps(warmup_steps: int | None, max_steps: int | None) -> None:
    """ConfigError when ``optim.warmup_steps`` is not shorter than ``train.max_steps`` (both set):
    a check that needs nothing loaded."""
    if warmup_steps is not None and max_steps is not None and warmup_steps >= max_steps:
        raise ConfigError(
            f"optim.warmup_steps ({warmup_steps}) is not shorter than train.max_steps "
            f"({max_steps}): the learning rate would never reach its peak")


def check_schedule(config: Any, total_steps: int, *, has_val: bool) -> int:
    """Warmup steps for ``total_steps``; ConfigError if warmup would not end before training,
    or if ``train.eval_every`` is set without validation data."""
    warmup = resolve_warmup_steps(total_steps, config.optim.warmup_ratio, config.optim.warmup_steps)
    if warmup >= total_steps and warmup > 0:
        raise ConfigError(
            f"optim.warmup_steps ({warmup}) is not shorter than the run ({total_steps} optimizer steps): "
            f"the learning rate would never reach its peak"
        )
    if config.train.eval_every is not None and not has_val:
        raise ConfigError(f"{config_key('train.eval_every')} is set but there is no validation data: set "
                          f"{config_key('data.val')} or {config_key('data.val_fraction')}")
    return warmup


# ----------------------------------------------------------------------------- model, optimizer, state


def pad_token_id(tokenizer: Any) -> int:
    """The id that pads a causal LM's training batches: the tokenizer's own, else 0."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def train_top_layers(model: torch.nn.Module, layers: int, key: str) -> torch.nn.Module:
    """Train only the top ``layers`` decoder blocks and the final norm of a causal LM
    (``models.prepare.train_top_blocks_only``); a bad count is a ConfigError naming ``key``."""
    try:
        return train_top_blocks_only(model, layers)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def load_causal_lm(model_name: str, lora: Any) -> torch.nn.Module:
    """The causal LM ``model_name`` in fp32 master weights, with LoRA when ``lora.enabled``
    (``lora``: the ``lora`` config section); unsharded, on the CPU."""
    model = load_model(model_name, dtype=torch.float32)
    if lora.enabled:
        model = apply_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules)
    return model


def place_for_training(model: torch.nn.Module, info: DistInfo, *, packing: bool, attn_implementation: str | None,
                       gradient_checkpointing: bool) -> torch.nn.Module:
    """Move to this rank's device, set the attention for ``packing`` (``models.attention``) and
    gradient checkpointing, shard over ranks (FSDP2 when distributed)."""
    model.to(info.device)
    prepare_for_training(model, attn_implementation=choose_attention(packing, attn_implementation),
                         gradient_checkpointing=gradient_checkpointing)
    return shard_model(model, info)


def build_optimizer_and_scheduler(model: torch.nn.Module, optim: Any, total_steps: int,
                                  warmup_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW and its per-optimizer-step schedule from an ``optim`` config section."""
    optimizer = build_optimizer(model, lr=optim.lr, weight_decay=optim.weight_decay, betas=optim.betas, eps=optim.eps)
    scheduler = build_scheduler(optimizer, total_steps=total_steps, warmup_steps=warmup_steps,
                                schedule=optim.schedule, min_lr_ratio=optim.min_lr_ratio)
    return optimizer, scheduler


def restore_state(resume_path: Path | None, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler: Any, info: DistInfo) -> TrainerState:
    """A fresh state, or the one saved in ``resume_path`` (tensors restored in place)."""
    if resume_path is None:
        return TrainerState()
    saved = ckpt.load_checkpoint(resume_path, model, optimizer, scheduler, info)
    return TrainerState(**{k: v for k, v in saved.items() if k in TrainerState.__dataclass_fields__})


# ----------------------------------------------------------------------------- held-out passes


def lockstep_micro_batches(lengths: Sequence[int], micro_batch_tokens: int, packing: bool,
                           info: DistInfo) -> list[list[int]]:
    """This rank's micro-batches (sample indices) of a held-out pass over every sample.

    Samples are shared over ranks by length; every rank gets the same number of
    micro-batches (empty fillers at the end), so collectives inside forward stay in step.
    """
    shares = split_across_ranks(list(range(len(lengths))), lengths, info.world_size)
    per_rank = [split_into_micro_batches(share, lengths, micro_batch_tokens, packing=packing) for share in shares]
    depth = max(len(m) for m in per_rank)
    return per_rank[info.rank] + [[]] * (depth - len(per_rank[info.rank]))


def summarise_pairs(micro: Sequence[MicroResult], info: DistInfo, keys: Sequence[str]) -> dict[str, float]:
    """Pair-weighted means of the metrics ``keys`` over the step's micro-batches (all ranks),
    plus ``pairs_per_step``: the step's pair metrics of a trainer of comparisons (rm, dpo)."""
    totals = [sum(float(m.metrics[key]) * m.count for m in micro) for key in keys] + [sum(m.count for m in micro)]
    totals = all_reduce_sum(totals, info)
    pairs = max(totals[-1], 1.0)
    return {key: value / pairs for key, value in zip(keys, totals)} | {"pairs_per_step": int(totals[-1])}


def write_eval(eval_dir: Path, val_metrics: dict[str, float], pairs: int, name: str) -> None:
    """``eval/<name>``: the held-out pair metrics of the end of training (nothing if none)."""
    if not val_metrics:
        return
    eval_dir.mkdir(parents=True, exist_ok=True)
    (eval_dir / name).write_text(json.dumps({"pairs": pairs, **val_metrics}, indent=2) + "\n")


# ----------------------------------------------------------------------------- the run's lines and steps


def announce_run(trainer: str, config: Any, info: DistInfo, model: torch.nn.Module, data: str, tokens: int,
                 total_steps: int, warmup_steps: int, resume_path: Path | None) -> None:
    """One stderr line on rank 0: data, steps, model size, where it runs, resume point."""
    if not info.is_main:
        return
    total, trainable = count_parameters(model)
    where = f"{info.world_size} x {info.device.type}" if info.distributed else info.device.type
    say(
        f"{trainer}: {data}, {tokens} tokens; {total_steps} steps (warmup {warmup_steps}); model {config.model.name} "
        f"({total / 1e6:.1f}M params, {trainable / 1e6:.2f}M trained) on {where}, {config.train.precision}"
        + (f"; resuming from {resume_path}" if resume_path else "")
    )


def end_step(session: RunSession, config: Any, state: TrainerState, total_steps: int, metrics: dict[str, Any],
             history: list[dict[str, Any]], logger: MetricsLogger, progress: Progress, run: Any, info: DistInfo,
             trained: tuple[torch.nn.Module, Any, Any]) -> None:
    """The end of a supervised step (sft, rm, dpo): log the metrics when due (and whenever it
    evaluated), advance the progress bar, then checkpoint ``trained`` = (model, optimizer,
    scheduler) when due or when a signal asked the run to stop (``RunSession.step_boundary``)."""
    if state.step % config.train.log_every == 0 or state.step == total_steps or "val/loss" in metrics:
        history.append(logger.log(metrics, step=state.step))
    progress.update(1, metrics)
    model, optimizer, scheduler = trained
    session.step_boundary(
        state.step, total_steps, due=is_due(state.step, config.train.save_every, total_steps), info=info,
        checkpoints=run.checkpoints,
        save=lambda: ckpt.save_checkpoint(run.checkpoints, state.step, model, optimizer, scheduler, state.as_dict(),
                                          info, keep_last=config.train.keep_last, config=config))
