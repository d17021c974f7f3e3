"""The settings of each stage of an RL step, read from the config once, as typed values.

``rl_settings(config, ...)`` is the one place that interprets the ``rl:``, ``rollout:`` and
``train:`` keys an RL step reads; every stage module takes its own settings object and never
sees the config:

    RolloutSettings   -> train.rl_rollouts   (prompts, sampling, dynamic sampling)
    ScoringSettings   -> train.rl_scoring    (overlong shaping, tool shaping)
    PassSettings      -> train.rl_logprobs   (old / reference log-probs, critic values)
    AdvantageSettings -> train.rl_advantages (the estimator and its options)
    UpdateSettings    -> train.rl_update     (mini-batches, policy and critic losses)

Two values change from step to step and are passed beside the settings: the step itself
(seeds) and the KL coefficient (the adaptive controller moves it). The ``alarms:`` section
becomes ``AlarmSettings`` for the run's alarms (``train.rl_alarms``), read by ``alarm_settings``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.algorithms.advantages import ADVANTAGE_ESTIMATORS, AdvantageOptions
from posttrain.algorithms.mismatch import MismatchOptions
from posttrain.algorithms.policy import PolicyLossOptions
from posttrain.config import RLConfig
from posttrain.rollout.base import SamplingParams
from posttrain.rollout.sources import SourceSettings
from posttrain.train.distributed import DistInfo
from posttrain.train.rl_alarms import ALARMS, AlarmSettings


@dataclass(frozen=True)
class LayoutSettings:
    """How samples are laid out in micro-batches (``train.rl_layout``)."""

    micro_batch_tokens: int
    share_prompt: bool
    pad_token_id: int


@dataclass(frozen=True)
class RolloutSettings:
    prompts_per_step: int
    sampling: SamplingParams  # its seed is the run's sampling seed base (``rl_rollouts.step_sampling``)
    dynamic_sampling: bool
    max_refill_rounds: int


@dataclass(frozen=True)
class ScoringSettings:
    overlong: str  # none | filter | penalty
    length_cap: int  # the length at which a completion counts as overlong
    overlong_buffer: int
    overlong_penalty: float
    tool_call_bonus: float = 0.0
    tool_error_penalty: float = 0.0


@dataclass(frozen=True)
class PassSettings:
    """The no-grad passes after scoring: which to run and how."""

    old_logprobs: bool  # samples are reused or the KL is a reward, so the policy's log-probs are needed
    temperature: float
    chunk_size: int
    layout: LayoutSettings
    precision: str
    device: torch.device


@dataclass(frozen=True)
class AdvantageSettings:
    estimator: str  # a name in algorithms.advantages.ADVANTAGE_ESTIMATORS
    options: AdvantageOptions  # kl_coef 0 here; the step's coefficient is set per step
    kl_in_reward: bool
    kl_estimator: str
    kl_clamp: float | None
    whiten: bool  # whiten the estimator's advantages over the whole batch

    @property
    def whole_batch(self) -> bool:
        """The advantages need statistics of every rank's samples, not only of each group."""
        return ADVANTAGE_ESTIMATORS[self.estimator].whole_batch or self.whiten


@dataclass(frozen=True)
class LossSettings:
    """Scalars of the policy loss (no config object enters the math)."""

    policy_loss: str  # a name in algorithms.policy.POLICY_LOSSES
    policy_options: PolicyLossOptions
    loss_agg_mode: str
    kl_in_loss: bool
    kl_estimator: str
    kl_clamp: float | None  # each token's KL estimate clamped to [-kl_clamp, kl_clamp]; None = unbounded
    entropy_coef: float
    temperature: float
    chunk_size: int
    sum_tokens_per_sequence: int  # loss_agg_mode 'sum' divides by sequences x this (Dr. GRPO: max_new_tokens)
    mismatch: MismatchOptions | None = None  # engine/trainer importance weights (None: the engine is the trainer)


@dataclass(frozen=True)
class CriticLossSettings:
    value_clip: float | None
    loss_agg_mode: str  # 'sum' has no meaning for a regression target: token-mean then
    warmup_steps: int  # the first steps train only the critic


@dataclass(frozen=True)
class UpdateSettings:
    ppo_epochs: int
    mini_batches: int  # optimizer steps per epoch
    seed: int
    layout: LayoutSettings
    precision: str
    device: torch.device
    max_grad_norm: float | None
    loss: LossSettings
    critic: CriticLossSettings | None


@dataclass(frozen=True)
class RLSettings:
    source: SourceSettings
    rollout: RolloutSettings
    scoring: ScoringSettings
    passes: PassSettings
    advantages: AdvantageSettings
    update: UpdateSettings


