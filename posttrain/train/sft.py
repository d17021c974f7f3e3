"""``posttrain sft``: supervised fine-tuning, exact and resumable, from one CPU to FSDP2.

Next-token cross-entropy on the assistant's tokens only (docs/PIPELINE.md, phase 1), with
what veRL's FSDP SFT trainer also gets right (loss masks, token-mean over the whole step,
micro-batch vs accumulation, scheduler per optimizer step, what to log, pre-flight checks:
docs/PREFLIGHT.md). The loop in ``run_sft`` is
the whole algorithm; every piece it calls is a named function shared with the other
trainers (``train.steps``, ``train.loop``, ``train.checkpoint``, ``train.distributed``,
``data.batching``).

Order of work: check settings that need nothing loaded -> tokenizer -> render and audit the
data (refuse to start on hard errors) -> plan every step and check the schedule -> only
then load the model. So impossible settings fail in one line before any model loads.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from posttrain.config import SFTConfig
from posttrain.data.batching import StepPlan, StepPlanner, collate, sample_length, trained_target_count
from posttrain.errors import ConfigError, DataError, config_key
from posttrain.hub import check_push_target
from posttrain.log import say
from posttrain.models import load_tokenizer
from posttrain.train import checkpoint as ckpt
from posttrain.train.distributed import DistInfo, all_reduce_sum, init_distributed, shutdown_distributed
from posttrain.train.logging import Progress, optimizer_step_metrics, run_metrics_logger
from posttrain.train.loop import (
    evaluate_nll,
    is_due,
    optimizer_step,
    seed_everything,
    sft_micro_batch_loss,
    tune_cpu_allocator,
)
from posttrain.train.session import RunSession, guard_step, open_run
from posttrain.train.steps import (TrainerState, advance, announce_run, build_optimizer_and_scheduler, check_schedule,
                                   check_warmup_before_max_steps, end_step, load_causal_lm, lockstep_micro_batches,
                                   pad_token_id, place_for_training, restore_state, train_top_layers)
from posttrain.data import load_sft_data
from posttrain.data.audit import preflight
from posttrain.data.mixture import setting_text, source_metrics
from posttrain.log import say_stdout


@dataclass
class SFTResult:
    run_dir: Path
    final_dir: Path | None
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)


def run_sft(config: SFTConfig, *, samples: tuple[list, list] | None = None) -> SFTResult:
    """Train; returns the run directory, final/ and the logged metrics (rank 0).

    ``samples``: optional pre-rendered (train, val) samples (tests, benchmarks); otherwise
    the data files of ``config.data`` are rendered and audited. The run holds its
    directory's lock throughout and stops cleanly on SIGTERM / Ctrl-C (``train.session``).
    """
    check_settings(config)
    with RunSession("sft", config) as session:
        return _run_sft(config, session, samples)


def _run_sft(config: SFTConfig, session: RunSession, samples: tuple[list, list] | None) -> SFTResult:
    info = init_distributed()
    if info.device.type == "cpu":
        tune_cpu_allocator()
    seed_everything(config.train.seed)  # same on every rank: FSDP shards each rank's own init of new weights
    tokenizer = load_tokenizer(config.model.name, config.model.chat_template)
    train_samples, val_samples = samples if samples is not None else load_sft_samples(config, tokenizer, info)
    planner = make_planner(config, train_samples, info.world_size)
    total_steps = planner.total_steps(config.train.epochs, config.train.max_steps)
    warmup_steps = check_schedule(config, total_steps, has_val=bool(val_samples))
    run, resume_path = open_run("sft", config, info, total_steps=total_steps)
    model = build_model(config, info)
    seed_everything(config.train.seed + info.rank)  # dropout differs between ranks, as their data does
    optimizer, scheduler = build_optimizer_and_scheduler(model, config.optim, total_steps, warmup_steps)
    state = restore_state(resume_path, model, optimizer, scheduler, info)
    announce(config, info, model, train_samples, val_samples, total_steps, warmup_steps, resume_path)
    history: list[dict[str, Any]] = []
    pad_id = pad_token_id(tokenizer)
    with (
        run_metrics_logger(run, config.run, info.is_main) as logger,
        Progress(total_steps, "sft", enabled=info.is_main and config.run.progress, initial=state.step,
                 keys=("loss", "lr", "val/loss", "tokens_per_sec")) as progress,
    ):
        if state.step == 0:  # a mixture's samples per source; the baseline the validation curve falls from
            start = source_metrics(config.data.train, train_samples)
            if config.train.eval_every and val_samples:
                start.update(validate(model, val_samples, config, info, pad_id))
            if start:
                history.append(logger.log(start, step=0))
        for plan in planner.iter_plans(state.step, total_steps):
            micro_batches = [collate([train_samples[i] for i in mb], packing=config.train.packing,
                                     pad_token_id=pad_id).to(info.device)
                             for mb in plan.micro_batches[info.rank]]
            result = optimizer_step(
                model, optimizer, scheduler, micro_batches,
                lambda m, b: sft_micro_batch_loss(
                    m, b, loss_agg_mode=config.train.loss_agg_mode, step_trained_tokens=plan.trained_tokens,
                    step_sequences=plan.trained_sequences, chunk_size=config.train.logits_chunk_size),
                precision=config.train.precision, device=info.device, max_grad_norm=config.optim.max_grad_norm,
                world_size=info.world_size, reduce_sum=lambda v: all_reduce_sum(v, info),
            )
            state = advance(state, plan, result)
            state.nonfinite_skipped = guard_step("sft", state.step, result, state.nonfinite_skipped, config.train,
                                                 run.checkpoints, info)
            metrics = step_metrics(config, plan, result, state)
            if is_due(state.step, config.train.eval_every, total_steps) and val_samples:
                metrics.update(validate(model, val_samples, config, info, pad_id))
            end_step(session, config, state, total_steps, metrics, history, logger, progress, run, info,
                     (model, optimizer, scheduler))
    final = ckpt.export_hf(model, tokenizer, run.final, info, merge_lora=config.lora.merge_on_export,
                           rebuild=lambda: build_model(config, info, unsharded=True))
    if info.is_main:
        say(f"sft: {state.step} steps, final model in {final}")
    shutdown_distributed()
    return SFTResult(run.path, final, state.step, history)


# ----------------------------------------------------------------------------- pieces


def check_settings(config: SFTConfig) -> None:
    """Refuse settings that cannot work, before anything loads (one-line ConfigError)."""
    train = config.train
    if train.micro_batch_tokens < config.data.max_length:
        raise ConfigError(
            f"{config_key('train.micro_batch_tokens')} ({train.micro_batch_tokens}) is smaller than {config_key('data.max_length')} "
            f"({config.data.max_length}): a full-length sample could never fit in a micro-batch; "
            f"raise micro_batch_tokens or lower max_length"
        )
    check_warmup_before_max_steps(config.optim.warmup_steps, train.max_steps)
    check_push_target(config.run.push_to_hub)
    if config.train_top_layers is not None and config.lora.enabled:
        raise ConfigError("train_top_layers: LoRA already freezes the base weights and trains adapters; set "
                          "lora.enabled: false or train_top_layers: null")


def load_sft_samples(config: SFTConfig, tokenizer: Any, info: DistInfo) -> tuple[list, list]:
    """Render + audit the train (and val) files; refuse to start on hard audit errors.

    Validation: ``data.val`` if set, else a seeded ``data.val_fraction`` of the training
    samples (at least one), else none. A list of sources is drawn with ``train.seed``
    (``data.mixture``).
    """

    say = say_stdout if info.is_main else None  # the audit summary: stdout, as the command's report
    prepared = load_sft_data(config.data.train, tokenizer, config.data, seed=config.train.seed)
    preflight(prepared, allow_errors=config.data.allow_audit_errors, print_fn=say)
    train = list(prepared.samples)
    val: list = []
    if config.data.val:
        val_prepared = load_sft_data(config.data.val, tokenizer, config.data, seed=config.train.seed, key="data.val")
        preflight(val_prepared, allow_errors=config.data.allow_audit_errors, print_fn=say)
        val = list(val_prepared.samples)
    elif config.data.val_fraction > 0:
        order = list(range(len(train)))
        random.Random(config.train.seed).shuffle(order)
        n_val = max(1, int(round(config.data.val_fraction * len(train))))
        held = set(order[:n_val])
        val = [s for i, s in enumerate(train) if i in held]
        train = [s for i, s in enumerate(train) if i not in held]
    if not train:
        raise DataError(f"{setting_text(config.data.train)}: no training samples left after rendering")
    return train, val


def make_planner(config: SFTConfig, samples: Sequence[Any], world_size: int) -> StepPlanner:
    lengths = [sample_length(s) for s in samples]
    too_long = max(lengths)
    if too_long > config.train.micro_batch_tokens:
        raise ConfigError(
            f"{config_key('train.micro_batch_tokens')} ({config.train.micro_batch_tokens}) is smaller than a "
            f"{too_long}-token sample: raise it or lower {config_key('data.max_length')}"
        )
    return StepPlanner(
        lengths, [trained_target_count(s) for s in samples],
        global_batch_size=config.train.global_batch_size, global_batch_tokens=config.train.global_batch_tokens,
        micro_batch_tokens=config.train.micro_batch_tokens, packing=config.train.packing,
        world_size=world_size, seed=config.train.seed, shuffle=config.train.shuffle,
    )


def build_model(config: SFTConfig, info: DistInfo, *, unsharded: bool = False) -> torch.nn.Module:
    """Load the model (fp32 master weights), add LoRA, set attention/checkpointing, shard."""
    model = load_causal_lm(config.model.name, config.lora)
    if config.train_top_layers is not None:
        train_top_layers(model, config.train_top_layers, "train_top_layers")
    if unsharded:
        return model
    return place_for_training(model, info, packing=config.train.packing,
                              attn_implementation=config.model.attn_implementation,
                              gradient_checkpointing=config.model.gradient_checkpointing)


def step_metrics(config: SFTConfig, plan: StepPlan, result: Any, state: TrainerState) -> dict[str, Any]:
    """The per-step metric line (docs/METRICS.md)."""
    return optimizer_step_metrics(
        result, step=state.step, epoch=plan.epoch_progress, tokens=plan.tokens, trained_tokens=plan.trained_tokens,
        sequences_per_step=len(plan.sample_indices),
        total_tokens=state.tokens_seen, total_trained_tokens=state.trained_tokens_seen,
        loss_agg_mode=config.train.loss_agg_mode,
    )


def validate(model: torch.nn.Module, samples: Sequence[Any], config: SFTConfig, info: DistInfo,
             pad_id: int) -> dict[str, float]:
    """val/loss and val/ppl over the whole held-out set, split over ranks in lock-step."""
    mine = lockstep_micro_batches([sample_length(s) for s in samples], config.train.micro_batch_tokens,
                                  config.train.packing, info)
    batches = (collate([samples[i] for i in mb], packing=config.train.packing, pad_token_id=pad_id)
               for mb in mine)
    return evaluate_nll(model, batches, precision=config.train.precision, device=info.device,
                        chunk_size=config.train.logits_chunk_size, reduce_sum=lambda v: all_reduce_sum(v, info))


def announce(config, info, model, train_samples, val_samples, total_steps, warmup_steps, resume_path) -> None:
    announce_run("sft", config, info, model, f"{len(train_samples)} train / {len(val_samples)} val samples",
                 sum(sample_length(s) for s in train_samples), total_steps, warmup_steps, resume_path)
