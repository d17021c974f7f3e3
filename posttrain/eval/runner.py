"""``posttrain eval``: generate through the rollout engine, score, report.

``evaluate(model, tokenizer, tasks, sampling)`` evaluates a model already in memory on a list
of tasks; ``run_eval(config)`` loads the model, builds the tasks from config, calls it and
writes to ``<output_dir>/<run.name>/eval/``:

- ``results.json``: model, sampling, ``headline_task`` (the task the report's headline
  follows: ``headline_task`` of the config, else the first), per task the metrics below
  (``tasks``), each problem's value of every headline metric with the problems' ids
  (``per_problem``: what pairs two evaluations of the same problems), and with several seeds
  each seed's metrics (``per_seed``);
- ``samples.jsonl``: one line per completion (task, id, prompt, completion, extracted answer,
  reference, score, correct, finish reason; ``seed`` with several seeds);
- ``config.yaml``: the resolved eval config (the run's own ``config.yaml`` is left alone, so
  evaluating a training run directory keeps its training config).

Metrics per generation task (``eval.generate``, which RL's held-out evaluation runs too):
``accuracy`` (share of completions the reward's correctness check passed; only for rewards
that check correctness), ``mean_score``, ``pass@k`` (unbiased, Chen et al. 2021; k <= n),
``maj@n`` (majority vote over extracted answers, n > 1), ``format_rate`` (when the task has a
format check), ``response_len/mean`` (tokens), ``response_len/clipped_frac`` (hit
max_new_tokens), ``time/generate``, ``time/score``. Perplexity tasks report ``ppl``, ``nll``,
``tokens``. ``accuracy``, ``pass@k`` and ``maj@n`` come with their 95% interval over the
problems (``<metric>/ci_low``, ``<metric>/ci_high``; ``eval.metrics``: Wilson's for a single
proportion, else the bootstrap over problems); the table prints them in brackets.

Several seeds (``sampling.seed: [0, 1, 2]``, temperature > 0): every task is evaluated once per
seed; a metric is the mean over seeds, ``<metric>/seed_std`` its spread (sample standard
deviation over seeds), the interval is over problems of each problem's value averaged over the
seeds, and the table is followed by each seed's figure.

With ``progress`` (``run.progress`` of ``posttrain eval``), generation and scoring of each task
are progress phases (``posttrain.log.Progress``): a live bar on a terminal, plain lines on
stderr at intervals otherwise, counting completions as the engine finishes them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from posttrain.eval.generate import EvalProgress, EvaluatedSample, RowsEvaluation, evaluate_rows, interval_metrics
from posttrain.eval.metrics import mean_and_spread
from posttrain.eval.prompts import PromptRow, reward_prompt
from posttrain.log import Progress, say
from posttrain.eval.tasks import EvalTask
from posttrain.rollout.base import SamplingParams
from posttrain.config import config_to_yaml
from posttrain.data.render import render_prompt
from posttrain.errors import ConfigError
from posttrain.eval.perplexity import perplexity
from posttrain.eval.tasks import load_humaneval, load_jsonl, load_reasoning_gym
from posttrain.models import inference_dtype, load_model, load_tokenizer
from posttrain.rewards.registry import build_reward
from posttrain.rollout.hf import HFEngine


@dataclass
class PerplexityTask:
    name: str
    path: str
    limit: int | None = None
    seed: int | None = None
    kind: str = "perplexity"


@dataclass
class TaskResult:
    name: str
    metrics: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)
    problems: dict[str, list[Any]] = field(default_factory=dict)  # "ids" and per metric each problem's value
    per_seed: dict[str, dict[str, float]] = field(default_factory=dict)  # several seeds: seed -> its metrics


# The figures a seed's spread is reported for (pass@k and maj@n by prefix).
SEED_FIGURES = ("accuracy", "mean_score", "format_rate")


def evaluate_task(engine, tokenizer, task: EvalTask, sampling: SamplingParams, pass_k: Sequence[int] = (1,), *,
                  progress: bool = False, seeds: Sequence[int | None] | None = None) -> TaskResult:
    """Generate ``sampling.n`` completions per item of ``task``, score them, compute metrics
    (``eval.generate.evaluate_rows``, the evaluation RL runs too), once per seed of ``seeds``
    (default: ``sampling.seed``; several: ``combine_seeds``); ``progress`` shows both phases
    (``posttrain.log.Progress``)."""

    params = replace(sampling, max_new_tokens=task.max_new_tokens) if task.max_new_tokens else sampling
    seeds = list(seeds) if seeds else [params.seed]
    rows = task_rows(task, tokenizer)
    agent = None
    if task.agent is not None:
        from posttrain.agent.build import build_agent

        agent = build_agent(task.agent, tokenizer, max_new_tokens=params.max_new_tokens)
    runs, records = [], []
    for index, seed in enumerate(seeds):
        shown = f" (seed {seed})" if len(seeds) > 1 else ""
        evaluated = evaluate_rows(engine, rows, task.reward, replace(params, seed=seed), agent=agent,
                                  format_reward=task.format_reward, pass_k=pass_k,
                                  progress=EvalProgress(progress, f"eval {task.name}{shown}: generate",
                                                        f"eval {task.name}{shown}: score"))
        runs.append(evaluated)
        for sample in evaluated.samples:  # numbered over seeds: sample 0 is each problem's first completion
            record = sample_record(task, replace(sample, sample=index * params.n + sample.sample))
            records.append(record if len(seeds) == 1 else {**record, "seed": seed})
    ids = [item.item_id for item in task.items]
    if len(runs) == 1:
        return TaskResult(task.name, runs[0].metrics, records, {"ids": ids, **runs[0].scores})
    metrics, scores = combine_seeds(runs)
    return TaskResult(task.name, metrics, records, {"ids": ids, **scores},
                      {str(seed): run.metrics for seed, run in zip(seeds, runs)})


def combine_seeds(runs: Sequence[RowsEvaluation]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """One task evaluated once per seed -> (metrics, per-problem scores) over all of them.

    Every metric is its mean over seeds (counts and times: their sum); ``<figure>/seed_std`` is
    the spread over seeds of accuracy, pass@k, maj@n, mean_score and format_rate; a problem's
    score is its mean over seeds, and the 95% intervals are over problems of those.

    >>> one = RowsEvaluation({"num_prompts": 2, "num_samples": 2, "accuracy": 0.5}, [], {"accuracy": [1.0, 0.0]})
    >>> two = RowsEvaluation({"num_prompts": 2, "num_samples": 2, "accuracy": 1.0}, [], {"accuracy": [1.0, 1.0]})
    >>> metrics, scores = combine_seeds([one, two])
    >>> metrics["accuracy"], metrics["num_samples"], round(metrics["accuracy/seed_std"], 4), scores
    (0.75, 4, 0.3536, {'accuracy': [1.0, 0.5]})
    """
    per_seed = [run.metrics for run in runs]
    summed = ("num_samples", "time/generate", "time/score")
    metrics: dict[str, float] = {}
    for key in per_seed[0]:
        if key.endswith(("/ci_low", "/ci_high")) or not all(key in m for m in per_seed):
            continue
        values = [m[key] for m in per_seed]
        if key in summed:
            metrics[key] = sum(values)
            continue
        metrics[key], spread = mean_and_spread(values)
        if key in SEED_FIGURES or key.startswith(("pass@", "maj@")):
            metrics[f"{key}/seed_std"] = spread
    metrics["seeds"] = len(runs)
    scores = {name: [sum(run.scores[name][i] for run in runs) / len(runs) for i in range(len(values))]
              for name, values in runs[0].scores.items() if all(name in run.scores for run in runs)}
    metrics.update(interval_metrics(scores))
    return metrics, scores


def task_rows(task: EvalTask, tokenizer) -> list[PromptRow]:
    """The task's items as prompt rows: rendered through the chat template, named
    ``<task>/<item id>`` in errors."""
    rows = []
    for line, item in enumerate(task.items, start=1):
        where = f"{task.name}/{item.item_id}"
        rows.append(PromptRow(render_prompt(item.prompt, tokenizer, where=where), reward_prompt(item.prompt),
                              item.metadata, line, where))
    return rows


def sample_record(task: EvalTask, sample: EvaluatedSample) -> dict[str, Any]:
    """One line of ``samples.jsonl``."""
    item = task.items[sample.row]
    return {
        "task": task.name,
        "id": item.item_id,
        "sample": sample.sample,
        "prompt": item.prompt,
        "completion": sample.completion.text,
        "extracted": sample.details.get("extracted"),
        "reference": sample.details.get("reference"),
        "score": sample.score,
        "correct": sample.correct,
        "format_ok": sample.format_ok,
        "finish_reason": sample.completion.finish_reason,
        "details": {k: v for k, v in sample.details.items() if k not in ("extracted", "reference")},
        **({} if sample.trajectory is None else {"trajectory": sample.trajectory}),
    }


def evaluate(model, tokenizer, tasks: Sequence[EvalTask | PerplexityTask], sampling: SamplingParams,
             pass_k: Sequence[int] = (1,), *, engine=None, batch_size: int = 16,
             progress: bool = False, seeds: Sequence[int | None] | None = None) -> list[TaskResult]:
    """Evaluate a live model on ``tasks`` (generation tasks through ``engine``, default HF, once
    per seed of ``seeds``, default ``sampling.seed``); ``progress`` shows each phase as it runs."""

    engine = engine or HFEngine(model, tokenizer, batch_size=batch_size)
    results = []
    for task in tasks:
        if isinstance(task, PerplexityTask):
            start = time.perf_counter()
            with Progress(None, f"eval {task.name}: perplexity", enabled=progress, keys=()):
                metrics = perplexity(model, tokenizer, task.path, limit=task.limit, seed=task.seed)
            metrics["time/score"] = time.perf_counter() - start
            results.append(TaskResult(task.name, metrics))
        else:
            results.append(evaluate_task(engine, tokenizer, task, sampling, pass_k, progress=progress, seeds=seeds))
    return results


def build_tasks(config) -> list[EvalTask | PerplexityTask]:
    """Instantiate the tasks of an ``EvalConfig``."""

    tasks: list[EvalTask | PerplexityTask] = []
    for i, t in enumerate(config.tasks):
        limit = t.limit if t.limit is not None else config.limit
        seed = t.seed if t.seed is not None else config.seed
        if t.name == "humaneval":
            task = load_humaneval(limit, seed, wall_seconds=config.code_timeout, max_workers=config.sandbox_workers,
                                  unsafe_process_isolation=config.unsafe_process_isolation)
        elif t.name == "reasoning_gym":
            task = load_reasoning_gym(t.dataset, limit, seed, params=t.params, system_prompt=t.system_prompt)
        elif t.name == "jsonl":
            task = load_jsonl(t.path, limit, seed, reward=t.reward, name=t.label)
        else:
            tasks.append(PerplexityTask(t.label or f"ppl/{Path(t.path).name}", t.path, limit, seed))
            continue
        task.name = task_label(t)
        if t.format is not None:
            task.format_reward = build_reward({"name": "format", **t.format}, key=f"tasks.{i}.format")
        task.max_new_tokens = t.max_new_tokens
        if t.agent is not None and t.agent.enabled:
            task.agent = t.agent
        tasks.append(task)
    names = [task.name for task in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:

        raise ConfigError(f"tasks: two tasks are named {duplicates[0]!r}; give one a 'label'")
    check_headline_task(config)
    return tasks


def task_label(task) -> str:
    """The name a task config's results go by: its ``label``, else ``humaneval``,
    ``rg/<dataset>``, ``jsonl/<file name>`` or ``ppl/<file name>``."""
    if task.label:
        return task.label
    if task.name == "humaneval":
        return "humaneval"
    if task.name == "reasoning_gym":
        return f"rg/{task.dataset}"
    prefix = "ppl" if task.name == "perplexity" else task.name
    return f"{prefix}/{Path(task.path).name}"


def check_headline_task(config) -> str:
    """The task the report's headline follows (``headline_task``, default the first task);
    a name that is no task's is a one-line ConfigError listing the names."""
    names = [task_label(task) for task in config.tasks]
    if config.headline_task is None:
        return names[0]
    if config.headline_task not in names:
        raise ConfigError(f"headline_task: {config.headline_task!r} is not a task of this config "
                          f"(tasks: {', '.join(names)})")
    return config.headline_task


