"""Held-out evaluation of generation: sample completions for prompt rows, score them with a
reward, report metrics. ``posttrain eval`` (``eval.runner.evaluate_task``) and RL's in-loop
evaluation (``train.rl.run_eval``) both call ``evaluate_rows``, so a completion is scored and
judged correct the same way in both.

Metrics (``posttrain eval``'s names; ``trainer_metrics`` gives RL's, docs/METRICS.md):

- ``num_prompts``, ``num_samples``;
- ``accuracy``: the share of completions whose correctness check passed
  (``RewardOutput.correct``: ``math``'s verdict, ``code`` with every test passed, a user reward
  declared ``correctness: true`` at a score of 1.0); absent when the reward checks no
  correctness (``format``, ``length``, a reward model);
- ``mean_score``: the mean reward;
- ``pass@k`` (unbiased, Chen et al. 2021; k <= n) and ``maj@n`` (majority vote over extracted
  answers, n > 1), both only with a correctness check;
- ``<metric>/ci_low``, ``<metric>/ci_high`` for ``accuracy``, ``pass@k`` and ``maj@n``: the 95%
  interval over problems (``eval.metrics.problem_interval``: Wilson when every problem scores 0 or
  1, else the bootstrap over problems); ``RowsEvaluation.scores`` keeps each problem's value, so
  two evaluations of the same problems can be compared pairwise (``eval.metrics.paired_difference``);
- ``format_rate`` (with a format reward beside the task's reward);
- ``response_len/mean`` (tokens), ``response_len/clipped_frac`` (hit max_new_tokens);
- ``<name>/unverified``: samples a reward could not check within its bounds;
- ``agent/*`` with an agent: tool calls, errors, turns, and how faithfully the final answer
  copies a tool output that printed the row's ``answer`` (``agent/tool_printed_right_rate``,
  ``agent/wrong_copy_rate``; ``agent.trajectory.trajectory_metrics``);
- ``time/generate``, ``time/score``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from posttrain.agent.trajectory import trajectory_metrics, trajectory_record
from posttrain.eval.metrics import majority_vote_correct, mean_pass_at_k, pass_at_k, problem_interval
from posttrain.eval.prompts import PromptRow, agent_prompts
from posttrain.log import Progress
from posttrain.rewards.output import RewardFn, correct_share, unverified_counts, with_completion_tokens
from posttrain.rollout.base import Completion, SamplingParams


@dataclass(frozen=True)
class EvalProgress:
    """How ``evaluate_rows`` shows its phases (``posttrain.log.Progress``): the generation
    phase's label, the scoring phase's (None: not shown), and whether to show them at all."""

    enabled: bool = False
    generate: str = "eval: generate"
    score: str | None = "eval: score"


@dataclass
class EvaluatedSample:
    """One scored completion: of ``rows[row]``, its ``sample``-th (of ``n``)."""

    row: int
    sample: int
    completion: Completion
    score: float
    correct: bool | None  # the reward's correctness check passed; None: the reward checks none
    details: dict[str, Any] = field(default_factory=dict)  # the reward's per-sample facts (extracted answer, ...)
    format_ok: bool | None = None  # the format reward scored 1.0; None: no format reward
    trajectory: dict | None = None  # multi-turn: the segments and tool counts (agent.trajectory.trajectory_record)


@dataclass
class RowsEvaluation:
    """``evaluate_rows``' result: the metrics (module docstring), every sample, grouped by
    row in row order, and per metric each row's value (``problem_scores``)."""

    metrics: dict[str, float]
    samples: list[EvaluatedSample]
    scores: dict[str, list[float]] = field(default_factory=dict)


