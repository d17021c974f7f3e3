"""``posttrain rl``: on-policy RL for language models, one loop for every algorithm.

Phase 3 of docs/PIPELINE.md. One step:

    sample prompts -> generate group_size completions each -> score -> old / reference
    log-probs (and critic values) -> advantages -> ppo_epochs passes of mini-batch updates
    -> log -> samples / eval / checkpoint every N steps

Algorithms (``rl.algorithm``): ``grpo`` (Shao et al. 2024), ``dr_grpo`` (Liu et al. 2025: no
std division; pair it with ``loss_agg_mode: sum``, divided by sequences x max_new_tokens),
``rloo`` (Ahmadian et al. 2024), ``reinforce_pp`` (Hu 2025) and ``ppo`` (Schulman et al.
2017; GAE with a learned scalar-head critic, ``posttrain.models.scalar_head``). DAPO options: clip-higher
(``rl.clip_high``), dynamic sampling, overlong filtering / soft punishment.

Deviations and shortcuts, stated:
- When every sample is used once, right after it was sampled (``ppo_epochs: 1`` and one
  mini-batch), the old log-probs ARE the current ones: that forward pass is skipped and the
  ratio is exactly 1 (as in TRL and veRL). The engine-vs-trainer gap is then measured in
  the update's forward.
- ``kl_coef: 0`` builds no reference model. With LoRA the reference is the base model with
  the adapter disabled (no second copy in memory); otherwise a frozen copy of the policy.
- Rollouts use the policy itself (``hf``) or a colocated vLLM engine that receives the new
  weights after every update (``vllm``); each step's sampling seed is a function of
  (train.seed, step), so a resumed run samples what the uninterrupted run sampled.

Data parallel (torchrun, K ranks; FSDP2 shards the policy, reference and critic): a step's
``rl.prompts_per_step`` prompts (a multiple of K) are drawn by the same seeded sampler on
every rank and dealt by whole groups, prompt i to rank i % K; each rank generates, scores
and trains on its own groups only, with its own sampling seed. Group-relative advantages
(grpo, dr_grpo, rloo) need only the group and are computed where it lives; batch-normalised
ones (reinforce_pp, ppo with whitening) are computed on the gathered batch, so they equal one
process's. The update's normalisers (tokens, sequences of a mini-batch) are summed over
ranks and each rank's loss share is multiplied by K before backward (FSDP averages
gradients), so a step's gradient is the one process would compute on the same samples;
every rank runs as many micro-batches and optimizer steps as the others (one-token fillers
with zero loss), since FSDP's collectives must stay in step. The logged metrics and
samples.jsonl cover every rank's samples. With mini-batches, the k-th mini-batch is the
union of each rank's k-th share (a different, equally random split than one process's).
DAPO dynamic sampling refills each rank's own share (``rl_rollouts.collect_rollouts``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from posttrain.algorithms.advantages import zero_variance_group_fraction
from posttrain.algorithms.kl import make_kl_controller
from posttrain.algorithms.policy import PolicyLossOptions
from posttrain.config import RLConfig
from posttrain.errors import ConfigError
from posttrain.log import say, say_stdout
from posttrain.agent.build import build_agent
from posttrain.models import load_tokenizer
from posttrain.rollout.base import SamplingParams
from posttrain.train import checkpoint as ckpt
from posttrain.train.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_max,
    all_reduce_sum,
    init_distributed,
    shard_model,
    shutdown_distributed,
)
from posttrain.train.logging import MetricsLogger, Progress, RunDir
from posttrain.models.attention import choose_attention
from posttrain.models.prepare import (
    apply_lora,
    count_parameters,
    prepare_for_training,
    train_top_blocks_only,
)
from posttrain.train.loop import (
    build_optimizer,
    build_scheduler,
    configured_hyperparameters_kept,
    is_due,
    optimizer_steps_per_rollout_batch,
    resolve_warmup_steps,
    seed_everything,
)
from posttrain.train.rl_rollouts import (
    PromptRow,
    PromptSampler,
    RolloutBatch,
    RolloutSample,
    append_samples,
    collect_rollouts,
    accuracy,
    evaluate_prompts,
    gather_batch,
    in_prompt_order,
    prompt_rows,
    trajectory_metrics,
    without_tensors,
)
from posttrain.train.session import RunSession, check_step_finite, last_checkpoint_note, open_run
from posttrain.train.rl_update import (
    LossSettings,
    compute_advantages,
    compute_rollout_tensors,
    critic_micro_loss,
    mini_batches,
    pack_micro_batches,
    plan_micro_batches,
    policy_micro_loss,
    update_model,
)
from posttrain.data.audit import preflight_prompts
from posttrain.models import load_model
from posttrain.models.scalar_head import load_scalar_head_model, train_top_layers_only
from posttrain.rewards import build_reward
from posttrain.rewards.registry import reward_fields
from posttrain.rollout.hf import HFEngine


@dataclass
class RLState:
    """What a checkpoint records besides tensors."""

    step: int = 0
    sampler: dict[str, int] = field(default_factory=dict)
    kl_controller: dict[str, float] = field(default_factory=dict)
    elapsed_s: float = 0.0
    nonfinite_skipped: int = 0  # optimizer steps skipped for a NaN/inf loss or gradient (train.skip_nonfinite_steps)


@dataclass
class RLResult:
    run_dir: Path
    final_dir: Path | None
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)


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


def run_rl(config: RLConfig, *, engine: Any = None, prompts: tuple[list[PromptRow], list[PromptRow]] | None = None,
           reward_fn: Any = None) -> RLResult:
    """Train; returns the run directory, final/ and the logged metrics (rank 0).

    ``engine``, ``prompts`` (train, eval rows) and ``reward_fn`` may be passed in (tests,
    benchmarks); otherwise they are built from ``config``. The run holds its directory's
    lock and stops cleanly on SIGTERM / Ctrl-C (``train.session``).
    """
    check_settings(config)
    with RunSession("rl", config) as session:
        return _run_rl(config, session, engine, prompts, reward_fn)


def _run_rl(config: RLConfig, session: RunSession, engine: Any, prompts: Any, reward_fn: Any) -> RLResult:
    info = init_distributed()
    seed_everything(config.train.seed)  # same on every rank while building: FSDP shards each rank's own init
    tokenizer = load_tokenizer(config.model.name, config.model.chat_template)
    train_rows, eval_rows = prompts if prompts is not None else load_prompts(config, tokenizer, info)
    reward_fn = reward_fn if reward_fn is not None else build_reward_fn(config)
    run, resume_path = open_run("rl", config, info)
    models = build_trainables(config, info)
    if info.distributed:
        seed_everything(config.train.seed + info.rank)
    engine = engine if engine is not None else build_engine(config, models.policy, tokenizer, info)
    agent = build_rl_agent(config, tokenizer)
    sampler = PromptSampler(len(train_rows), seed=config.train.seed)
    kl_controller = make_kl_controller(config.rl.kl_coef, target_kl=config.rl.target_kl, horizon=config.rl.kl_horizon)
    state = RLState()
    if resume_path is not None:
        state = load_rl_checkpoint(resume_path, models, sampler, kl_controller, info)
        engine.update_weights(models.policy)
    announce(config, info, models, train_rows, eval_rows, resume_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    result = RLResult(run.path, None, state.step)
    if eval_rows and config.train.eval_before and state.step == 0:
        result.eval_before = run_eval(engine, eval_rows, reward_fn, config, run, step=0, info=info, agent=agent)
    with MetricsLogger(run, tensorboard=config.run.tensorboard, enabled=info.is_main,
                       wandb=config.run.wandb, wandb_project=config.run.wandb_project) as logger, \
            Progress(config.train.max_steps, "rl", enabled=info.is_main and config.run.progress, initial=state.step,
                     keys=("reward/mean", "acc", "kl", "response_len/mean", "eval/acc")) as progress:
        while state.step < config.train.max_steps:
            started = time.perf_counter()
            batch = collect_rollouts(engine, train_rows, sampler, reward_fn,
                                     **rollout_arguments(config, state.step, info), agent=agent)  # this rank's groups
            whole = gather_batch(batch, info)  # every rank's samples (no tensors): metrics, samples.jsonl
            times = {"time/generate": whole.seconds_generate, "time/score": whole.seconds_score}
            tick = time.perf_counter()
            gap = rollout_passes(batch.samples, info, **rollout_pass_arguments(config, models, info, pad_id))
            adv_metrics = advantages(config, batch, kl_controller.value, info)
            times["time/logprob"] = time.perf_counter() - tick
            tick = time.perf_counter()
            update_metrics = update(config, models, batch, state.step, kl_controller.value, info, pad_id)
            state.nonfinite_skipped = guard_update(config, models, update_metrics, state, run, info)
            engine.update_weights(models.policy)
            times["time/update"] = time.perf_counter() - tick
            if config.rl.kl_coef and "kl" in update_metrics:
                kl_controller.update(update_metrics["kl"], len(whole.samples))
            state.step += 1
            state.elapsed_s += time.perf_counter() - started
            metrics = step_metrics(config, whole, adv_metrics, update_metrics, gap, times, kl_controller.value,
                                   time.perf_counter() - started)
            if is_due(state.step, config.train.eval_every, config.train.max_steps) and eval_rows:
                result.eval_after = run_eval(engine, eval_rows, reward_fn, config, run, step=state.step, info=info,
                                             agent=agent)
                metrics.update(result.eval_after)
            if info.is_main and is_due(state.step, config.train.samples_every, config.train.max_steps):
                append_samples(run.samples, state.step, whole, train_rows, config.train.samples_per_log)
            if state.step % config.train.log_every == 0 or state.step == config.train.max_steps:
                result.history.append(logger.log(metrics, step=state.step))
            progress.update(1, metrics)
            state.sampler, state.kl_controller = sampler.state_dict(), kl_controller.state_dict()
            session.step_boundary(state.step, config.train.max_steps, info=info, checkpoints=run.checkpoints,
                                  due=is_due(state.step, config.train.save_every, config.train.max_steps),
                                  save=lambda: save_rl_checkpoint(run, state, models, info, config=config))
    if eval_rows and not result.eval_after and config.train.eval_every is None:
        result.eval_after = run_eval(engine, eval_rows, reward_fn, config, run, step=state.step, info=info, agent=agent)
    if config.train.export:
        result.final_dir = ckpt.export_hf(models.policy, tokenizer, run.final, info,
                                          merge_lora=config.lora.merge_on_export,
                                          rebuild=lambda: build_policy(config, info, unsharded=True))
    result.steps = state.step
    finish(config, info, state, result)
    if info.distributed:  # a single process may share the default group with a colocated vLLM: leave it
        shutdown_distributed()
    return result


# ----------------------------------------------------------------------------- setup


def check_settings(config: RLConfig, world_size: int | None = None) -> None:
    """Refuse settings that cannot work, before anything loads (one-line ConfigError).

    ``world_size``: the number of ranks (default: torchrun's ``WORLD_SIZE``, else 1).
    """
    ranks = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if config.rl.prompts_per_step % ranks:
        raise ConfigError(f"rl.prompts_per_step ({config.rl.prompts_per_step}) is not a multiple of the "
                          f"{ranks} ranks: each rank samples an equal share of whole groups")


def load_prompts(config: RLConfig, tokenizer: Any, info: DistInfo) -> tuple[list[PromptRow], list[PromptRow]]:
    """Train and held-out prompts, each file read, checked, rendered and audited once
    (``data.audit.preflight_prompts``: a bad row is a one-line error naming file:line, over-long
    prompts are dropped and counted), before any model loads; the summary prints on rank 0."""

    data = config.data
    fields = reward_fields(config.reward, "reward")  # rows lacking what the reward reads are refused

    def load(path: str, limit: int | None) -> list[PromptRow]:
        return prompt_rows(preflight_prompts(path, tokenizer, system=data.system, max_prompt_length=data.max_prompt_length,
                                             limit=limit, print_fn=say_stdout if info.is_main else None,
                                             columns=data.columns, reward_fields=fields,
                                             allow_special_tokens_in_text=data.allow_special_tokens_in_text))

    return load(data.train, data.limit), load(data.eval, data.eval_limit) if data.eval else []


def build_reward_fn(config: RLConfig):
    return build_reward(config.reward, "reward")


def build_policy(config: RLConfig, info: DistInfo, *, unsharded: bool = False) -> torch.nn.Module:
    """The policy: fp32 master weights, optional LoRA, packed attention, optional FSDP2."""

    model = load_model(config.model.name, dtype=torch.float32)
    if config.lora.enabled:
        lora = config.lora
        model = apply_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules)
    if config.rl.train_top_layers is not None:
        train_top_layers(model, config.rl.train_top_layers)
    if unsharded:
        return model
    model.to(info.device)
    prepare_for_training(model, attn_implementation=choose_attention(True, config.model.attn_implementation),
                         gradient_checkpointing=config.model.gradient_checkpointing)
    return shard_model(model, info)


def train_top_layers(model: torch.nn.Module, layers: int) -> torch.nn.Module:
    """Train only the top ``layers`` decoder blocks and the final norm of the policy
    (``models.prepare.train_top_blocks_only``); a bad count names ``rl.train_top_layers``."""
    try:
        return train_top_blocks_only(model, layers)
    except ValueError as exc:
        raise ConfigError(f"rl.train_top_layers: {exc}") from None


def build_reference(config: RLConfig, policy: torch.nn.Module, info: DistInfo):
    """A factory of context managers yielding the frozen reference; None when kl_coef == 0."""
    if config.rl.kl_coef == 0:
        return None
    if config.lora.enabled:
        @contextlib.contextmanager
        def adapter_disabled():
            with policy.disable_adapter():
                yield policy

        return adapter_disabled
    if info.distributed:
        reference = shard_model(_frozen(build_policy(config, info, unsharded=True).to(info.device), config), info)
    else:
        reference = _frozen(copy.deepcopy(policy), config)

    @contextlib.contextmanager
    def frozen_copy():
        yield reference

    return frozen_copy


def _frozen(model: torch.nn.Module, config: RLConfig) -> torch.nn.Module:
    prepare_for_training(model, attn_implementation=choose_attention(True, config.model.attn_implementation),
                         gradient_checkpointing=False)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def build_critic(config: RLConfig, info: DistInfo) -> torch.nn.Module:
    """The PPO critic: a scalar-head model (``posttrain.models.scalar_head``) on the policy's or its own backbone."""

    critic_config = config.rl.critic
    critic = load_scalar_head_model(critic_config.model or config.model.name, seed=config.train.seed)
    if critic_config.train_top_layers is not None:
        train_top_layers_only(critic, critic_config.train_top_layers)
    critic.to(info.device)
    prepare_for_training(critic, attn_implementation=choose_attention(True, config.model.attn_implementation),
                         gradient_checkpointing=config.model.gradient_checkpointing)
    return shard_model(critic, info)


def optimizer_steps_per_rl_step(config: RLConfig) -> int:
    return optimizer_steps_per_rollout_batch(config.rl.prompts_per_step * config.rollout.group_size,
                                             config.rl.mini_batch_size, config.rl.ppo_epochs)


def build_trainables(config: RLConfig, info: DistInfo) -> Trainables:
    optim = config.optim
    total = config.train.max_steps * optimizer_steps_per_rl_step(config)
    warmup = resolve_warmup_steps(total, optim.warmup_ratio, optim.warmup_steps)
    if warmup >= total and warmup > 0:
        raise ConfigError(f"optim.warmup_steps ({warmup}) is not shorter than the run ({total} optimizer steps)")
    policy = build_policy(config, info)
    optimizer = build_optimizer(policy, lr=optim.lr, weight_decay=optim.weight_decay, betas=optim.betas, eps=optim.eps)
    scheduler = build_scheduler(optimizer, total_steps=total, warmup_steps=warmup, schedule=optim.schedule,
                                min_lr_ratio=optim.min_lr_ratio)
    models = Trainables(policy, optimizer, scheduler, reference=build_reference(config, policy, info))
    if config.rl.algorithm == "ppo":
        models.critic = build_critic(config, info)
        models.critic_optimizer = build_optimizer(models.critic, lr=config.rl.critic.lr, weight_decay=optim.weight_decay,
                                                  betas=optim.betas, eps=optim.eps)
        models.critic_scheduler = build_scheduler(models.critic_optimizer, total_steps=total, warmup_steps=warmup,
                                                  schedule="constant", min_lr_ratio=1.0)
    return models


def build_engine(config: RLConfig, policy: torch.nn.Module, tokenizer: Any, info: DistInfo | None = None):
    """The rollout engine named by ``rollout.engine`` (``hf`` under FSDP: ranks generate in step)."""
    if config.rollout.engine == "vllm":
        from posttrain.rollout.vllm import VLLMEngine

        return VLLMEngine.from_policy(policy, tokenizer, config.model.name, seed=config.train.seed,
                                      max_model_len=config.data.max_prompt_length + config.rollout.max_new_tokens,
                                      gpu_memory_utilization=config.rollout.vllm_gpu_memory_utilization,
                                      kv_cache_gb=config.rollout.vllm_kv_cache_gb,
                                      enforce_eager=config.rollout.vllm_enforce_eager)

    precision = config.train.precision if config.rollout.precision == "auto" else config.rollout.precision
    return HFEngine(policy, tokenizer, batch_size=config.rollout.batch_size,
                    synced_gpus=info is not None and info.distributed,
                    dtype=torch.bfloat16 if precision == "bf16" else torch.float32)


# ----------------------------------------------------------------------------- one step


def engine_logprobs_wanted(config: RLConfig) -> bool:
    """Engine log-probs are compared at temperature 1 only (the engines report raw log-probs)."""
    wanted = config.rollout.engine_logprobs
    if wanted is None:
        wanted = config.rollout.engine == "vllm"
    return bool(wanted) and config.rollout.temperature == 1.0


RANK_SEED_STRIDE = 1_000_000_007  # rank r samples with seed + r x this (rank 0: the single-process seed)


def rollout_arguments(config: RLConfig, step: int, info: DistInfo | None = None) -> dict[str, Any]:
    rollout, rl = config.rollout, config.rl
    rank = info.rank if info is not None else 0
    params = SamplingParams(n=rollout.group_size, temperature=rollout.temperature, top_p=rollout.top_p,
                            top_k=rollout.top_k, max_new_tokens=rollout.max_new_tokens, stop=tuple(rollout.stop),
                            seed=config.train.seed * 1_000_003 + step + RANK_SEED_STRIDE * rank,
                            return_logprobs=engine_logprobs_wanted(config))
    return dict(prompts=rl.prompts_per_step, params=params, dynamic_sampling=rl.dynamic_sampling,
                max_refill_rounds=rl.max_refill_rounds, overlong=rl.overlong, overlong_buffer=rl.overlong_buffer,
                overlong_penalty=rl.overlong_penalty, info=info)


def build_rl_agent(config: RLConfig, tokenizer: Any) -> Any:
    """The multi-turn agent of ``agent:`` (None when no tool or environment is named); each
    turn may sample up to ``rollout.max_new_tokens``, clamped to what is left of
    ``agent.max_total_tokens``."""
    if not config.agent.enabled:
        return None
    return build_agent(config.agent, tokenizer, max_new_tokens=config.rollout.max_new_tokens)


def needs_old_logprobs(config: RLConfig) -> bool:
    """Old log-probs differ from the first update's only if samples are reused or the KL is a reward."""
    rl = config.rl
    batch = rl.prompts_per_step * config.rollout.group_size
    reused = rl.ppo_epochs > 1 or (rl.mini_batch_size is not None and rl.mini_batch_size < batch)
    return reused or (rl.kl_coef > 0 and rl.kl_in == "reward")


def rollout_pass_arguments(config: RLConfig, models: Trainables, info: DistInfo, pad_id: int) -> dict[str, Any]:
    return dict(policy=models.policy if needs_old_logprobs(config) else None, reference=models.reference,
                critic=models.critic, temperature=config.rollout.temperature,
                chunk_size=config.train.logits_chunk_size, micro_batch_tokens=config.train.micro_batch_tokens,
                share_prompt=config.rl.share_prompt, pad_token_id=pad_id, precision=config.train.precision,
                device=info.device)


def filler_sample(pad_id: int) -> RolloutSample:
    """A one-token prompt with a one-token response and every per-token field set: what a rank
    runs (and discards) when it has fewer micro-batches than another, so FSDP's collectives
    stay in step."""
    zeros = torch.zeros(1)
    return RolloutSample(row=-1, group=-1, prompt_ids=[pad_id], response_ids=[pad_id], text="", finish_reason="stop",
                         old_logp=zeros, ref_logp=zeros, values=zeros, advantages=zeros, returns=zeros)


def rollout_passes(samples: Sequence[RolloutSample], info: DistInfo, **arguments: Any) -> dict[str, float]:
    """``compute_rollout_tensors`` on this rank's samples; under FSDP every rank then runs
    filler micro-batches up to the largest count, and the engine-vs-trainer gap metrics are
    combined over ranks (token-weighted)."""
    if not info.distributed:
        return compute_rollout_tensors(samples, **arguments)
    mine = len(plan_micro_batches(samples, arguments["micro_batch_tokens"], arguments["share_prompt"]))
    depth = int(all_reduce_max([float(mine)], info)[0])  # before any forward: collectives in order
    gap = compute_rollout_tensors(samples, **arguments)
    for _ in range(depth - mine):
        compute_rollout_tensors([filler_sample(arguments["pad_token_id"])], **arguments)
    tokens = float(sum(s.trained_length for s in samples if s.engine_logp is not None)) if gap else 0.0
    parts = [(part, n) for part, n in all_gather_objects((gap, tokens), info) if part]
    if not parts:
        return {}
    total = sum(n for _, n in parts) or 1.0
    return {"logprob_gap/mean_abs": sum(p["logprob_gap/mean_abs"] * n for p, n in parts) / total,
            "logprob_gap/max_abs": max(p["logprob_gap/max_abs"] for p, _ in parts),
            "logprob_gap/mean": sum(p["logprob_gap/mean"] * n for p, n in parts) / total}


def batch_normalised(config: RLConfig) -> bool:
    """Whether the advantages need statistics of the whole batch (not only of a group)."""
    return config.rl.algorithm == "reinforce_pp" or (config.rl.algorithm == "ppo" and config.rl.whiten_advantages)


def advantages(config: RLConfig, batch: RolloutBatch, kl_coef: float, info: DistInfo) -> dict[str, float]:
    """Fill this rank's samples' advantages (and returns); returns stats over every rank.

    Group-relative advantages are computed locally; batch-normalised ones on the gathered
    batch (rewards, lengths and the per-token KL / values they need), in global prompt order,
    so K ranks compute exactly what one process computes."""
    rl = config.rl
    settings = dict(algorithm=rl.algorithm, kl_in_reward=rl.kl_in == "reward", kl_coef=kl_coef,
                    kl_estimator=rl.kl_estimator, gamma=rl.gamma, lam=rl.lam, whiten=rl.whiten_advantages,
                    kl_clamp=rl.kl_clamp)
    if not info.distributed:
        return compute_advantages(batch.groups, **settings)
    if not batch_normalised(config):
        compute_advantages(batch.groups, **settings)
        return global_advantage_stats(batch.samples, info)
    inputs = ("old_logp", "ref_logp", "values")  # with reward, length and trained: what compute_advantages reads
    parts = all_gather_objects([[without_tensors(s, keep=inputs) for s in group] for group in batch.groups], info)
    metrics = compute_advantages(in_prompt_order(parts), **settings)
    for sample, filled in zip(batch.samples, [s for group in parts[info.rank] for s in group]):
        sample.advantages, sample.returns = filled.advantages, filled.returns
    return metrics


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


def update(config: RLConfig, models: Trainables, batch: RolloutBatch, step: int, kl_coef: float, info: DistInfo,
           pad_id: int) -> dict[str, float]:
    """Critic (ppo) then policy updates over ``ppo_epochs`` passes of mini-batches.

    Data parallel: this rank's samples are dealt into its share of each mini-batch; a
    mini-batch empty on every rank is skipped everywhere, so all ranks take the same steps."""
    rl = config.rl
    count = (rl.prompts_per_step * config.rollout.group_size) // (rl.mini_batch_size or
                                                                   rl.prompts_per_step * config.rollout.group_size)
    batches = mini_batches(batch.groups, count, seed=config.train.seed * 7919 + step, keep_empty=info.distributed)
    sizes = [float(len(b)) for b in batches]
    if info.distributed:
        sizes = all_reduce_sum(sizes, info)
        batches = [b for b, size in zip(batches, sizes) if size > 0]
        sizes = [size for size in sizes if size > 0]
    if not batches:
        return {}
    filler = None
    if info.distributed:
        chunk, micro = pack_micro_batches([filler_sample(pad_id)], config.train.micro_batch_tokens, pad_id, rl.share_prompt)[0]
        filler = (chunk, micro.to(info.device))
    common = dict(ppo_epochs=rl.ppo_epochs, seed=config.train.seed + step, micro_batch_tokens=config.train.micro_batch_tokens,
                  share_prompt=rl.share_prompt, pad_token_id=pad_id, precision=config.train.precision, device=info.device,
                  max_grad_norm=config.optim.max_grad_norm, world_size=info.world_size, info=info, filler=filler)
    metrics: dict[str, float] = {}
    if models.critic is not None:
        critic_metrics = update_model(
            models.critic, models.critic_optimizer, models.critic_scheduler, batches,
            lambda m, item, **kw: critic_micro_loss(m, item, value_clip=rl.critic.value_clip,
                                                    loss_agg_mode=config.train.loss_agg_mode, **kw), **common)
        metrics.update({f"critic/{k}": v for k, v in critic_metrics.items()})
        if step < rl.critic.warmup_steps:
            return metrics
    settings = LossSettings(
        policy_loss=rl.policy_loss,
        policy_options=PolicyLossOptions(clip_low=rl.clip_low, clip_high=rl.clip_high, dual_clip_c=rl.dual_clip_c,
                                         importance_level=rl.gspo_importance_level),
        loss_agg_mode=config.train.loss_agg_mode,
        kl_coef=kl_coef if rl.kl_in == "loss" else 0.0, kl_estimator=rl.kl_estimator, kl_in_loss=rl.kl_in == "loss",
        kl_clamp=rl.kl_clamp,
        entropy_coef=rl.entropy_coef, temperature=config.rollout.temperature,
        chunk_size=config.train.logits_chunk_size,
        sum_normaliser=float(max(1, int(sizes[0])) * config.rollout.max_new_tokens))
    policy_metrics = update_model(
        models.policy, models.optimizer, models.scheduler, batches,
        lambda m, item, **kw: policy_micro_loss(m, item, settings=settings, **kw), **common)
    metrics.update(policy_metrics)
    return metrics