def _device(spec: str) -> str:
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec


def figure(metrics: dict[str, float], key: str) -> str:
    """One figure with its spread over seeds and its 95% interval, as the table prints it.

    >>> figure({"accuracy": 0.13, "accuracy/ci_low": 0.0776, "accuracy/ci_high": 0.2098}, "accuracy")
    '0.130 [0.078, 0.210]'
    >>> figure({"accuracy": 0.42, "accuracy/seed_std": 0.02}, "accuracy"), figure({}, "accuracy")
    ('0.420±0.020', '-')
    """
    value = metrics.get(key)
    if value is None:
        return "-"
    text = f"{value:.3f}"
    if f"{key}/seed_std" in metrics:
        text += f"±{metrics[f'{key}/seed_std']:.3f}"
    if f"{key}/ci_low" in metrics and f"{key}/ci_high" in metrics:
        text += f" [{metrics[f'{key}/ci_low']:.3f}, {metrics[f'{key}/ci_high']:.3f}]"
    return text


def _is_figure(key: str, prefix: str) -> bool:
    return key.startswith(prefix) and "/" not in key


def wrong_copy_cell(metrics: dict[str, float]) -> str:
    """``rate of count`` for the table's ``wrong copy`` column, ``-`` without an agent.

    >>> wrong_copy_cell({"agent/wrong_copy_rate": 0.25, "agent/tool_printed_right_rate": 0.4, "num_samples": 10})
    '0.250 of 4'
    """
    if "agent/wrong_copy_rate" not in metrics:
        return "-"
    count = round(metrics.get("agent/tool_printed_right_rate", 0.0) * metrics.get("num_samples", 0))
    return f"{metrics['agent/wrong_copy_rate']:.3f} of {count}"


