"""The one return type of every reward: per-sample scores plus named components.

A reward is a plain callable ``reward(prompts, completions, metadata) -> RewardOutput`` over
a batch (docs/PIPELINE.md, "Rewards"; TRL's reward functions work on batches too). ``components`` holds the parts a score is made of, keyed by
the name RL logs as ``reward/<name>``; a single-part reward has one component, its own name.

A reward that checks correctness (the right answer, all tests passed: ``math``, ``code``,
``reasoning_gym``, a user reward declared with ``correctness: true``) says so per sample in
``correct``; one that does not (``format``, ``length``, a reward model) leaves it None. Accuracy
(``acc`` in RL, ``accuracy`` in ``posttrain eval``) is the share of correct samples, and
exists only for rewards that check correctness (``correct_share``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[dict]], "RewardOutput"]


@dataclass
class RewardOutput:
    """``scores[i]`` rewards completion ``i``; every ``components[name]`` has the same length;
    ``correct[i]``: whether completion ``i`` passed the reward's correctness check (None: the
    reward checks no correctness).

    >>> out = RewardOutput([1.0, 0.0], {"math": [1.0, 0.0]}, correct=[True, False])
    >>> out.mean("math"), correct_share(out.correct)
    (0.5, 0.5)
    """

    scores: list[float]
    components: dict[str, list[float]] = field(default_factory=dict)
    details: list[dict] | None = None  # per-sample non-numeric facts (extracted answer, test verdicts)
    correct: list[bool] | None = None  # per sample: the correctness check passed; None = the reward checks none

    def __post_init__(self) -> None:
        self.scores = [float(s) for s in self.scores]
        for name, values in self.components.items():
            if len(values) != len(self.scores):
                raise ValueError(f"reward component {name!r} has {len(values)} values for {len(self.scores)} scores")
        if self.details is not None and len(self.details) != len(self.scores):
            raise ValueError(f"reward details has {len(self.details)} rows for {len(self.scores)} scores")
        if self.correct is not None:
            if len(self.correct) != len(self.scores):
                raise ValueError(f"reward correct has {len(self.correct)} values for {len(self.scores)} scores")
            self.correct = [bool(c) for c in self.correct]

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


def correct_at_full_score(scores: Sequence[float]) -> list[bool]:
    """Correctness read from a score whose 1.0 means fully right (an answer check, a share of
    tests passed, a user reward declared ``correctness: true``): correct at 1.0 or more.

    >>> correct_at_full_score([1.0, 0.5, 0.0, 1.2])
    [True, False, False, True]
    """
    return [float(s) >= 1.0 for s in scores]


def all_correct(checks: Sequence[Sequence[bool] | None]) -> list[bool] | None:
    """Per sample, whether every correctness check that exists passed (a composite of several
    rewards: the terms that check correctness); None when no check exists.

    >>> all_correct([None, [True, False]]), all_correct([[True, True], [True, False]]), all_correct([None])
    ([True, False], [True, False], None)
    """
    present = [list(check) for check in checks if check is not None]
    if not present:
        return None
    return [all(values) for values in zip(*present)]


def correct_share(correct: Sequence[bool | None] | None) -> float | None:
    """Accuracy: the share of samples whose correctness check passed, over the samples that
    have one; None when none has (the reward checks no correctness: no accuracy is reported).

    >>> correct_share([True, False, True, True]), correct_share(None), correct_share([None, None])
    (0.75, None, None)
    """
    checked = [c for c in correct or () if c is not None]
    return sum(checked) / len(checked) if checked else None


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
