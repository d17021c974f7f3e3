"""Length reward: a penalty for every character or token beyond a budget.

The classic length term of a composite reward (docs/PIPELINE.md, "Rewards"), e.g.
``-max(0, len(response) - 2000) * 0.0001`` against verbose completions. The score is ``-penalty_per_unit * max(0, length -
budget)``, optionally capped at ``-max_penalty``; it is 0.0 within the budget.

``unit="chars"`` counts characters. ``unit="tokens"`` uses ``metadata["completion_tokens"]``
(the number of sampled tokens, which the RL loop knows exactly) when present, else the
``tokenizer`` given to the constructor (anything with ``encode(text) -> list``).

Not a correctness check (``RewardOutput.correct`` stays None): it gives no accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from posttrain.errors import ConfigError, DataError
from posttrain.rewards.output import RewardOutput, check_batch


@dataclass
class LengthReward:
    """``-penalty_per_unit * max(0, length - budget)``, at least ``-max_penalty``.

    >>> seed = LengthReward(budget=2000, penalty_per_unit=0.0001)  # the seed's rule 3
    >>> seed(["q"] * 3, ["x" * 10, "x" * 2000, "x" * 2500]).scores
    [0.0, 0.0, -0.05]
    >>> LengthReward(budget=4, unit="tokens", penalty_per_unit=0.5, max_penalty=2.0)(
    ...     ["q"] * 2, ["a", "b"], [{"completion_tokens": 6}, {"completion_tokens": 100}]).scores
    [-1.0, -2.0]
    """

    budget: int = 2000
    unit: Literal["chars", "tokens"] = "chars"
    penalty_per_unit: float = 0.0001
    max_penalty: float | None = None
    name: str = "length"
    tokenizer: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.unit not in ("chars", "tokens"):
            raise ConfigError(f"unit: must be chars or tokens, not {self.unit!r}")
        if self.budget < 0 or self.penalty_per_unit < 0 or (self.max_penalty is not None and self.max_penalty < 0):
            raise ConfigError("budget, penalty_per_unit and max_penalty must be >= 0")

    def length(self, completion: str, meta: dict) -> int:
        if self.unit == "chars":
            return len(completion)
        if "completion_tokens" in meta:
            return int(meta["completion_tokens"])
        if self.tokenizer is None:
            raise DataError("length reward with unit=tokens needs metadata['completion_tokens'] or a tokenizer")
        return len(self.tokenizer.encode(completion, add_special_tokens=False) if _accepts_special(self.tokenizer)
                   else self.tokenizer.encode(completion))

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict] | None = None):
        metadata = check_batch(prompts, completions, metadata)
        scores = []
        for completion, meta in zip(completions, metadata):
            penalty = self.penalty_per_unit * max(0, self.length(completion, meta) - self.budget)
            if self.max_penalty is not None:
                penalty = min(penalty, self.max_penalty)
            scores.append(-penalty if penalty else 0.0)
        return RewardOutput(scores, {self.name: list(scores)})


def _accepts_special(tokenizer) -> bool:
    return hasattr(tokenizer, "all_special_ids")  # a transformers tokenizer