def format_table(results: Sequence[TaskResult]) -> str:
    """A plain-text table: one row per task, the headline metrics as columns, each with its
    95% interval over the n prompts in brackets (and ± its spread over seeds); several seeds
    add one line per task with each seed's figure. With an agentic task, a ``wrong copy``
    column: ``agent/wrong_copy_rate`` and the number of samples it is over (those whose last
    tool output printed the answer)."""
    columns = ["task", "n", "samples", "accuracy [95% CI]", "pass@k [95% CI]", "maj [95% CI]", "format", "ppl", "len",
               "gen s", "score s"]
    agentic = any("agent/wrong_copy_rate" in r.metrics for r in results)
    if agentic:
        columns.insert(columns.index("len"), "wrong copy")
    rows = []
    for r in results:
        m = r.metrics
        pass_keys = sorted(k for k in m if _is_figure(k, "pass@"))
        maj_keys = [k for k in m if _is_figure(k, "maj@")]
        fmt = lambda v, spec=".3f": "-" if v is None else format(v, spec)  # noqa: E731
        rows.append(
            [
                r.name,
                str(m.get("num_prompts", m.get("conversations", "-"))),
                str(m.get("num_samples", m.get("tokens", "-"))),
                figure(m, "accuracy"),
                " ".join(f"{k}={figure(m, k)}" for k in pass_keys) or "-",
                " ".join(f"{k}={figure(m, k)}" for k in maj_keys) or "-",
                fmt(m.get("format_rate")),
                fmt(m.get("ppl"), ".2f"),
                *([wrong_copy_cell(m)] if agentic else []),
                fmt(m.get("response_len/mean"), ".0f"),
                fmt(m.get("time/generate"), ".1f"),
                fmt(m.get("time/score"), ".1f"),
            ]
        )
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    line = lambda cells: "  ".join(cell.ljust(w) for cell, w in zip(cells, widths)).rstrip()  # noqa: E731
    notes = []
    if any(k.endswith("/ci_low") for r in results for k in r.metrics):
        notes.append("[a, b]: 95% interval over the n prompts (Wilson for a proportion, else a bootstrap over prompts)"
                     + ("; ±: spread over seeds" if any(r.per_seed for r in results) else ""))
    for r in results:
        if r.per_seed:
            key = "accuracy" if "accuracy" in r.metrics else "mean_score"
            each = ", ".join(f"seed {seed}: {m[key]:.3f}" for seed, m in r.per_seed.items() if key in m)
            mean, spread = r.metrics.get(key), r.metrics.get(f"{key}/seed_std")
            if mean is not None and spread is not None:
                notes.append(f"{r.name} {key} per seed: {each} (mean {mean:.3f}, spread {spread:.3f})")
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(row) for row in rows] + notes)


