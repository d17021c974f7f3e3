"""The models of an RL run: the policy (fp32 master weights, optional LoRA, packed attention,
optional FSDP2), the frozen reference, the PPO critic (a scalar-head model,
``models.scalar_head``), their optimizers and schedulers, and the rollout engine from the
source ``rollout.engine`` names (``rollout.sources.ROLLOUT_SOURCES``).

``rl.kl_coef: 0`` builds no reference model. With LoRA the reference is the base model with the
adapter disabled (no second copy in memory); otherwise a frozen copy of the policy.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch

from posttrain.config import RLConfig
from posttrain.errors import ConfigError
from posttrain.models.attention import choose_attention
from posttrain.models.prepare import prepare_for_training
from posttrain.models.scalar_head import load_scalar_head_model, train_top_layers_only
from posttrain.rollout.base import RolloutEngine
from posttrain.rollout.sources import ROLLOUT_SOURCES
from posttrain.train.distributed import DistInfo, shard_model
from posttrain.train.loop import build_optimizer, build_scheduler, optimizer_steps_per_rollout_batch, resolve_warmup_steps
from posttrain.train.rl_settings import SourceSettings, uses_critic
from posttrain.train.rl_update import Trainables
from posttrain.train.steps import build_optimizer_and_scheduler, load_causal_lm, place_for_training, train_top_layers


def build_policy(config: RLConfig, info: DistInfo, *, unsharded: bool = False) -> torch.nn.Module:
    """The policy: fp32 master weights, optional LoRA, packed attention, optional FSDP2."""

    model = load_causal_lm(config.model.name, config.lora)
    if config.rl.train_top_layers is not None:
        train_top_layers(model, config.rl.train_top_layers, "rl.train_top_layers")
    if unsharded:
        return model
    return place_for_training(model, info, packing=True, attn_implementation=config.model.attn_implementation,
                              gradient_checkpointing=config.model.gradient_checkpointing)


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
    return place_for_training(critic, info, packing=True, attn_implementation=config.model.attn_implementation,
                              gradient_checkpointing=config.model.gradient_checkpointing)


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
    optimizer, scheduler = build_optimizer_and_scheduler(policy, optim, total, warmup)
    models = Trainables(policy, optimizer, scheduler, reference=build_reference(config, policy, info))
    if uses_critic(config):
        models.critic = build_critic(config, info)
        models.critic_optimizer = build_optimizer(models.critic, lr=config.rl.critic.lr, weight_decay=optim.weight_decay,
                                                  betas=optim.betas, eps=optim.eps)
        models.critic_scheduler = build_scheduler(models.critic_optimizer, total_steps=total, warmup_steps=warmup,
                                                  schedule="constant", min_lr_ratio=1.0)
    return models


def build_engine(config: RLConfig, policy: torch.nn.Module, tokenizer: Any, settings: SourceSettings) -> RolloutEngine:
    """The rollout engine of the source ``rollout.engine`` names."""
    return ROLLOUT_SOURCES[config.rollout.engine](policy, tokenizer, settings)
