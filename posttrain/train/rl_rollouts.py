"""Rollouts for ``posttrain rl``: prompts, the seeded prompt sampler, sampling groups of
completions, scoring them, DAPO's dynamic sampling and overlong shaping, and held-out
evaluation.

Token in, token out (docs/ARCHITECTURE.md, "One tokenisation"): a prompt is rendered ONCE
(``data.render.render_prompt``) into ids; the engine returns the exact ids it sampled
(``rollout.base.Completion``); a ``RolloutSample`` keeps both and the trainer builds its
batches from ``prompt_ids + response_ids``. Text is decoded only for the reward and the logs.

DAPO (Yu et al. 2025): dynamic sampling (§3.2: groups whose rewards are all equal carry no
group-relative signal; drop them and sample more prompts, here at most
``max_refill_rounds`` extra rounds, after which the batch is completed with dropped groups,
which then add nothing to the policy gradient); overlong filtering (§3.3: truncated
completions get no loss) and soft overlong punishment (eq. 13: a linear penalty over the last
``buffer`` tokens before the cap).

Data parallel (torchrun): each rank samples and scores its own share of a step's prompts
(``collect_rollouts``); ``gather_batch`` gives every rank the whole step's samples, without
their tensors, for the metrics and samples.jsonl.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from posttrain.agent.trajectory import trajectory_metrics, trajectory_record
from posttrain.errors import DataError
from posttrain.rewards.output import PromptText, unverified_counts, with_completion_tokens
from posttrain.rollout.base import Completion, SamplingParams
from posttrain.train.distributed import DistInfo, all_gather_objects
from posttrain.train.checkpoint import storage_errors

# ----------------------------------------------------------------------------- prompts


@dataclass
class PromptRow:
    """One RL prompt: its rendered ids, its text for the reward, and the row's metadata."""

    prompt_ids: list[int]
    text: str
    metadata: dict[str, Any]
    line: int


def prompt_text(messages: Any) -> str:
    """The text a reward sees as the prompt: the last user message (or the string itself)."""
    if isinstance(messages, str):
        return messages
    for message in reversed(messages):
        if message.get("role") in ("user", "human") or message.get("from") in ("user", "human"):
            return str(message.get("content", message.get("value", "")))
    return str(messages[-1].get("content", ""))


def prompt_rows(prepared: Any) -> list[PromptRow]:
    """The trainer's rows of a checked, rendered prompt file (``data.audit.load_prompt_data``:
    a row holds its prompt under ``messages`` or ``prompt``; every other key is metadata for
    the reward, ``answer``, ``tests``, ...)."""
    return [PromptRow(p.prompt_ids, PromptText(prompt_text(p.messages), p.messages if p.conversational else None),
                      p.metadata, p.line) for p in prepared.prompts]


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


@dataclass
class RolloutSample:
    """One sampled completion and everything the update computes for it.

    ``input_ids``/``loss_mask`` (the trainer's view) are ``prompt_ids + response_ids`` with
    the response tokens marked, so ``data.batching.collate`` packs it like an SFT sample.
    Per-token tensors (``old_logp``, ``ref_logp``, ``values``, ``advantages``, ``returns``)
    are [R] float32, one entry per TRAINED response token: all of them in a single turn; in a
    multi-turn trajectory only the sampled ones (``response_mask``), so log-probs, KL,
    entropy, advantages and the loss normalisers never see a tool output, and returns run
    over the sampled tokens straight across env tokens (docs/AGENTIC.md).
    """

    row: int
    group: int
    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    finish_reason: str
    engine_logp: list[float] | None = None  # one per trained (sampled) token
    response_mask: list[int] | None = None  # multi-turn: 1 at sampled tokens, 0 at env tokens; None = all sampled
    trajectory: dict | None = None  # multi-turn: the segments (ids, kind) and tool counts, for samples.jsonl and metrics
    reward: float = 0.0
    raw_reward: float = 0.0
    components: dict[str, float] = field(default_factory=dict)
    trained: bool = True
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    values: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    @property
    def loss_mask(self) -> list[int]:
        response = self.response_mask if self.response_mask is not None else [1] * len(self.response_ids)
        return [0] * len(self.prompt_ids) + list(response)

    @property
    def trained_length(self) -> int:
        """Response tokens the policy sampled (and is trained on): every per-token tensor
        (``old_logp``, ``advantages``, ...) has this length; env tokens are not among them."""
        return len(self.response_ids) if self.response_mask is None else sum(self.response_mask)

    @property
    def clipped(self) -> bool:
        return self.finish_reason == "length"