def step_metrics(config: RLConfig, batch: RolloutBatch, adv_metrics: dict[str, float],
                 update_metrics: dict[str, float], gap: dict[str, float], times: dict[str, float], kl_coef: float,
                 seconds: float) -> dict[str, Any]:
    """The per-step metric line (docs/METRICS.md: RL metric names plus advantage/ratio/gap stats)."""
    samples = batch.samples
    rewards = [s.reward for s in samples]
    mean = sum(rewards) / len(rewards)
    std = (sum((r - mean) ** 2 for r in rewards) / max(1, len(rewards) - 1)) ** 0.5
    lengths = [len(s.response_ids) for s in samples]
    tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    metrics: dict[str, Any] = {"reward/mean": mean, "reward/std": std}
    for name in sorted({k for s in samples for k in s.components}):
        values = [s.components.get(name, 0.0) for s in samples]
        metrics[f"reward/{name}"] = sum(values) / len(values)
    acc = accuracy([s.raw_reward for s in samples], {name: [s.components.get(name, 0.0) for s in samples]
                                                    for name in samples[0].components})
    if acc is not None:
        metrics["acc"] = acc
    metrics.update(adv_metrics)
    metrics.update({k: v for k, v in update_metrics.items()})
    metrics.update(gap)
    metrics.update(trajectory_metrics([s.trajectory for s in samples if s.trajectory is not None]))
    metrics.update({
        "kl_coef": kl_coef,
        "response_len/mean": sum(lengths) / len(lengths),
        "response_len/max": max(lengths),
        "response_len/clipped_frac": sum(s.clipped for s in samples) / len(samples),
        "zero_variance_group_frac": zero_variance_group_fraction(batch.rewards_PG()),
        "groups/generated": batch.generated_groups,
        "groups/dropped": batch.dropped_groups,
        "trained_sequences": sum(s.trained for s in samples),
        "tokens_per_step": sum(lengths),
        "tokens_per_sec": tokens / max(seconds, 1e-9),
        "step_time_s": seconds,
        **times,
    })
    return metrics


