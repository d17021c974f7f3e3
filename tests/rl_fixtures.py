"""Stage settings of an RL step (``train.rl_settings``) for tests that call a stage directly,
with the defaults of a plain single-process GRPO run on the CPU; each keyword overrides one."""

from __future__ import annotations

import dataclasses

import torch

from posttrain.algorithms.advantages import AdvantageOptions
from posttrain.algorithms.policy import PolicyLossOptions
from posttrain.rollout.base import SamplingParams
from posttrain.train.rl_settings import (
    AdvantageSettings,
    LayoutSettings,
    LossSettings,
    PassSettings,
    RolloutSettings,
    ScoringSettings,
    UpdateSettings,
)
from posttrain.train.rl_update import PolicyObjective, StepNormalisers


def layout(micro_batch_tokens: int = 4096, share_prompt: bool = False, pad_token_id: int = 0) -> LayoutSettings:
    return LayoutSettings(micro_batch_tokens, share_prompt, pad_token_id)


def advantage_settings(estimator: str = "grpo", *, kl_in_reward: bool = False, kl_estimator: str = "k3",
                       kl_clamp: float | None = 10.0, gamma: float = 1.0, lam: float = 1.0,
                       whiten: bool = False) -> AdvantageSettings:
    return AdvantageSettings(estimator=estimator, options=AdvantageOptions(gamma=gamma, lam=lam),
                             kl_in_reward=kl_in_reward, kl_estimator=kl_estimator, kl_clamp=kl_clamp, whiten=whiten)


def loss_settings(**overrides) -> LossSettings:
    values = dict(policy_loss="ppo_clip", policy_options=PolicyLossOptions(clip_low=0.2, clip_high=0.28),
                  loss_agg_mode="token-mean", kl_in_loss=True, kl_estimator="k3", kl_clamp=10.0, entropy_coef=0.0,
                  temperature=1.0, chunk_size=8, sum_tokens_per_sequence=1)
    values.update(overrides)
    return LossSettings(**values)


def objective(settings: LossSettings | None = None, *, kl_coef: float = 0.0,
              sum_normaliser: float = 1.0) -> PolicyObjective:
    return PolicyObjective(settings or loss_settings(), kl_coef=kl_coef, sum_normaliser=sum_normaliser)


def normalisers(tokens: float, sequences: float) -> StepNormalisers:
    return StepNormalisers(float(tokens), float(sequences))


def update_settings(loss: LossSettings | None = None, *, micro_batch_tokens: int = 4096, share_prompt: bool = False,
                    ppo_epochs: int = 1, mini_batches: int = 1, seed: int = 0, precision: str = "fp32",
                    max_grad_norm: float | None = None) -> UpdateSettings:
    return UpdateSettings(ppo_epochs=ppo_epochs, mini_batches=mini_batches, seed=seed,
                          layout=layout(micro_batch_tokens, share_prompt), precision=precision,
                          device=torch.device("cpu"), max_grad_norm=max_grad_norm, loss=loss or loss_settings(),
                          critic=None)


def pass_settings(*, old_logprobs: bool = True, temperature: float = 1.0, chunk_size: int = 8,
                  micro_batch_tokens: int = 4096, share_prompt: bool = False) -> PassSettings:
    return PassSettings(old_logprobs=old_logprobs, temperature=temperature, chunk_size=chunk_size,
                        layout=layout(micro_batch_tokens, share_prompt), precision="fp32", device=torch.device("cpu"))


def scoring(*, overlong: str = "none", length_cap: int = 64, overlong_buffer: int = 8, overlong_penalty: float = 1.0,
            tool_call_bonus: float = 0.0, tool_error_penalty: float = 0.0) -> ScoringSettings:
    return ScoringSettings(overlong=overlong, length_cap=length_cap, overlong_buffer=overlong_buffer,
                           overlong_penalty=overlong_penalty, tool_call_bonus=tool_call_bonus,
                           tool_error_penalty=tool_error_penalty)


def rollout_settings(params: SamplingParams, *, prompts_per_step: int, dynamic_sampling: bool = False,
                     max_refill_rounds: int = 3) -> RolloutSettings:
    """``params.seed`` is the seed base (None: 0)."""
    if params.seed is None:
        params = dataclasses.replace(params, seed=0)
    return RolloutSettings(prompts_per_step=prompts_per_step, sampling=params, dynamic_sampling=dynamic_sampling,
                           max_refill_rounds=max_refill_rounds)
