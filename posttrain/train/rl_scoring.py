"""Scoring of an RL step's samples: the reward once for all of them, then the shaping terms of
the settings (``train.rl_settings.ScoringSettings``): DAPO's overlong filtering (§3.3,
truncated completions get no loss) or soft overlong punishment (eq. 13, a linear penalty over
the last ``buffer`` tokens before the cap; Yu et al. 2025), and for multi-turn trajectories
the tool-call bonus, the tool-error penalty and the environment's reward (docs/AGENTIC.md).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from posttrain.rewards.output import with_completion_tokens
from posttrain.train.rl_samples import RolloutSample
from posttrain.train.rl_settings import ScoringSettings

RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[dict]], Any]


def score_groups(groups: Sequence[Sequence[RolloutSample]], rows: Sequence[Any], reward_fn: RewardFn,
                 settings: ScoringSettings) -> None:
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
        sample.correct = None if out.correct is None else out.correct[index]
        sample.reward = sample.raw_reward
        if sample.trajectory is not None:
            used = bool(sample.trajectory.get("answer_from_tool"))  # the answer is what a call printed (agent/trajectory.py)
            shaping = {"tool_bonus": settings.tool_call_bonus if used else 0.0,
                       "tool_error_penalty": -settings.tool_error_penalty * sample.trajectory["tool_errors"],
                       "env": float(sample.trajectory["env_reward"])}
            for name, value in shaping.items():
                if value:
                    sample.components[name] = value
                    sample.reward += value
        if settings.overlong == "filter" and sample.clipped:
            sample.trained = False
        elif settings.overlong == "penalty":
            penalty = overlong_length_penalty(len(sample.response_ids), settings.length_cap, settings.overlong_buffer,
                                              settings.overlong_penalty)
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
