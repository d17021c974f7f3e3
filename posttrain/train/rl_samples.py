"""The samples of an RL step, as every stage sees them: ``RolloutSample`` (one completion with
its ids and everything the later stages compute for it) and ``RolloutBatch`` (the step's
groups), and how they cross ranks (``without_tensors``, ``in_prompt_order``).

Token in, token out (docs/ARCHITECTURE.md, "One tokenisation"): a sample keeps the prompt's
rendered ids and the exact ids the engine sampled; the trainer builds its batches from
``prompt_ids + response_ids``. Text is decoded only for the reward and the logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch


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
    correct: bool | None = None  # the reward's correctness check passed (RewardOutput.correct); None: it checks none
    policy_version: int | None = None  # updates the sampling weights had seen (train.rl_async)
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
    sampler_state: dict[str, int] | None = None  # the prompt sampler's position after this batch's draws
    stale_rows: list[int] = field(default_factory=list)  # prompt rows of samples dropped as too stale

    @property
    def samples(self) -> list[RolloutSample]:
        return [s for group in self.groups for s in group]

    def rewards_PG(self) -> torch.Tensor:
        return torch.tensor([[s.reward for s in group] for group in self.groups], dtype=torch.float32)


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
    fields = ("engine_logp", "old_logp", "ref_logp", "values", "advantages", "returns")
    return replace(sample, components=dict(sample.components),
                   **{name: None for name in fields if name not in keep})