def rl_settings(config: RLConfig, info: DistInfo, pad_token_id: int, agent: Any = None,
                run_dir: Any = None) -> RLSettings:
    """Every stage's settings from ``config`` (``agent``: the run's multi-turn agent, or None;
    ``run_dir``: where a rollout server's weight syncs and log go unless ``rollout.sync_dir``)."""
    rl, rollout, train = config.rl, config.rollout, config.train
    layout = LayoutSettings(train.micro_batch_tokens, rl.share_prompt, pad_token_id)
    batch = rl.prompts_per_step * rollout.group_size
    return RLSettings(
        source=source_settings(config, info, run_dir),
        rollout=RolloutSettings(
            prompts_per_step=rl.prompts_per_step,
            sampling=SamplingParams(n=rollout.group_size, temperature=rollout.temperature, top_p=rollout.top_p,
                                    top_k=rollout.top_k, max_new_tokens=rollout.max_new_tokens,
                                    stop=tuple(rollout.stop), seed=train.seed * 1_000_003,
                                    return_logprobs=engine_logprobs_wanted(config)),
            dynamic_sampling=rl.dynamic_sampling, max_refill_rounds=rl.max_refill_rounds),
        scoring=ScoringSettings(
            overlong=rl.overlong, overlong_buffer=rl.overlong_buffer, overlong_penalty=rl.overlong_penalty,
            # a trajectory's length (sampled + env tokens) is capped by the agent's budget, not one turn's
            length_cap=rollout.max_new_tokens if agent is None else agent.limits.max_total_tokens,
            tool_call_bonus=0.0 if agent is None else agent.config.tool_call_bonus,
            tool_error_penalty=0.0 if agent is None else agent.config.tool_error_penalty),
        passes=PassSettings(
            old_logprobs=needs_old_logprobs(config), temperature=rollout.temperature,
            chunk_size=train.logits_chunk_size, layout=layout, precision=train.precision, device=info.device),
        advantages=AdvantageSettings(
            estimator=rl.advantage, options=AdvantageOptions(gamma=rl.gamma, lam=rl.lam),
            kl_in_reward=rl.kl_in == "reward", kl_estimator=rl.kl_estimator, kl_clamp=rl.kl_clamp,
            whiten=rl.whiten_advantages and rl.advantage == "gae"),
        update=UpdateSettings(
            ppo_epochs=rl.ppo_epochs, mini_batches=batch // (rl.mini_batch_size or batch), seed=train.seed,
            layout=layout, precision=train.precision, device=info.device, max_grad_norm=config.optim.max_grad_norm,
            loss=LossSettings(
                policy_loss=rl.policy_loss,
                policy_options=PolicyLossOptions(clip_low=rl.clip_low, clip_high=rl.clip_high,
                                                 dual_clip_c=rl.dual_clip_c,
                                                 importance_level=rl.gspo_importance_level),
                loss_agg_mode=train.loss_agg_mode, kl_in_loss=rl.kl_in == "loss", kl_estimator=rl.kl_estimator,
                kl_clamp=rl.kl_clamp, entropy_coef=rl.entropy_coef, temperature=rollout.temperature,
                chunk_size=train.logits_chunk_size, sum_tokens_per_sequence=rollout.max_new_tokens,
                mismatch=mismatch_options(config)),
            critic=None if not uses_critic(config) else CriticLossSettings(
                value_clip=rl.critic.value_clip,
                loss_agg_mode="token-mean" if train.loss_agg_mode == "sum" else train.loss_agg_mode,
                warmup_steps=rl.critic.warmup_steps)),
    )


