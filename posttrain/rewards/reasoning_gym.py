"""Reward for reasoning-gym procedural tasks, scored by the task's own ``score_answer``.

reasoning-gym (``pip install reasoning-gym``) generates verifiable problems (arithmetic,
algebra, logic, games...) and ships a scorer per task; scores may be partial (0..1). The
answer is extracted like the ``math`` reward (default: ``<answer>`` tags, the format the
library's default system prompt asks for, then ``\\boxed{}``, then the last number).

Rows carry the reasoning-gym entry in ``metadata["entry"]`` (``question``, ``answer``,
``metadata`` with ``source_dataset``); the scorer is looked up from
``entry["metadata"]["source_dataset"]`` or the ``dataset`` parameter. Rows without an entry
fall back to the ``math`` comparison against ``metadata["answer"]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

from posttrain.errors import ConfigError
from posttrain.rewards.math import answers_match, check_extract_methods, extract_answer
from posttrain.rewards.output import RewardOutput, check_batch, correct_at_full_score


@lru_cache(maxsize=None)
def _scorer(dataset: str):
    import reasoning_gym

    try:
        return reasoning_gym.get_score_answer_fn(dataset)
    except Exception as e:  # unknown names raise library-specific errors
        raise ConfigError(f"dataset: unknown reasoning-gym dataset {dataset!r} ({e})") from None


@dataclass
class ReasoningGymReward:
    """The task's ``score_answer`` on the extracted answer (0.0 when none is found); a
    correctness check: correct at a full score of 1.0 (``RewardOutput.correct``).

    >>> import reasoning_gym
    >>> entry = reasoning_gym.create_dataset("basic_arithmetic", size=1, seed=1)[0]
    >>> entry["question"], entry["answer"]
    ('Calculate 5 - 3 - 6.', '-4')
    >>> ReasoningGymReward()(["q"] * 3, ["<answer>-4</answer>", "so -4", "<answer>4</answer>"], [{"entry": entry}] * 3).scores
    [1.0, 1.0, 0.0]
    """

    dataset: str | None = None
    extract: list[str] = field(default_factory=lambda: ["answer_tag", "boxed", "last_number"])
    name: str = "reasoning_gym"

    def __post_init__(self) -> None:
        self.extract = check_extract_methods(self.extract)
        if self.dataset is not None:
            _scorer(self.dataset)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict] | None = None):
        metadata = check_batch(prompts, completions, metadata)
        scores, details = [], []
        for completion, meta in zip(completions, metadata):
            extracted = extract_answer(completion, self.extract)
            entry = meta.get("entry")
            if extracted is None:
                score = 0.0
            elif entry is not None:
                dataset = self.dataset or entry.get("metadata", {}).get("source_dataset")
                if dataset is None:
                    raise ConfigError("dataset: rows' entries name no source_dataset; set the reward's dataset")
                try:
                    score = float(_scorer(dataset)(extracted, entry))
                except Exception:  # a scorer crashing on odd model output is a wrong answer
                    score = 0.0
            else:
                reference = meta.get("answer")
                score = float(reference is not None and answers_match(extracted, str(reference)))
            scores.append(score)
            reference = entry.get("answer") if entry is not None else meta.get("answer")
            details.append({"extracted": extracted, "reference": reference})
        return RewardOutput(scores, {self.name: list(scores)}, details=details, correct=correct_at_full_score(scores))
