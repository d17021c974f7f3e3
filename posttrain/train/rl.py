"""``posttrain rl``: on-policy RL for language models, one loop for every algorithm.

Phase 3 of docs/PIPELINE.md. One step, one module per stage, each given its own typed
settings built once from the config (``train.rl_settings``):

    collect_rollouts  train.rl_rollouts    sample prompts, generate group_size completions each
                                           from the rollout source (rollout.sources), and score
                                           them (train.rl_scoring); DAPO dynamic sampling
    rollout_passes    train.rl_logprobs    old / reference log-probs and critic values (no grad)
    advantages        train.rl_advantages  the estimator rl.advantage names (packed, per token)
    update            train.rl_update      ppo_epochs passes of mini-batch updates with the
                                           policy loss rl.policy_loss names (and the critic's),
                                           plus ptx.coef x an SFT loss on ptx rows (train.rl_ptx)

then log, samples.jsonl, held-out eval and checkpoints every N steps. The models and the
engine are built by ``train.rl_models``.

Estimators (``rl.advantage``, or the preset ``rl.algorithm``): ``grpo`` (Shao et al. 2024),
``dr_grpo`` (Liu et al. 2025: no std division; pair it with ``loss_agg_mode: sum``, divided by
sequences x max_new_tokens), ``rloo`` (Ahmadian et al. 2024), ``reinforce_pp`` (Hu 2025) and
``gae`` (preset ``ppo``, Schulman et al. 2017; a learned scalar-head critic). Policy losses
(``rl.policy_loss``): ``ppo_clip`` (clip-higher, dual clip), ``gspo``, ``cispo``. DAPO options:
clip-higher (``rl.clip_high``), dynamic sampling, overlong filtering / soft punishment.

Deviations and shortcuts, stated:
- When every sample is used once, right after it was sampled (``ppo_epochs: 1`` and one
  mini-batch), the old log-probs ARE the current ones: that forward pass is skipped and the
  ratio is exactly 1 (as in TRL and veRL). The engine-vs-trainer gap is then measured in
  the update's forward.
- Each step's sampling seed is a function of (train.seed, step, rank), so a resumed run
  samples what the uninterrupted run sampled.

Data parallel (torchrun, K ranks; FSDP2 shards the policy, reference and critic): a step's
``rl.prompts_per_step`` prompts (a multiple of K) are drawn by the same seeded sampler on
every rank and dealt by whole groups, prompt i to rank i % K; each rank generates, scores
and trains on its own groups only, with its own sampling seed. Group-relative advantages
need only the group and are computed where it lives; batch-normalised ones are computed on
the gathered batch, so they equal one process's. The update's normalisers are summed over
ranks, so a step's gradient is the one process would compute on the same samples; every rank
runs as many micro-batches and optimizer steps as the others (one-token fillers with zero
loss), since FSDP's collectives must stay in step. The logged metrics and samples.jsonl cover
every rank's samples. With mini-batches, the k-th mini-batch is the union of each rank's k-th
share (a different, equally random split than one process's).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from posttrain.agent.build import build_agent
from posttrain.agent.trajectory import trajectory_metrics
from posttrain.algorithms.advantages import zero_variance_group_fraction
from posttrain.algorithms.kl import make_kl_controller
from posttrain.config import RLConfig
from posttrain.data.audit import load_sft_data, preflight, preflight_prompts
from posttrain.data.mixture import setting_text, source_metrics
from posttrain.errors import ConfigError, DataError, config_key, config_section
from posttrain.eval.generate import EvalProgress, evaluate_rows, trainer_metrics, trainer_records
from posttrain.eval.prompts import PromptRow, prompt_rows
from posttrain.hub import check_push_target
from posttrain.log import say, say_stdout
from posttrain.models import load_tokenizer
from posttrain.models.prepare import count_parameters
from posttrain.rewards import build_reward
from posttrain.rewards.output import correct_share
from posttrain.rewards.preflight import reward_rows, rl_preflight
from posttrain.rewards.registry import reward_fields
from posttrain.rollout.base import SamplingParams
from posttrain.train import checkpoint as ckpt
from posttrain.train.distributed import DistInfo, init_distributed, shutdown_distributed
from posttrain.train.logging import MetricsLogger, Progress, RunDir, run_metrics_logger
from posttrain.train.loop import configured_hyperparameters_kept, is_due, seed_everything
from posttrain.train.rl_advantages import advantages
from posttrain.train.rl_async import RolloutAhead, RolloutError, StalenessCounts, drop_stale
from posttrain.train.rl_logprobs import rollout_passes
from posttrain.train.rl_models import build_engine, build_policy, build_trainables
from posttrain.train.rl_ptx import PtxMix
from posttrain.train.rl_rollouts import (
    PromptSampler,
    append_samples,
    collect_rollouts,
    gather_batch,
)
from posttrain.train.rl_samples import RolloutBatch
from posttrain.train.rl_alarms import RLAlarms, reward_length_correlation
from posttrain.train.rl_settings import alarm_settings, rl_settings
from posttrain.train.rl_update import Trainables, update
from posttrain.train.session import RunSession, check_step_finite, last_checkpoint_note, open_run
from posttrain.train.steps import pad_token_id


# Start the rollout thread even at rl.max_staleness 0 (tests: it must then equal the synchronous loop bit for bit).
ROLLOUT_THREAD_AT_ZERO = False


@dataclass
class RLState:
    """What a checkpoint records besides tensors."""

    step: int = 0
    sampler: dict[str, int] = field(default_factory=dict)
    kl_controller: dict[str, float] = field(default_factory=dict)
    elapsed_s: float = 0.0
    nonfinite_skipped: int = 0  # optimizer steps skipped for a NaN/inf loss or gradient (train.skip_nonfinite_steps)
    alarms: dict[str, Any] = field(default_factory=dict)  # the alarms' window of history (train.rl_alarms)


@dataclass
class RLResult:
    run_dir: Path
    final_dir: Path | None
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)


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
    ptx = load_ptx(config, tokenizer, info)
    reward_fn = reward_fn if reward_fn is not None else build_reward_fn(config)
    run, resume_path = open_run("rl", config, info)
    models = build_trainables(config, info)
    if info.distributed:
        seed_everything(config.train.seed + info.rank)
    agent = build_rl_agent(config, tokenizer)
    settings = rl_settings(config, info, pad_token_id(tokenizer), agent, run_dir=run.path)
    built = engine is None
    engine = engine if engine is not None else build_engine(config, models.policy, tokenizer, settings.source)
    try:
        return _train_rl(config, session, info, tokenizer, train_rows, eval_rows, reward_fn, run, resume_path, models,
                         agent, settings, engine, ptx)
    finally:
        if built and hasattr(engine, "close"):  # a rollout server posttrain started stops with the run
            engine.close()


def _train_rl(config: RLConfig, session: RunSession, info: DistInfo, tokenizer: Any, train_rows: list[PromptRow],
              eval_rows: list[PromptRow], reward_fn: Any, run: RunDir, resume_path: Path | None, models: Trainables,
              agent: Any, settings: Any, engine: Any, ptx: PtxMix | None) -> RLResult:
    sampler = PromptSampler(len(train_rows), seed=config.train.seed)
    kl_controller = make_kl_controller(config.rl.kl_coef, target_kl=config.rl.target_kl, horizon=config.rl.kl_horizon)
    state = RLState()
    if resume_path is not None:
        state = load_rl_checkpoint(resume_path, models, sampler, kl_controller, info)
        engine.update_weights(models.policy)
    announce(config, info, models, train_rows, eval_rows, resume_path)
    result = RLResult(run.path, None, state.step)
    start = source_metrics(config.data.train, train_rows)  # a mixture's prompts per source
    if eval_rows and config.train.eval_before and state.step == 0:
        result.eval_before = run_eval(engine, eval_rows, reward_fn, config, run, step=0, info=info, agent=agent)
    alarms = RLAlarms(alarm_settings(config), announce=info.is_main, state=state.alarms, before=result.eval_before)
    staleness = StalenessCounts()

    def collect_step(step: int, version: int) -> RolloutBatch:  # this rank's groups of `step`, scored
        batch = collect_rollouts(engine, train_rows, sampler, reward_fn, settings.rollout, settings.scoring, step,
                                 info, agent)
        for sample in batch.samples:
            sample.policy_version = version
        batch.sampler_state = sampler.state_dict()
        return batch

    with (
        RolloutAhead(collect_step, start=state.step, stop=config.train.max_steps,
                     max_staleness=config.rl.max_staleness, threaded=ROLLOUT_THREAD_AT_ZERO or None) as ahead,
        run_metrics_logger(run, config.run, info.is_main) as logger,
        Progress(config.train.max_steps, "rl", enabled=info.is_main and config.run.progress, initial=state.step,
                 keys=("reward/mean", "acc", "kl", "response_len/mean", "eval/acc")) as progress,
    ):
        if state.step == 0 and start:
            result.history.append(logger.log(start, step=0))
        if result.eval_before:
            log_eval(logger, run, 0, result.eval_before)
        while state.step < config.train.max_steps:
            started = time.perf_counter()
            batch = ahead.next(state.step)  # this rank's groups, scored (generated ahead when rl.max_staleness > 0)
            stale = drop_stale(batch, state.step, config.rl.max_staleness, staleness)
            if not batch.groups:
                raise RolloutError(f"rl: every sample of step {state.step + 1} was sampled by a policy more than "
                                   f"rl.max_staleness={config.rl.max_staleness} versions old (the engine's weights "
                                   f"are not being updated); {last_checkpoint_note(run.checkpoints)}")
            whole = gather_batch(batch, info)  # every rank's samples (no tensors): metrics, samples.jsonl
            times = {"time/generate": whole.seconds_generate, "time/score": whole.seconds_score}
            tick = time.perf_counter()
            gap = rollout_passes(batch.samples, settings.passes, info, policy=models.policy,
                                 reference=models.reference, critic=models.critic)
            adv_metrics = advantages(batch, settings.advantages, kl_controller.value, info)
            times["time/logprob"] = time.perf_counter() - tick
            tick = time.perf_counter()
            update_metrics = update(models, batch, settings.update, state.step, kl_controller.value, info, ptx)
            state.nonfinite_skipped = guard_update(config, models, update_metrics, state, run, info)
            times["time/update"] = time.perf_counter() - tick
            tick = time.perf_counter()
            ahead.push_weights(lambda: engine.update_weights(models.policy))  # between two batches of the thread
            times["time/weight_sync"] = time.perf_counter() - tick
            if config.rl.kl_coef and "kl" in update_metrics:
                kl_controller.update(update_metrics["kl"], len(whole.samples))
            state.step += 1
            state.elapsed_s += time.perf_counter() - started
            metrics = step_metrics(config, whole, adv_metrics, update_metrics, gap, times, kl_controller.value,
                                   time.perf_counter() - started)
            if config.rl.max_staleness > 0:
                metrics.update(stale)
            if is_due(state.step, config.train.eval_every, config.train.max_steps) and eval_rows:
                with ahead.exclusive():  # the rollout thread waits
                    result.eval_after = run_eval(engine, eval_rows, reward_fn, config, run, step=state.step, info=info,
                                                 agent=agent)
                metrics.update(result.eval_after)
                log_eval(logger, run, state.step)  # the metrics ride on this step's line
            metrics.update(alarms.observe(state.step, metrics))
            if info.is_main and is_due(state.step, config.train.samples_every, config.train.max_steps):
                append_samples(run.samples, state.step, whole, train_rows, config.train.samples_per_log)
                logger.log_samples("train/samples", training_sample_rows(whole, train_rows,
                                                                         config.train.samples_per_log), state.step)
            if state.step % config.train.log_every == 0 or state.step == config.train.max_steps:
                result.history.append(logger.log(metrics, step=state.step))
            progress.update(1, metrics)
            # the sampler's position after THIS step's prompts (the rollout thread may have drawn further)
            state.sampler, state.kl_controller, state.alarms = (batch.sampler_state, kl_controller.state_dict(),
                                                                alarms.state_dict())
            session.step_boundary(state.step, config.train.max_steps, info=info, checkpoints=run.checkpoints,
                                  due=is_due(state.step, config.train.save_every, config.train.max_steps),
                                  save=lambda: save_rl_checkpoint(run, state, models, info, config=config))
        if eval_rows and not result.eval_after and config.train.eval_every is None:
            ahead.close()
            result.eval_after = run_eval(engine, eval_rows, reward_fn, config, run, step=state.step, info=info,
                                         agent=agent)
            log_eval(logger, run, state.step, result.eval_after)
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
    if config.rl.max_staleness > 0 and ranks > 1 and (config.rollout.engine == "hf" or config.rl.dynamic_sampling):
        what = ("rollout.engine hf (ranks generate in lock-step)" if config.rollout.engine == "hf"
                else "rl.dynamic_sampling (ranks agree on refills)")
        raise ConfigError(f"rl.max_staleness: with {ranks} ranks, {what} needs collectives that cannot run in the "
                          f"rollout thread beside the update's; use rollout.engine vllm_server, or max_staleness 0")
    check_push_target(config.run.push_to_hub)


def load_prompts(config: RLConfig, tokenizer: Any, info: DistInfo) -> tuple[list[PromptRow], list[PromptRow]]:
    """Train and held-out prompts, each file read, checked, rendered and audited once
    (``data.audit.preflight_prompts``: a bad row is a one-line error naming file:line, over-long
    prompts are dropped and counted), then the reward pre-flight (``rewards.preflight.rl_preflight``:
    every reward tried on sample rows, the agent's budget, train/held-out overlap), before any
    model loads; the summaries print on rank 0, every rank refuses alike."""

    data = config.data
    fields = reward_fields(config.reward, "reward")  # rows lacking what the reward reads are refused

    def load(setting: Any, limit: int | None, key: str) -> list[PromptRow]:  # one file or a list of sources
        return prompt_rows(preflight_prompts(setting, tokenizer, system=data.system, max_prompt_length=data.max_prompt_length,
                                             limit=limit, print_fn=say_stdout if info.is_main else None,
                                             columns=data.columns, reward_fields=fields,
                                             allow_special_tokens_in_text=data.allow_special_tokens_in_text,
                                             seed=config.train.seed, key=key))

    train_rows = load(data.train, data.limit, "data.train")
    eval_rows = load(data.eval, data.eval_limit, "data.eval") if data.eval else []
    lines = rl_preflight(config, reward_rows(train_rows, data.train), reward_rows(eval_rows, data.eval or ""))
    for line in lines if info.is_main else ():
        say_stdout(line)
    return train_rows, eval_rows


def load_ptx(config: RLConfig, tokenizer: Any, info: DistInfo) -> PtxMix | None:
    """The SFT rows of PPO-ptx (``ptx:``; None when ``ptx.coef`` is 0), read, rendered and
    audited as ``posttrain sft`` does (a bad row is a one-line error naming file:line; hard
    audit errors refuse the run), before any model loads."""
    ptx = config.ptx
    if ptx.coef == 0:
        return None
    with config_section("ptx"):  # its messages name ptx.data.allow_audit_errors, not data.allow_audit_errors
        prepared = load_sft_data(ptx.data.train, tokenizer, ptx.data, seed=config.train.seed)
        preflight(prepared, allow_errors=ptx.data.allow_audit_errors, print_fn=say_stdout if info.is_main else None)
        if not prepared.samples:
            raise DataError(f"{setting_text(ptx.data.train)}: no trained tokens left after rendering "
                            f"({config_key('data.train')})")
    return PtxMix(samples=list(prepared.samples), coef=ptx.coef, rows_per_step=ptx.rows_per_step,
                  seed=config.train.seed, micro_batch_tokens=config.train.micro_batch_tokens,
                  pad_token_id=pad_token_id(tokenizer), chunk_size=config.train.logits_chunk_size)


def build_reward_fn(config: RLConfig):
    return build_reward(config.reward, "reward")


def build_rl_agent(config: RLConfig, tokenizer: Any) -> Any:
    """The multi-turn agent of ``agent:`` (None when no tool or environment is named); each
    turn may sample up to ``rollout.max_new_tokens``, clamped to what is left of
    ``agent.max_total_tokens``."""
    if not config.agent.enabled:
        return None
    return build_agent(config.agent, tokenizer, max_new_tokens=config.rollout.max_new_tokens)


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
    acc = correct_share([s.correct for s in samples])  # the reward's correctness check (rewards/output.py)
    if acc is not None:
        metrics["acc"] = acc
    metrics.update(adv_metrics)
    metrics.update({k: v for k, v in update_metrics.items()})
    metrics.update(gap)
    metrics.update(trajectory_metrics([s.trajectory for s in samples if s.trajectory is not None]))
    corr = reward_length_correlation([[s.reward for s in g] for g in batch.groups],
                                     [[s.trained_length for s in g] for g in batch.groups])
    metrics.update({} if corr is None else {"reward_length_corr": corr})  # what the reward_length_corr alarm reads
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
    """One completion per held-out prompt (greedy at ``eval_temperature`` 0), scored by the
    reward through ``posttrain eval``'s evaluation (``eval.generate.evaluate_rows``); logged
    under the trainer's names (``eval/acc`` with its 95% interval ``eval/acc/ci_low``,
    ``eval/acc/ci_high``, ``eval/reward``, ...); writes ``eval/step_<N>.json`` (metrics + every
    completion). Shown as a progress phase counting completions (multi-turn: generations) as
    they finish. ``log_eval`` puts it in the logs."""
    params = SamplingParams(n=1, temperature=config.rollout.eval_temperature,
                            max_new_tokens=config.rollout.max_new_tokens, stop=tuple(config.rollout.stop),
                            seed=config.train.seed)
    evaluated = evaluate_rows(engine, rows, reward_fn, params, agent=agent,
                              progress=EvalProgress(info.is_main and config.run.progress, f"rl eval at step {step}",
                                                    score=None))
    metrics, records = trainer_metrics(evaluated.metrics), trainer_records(rows, evaluated.samples)
    if info.is_main:
        run.eval.mkdir(parents=True, exist_ok=True)
        (run.eval / f"step_{step}.json").write_text(json.dumps({"step": step, "metrics": metrics, "samples": records},
                                                               indent=1))
        shown = "  ".join(f"{k}={v:.4g}{acc_interval(metrics) if k == 'eval/acc' else ''}"
                          for k, v in metrics.items() if k in ("eval/acc", "eval/reward", "eval/response_len"))
        say(f"rl: held-out eval at step {step}: {shown}")
    return metrics


def acc_interval(metrics: dict[str, float]) -> str:
    """`` [low, high] (n=N)``: the 95% interval of a held-out ``eval/acc``, or "" without one.

    >>> acc_interval({"eval/acc": 0.13, "eval/acc/ci_low": 0.0776, "eval/acc/ci_high": 0.2098, "eval/count": 100})
    ' [0.078, 0.210] (n=100)'
    """
    if "eval/acc/ci_low" not in metrics or "eval/acc/ci_high" not in metrics:
        return ""
    count = f" (n={metrics['eval/count']:.0f})" if "eval/count" in metrics else ""
    return f" [{metrics['eval/acc/ci_low']:.3f}, {metrics['eval/acc/ci_high']:.3f}]{count}"


# Held-out completions shown in each evaluation's samples table (TensorBoard text, W&B table).
EVAL_TABLE_ROWS = 32


def log_eval(logger: MetricsLogger, run: RunDir, step: int, metrics: dict[str, float] | None = None) -> None:
    """The held-out evaluation at ``step`` in metrics.jsonl, TensorBoard and W&B: ``metrics`` as
    a metric line of its own (the evaluations before the first step and after the last; an
    in-loop evaluation's metrics ride on its step's line instead), and its first
    ``EVAL_TABLE_ROWS`` completions as the samples table ``eval/samples``, read from the
    ``eval/step_<N>.json`` that ``run_eval`` wrote (rank 0)."""
    if metrics:
        logger.log(metrics, step=step)
    written = run.eval / f"step_{step}.json"
    if logger.enabled and written.is_file():
        logger.log_samples("eval/samples", json.loads(written.read_text())["samples"][:EVAL_TABLE_ROWS], step)


def training_sample_rows(batch: RolloutBatch, rows: Sequence[PromptRow], limit: int) -> list[dict[str, Any]]:
    """The step's first ``limit`` samples as rows of the ``train/samples`` table: prompt,
    completion, reward (what samples.jsonl keeps, without token ids and trajectories)."""
    return [{"prompt": rows[sample.row].text, "completion": sample.text, "reward": sample.reward}
            for sample in batch.samples[:limit]]


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
                     "elapsed_s": state.elapsed_s, "nonfinite_skipped": state.nonfinite_skipped, "alarms": state.alarms}
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
                   elapsed_s=saved.get("elapsed_s", 0.0), nonfinite_skipped=saved.get("nonfinite_skipped", 0),
                   alarms=saved.get("alarms", {}))




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
          + (f"; ptx: {config.ptx.rows_per_step} SFT rows per optimizer step, coef {config.ptx.coef:g}"
             if config.ptx.coef else "")
          + (f"; resuming from {resume_path}" if resume_path else ""))


def finish(config: RLConfig, info: DistInfo, state: RLState, result: RLResult) -> None:
    if not info.is_main:
        return
    before, after = result.eval_before.get("eval/acc"), result.eval_after.get("eval/acc")
    change = (f"; held-out acc {before:.3f}{acc_interval(result.eval_before)} -> "
              f"{after:.3f}{acc_interval(result.eval_after)}" if before is not None and after is not None else "")
    where = f"final model in {result.final_dir}" if result.final_dir else "no final model (train.export=false)"
    say(f"rl: {state.step} steps in {state.elapsed_s:.0f}s{change}; {where}")