# ----------------------------------------------------------------------------- eval, checkpoints


def run_eval(engine: Any, rows: Sequence[PromptRow], reward_fn: Any, config: RLConfig, run: RunDir, *, step: int,
             info: DistInfo, agent: Any = None) -> dict[str, float]:
    """Score the held-out prompts; writes ``eval/step_<N>.json`` (metrics + every completion).
    Shown as a progress phase counting completions (multi-turn: generations) as they finish."""
    total = len(rows) if agent is None else None
    with Progress(total, f"rl eval at step {step}", enabled=info.is_main and config.run.progress, keys=(),
                  generation=True, unit="completions" if total is not None else "generations"):
        metrics, records = evaluate_prompts(engine, rows, reward_fn, temperature=config.rollout.eval_temperature,
                                            max_new_tokens=config.rollout.max_new_tokens, stop=config.rollout.stop,
                                            seed=config.train.seed, agent=agent)
    if info.is_main:
        run.eval.mkdir(parents=True, exist_ok=True)
        (run.eval / f"step_{step}.json").write_text(json.dumps({"step": step, "metrics": metrics, "samples": records},
                                                               indent=1))
        shown = "  ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k in ("eval/acc", "eval/reward",
                                                                               "eval/response_len"))
        say(f"rl: held-out eval at step {step}: {shown}")
    return metrics


