"""The rollout stage of an RL step: prompts, the seeded prompt sampler, sampling groups of
completions from the rollout source (``rollout.sources``; multi-turn trajectories through the
agent), DAPO's dynamic sampling, the step's samples on every rank, and samples.jsonl.

Token in, token out (docs/ARCHITECTURE.md, "One tokenisation"): a prompt is rendered ONCE
(``data.render.render_prompt``) into ids; the engine returns the exact ids it sampled
(``rollout.base.Completion``); a ``RolloutSample`` (``train.rl_samples``) keeps both.

DAPO (Yu et al. 2025) dynamic sampling (§3.2): groups whose rewards are all equal carry no
group-relative signal; drop them and sample more prompts, here at most ``max_refill_rounds``
extra rounds, after which the batch is completed with dropped groups, which then add nothing
to the policy gradient. Each round is scored (``train.rl_scoring``) before the next is drawn.

Data parallel (torchrun): each rank samples and scores its own share of a step's prompts
(``collect_rollouts``); ``gather_batch`` gives every rank the whole step's samples, without
their tensors, for the metrics and samples.jsonl.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from posttrain.agent.trajectory import trajectory_record
from posttrain.errors import DataError
from posttrain.eval.prompts import PromptRow, agent_prompts
from posttrain.rollout.base import Completion, SamplingParams
from posttrain.train.checkpoint import storage_errors
from posttrain.train.distributed import DistInfo, all_gather_objects
from posttrain.train.rl_samples import RolloutBatch, RolloutSample, in_prompt_order, without_tensors
from posttrain.train.rl_scoring import RewardFn, has_signal, score_groups
from posttrain.train.rl_settings import RolloutSettings, ScoringSettings

# ----------------------------------------------------------------------------- prompts


class PromptSampler:
    """Seeded prompt order, epoch after epoch; its position is part of a checkpoint.

    >>> sampler = PromptSampler(3, seed=0)
    >>> first = sampler.take(2) + sampler.take(2)   # crosses into the second epoch
    >>> state = sampler.state_dict(); after = sampler.take(3)
    >>> again = PromptSampler(3, seed=0); again.load_state_dict(state); again.take(3) == after
    True
    """

    def __init__(self, size: int, seed: int):
        if size < 1:
            raise ValueError("PromptSampler needs at least one prompt")
        self.size, self.seed = size, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(self.size))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self, count: int) -> list[int]:
        taken = []
        while len(taken) < count:
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            taken.append(self._order[self.position])
            self.position += 1
        return taken

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "size": self.size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["size"] != self.size:
            raise DataError(f"train.resume: the checkpoint saw {state['size']} prompts, this run has {self.size}")
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)


# ----------------------------------------------------------------------------- samples


def generate_groups(engine: Any, rows: Sequence[PromptRow], row_indices: Sequence[int],
                    params: SamplingParams, first_group: int, agent: Any = None) -> list[list[RolloutSample]]:
    """Sample ``params.n`` completions for each prompt; one group per prompt, in order.
    With an ``agent`` (``agent.build.Agent``) each completion is a multi-turn trajectory."""
    if agent is not None:
        return trajectory_groups(agent, engine, rows, row_indices, params, first_group)
    completions: list[Completion] = engine.generate([rows[i].prompt_ids for i in row_indices], params)
    groups: list[list[RolloutSample]] = [[] for _ in row_indices]
    for completion in completions:
        position = completion.prompt_index
        row = rows[row_indices[position]]
        groups[position].append(RolloutSample(
            row=row_indices[position], group=first_group + position, prompt_ids=list(row.prompt_ids),
            response_ids=list(completion.token_ids), text=completion.text,
            finish_reason=completion.finish_reason, engine_logp=completion.logprobs,
        ))
    return groups


def trajectory_groups(agent: Any, engine: Any, rows: Sequence[PromptRow], row_indices: Sequence[int],
                      params: SamplingParams, first_group: int) -> list[list[RolloutSample]]:
    """``params.n`` multi-turn trajectories per prompt (``agent.loop.run_agent``): the sample's
    response is every segment after the prompt, its mask the sampled ones; its text (what the
    reward reads) is the final answer after the last tool output."""
    trajectories = agent.run(engine, agent_prompts(agent, rows, row_indices), params)
    groups: list[list[RolloutSample]] = [[] for _ in row_indices]
    for trajectory in trajectories:
        position = trajectory.prompt_index
        groups[position].append(RolloutSample(
            row=row_indices[position], group=first_group + position, prompt_ids=trajectory.prompt_ids,
            response_ids=trajectory.response_ids, response_mask=trajectory.response_mask, text=trajectory.final_text,
            finish_reason=trajectory.stop_or_length,
            engine_logp=trajectory.sampled_logprobs, trajectory=trajectory_record(trajectory, agent.tokenizer),
        ))
    return groups


def collect_rollouts(engine: Any, rows: Sequence[PromptRow], sampler: PromptSampler, reward_fn: RewardFn,
                     settings: RolloutSettings, scoring: ScoringSettings, step: int, info: DistInfo | None = None,
                     agent: Any = None) -> RolloutBatch:
    """Sample this rank's share of ``prompts`` groups (generate + score), with DAPO dynamic
    sampling if asked.

    Data parallel (``info`` with K ranks; K divides ``prompts``): every rank draws the same
    prompts from ``sampler`` (so its position is the same everywhere) and keeps every K-th,
    prompt i going to rank i % K; each rank generates and scores only its own groups.
    Dynamic sampling refills each rank's own share: a round draws K x (the largest share
    still missing) prompts, so every rank generates the same number of prompts per round (an
    engine holding sharded weights needs every rank's forward passes); groups beyond a
    rank's missing share are discarded. Alone (K = 1) a round draws exactly what is missing.
    """
    rank, world_size = (info.rank, info.world_size) if info is not None else (0, 1)
    share = settings.prompts_per_step // world_size
    params = step_sampling(settings.sampling, step, rank)
    batch = RolloutBatch(groups=[])
    dropped: list[list[RolloutSample]] = []
    rounds = 0
    missing = [share] * world_size  # every rank's missing groups
    while True:
        indices = sampler.take(max(missing) * world_size)[rank::world_size]
        started = time.perf_counter()
        round_params = replace(params, seed=params.seed + 7919 * rounds)
        groups = generate_groups(engine, rows, indices, round_params, first_group=batch.generated_groups, agent=agent)
        batch.seconds_generate += time.perf_counter() - started
        started = time.perf_counter()
        score_groups(groups, rows, reward_fn, scoring)
        batch.seconds_score += time.perf_counter() - started
        batch.generated_groups += len(groups)
        for group in groups:
            if settings.dynamic_sampling and not has_signal(group):
                dropped.append(group)
            elif len(batch.groups) < share:
                batch.groups.append(group)
        if not settings.dynamic_sampling:
            break
        missing = _every_rank(share - len(batch.groups), info)
        if max(missing) == 0 or rounds >= settings.max_refill_rounds:
            break
        rounds += 1
    batch.refill_rounds = rounds
    batch.dropped_groups = len(dropped)
    short = share - len(batch.groups)
    if short > 0:  # bounded: complete the batch with signal-free groups (zero advantage)
        batch.groups.extend(dropped[:short])
        batch.kept_zero_variance = min(short, len(dropped))
    return batch


def _every_rank(value: int, info: DistInfo | None) -> list[int]:
    return [value] if info is None else all_gather_objects(value, info)


def gather_batch(batch: RolloutBatch, info: DistInfo) -> RolloutBatch:
    """The whole step's batch on every rank: every rank's groups in global prompt order,
    samples without their tensors, counts summed and times the slowest rank's. Alone:
    ``batch`` itself.

    Group ids are renumbered by global position.
    """
    if not info.distributed:
        return batch
    mine = {"groups": [[without_tensors(s) for s in group] for group in batch.groups],
            "counts": [batch.generated_groups, batch.dropped_groups, batch.kept_zero_variance],
            "refill_rounds": batch.refill_rounds, "seconds": [batch.seconds_generate, batch.seconds_score],
            "stale_rows": batch.stale_rows}
    parts = all_gather_objects(mine, info)
    groups = in_prompt_order([part["groups"] for part in parts])
    for position, group in enumerate(groups):
        for sample in group:
            sample.group = position
    generated, dropped, kept = (sum(part["counts"][k] for part in parts) for k in range(3))
    return RolloutBatch(groups=groups, generated_groups=generated, dropped_groups=dropped,
                        refill_rounds=max(part["refill_rounds"] for part in parts),
                        seconds_generate=max(part["seconds"][0] for part in parts),
                        seconds_score=max(part["seconds"][1] for part in parts), kept_zero_variance=kept,
                        sampler_state=batch.sampler_state,
                        stale_rows=[row for part in parts for row in part["stale_rows"]])


RANK_SEED_STRIDE = 1_000_000_007  # rank r samples with seed + r x this (rank 0: the single-process seed)


def step_sampling(sampling: SamplingParams, step: int, rank: int) -> SamplingParams:
    """The sampling parameters of ``step`` on ``rank``: the seed is a function of (run seed,
    step, rank), so a resumed run samples what the uninterrupted run sampled."""
    return replace(sampling, seed=sampling.seed + step + RANK_SEED_STRIDE * rank)


def append_samples(path: Path, step: int, batch: RolloutBatch, rows: Sequence[PromptRow], limit: int) -> None:
    """Append up to ``limit`` samples of this step (whole groups first) to samples.jsonl
    (a failed write is one ``StorageError`` line)."""

    with storage_errors("writing samples", path, "; the checkpoints are intact"), open(path, "a", encoding="utf-8") as handle:
        for sample in batch.samples[:limit]:
            handle.write(json.dumps({
                "step": step, "group": sample.group, "prompt": rows[sample.row].text, "completion": sample.text,
                "reward": sample.reward, "components": sample.components, "finish_reason": sample.finish_reason,
                "response_ids": sample.response_ids, "policy_version": sample.policy_version,
                **({} if sample.trajectory is None else {"trajectory": sample.trajectory}),
            }) + "\n")
