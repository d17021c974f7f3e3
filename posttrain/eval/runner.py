"""``posttrain eval``: generate through the rollout engine, score, report.

``evaluate(model, tokenizer, tasks, sampling)`` evaluates a model already in memory on a list
of tasks; ``run_eval(config)`` loads the model, builds the tasks from config, calls it and
writes to ``<output_dir>/<run.name>/eval/``:

- ``results.json``: model, config, and per task the metrics below;
- ``samples.jsonl``: one line per completion (task, id, prompt, completion, extracted answer,
  reference, score, correct, finish reason);
- ``config.yaml``: the resolved eval config (the run's own ``config.yaml`` is left alone, so
  evaluating a training run directory keeps its training config).

Metrics per generation task (``eval.generate``, which RL's held-out evaluation runs too):
``accuracy`` (share of completions the reward's correctness check passed; only for rewards
that check correctness), ``mean_score``, ``pass@k`` (unbiased, Chen et al. 2021; k <= n),
``maj@n`` (majority vote over extracted answers, n > 1), ``format_rate`` (when the task has a
format check), ``response_len/mean`` (tokens), ``response_len/clipped_frac`` (hit
max_new_tokens), ``time/generate``, ``time/score``. Perplexity tasks report ``ppl``, ``nll``,
``tokens``.

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

from posttrain.eval.generate import EvalProgress, EvaluatedSample, evaluate_rows
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


def evaluate_task(engine, tokenizer, task: EvalTask, sampling: SamplingParams, pass_k: Sequence[int] = (1,), *,
                  progress: bool = False) -> TaskResult:
    """Generate ``sampling.n`` completions per item of ``task``, score them, compute metrics
    (``eval.generate.evaluate_rows``, the evaluation RL runs too); ``progress`` shows both
    phases (``posttrain.log.Progress``)."""

    params = replace(sampling, max_new_tokens=task.max_new_tokens) if task.max_new_tokens else sampling
    rows = task_rows(task, tokenizer)
    agent = None
    if task.agent is not None:
        from posttrain.agent.build import build_agent

        agent = build_agent(task.agent, tokenizer, max_new_tokens=params.max_new_tokens)
    evaluated = evaluate_rows(engine, rows, task.reward, params, agent=agent, format_reward=task.format_reward,
                              pass_k=pass_k, progress=EvalProgress(progress, f"eval {task.name}: generate",
                                                                   f"eval {task.name}: score"))
    return TaskResult(task.name, evaluated.metrics, [sample_record(task, sample) for sample in evaluated.samples])


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
             progress: bool = False) -> list[TaskResult]:
    """Evaluate a live model on ``tasks`` (generation tasks through ``engine``, default HF);
    ``progress`` shows each phase as it runs."""

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
            results.append(evaluate_task(engine, tokenizer, task, sampling, pass_k, progress=progress))
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
        if t.label:
            task.name = t.label
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
    return tasks


def _device(spec: str) -> str:
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec


def format_table(results: Sequence[TaskResult]) -> str:
    """A plain-text table: one row per task, the headline metrics as columns."""
    columns = ["task", "prompts", "samples", "accuracy", "pass@k", "maj", "format", "ppl", "len", "gen s", "score s"]
    rows = []
    for r in results:
        m = r.metrics
        pass_keys = sorted(k for k in m if k.startswith("pass@"))
        maj_keys = [k for k in m if k.startswith("maj@")]
        fmt = lambda v, spec=".3f": "-" if v is None else format(v, spec)  # noqa: E731
        rows.append(
            [
                r.name,
                str(m.get("num_prompts", m.get("conversations", "-"))),
                str(m.get("num_samples", m.get("tokens", "-"))),
                fmt(m.get("accuracy")),
                " ".join(f"{k}={m[k]:.3f}" for k in pass_keys) or "-",
                " ".join(f"{k}={m[k]:.3f}" for k in maj_keys) or "-",
                fmt(m.get("format_rate")),
                fmt(m.get("ppl"), ".2f"),
                fmt(m.get("response_len/mean"), ".0f"),
                fmt(m.get("time/generate"), ".1f"),
                fmt(m.get("time/score"), ".1f"),
            ]
        )
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    line = lambda cells: "  ".join(cell.ljust(w) for cell, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(row) for row in rows])


def run_eval(config, *, print_table: bool = True) -> list[TaskResult]:
    """Load the model of an ``EvalConfig``, evaluate every task, write results, print a table."""

    tasks = build_tasks(config)  # config and data errors before the model loads
    tokenizer = load_tokenizer(config.model.name, chat_template=config.model.chat_template)
    device = _device(config.device)
    model = load_model(config.model.name, device=device, dtype=inference_dtype(device))
    s = config.sampling
    sampling = SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                              max_new_tokens=s.max_new_tokens, seed=s.seed)
    results = evaluate(model, tokenizer, tasks, sampling, config.pass_k, batch_size=config.batch_size,
                       progress=config.run.progress)

    out_dir = Path(config.run.output_dir) / config.run.name / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(config_to_yaml(config))
    summary = {
        "model": config.model.name,
        "sampling": s.model_dump(),
        "tasks": {r.name: r.metrics for r in results},
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