def save_rl_checkpoint(run: RunDir, state: RLState, models: Trainables, info: DistInfo, *, config: RLConfig) -> None:
    """``checkpoints/step_<N>/``: policy (+ critic) weights, optimizers, schedulers, RNG, and
    the trainer state (step, prompt sampler position, KL controller), written by
    ``train.checkpoint.save_checkpoint`` (atomic, checksummed, finite, keeps the last K)."""
    extra: dict[str, Any] = {}
    if models.critic is not None:
        critic_state, critic_optim = ckpt.gather_training_state(models.critic, models.critic_optimizer, info)
        extra = {"critic_model.pt": critic_state, "critic_optimizer.pt": critic_optim,
                 "critic_scheduler.pt": models.critic_scheduler.state_dict()}
    trainer_state = {"step": state.step, "sampler": state.sampler, "kl_controller": state.kl_controller,
                     "elapsed_s": state.elapsed_s, "nonfinite_skipped": state.nonfinite_skipped}
    ckpt.save_checkpoint(run.checkpoints, state.step, models.policy, models.optimizer, models.scheduler, trainer_state,
                         info, keep_last=config.train.keep_last, config=config, extra=extra)


def guard_update(config: RLConfig, models: Trainables, update_metrics: dict[str, float], state: RLState, run: RunDir,
                 info: DistInfo) -> int:
    """After step ``state.step + 1``'s update: count its optimizer steps skipped for a NaN/inf
    loss or gradient (``train.session.check_step_finite``: stop over
    ``train.skip_nonfinite_steps``), and stop if the policy's weights are not finite (the
    next rollout could not sample from them). Returns the run's count of skipped steps."""
    step = state.step + 1
    bad = int(update_metrics.get("nonfinite_steps", 0) + update_metrics.get("critic/nonfinite_steps", 0))
    steps = int(update_metrics.get("optimizer_steps", 0) + update_metrics.get("critic/optimizer_steps", 0))
    skipped = check_step_finite("rl", step, nonfinite_steps=bad, skipped_before=state.nonfinite_skipped,
                                limit=config.train.skip_nonfinite_steps, checkpoints=run.checkpoints,
                                detail=f"{bad} of its {steps} optimizer steps had a NaN/inf loss or gradient norm",
                                is_main=info.is_main)
    try:
        ckpt.check_finite_weights(list(models.policy.named_parameters()), info, f"rl: step {step}")
    except ckpt.NonFiniteError as exc:
        raise ckpt.NonFiniteError(f"{exc}; {last_checkpoint_note(run.checkpoints)}") from None
    return skipped