@dataclass
class RolloutBatch:
    """The groups of one RL step (``group_size`` samples each, in prompt order)."""

    groups: list[list[RolloutSample]]
    generated_groups: int = 0
    dropped_groups: int = 0
    refill_rounds: int = 0
    seconds_generate: float = 0.0
    seconds_score: float = 0.0
    kept_zero_variance: int = 0

    @property
    def samples(self) -> list[RolloutSample]:
        return [s for group in self.groups for s in group]

    def rewards_PG(self) -> torch.Tensor:
        return torch.tensor([[s.reward for s in group] for group in self.groups], dtype=torch.float32)


RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[dict]], Any]


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


def agent_prompts(agent: Any, rows: Sequence[PromptRow], row_indices: Sequence[int]) -> list[Any]:
    return [agent.prompt(getattr(rows[i].text, "messages", None) or str(rows[i].text), rows[i].prompt_ids, rows[i].metadata,
                         where=f"prompt row {rows[i].line}") for i in row_indices]


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


def score_groups(groups: Sequence[Sequence[RolloutSample]], rows: Sequence[PromptRow], reward_fn: RewardFn, *,
                 overlong: str, max_new_tokens: int, overlong_buffer: int, overlong_penalty: float,
                 tool_call_bonus: float = 0.0, tool_error_penalty: float = 0.0) -> None:
    """Call the reward once for all samples; apply overlong filtering or penalty and, for
    trajectories, the tool shaping terms and the environment's rewards (in place)."""
    samples = [s for group in groups for s in group]
    if not samples:
        return
    out = reward_fn([rows[s.row].text for s in samples], [s.text for s in samples],
                    with_completion_tokens([rows[s.row].metadata for s in samples], [s.trained_length for s in samples]))
    for index, sample in enumerate(samples):
        sample.raw_reward = float(out.scores[index])
        sample.components = {name: float(values[index]) for name, values in out.components.items()}
        sample.reward = sample.raw_reward
        if sample.trajectory is not None:
            used = bool(sample.trajectory.get("answer_from_tool"))  # the answer is what a call printed (agent/trajectory.py)
            shaping = {"tool_bonus": tool_call_bonus if used else 0.0,
                       "tool_error_penalty": -tool_error_penalty * sample.trajectory["tool_errors"],
                       "env": float(sample.trajectory["env_reward"])}
            for name, value in shaping.items():
                if value:
                    sample.components[name] = value
                    sample.reward += value
        if overlong == "filter" and sample.clipped:
            sample.trained = False
        elif overlong == "penalty":
            penalty = overlong_length_penalty(len(sample.response_ids), max_new_tokens, overlong_buffer, overlong_penalty)
            sample.reward -= penalty
            if penalty:
                sample.components["overlong_penalty"] = -penalty


def overlong_length_penalty(length: int, max_new_tokens: int, buffer: int, penalty: float) -> float:
    """DAPO soft overlong punishment (eq. 13), as a positive amount to subtract.

    0 up to ``max_new_tokens - buffer`` tokens, then rising linearly to ``penalty`` at
    ``max_new_tokens``.

    >>> overlong_length_penalty(90, 100, 20, 1.0), overlong_length_penalty(80, 100, 20, 1.0)
    (0.5, 0.0)
    """
    start = max_new_tokens - buffer
    if length <= start:
        return 0.0
    return min(penalty, penalty * (length - start) / buffer)


def has_signal(group: Sequence[RolloutSample]) -> bool:
    """False when every reward of the group is equal (no group-relative advantage)."""
    return any(s.reward != group[0].reward for s in group)