def alarm_settings(config: RLConfig) -> AlarmSettings:
    """The thresholds of ``alarms:`` (``train.rl_alarms``) and the alarms this run can watch: all
    whose threshold is set, the held-out one only with periodic evaluation (``train.eval_every``),
    the tool-call one only with an agent; none when ``alarms.enabled`` is false. The window is a
    quarter of the run unless set (3 to 10 steps: a 12-step run still compares 3 with 3)."""
    alarms = config.alarms
    thresholds = {"reward_up_heldout_down": alarms.heldout_drop, "reward_length_corr": alarms.reward_length_corr,
                  "format_saturated": alarms.term_rise, "tool_calls_no_gain": alarms.tool_calls_rise,
                  "entropy_collapse": alarms.entropy_ratio,
                  "kl_blowup": alarms.kl_max if alarms.kl_max is not None else alarms.approx_kl_max,
                  "clip_frac_blowup": alarms.clip_frac_max, "length_cap": alarms.length_cap_frac,
                  "nonfinite": alarms.nonfinite_steps}
    runnable = {"reward_up_heldout_down": bool(config.data.eval) and config.train.eval_every is not None,
                "tool_calls_no_gain": config.agent.enabled}
    watched = tuple(name for name in ALARMS
                    if alarms.enabled and thresholds[name] is not None and runnable.get(name, True))
    window = alarms.window if alarms.window is not None else max(3, min(10, config.train.max_steps // 4))
    return AlarmSettings(
        window=window, acc_gain=alarms.acc_gain, heldout_drop=alarms.heldout_drop,
        reward_rise=alarms.reward_rise, reward_length_corr=alarms.reward_length_corr, term_rise=alarms.term_rise,
        term_saturation=alarms.term_saturation, tool_calls_rise=alarms.tool_calls_rise,
        entropy_ratio=alarms.entropy_ratio, kl_max=alarms.kl_max, approx_kl_max=alarms.approx_kl_max,
        clip_frac_max=alarms.clip_frac_max, blowup_factor=alarms.blowup_factor,
        length_cap_frac=alarms.length_cap_frac, length_cap_rise=alarms.length_cap_rise,
        nonfinite_steps=alarms.nonfinite_steps, watched=watched)


def source_settings(config: RLConfig, info: DistInfo | None, run_dir: Any = None) -> SourceSettings:
    rollout = config.rollout
    precision = config.train.precision if rollout.precision == "auto" else rollout.precision
    sync_dir = rollout.sync_dir or (None if run_dir is None else str(Path(run_dir) / "weight_sync"))
    return SourceSettings(
        model_name=config.model.name, seed=config.train.seed,
        max_model_len=config.data.max_prompt_length + rollout.max_new_tokens, batch_size=rollout.batch_size,
        dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
        synced_gpus=info is not None and info.distributed,
        vllm_gpu_memory_utilization=rollout.vllm_gpu_memory_utilization, vllm_kv_cache_gb=rollout.vllm_kv_cache_gb,
        vllm_enforce_eager=rollout.vllm_enforce_eager, separate_weights=config.rl.max_staleness > 0,
        prepacked_copy=rollout.prepacked_copy,
        lora=config.lora.enabled, top_p=rollout.top_p, top_k=rollout.top_k, server_url=rollout.server_url,
        server_python=rollout.server_python, server_args=tuple(rollout.server_args),
        server_start_timeout_s=rollout.server_start_timeout_s, server_timeout_s=rollout.server_timeout_s,
        sync_dir=sync_dir, log_dir=None if run_dir is None else str(run_dir))


def uses_critic(config: RLConfig) -> bool:
    """A learned critic is built and trained when the estimator reads its values (gae)."""
    return ADVANTAGE_ESTIMATORS[config.rl.advantage].needs_values


def engine_is_trainer(config: RLConfig) -> bool:
    """Rollouts come from the trained module itself, in step with it (hf, synchronous)."""
    return config.rollout.engine == "hf" and config.rl.max_staleness == 0


def engine_logprobs_wanted(config: RLConfig) -> bool:
    """The engine reports the log-probs of what it sampled: asked by ``rollout.engine_logprobs``,
    by default whenever the engine is not the trainer, and always when mismatch correction
    reads them. Both sides are at the sampling temperature; with top-p / top-k truncation the
    engine's distribution is not the trainer's, so they are not compared then (the config
    refuses a correction with truncation)."""
    wanted = config.rollout.engine_logprobs
    if wanted is None:
        wanted = not engine_is_trainer(config)
    wanted = wanted or mismatch_options(config) is not None
    return bool(wanted) and config.rollout.top_p == 1.0 and config.rollout.top_k == 0


def mismatch_options(config: RLConfig) -> MismatchOptions | None:
    """``rl.mismatch`` resolved: ``auto`` = tis when the engine is not the trainer, else off
    (None: no weights, no mismatch metrics)."""
    mismatch = config.rl.mismatch
    correction = mismatch.correction
    if correction == "auto":
        correction = "none" if engine_is_trainer(config) else "tis"
        if correction == "none":
            return None
    return MismatchOptions(correction, level=mismatch.level, cap=mismatch.cap, low=mismatch.low, high=mismatch.high)


def needs_old_logprobs(config: RLConfig) -> bool:
    """Old log-probs differ from the first update's only if samples are reused or the KL is a reward."""
    rl = config.rl
    batch = rl.prompts_per_step * config.rollout.group_size
    reused = rl.ppo_epochs > 1 or (rl.mini_batch_size is not None and rl.mini_batch_size < batch)
    return reused or (rl.kl_coef > 0 and rl.kl_in == "reward")