def load_rl_checkpoint(path: Path, models: Trainables, sampler: PromptSampler, kl_controller: Any,
                       info: DistInfo) -> RLState:
    """Restore everything ``save_rl_checkpoint`` wrote; returns the trainer state."""
    saved = ckpt.load_checkpoint(path, models.policy, models.optimizer, models.scheduler, info)
    if models.critic is not None:
        if not (Path(path) / "critic_model.pt").is_file():
            raise ConfigError(f"train.resume: {path} has no critic (it was not a ppo run)")
        read = info.is_main or not info.distributed
        critic_state = torch.load(Path(path) / "critic_model.pt", weights_only=False) if read else {}
        critic_optim = torch.load(Path(path) / "critic_optimizer.pt", weights_only=False) if read else {}
        with configured_hyperparameters_kept(models.critic_optimizer, models.critic_scheduler):
            ckpt.load_full_state(models.critic, models.critic_optimizer, critic_state, critic_optim, info)
            models.critic_scheduler.load_state_dict(torch.load(Path(path) / "critic_scheduler.pt", weights_only=False))
    sampler.load_state_dict(saved["sampler"])
    if saved.get("kl_controller"):
        kl_controller.load_state_dict(saved["kl_controller"])
    return RLState(step=saved["step"], sampler=saved["sampler"], kl_controller=saved.get("kl_controller", {}),
                   elapsed_s=saved.get("elapsed_s", 0.0), nonfinite_skipped=saved.get("nonfinite_skipped", 0))