def run_eval(config, *, print_table: bool = True) -> list[TaskResult]:
    """Load the model of an ``EvalConfig``, evaluate every task, write results, print a table."""

    tasks = build_tasks(config)  # config and data errors before the model loads
    tokenizer = load_tokenizer(config.model.name, chat_template=config.model.chat_template)
    device = _device(config.device)
    model = load_model(config.model.name, device=device, dtype=inference_dtype(device))
    s = config.sampling
    sampling = SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                              max_new_tokens=s.max_new_tokens, seed=s.seeds[0])
    results = evaluate(model, tokenizer, tasks, sampling, config.pass_k, batch_size=config.batch_size,
                       progress=config.run.progress, seeds=s.seeds)

    out_dir = Path(config.run.output_dir) / config.run.name / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(config_to_yaml(config))
    summary = {
        "model": config.model.name,
        "sampling": s.model_dump(),
        "headline_task": check_headline_task(config),
        "tasks": {r.name: r.metrics for r in results},
        "per_problem": {r.name: r.problems for r in results if r.problems},
        **({"per_seed": {r.name: r.per_seed for r in results if r.per_seed}} if any(r.per_seed for r in results) else {}),
    }
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    with open(out_dir / "samples.jsonl", "w", encoding="utf-8") as f:
        for r in results:
            for sample in r.samples:
                f.write(json.dumps(sample, default=str, ensure_ascii=False) + "\n")
    if print_table:
        say(format_table(results), stdout=True)
        say(f"results: {out_dir / 'results.json'}  samples: {out_dir / 'samples.jsonl'}", stdout=True)
    return results