def evaluate_rows(engine: Any, rows: Sequence[PromptRow], reward: RewardFn, params: SamplingParams, *,
                  agent: Any = None, format_reward: RewardFn | None = None, pass_k: Sequence[int] = (),
                  progress: EvalProgress = EvalProgress()) -> RowsEvaluation:
    """Generate ``params.n`` completions per row (with ``agent``, an ``agent.build.Agent``: a
    multi-turn trajectory each, whose text is the answer after the last tool output), score
    them with ``reward`` (and ``format_reward``), and compute the metrics.

    The reward gets each row's ``text`` as the prompt and its metadata with
    ``completion_tokens``: the tokens the model sampled (a trajectory's tool output excluded).
    """
    started = time.perf_counter()
    total = len(rows) * params.n if agent is None else None  # agent turns: not known in advance
    with Progress(total, progress.generate, enabled=progress.enabled, keys=(), generation=True,
                  unit="completions" if total is not None else "generations"):
        if agent is None:
            completions = sorted(engine.generate([row.prompt_ids for row in rows], params),
                                 key=lambda c: c.prompt_index)  # stable: keeps each row's sample order
            trajectories = None
            sampled = [len(c.token_ids) for c in completions]
        else:
            runs = sorted(agent.run(engine, agent_prompts(agent, rows, range(len(rows))), params),
                          key=lambda t: t.prompt_index)
            completions = [t.as_completion() for t in runs]
            trajectories = [trajectory_record(t, agent.tokenizer) for t in runs]
            sampled = [sum(t.response_mask) for t in runs]
    seconds_generate = time.perf_counter() - started

    scored_rows = [rows[c.prompt_index] for c in completions]
    prompts = [row.text for row in scored_rows]
    texts = [c.text for c in completions]
    metadata = with_completion_tokens([row.metadata for row in scored_rows], sampled)
    started = time.perf_counter()
    label = None if progress.score is None else f"{progress.score} {len(texts)} completions"
    with Progress(None, label or "", enabled=progress.enabled and label is not None, keys=()):
        scored = reward(prompts, texts, metadata)
        formatted = format_reward(prompts, texts, metadata) if format_reward is not None else None
    seconds_score = time.perf_counter() - started

    samples, seen = [], [0] * len(rows)
    for index, completion in enumerate(completions):
        row = completion.prompt_index
        samples.append(EvaluatedSample(
            row=row, sample=seen[row], completion=completion, score=float(scored.scores[index]),
            correct=None if scored.correct is None else scored.correct[index],
            details=dict(scored.details[index]) if scored.details is not None else {},
            format_ok=None if formatted is None else formatted.scores[index] >= 1.0,
            trajectory=None if trajectories is None else trajectories[index]))
        seen[row] += 1
    metrics = sample_metrics(samples, len(rows), params.n, pass_k)
    metrics["time/generate"] = seconds_generate
    metrics["time/score"] = seconds_score
    metrics.update(unverified_counts(scored.components))  # samples a reward could not check within its bounds
    if trajectories is not None:  # the reference answer: the row's ``answer`` (the RL and eval row contract)
        metrics.update(trajectory_metrics(trajectories, prefix="agent", answers=[m.get("answer") for m in metadata]))
    return RowsEvaluation(metrics, samples, problem_scores(samples, params.n, pass_k))


def problem_scores(samples: Sequence[EvaluatedSample], n: int, pass_k: Sequence[int] = ()) -> dict[str, list[float]]:
    """Per problem (rows in order) the value each headline metric averages: ``accuracy`` (the
    share of its checked completions that are correct; 0 when none was checked), ``pass@k`` (k <= n) and ``maj@n``
    (n > 1, extracted answers: 1.0 when the voted answer is correct); {} when the reward checks
    no correctness.

    >>> done = lambda row, ok: EvaluatedSample(row, 0, Completion(row, [1], "x", "stop"), float(ok), ok)
    >>> problem_scores([done(0, True), done(0, False), done(1, False), done(1, False)], n=2, pass_k=(1, 2))
    {'accuracy': [0.5, 0.0], 'pass@1': [0.5, 0.0], 'pass@2': [1.0, 0.0]}
    """
    per_row: dict[int, list[EvaluatedSample]] = {}
    for sample in samples:
        per_row.setdefault(sample.row, []).append(sample)
    groups = [per_row[row] for row in sorted(per_row)]
    checked = [[s for s in group if s.correct is not None] for group in groups]
    if not any(checked):
        return {}
    scores = {"accuracy": [sum(bool(s.correct) for s in group) / len(group) if group else 0.0 for group in checked]}
    for k in pass_k:
        if k <= n:
            scores[f"pass@{k}"] = [pass_at_k(n, sum(bool(s.correct) for s in group), k) for group in groups]
    if n > 1 and any("extracted" in s.details for s in samples):
        scores[f"maj@{n}"] = [float(majority_vote_correct([s.details.get("extracted") for s in group],
                                                          [bool(s.correct) for s in group])) for group in groups]
    return scores