def announce(config: RLConfig, info: DistInfo, models: Trainables, train_rows: Sequence[PromptRow],
             eval_rows: Sequence[PromptRow], resume_path: Path | None) -> None:
    if not info.is_main:
        return
    total, trainable = count_parameters(models.policy)
    rl, rollout = config.rl, config.rollout
    reference = "none" if models.reference is None else ("adapter-disabled base" if config.lora.enabled else "frozen copy")
    say(f"rl: {rl.algorithm}, {len(train_rows)} train / {len(eval_rows)} held-out prompts; {config.train.max_steps} steps "
          f"x {rl.prompts_per_step} prompts x {rollout.group_size} completions (<= {rollout.max_new_tokens} tokens, "
          f"{rollout.engine}); model {config.model.name} ({total / 1e6:.1f}M params, {trainable / 1e6:.2f}M trained); "
          f"reference: {reference}" + (f"; critic: {config.rl.critic.model or config.model.name}" if models.critic else "")
          + (f"; resuming from {resume_path}" if resume_path else ""))


def finish(config: RLConfig, info: DistInfo, state: RLState, result: RLResult) -> None:
    if not info.is_main:
        return
    before, after = result.eval_before.get("eval/acc"), result.eval_after.get("eval/acc")
    change = f"; held-out acc {before:.3f} -> {after:.3f}" if before is not None and after is not None else ""
    where = f"final model in {result.final_dir}" if result.final_dir else "no final model (train.export=false)"
    say(f"rl: {state.step} steps in {state.elapsed_s:.0f}s{change}; {where}")
