"""Rollout sources: where an RL run's completions come from, one registry entry each.

A source is a function ``(policy, tokenizer, settings: SourceSettings) -> RolloutEngine``
(``rollout.base``): it builds an engine that samples from the policy's current weights and
takes new ones through ``engine.update_weights(policy)`` after every update. ``rollout.engine``
in the config names one (``ROLLOUT_SOURCES``):

- ``hf``: transformers ``generate`` on the policy module itself (``rollout.hf.HFEngine``); under
  FSDP every rank generates in step (``synced_gpus``).
- ``vllm``: vLLM's offline engine in this process, on a snapshot of the policy
  (``rollout.vllm.VLLMEngine``), reloaded after every update.
- ``vllm_server``: a vLLM server in its own process, on this machine or another
  (``rollout.vllm_server.VLLMServerEngine``), driven over HTTP token in / token out; the
  weights (or the LoRA adapter alone) are pushed to it after every update.

Adding a source (for example a remote inference server) is one function here and one
registry line (docs/ARCHITECTURE.md, "How to add").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from posttrain.errors import ConfigError
from posttrain.rollout.base import RolloutEngine


@dataclass(frozen=True)
class SourceSettings:
    """What every rollout source may need, read once from the config.

    ``dtype``: the precision the hf engine generates in; ``synced_gpus``: ranks generate in
    lock-step (FSDP-sharded weights); ``max_model_len``: the longest prompt + completion.
    """

    model_name: str
    seed: int
    max_model_len: int
    batch_size: int
    dtype: torch.dtype
    synced_gpus: bool
    vllm_gpu_memory_utilization: float
    vllm_kv_cache_gb: float
    vllm_enforce_eager: bool
    separate_weights: bool = False  # hf: generate on a copy of the policy (asynchronous steps), not the module itself
    prepacked_copy: bool | None = None  # hf on a CPU: a copy with transposed linear weights (rollout.prepacked); None = auto
    lora: bool = False  # the policy is a LoRA (peft) model: a server takes the adapter alone after each update
    top_p: float = 1.0
    top_k: int = 0
    server_url: str | None = None  # vllm_server: a running server; None = start one (server_python, server_args)
    server_python: str | None = None
    server_args: tuple[str, ...] = ()
    server_start_timeout_s: float = 600.0
    server_timeout_s: float = 600.0
    sync_dir: str | None = None  # vllm_server: where each update's weights are written for the server to load
    log_dir: str | None = None  # vllm_server started by posttrain: its log goes here (vllm_server.log)


def hf_source(policy: torch.nn.Module, tokenizer: Any, settings: SourceSettings) -> RolloutEngine:
    """The hf engine on the policy itself, or on a copy of it (another dtype, asynchronous steps,
    or the CPU's prepacked copy: ``rollout.hf``)."""
    from posttrain.rollout.hf import HFEngine

    return HFEngine(policy, tokenizer, batch_size=settings.batch_size, synced_gpus=settings.synced_gpus,
                    dtype=settings.dtype, separate_copy=settings.separate_weights, prepack=settings.prepacked_copy)


def vllm_source(policy: torch.nn.Module, tokenizer: Any, settings: SourceSettings) -> RolloutEngine:
    """vLLM's offline engine colocated in this process, on a snapshot of the policy."""
    from posttrain.rollout.vllm import VLLMEngine

    return VLLMEngine.from_policy(policy, tokenizer, settings.model_name, seed=settings.seed,
                                  max_model_len=settings.max_model_len,
                                  gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
                                  kv_cache_gb=settings.vllm_kv_cache_gb, enforce_eager=settings.vllm_enforce_eager)


def vllm_server_source(policy: torch.nn.Module, tokenizer: Any, settings: SourceSettings) -> RolloutEngine:
    """A vLLM server in its own process (``rollout.vllm_server.VLLMServerEngine``): the one at
    ``server_url``, or one started on this machine for the run; weights (or the LoRA adapter)
    pushed through ``sync_dir`` after every update."""
    from posttrain.rollout.vllm_server import VLLMServerEngine

    hint = f"; the run's checkpoints in {settings.log_dir} are intact" if settings.log_dir else ""
    if settings.server_url:
        if settings.sync_dir is None:
            raise ConfigError("rollout.sync_dir: a directory the trainer and the server at rollout.server_url both "
                              "read is needed to pass weights")
        return VLLMServerEngine.connect(settings.server_url, policy, tokenizer, sync_dir=settings.sync_dir,
                                        timeout_s=settings.server_timeout_s, error_hint=hint)
    return VLLMServerEngine.start(policy, tokenizer, sync_dir=settings.sync_dir, log_dir=settings.log_dir,
                                  python=settings.server_python, seed=settings.seed,
                                  max_model_len=settings.max_model_len, kv_cache_gb=settings.vllm_kv_cache_gb,
                                  gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
                                  enforce_eager=settings.vllm_enforce_eager, extra_args=tuple(settings.server_args),
                                  start_timeout_s=settings.server_start_timeout_s,
                                  timeout_s=settings.server_timeout_s, error_hint=hint)


RolloutSource = Callable[[torch.nn.Module, Any, SourceSettings], RolloutEngine]

ROLLOUT_SOURCES: dict[str, RolloutSource] = {
    "hf": hf_source,
    "vllm": vllm_source,
    "vllm_server": vllm_server_source,
}