def collect_rollouts(engine: Any, rows: Sequence[PromptRow], sampler: PromptSampler, reward_fn: RewardFn, *,
                     prompts: int, params: SamplingParams, dynamic_sampling: bool, max_refill_rounds: int,
                     overlong: str, overlong_buffer: int, overlong_penalty: float,
                     info: DistInfo | None = None, agent: Any = None) -> RolloutBatch:
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
    share = prompts // world_size
    batch = RolloutBatch(groups=[])
    dropped: list[list[RolloutSample]] = []
    rounds = 0
    missing = [share] * world_size  # every rank's missing groups
    while True:
        indices = sampler.take(max(missing) * world_size)[rank::world_size]
        started = time.perf_counter()
        round_params = params if params.seed is None else _reseed(params, params.seed + 7919 * rounds)
        groups = generate_groups(engine, rows, indices, round_params, first_group=batch.generated_groups, agent=agent)
        batch.seconds_generate += time.perf_counter() - started
        started = time.perf_counter()
        # a trajectory's length (sampled + env tokens) is capped by the agent's budget, not one turn's
        length_cap = params.max_new_tokens if agent is None else agent.limits.max_total_tokens
        score_groups(groups, rows, reward_fn, overlong=overlong, max_new_tokens=length_cap,
                     overlong_buffer=overlong_buffer, overlong_penalty=overlong_penalty,
                     **({} if agent is None else {"tool_call_bonus": agent.config.tool_call_bonus,
                                                  "tool_error_penalty": agent.config.tool_error_penalty}))
        batch.seconds_score += time.perf_counter() - started
        batch.generated_groups += len(groups)
        for group in groups:
            if dynamic_sampling and not has_signal(group):
                dropped.append(group)
            elif len(batch.groups) < share:
                batch.groups.append(group)
        if not dynamic_sampling:
            break
        missing = _every_rank(share - len(batch.groups), info)
        if max(missing) == 0 or rounds >= max_refill_rounds:
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
            "refill_rounds": batch.refill_rounds, "seconds": [batch.seconds_generate, batch.seconds_score]}
    parts = all_gather_objects(mine, info)
    groups = in_prompt_order([part["groups"] for part in parts])
    for position, group in enumerate(groups):
        for sample in group:
            sample.group = position
    generated, dropped, kept = (sum(part["counts"][k] for part in parts) for k in range(3))
    return RolloutBatch(groups=groups, generated_groups=generated, dropped_groups=dropped,
                        refill_rounds=max(part["refill_rounds"] for part in parts),
                        seconds_generate=max(part["seconds"][0] for part in parts),
                        seconds_score=max(part["seconds"][1] for part in parts), kept_zero_variance=kept)


