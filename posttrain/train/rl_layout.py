"""How an RL step's samples are laid out for the model: packed micro-batches within the token
budget (``train.micro_batch_tokens``), the shared-prompt layout (``rl.share_prompt``: each
group's prompt once), mini-batches of whole groups, and the per-token tensors of a
micro-batch's samples. Used by the rollout-time passes (``train.rl_logprobs``) and the update
(``train.rl_update``).

In every micro-batch the response tokens come out in sample order, so each sample's per-token
tensors (``old_logp``, ``advantages``...) are simply concatenated to line up with them.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from posttrain.data.batching import MicroBatch, collate_packed, collate_shared_prompt, split_into_micro_batches
from posttrain.train.rl_samples import RolloutSample
from posttrain.train.rl_settings import LayoutSettings


def pack_micro_batches(samples: Sequence[RolloutSample],
                       layout: LayoutSettings) -> list[tuple[list[RolloutSample], MicroBatch]]:
    """Split samples into packed micro-batches within the token budget (order inside each
    micro-batch = the order of its sample list): ``plan_micro_batches`` then
    ``collate_rollouts``."""
    return [(chunk, collate_rollouts(chunk, layout.pad_token_id, layout.share_prompt))
            for chunk in plan_micro_batches(samples, layout.micro_batch_tokens, layout.share_prompt)]


def plan_micro_batches(samples: Sequence[RolloutSample], micro_batch_tokens: int,
                       share_prompt: bool = False) -> list[list[RolloutSample]]:
    """Which samples go into which micro-batch (no tensors built).

    Plain: every sample is its own packed sequence (first-fit decreasing by length).
    ``share_prompt``: samples are grouped by prompt ids and each group costs its prompt once;
    micro-batches are filled in order, and a group larger than the budget is split, each part
    paying for its own copy of the prompt (one completion always gets a micro-batch).
    """
    if not share_prompt:
        lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
        bins = split_into_micro_batches(list(range(len(samples))), lengths, micro_batch_tokens, packing=True)
        return [[samples[i] for i in indices] for indices in bins]
    groups: dict[tuple[int, ...], list[RolloutSample]] = {}
    for sample in samples:
        groups.setdefault(tuple(sample.prompt_ids), []).append(sample)
    parts: list[list[RolloutSample]] = []
    for prompt, members in groups.items():
        part: list[RolloutSample] = []
        cost = len(prompt)
        for sample in members:
            if part and cost + len(sample.response_ids) > micro_batch_tokens:
                parts.append(part)
                part, cost = [], len(prompt)
            part.append(sample)
            cost += len(sample.response_ids)
        parts.append(part)
    bins: list[list[RolloutSample]] = []
    bin_cost = 0
    for part in parts:
        cost = len(part[0].prompt_ids) + sum(len(s.response_ids) for s in part)
        if not bins or bin_cost + cost > micro_batch_tokens:
            bins.append([])
            bin_cost = 0
        bins[-1].extend(part)
        bin_cost += cost
    return bins


def collate_rollouts(chunk: Sequence[RolloutSample], pad_token_id: int, share_prompt: bool = False) -> MicroBatch:
    """One micro-batch's tensors: one packed sequence per sample, or (``share_prompt``) each
    run of consecutive samples with the same prompt ids as one shared-prompt group."""
    if not share_prompt:
        return collate_packed(chunk, pad_token_id)
    groups: list[tuple[list[int], list[list[int]], list[list[int] | None]]] = []
    for sample in chunk:
        if not groups or groups[-1][0] != sample.prompt_ids:
            groups.append((sample.prompt_ids, [], []))
        groups[-1][1].append(sample.response_ids)
        groups[-1][2].append(sample.response_mask)
    return collate_shared_prompt(groups)


def split_per_sample(values_N: torch.Tensor, samples: Sequence[RolloutSample]) -> list[torch.Tensor]:
    return list(torch.split(values_N.detach().float().cpu(), [s.trained_length for s in samples]))


def concat_field(samples: Sequence[RolloutSample], name: str, device: torch.device) -> torch.Tensor:
    return torch.cat([getattr(s, name) for s in samples]).to(device)


def filler_sample(pad_id: int) -> RolloutSample:
    """A one-token prompt with a one-token response and every per-token field set: what a rank
    runs (and discards) when it has fewer micro-batches than another, so FSDP's collectives
    stay in step."""
    zeros = torch.zeros(1)
    return RolloutSample(row=-1, group=-1, prompt_ids=[pad_id], response_ids=[pad_id], text="", finish_reason="stop",
                         old_logp=zeros, ref_logp=zeros, values=zeros, advantages=zeros, returns=zeros)


def mini_batches(groups: Sequence[Sequence[RolloutSample]], count: int, seed: int,
                 keep_empty: bool = False) -> list[list[RolloutSample]]:
    """Shuffle whole groups (seeded), then deal the samples into ``count`` equal mini-batches
    (as equal as they can be when ``count`` does not divide them).

    With a mini-batch size that is a multiple of the group size, groups stay whole. Samples
    excluded from the loss (overlong filtering) are left out; empty mini-batches are dropped,
    unless ``keep_empty`` (data parallel: a rank's share of a mini-batch may be empty while
    another rank's is not), which always returns ``count`` lists.
    """
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    flat = [s for g in order for s in groups[g]]
    bounds = [len(flat) * k // count for k in range(count + 1)]
    chunks = [[s for s in flat[start: end] if s.trained] for start, end in zip(bounds[:-1], bounds[1:])]
    return chunks if keep_empty else [chunk for chunk in chunks if chunk]


def reshuffle(batches: Sequence[list[RolloutSample]], seed: int) -> list[list[RolloutSample]]:
    """Later epochs see the same samples in a new (seeded) mini-batch order."""
    order = list(range(len(batches)))
    random.Random(seed).shuffle(order)
    return [batches[i] for i in order]
