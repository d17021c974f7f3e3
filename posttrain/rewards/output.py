"""The one return type of every reward: per-sample scores plus named components.

A reward is a plain callable ``reward(prompts, completions, metadata) -> RewardOutput`` over
a batch (docs/PIPELINE.md, "Rewards"; TRL's reward functions work on batches too). ``components`` holds the parts a score is made of, keyed by
the name RL logs as ``reward/<name>``; a single-part reward has one component, its own name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[dict]], "RewardOutput"]


@dataclass
class RewardOutput:
    """``scores[i]`` rewards completion ``i``; every ``components[name]`` has the same length.

    >>> out = RewardOutput([1.0, 0.0], {"math": [1.0, 0.0]})
    >>> out.mean("math")
    0.5
    """

    scores: list[float]
    components: dict[str, list[float]] = field(default_factory=dict)
    details: list[dict] | None = None  # per-sample non-numeric facts (extracted answer, test verdicts)

    def __post_init__(self) -> None:
        self.scores = [float(s) for s in self.scores]
        for name, values in self.components.items():
            if len(values) != len(self.scores):
                raise ValueError(f"reward component {name!r} has {len(values)} values for {len(self.scores)} scores")
        if self.details is not None and len(self.details) != len(self.scores):
            raise ValueError(f"reward details has {len(self.details)} rows for {len(self.scores)} scores")

    def mean(self, component: str | None = None) -> float:
        values = self.scores if component is None else self.components[component]
        finite = [v for v in values if math.isfinite(v)]
        return sum(finite) / len(finite) if finite else float("nan")


class PromptText(str):
    """The prompt text a reward sees, remembering the prompt's messages when the row gave it as
    a conversation (``messages`` is None for a plain-string prompt). Any reward may treat it as
    the ``str`` it is; the TRL calling convention (``registry.TRLReward``) passes the messages.

    >>> p = PromptText("2+2?", [{"role": "user", "content": "2+2?"}])
    >>> p == "2+2?", p.messages[0]["role"]
    (True, 'user')
    """

    messages: list[dict] | None

    def __new__(cls, text: str, messages: list[dict] | None = None) -> "PromptText":
        value = super().__new__(cls, text)
        value.messages = messages
        return value

    def __reduce__(self):  # pickled across ranks with its messages
        return (PromptText, (str(self), self.messages))


def as_reward_output(value: Any, name: str, batch_size: int) -> RewardOutput:
    """Normalise what a user reward returned (RewardOutput, or a list of numbers)."""
    if isinstance(value, RewardOutput):
        out = value
    else:
        scores = [float(v) for v in value]
        out = RewardOutput(scores, {name: list(scores)})
    if len(out.scores) != batch_size:
        raise ValueError(f"reward {name!r} returned {len(out.scores)} scores for a batch of {batch_size}")
    return out


def unverified_counts(components: dict[str, Sequence[float]]) -> dict[str, float]:
    """How many samples each reward could not check within its bounds: the sum of every
    ``<name>/unverified`` component (1.0 per refused sample; ``rewards/math.py``), keyed by
    the component's name, for evaluation reports.

    >>> unverified_counts({"math": [0.0, 0.0, 1.0], "math/unverified": [1.0, 1.0, 0.0]})
    {'math/unverified': 2.0}
    """
    return {name: float(sum(values)) for name, values in components.items() if name.endswith("/unverified")}


def with_completion_tokens(metadata: Sequence[dict], counts: Sequence[int]) -> list[dict]:
    """Each row's metadata with ``completion_tokens``: how many tokens the model sampled for
    that completion (a trajectory's tool output not counted), which ``length`` reads with
    ``unit: tokens``. The row's own key of that name, if any, is replaced.

    >>> with_completion_tokens([{"answer": "4"}], [12])
    [{'answer': '4', 'completion_tokens': 12}]
    """
    return [{**meta, "completion_tokens": int(count)} for meta, count in zip(metadata, counts)]


def check_batch(prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict] | None) -> list[dict]:
    """Validate batch lengths; ``metadata=None`` means no metadata for any row."""
    if metadata is None:
        metadata = [{} for _ in completions]
    if not (len(prompts) == len(completions) == len(metadata)):
        raise ValueError(
            f"reward batch: {len(prompts)} prompts, {len(completions)} completions, {len(metadata)} metadata rows"
        )
    return list(metadata)