def in_prompt_order(per_rank: Sequence[Sequence[Any]]) -> list[Any]:
    """Every rank's groups (equal counts) in the step's prompt order: prompt i was dealt to
    rank i % K as its (i // K)-th group (``collect_rollouts``).

    >>> in_prompt_order([["p0", "p2"], ["p1", "p3"]])
    ['p0', 'p1', 'p2', 'p3']
    """
    ranks = len(per_rank)
    return [per_rank[i % ranks][i // ranks] for i in range(len(per_rank[0]) * ranks)]


def without_tensors(sample: RolloutSample, keep: Sequence[str] = ()) -> RolloutSample:
    """A copy of ``sample`` to send to other ranks: its per-token tensors dropped, except the
    ones named in ``keep`` (what metrics, samples.jsonl or batch-wide advantages read)."""
    from dataclasses import replace

    fields = ("engine_logp", "old_logp", "ref_logp", "values", "advantages", "returns")
    return replace(sample, components=dict(sample.components),
                   **{name: None for name in fields if name not in keep})


def _reseed(params: SamplingParams, seed: int) -> SamplingParams:
    from dataclasses import replace

    return replace(params, seed=seed)


# ----------------------------------------------------------------------------- evaluation


def is_binary(scores: Sequence[float]) -> bool:
    return bool(scores) and all(s in (0.0, 1.0) for s in scores)


ACCURACY_COMPONENTS = ("math", "accuracy", "correct", "code")


def accuracy(scores: Sequence[float], components: dict[str, Sequence[float]]) -> float | None:
    """Share of correct samples: the score itself when it is 0/1, else the first 0/1 component
    named like a correctness check (``math``, ``accuracy``, ``correct``, ``code``); None if none.

    >>> accuracy([1.0, 0.0], {}), accuracy([1.2, 0.2], {"math": [1.0, 0.0], "format": [1.0, 1.0]})
    (0.5, 0.5)
    """
    if is_binary(scores):
        return sum(scores) / len(scores)
    for name in ACCURACY_COMPONENTS:
        values = components.get(name)
        if values is not None and is_binary(values):
            return sum(values) / len(values)
    return None


def evaluate_prompts(engine: Any, rows: Sequence[PromptRow], reward_fn: RewardFn, *, temperature: float,
                     max_new_tokens: int, stop: Sequence[str], seed: int,
                     agent: Any = None) -> tuple[dict[str, float], list[dict]]:
    """One completion per held-out prompt (greedy at temperature 0), scored by the reward.

    Returns ``(metrics, records)``: ``eval/reward``, ``eval/acc`` (when rewards are 0/1),
    ``eval/response_len``, ``eval/clipped_frac``, ``eval/count``; records hold prompt,
    completion and reward per row.
    """
    params = SamplingParams(n=1, temperature=temperature, max_new_tokens=max_new_tokens, stop=tuple(stop), seed=seed)
    trajectories = None
    if agent is None:
        completions = engine.generate([row.prompt_ids for row in rows], params)
    else:
        runs = agent.run(engine, agent_prompts(agent, rows, range(len(rows))), params)
        trajectories = [trajectory_record(t, agent.tokenizer) for t in runs]
        completions = [t.as_completion() for t in runs]
    sampled = ([len(c.token_ids) for c in completions] if agent is None
               else [sum(t.response_mask) for t in runs])
    out = reward_fn([row.text for row in rows], [c.text for c in completions],
                    with_completion_tokens([row.metadata for row in rows], sampled))
    scores = [float(s) for s in out.scores]
    lengths = [len(c.token_ids) for c in completions]
    metrics = {
        "eval/reward": sum(scores) / len(scores),
        "eval/response_len": sum(lengths) / len(lengths),
        "eval/clipped_frac": sum(c.finish_reason == "length" for c in completions) / len(completions),
        "eval/count": len(rows),
    }
    acc = accuracy(scores, out.components)
    if acc is not None:
        metrics["eval/acc"] = acc
    metrics.update({f"eval/{name}": count for name, count in unverified_counts(out.components).items()})
    metrics.update(trajectory_metrics(trajectories or [], prefix="eval/agent"))
    records = [{"prompt": row.text, "completion": c.text, "reward": s, **{k: v for k, v in row.metadata.items()
                                                                            if isinstance(v, (str, int, float))}}
               for row, c, s in zip(rows, completions, scores)]
    for record, trajectory in zip(records, trajectories or []):
        record["trajectory"] = trajectory
    return metrics, records


def append_samples(path: Path, step: int, batch: RolloutBatch, rows: Sequence[PromptRow], limit: int) -> None:
    """Append up to ``limit`` samples of this step (whole groups first) to samples.jsonl
    (a failed write is one ``StorageError`` line)."""

    with storage_errors("writing samples", path, "; the checkpoints are intact"), open(path, "a", encoding="utf-8") as handle:
        for sample in batch.samples[:limit]:
            handle.write(json.dumps({
                "step": step, "group": sample.group, "prompt": rows[sample.row].text, "completion": sample.text,
                "reward": sample.reward, "components": sample.components, "finish_reason": sample.finish_reason,
                "response_ids": sample.response_ids,
                **({} if sample.trajectory is None else {"trajectory": sample.trajectory}),
            }) + "\n")