def interval_metrics(scores: dict[str, list[float]]) -> dict[str, float]:
    """``<metric>/ci_low`` and ``<metric>/ci_high``: the 95% interval over problems of each
    metric of ``problem_scores`` (``eval.metrics.problem_interval``).

    >>> {k: round(v, 4) for k, v in interval_metrics({"accuracy": [1.0] * 13 + [0.0] * 87}).items()}
    {'accuracy/ci_low': 0.0776, 'accuracy/ci_high': 0.2098}
    """
    metrics: dict[str, float] = {}
    for name, values in scores.items():
        metrics[f"{name}/ci_low"], metrics[f"{name}/ci_high"] = problem_interval(values)
    return metrics


def sample_metrics(samples: Sequence[EvaluatedSample], prompts: int, n: int,
                   pass_k: Sequence[int] = ()) -> dict[str, float]:
    """Counts, ``accuracy`` (only when the reward checks correctness), ``mean_score``,
    ``pass@k``, ``maj@n``, each with its 95% interval over problems (``interval_metrics``),
    ``format_rate`` (when a format reward judged the samples) and response lengths over
    ``samples`` (``n`` per prompt)."""
    count = max(1, len(samples))
    metrics: dict[str, float] = {"num_prompts": prompts, "num_samples": len(samples)}
    accuracy = correct_share([s.correct for s in samples])
    if accuracy is not None:
        metrics["accuracy"] = accuracy
    metrics["mean_score"] = sum(s.score for s in samples) / count
    if accuracy is not None:
        per_row: dict[int, list[EvaluatedSample]] = {}
        for sample in samples:
            per_row.setdefault(sample.row, []).append(sample)
        for k in pass_k:
            if k <= n:
                metrics[f"pass@{k}"] = mean_pass_at_k([sum(bool(s.correct) for s in group) for group in per_row.values()],
                                                      n, k)
        if n > 1 and any("extracted" in s.details for s in samples):
            votes = [majority_vote_correct([s.details.get("extracted") for s in group], [bool(s.correct) for s in group])
                     for group in per_row.values()]
            metrics[f"maj@{n}"] = sum(votes) / len(votes)
        metrics.update(interval_metrics(problem_scores(samples, n, pass_k)))
    if any(s.format_ok is not None for s in samples):
        metrics["format_rate"] = sum(bool(s.format_ok) for s in samples) / count
    metrics["response_len/mean"] = sum(len(s.completion.token_ids) for s in samples) / count
    metrics["response_len/clipped_frac"] = sum(s.completion.finish_reason == "length" for s in samples) / count
    return metrics


TRAINER_NAMES = {
    "mean_score": "eval/reward",
    "response_len/mean": "eval/response_len",
    "response_len/clipped_frac": "eval/clipped_frac",
    "num_prompts": "eval/count",
    "accuracy": "eval/acc",
    "accuracy/ci_low": "eval/acc/ci_low",
    "accuracy/ci_high": "eval/acc/ci_high",
}


def trainer_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """``evaluate_rows``' metrics under the names a trainer logs (docs/METRICS.md, RL):
    ``eval/reward``, ``eval/acc``, ``eval/response_len``, ``eval/clipped_frac``, ``eval/count``,
    ``eval/<name>/unverified`` and ``eval/agent/*``; the rest (pass@k, times) stays in
    ``posttrain eval``'s results. ``eval/acc/ci_low``, ``eval/acc/ci_high``: its 95% interval.

    >>> trainer_metrics({"num_prompts": 2, "accuracy": 0.5, "mean_score": 0.6, "time/score": 0.1, "agent/turns": 2.0})
    {'eval/reward': 0.6, 'eval/count': 2, 'eval/acc': 0.5, 'eval/agent/turns': 2.0}
    """
    named = {TRAINER_NAMES[name]: metrics[name] for name in TRAINER_NAMES if name in metrics}
    return named | {f"eval/{name}": value for name, value in metrics.items()
                    if name.endswith("/unverified") or name.startswith("agent/")}


def trainer_records(rows: Sequence[PromptRow], samples: Sequence[EvaluatedSample]) -> list[dict[str, Any]]:
    """One record per sample for a trainer's ``eval/step_<N>.json``: prompt text, completion,
    reward, the row's scalar metadata, and the trajectory of a multi-turn sample."""
    records = []
    for sample in samples:
        row = rows[sample.row]
        record = {"prompt": row.text, "completion": sample.completion.text, "reward": sample.score,
                  **{k: v for k, v in row.metadata.items() if isinstance(v, (str, int, float))}}
        if sample.trajectory is not None:
            record["trajectory"] = sample.trajectory
        records.append(record)
    return records
