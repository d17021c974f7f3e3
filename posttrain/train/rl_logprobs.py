"""The no-grad passes of an RL step after scoring: the policy's log-probs of the sampled tokens
before any update (``old_logp``, when samples are reused or the KL is a reward), the
reference's (``ref_logp``, when ``rl.kl_coef > 0``) and the critic's values (gae), each
[trained tokens] per sample; and the gap between the engine's log-probs and the trainer's.

Log-probs are computed at the sampling temperature (logits / T), the distribution the tokens
were drawn from (``models.logprobs``). When every sample is used once, right after it was
sampled, the old log-probs ARE the update's own: that pass is skipped and the gap is measured
in the update's forward instead (``train.rl_update``).

Data parallel: every rank runs as many micro-batches as the busiest one (one-token fillers),
so FSDP's collectives stay in step; the gap metrics are combined over ranks (token-weighted).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from posttrain.models.logprobs import response_token_logprobs, response_token_values
from posttrain.train.distributed import DistInfo, all_gather_objects, all_reduce_max
from posttrain.train.loop import autocast_context
from posttrain.train.rl_layout import filler_sample, pack_micro_batches, plan_micro_batches, split_per_sample
from posttrain.train.rl_samples import RolloutSample
from posttrain.train.rl_settings import PassSettings


def rollout_passes(samples: Sequence[RolloutSample], settings: PassSettings, info: DistInfo, *,
                   policy: torch.nn.Module, reference: Callable[[], Any] | None,
                   critic: torch.nn.Module | None) -> dict[str, float]:
    """``compute_rollout_tensors`` on this rank's samples; returns the engine-vs-trainer gap
    metrics over every rank's samples."""
    policy_pass = policy if settings.old_logprobs else None
    if not info.distributed:
        return compute_rollout_tensors(samples, settings, policy=policy_pass, reference=reference, critic=critic)
    layout = settings.layout
    mine = len(plan_micro_batches(samples, layout.micro_batch_tokens, layout.share_prompt))
    depth = int(all_reduce_max([float(mine)], info)[0])  # before any forward: collectives in order
    gap = compute_rollout_tensors(samples, settings, policy=policy_pass, reference=reference, critic=critic)
    for _ in range(depth - mine):
        compute_rollout_tensors([filler_sample(layout.pad_token_id)], settings, policy=policy_pass,
                                reference=reference, critic=critic)
    tokens = float(sum(s.trained_length for s in samples if s.engine_logp is not None)) if gap else 0.0
    parts = [(part, n) for part, n in all_gather_objects((gap, tokens), info) if part]
    if not parts:
        return {}
    total = sum(n for _, n in parts) or 1.0
    return {"logprob_gap/mean_abs": sum(p["logprob_gap/mean_abs"] * n for p, n in parts) / total,
            "logprob_gap/max_abs": max(p["logprob_gap/max_abs"] for p, _ in parts),
            "logprob_gap/mean": sum(p["logprob_gap/mean"] * n for p, n in parts) / total}


@torch.no_grad()
def compute_rollout_tensors(samples: Sequence[RolloutSample], settings: PassSettings, *,
                            policy: torch.nn.Module | None, reference: Callable[[], Any] | None,
                            critic: torch.nn.Module | None) -> dict[str, float]:
    """Fill ``old_logp`` (policy given), ``ref_logp`` (reference given) and ``values``
    (critic given) of every sample, without gradients.

    ``reference`` is a context-manager factory returning the reference module (LoRA: the
    policy with its adapter disabled; otherwise a frozen copy). Returns the engine-vs-trainer
    log-prob gap metrics when the engine reported log-probs and the policy pass ran.
    """
    gaps: list[torch.Tensor] = []
    for chunk, batch in pack_micro_batches(samples, settings.layout):
        batch = batch.to(settings.device)
        with autocast_context(settings.precision, settings.device):
            if policy is not None:
                was_training = policy.training
                policy.eval()
                logp = response_token_logprobs(policy, batch, temperature=settings.temperature,
                                               chunk_size=settings.chunk_size, with_entropy=False).logp
                policy.train(was_training)
                for sample, values in zip(chunk, split_per_sample(logp, chunk)):
                    sample.old_logp = values
                    if sample.engine_logp is not None:
                        gaps.append(torch.tensor(sample.engine_logp, dtype=torch.float32) - values)
            if reference is not None:
                with reference() as ref_model:
                    ref_logp = response_token_logprobs(ref_model, batch, temperature=settings.temperature,
                                                       chunk_size=settings.chunk_size, with_entropy=False).logp
                for sample, values in zip(chunk, split_per_sample(ref_logp, chunk)):
                    sample.ref_logp = values
            if critic is not None:
                values_N = response_token_values(critic, batch)
                for sample, values in zip(chunk, split_per_sample(values_N, chunk)):
                    sample.values = values
    return logprob_gap_metrics(gaps)


def logprob_gap_metrics(gaps: Sequence[torch.Tensor]) -> dict[str, float]:
    """Engine log-prob minus trainer log-prob of the same sampled tokens."""
    if not gaps:
        return {}
    gap = torch.cat(list(gaps))
    return {"logprob_gap/mean_abs": gap.abs().mean().item(), "logprob_gap/max_abs": gap.abs().max().item(),
            "logprob_gap/mean": gap.mean().item()}
