"""Composite reward: a weighted sum of named rewards, written in config.

The classic composite of docs/PIPELINE.md ("Rewards"): ``1.0 * passed/total`` (code) ``+ 0.2`` if the
format is right ``- max(0, len - 2000) * 0.0001`` (length). As config::

    reward:
      name: composite
      terms:
        code:   {weight: 1.0}
        format: {weight: 0.2, required_tags: [answer]}
        length: {weight: 1.0, budget: 2000, penalty_per_unit: 0.0001}

A term's reward is its key unless it names one with ``reward:`` (so two terms can use the
same reward with different parameters); other keys are that reward's parameters. Components
carry each term's unweighted scores under the term's name (RL logs them as
``reward/<term>``), plus the terms' own sub-components. A sample is correct when every term
that checks correctness passed it (``math`` beside ``format``: the ``math`` verdict); a
composite of terms that check none checks none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from posttrain.rewards.output import RewardFn, RewardOutput, all_correct, check_batch


@dataclass
class CompositeTerm:
    name: str
    weight: float
    reward: RewardFn


class CompositeReward:
    """``sum(weight * term(...))`` over the terms, with every term's scores as components.

    >>> from posttrain.rewards.format import FormatReward
    >>> from posttrain.rewards.length import LengthReward
    >>> reward = CompositeReward([
    ...     CompositeTerm("format", 0.2, FormatReward(required_tags=["answer"])),
    ...     CompositeTerm("length", 1.0, LengthReward(budget=10, penalty_per_unit=0.01)),
    ... ])
    >>> out = reward(["q", "q"], ["<answer>4</answer>", "x" * 30])
    >>> [round(s, 4) for s in out.scores]
    [0.12, -0.2]
    >>> out.components["format"], out.components["length"], out.correct
    ([1.0, 0.0], [-0.08, -0.2], None)
    """

    def __init__(self, terms: Sequence[CompositeTerm]):
        if not terms:
            raise ValueError("a composite reward needs at least one term")
        self.terms = list(terms)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict] | None = None):
        metadata = check_batch(prompts, completions, metadata)
        total = [0.0] * len(completions)
        components: dict[str, list[float]] = {}
        details = [dict() for _ in completions]
        checks = []
        for term in self.terms:
            out = term.reward(prompts, completions, metadata)
            total = [t + term.weight * s for t, s in zip(total, out.scores)]
            checks.append(out.correct)
            components[term.name] = list(out.scores)
            for key, values in out.components.items():
                if key == term.name or values == out.scores and len(out.components) == 1:
                    continue
                components[key if key.startswith(term.name + "/") else f"{term.name}/{key}"] = list(values)
            if out.details is not None:
                for row, d in zip(details, out.details):
                    row[term.name] = d
        return RewardOutput(total, components, details=details, correct=all_correct(checks))
