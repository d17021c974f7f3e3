"""The run report: one standalone HTML page (plots inlined as PNG) and a terminal summary.

``posttrain report RUN_DIR`` (and the end of every pipeline run) reads what the trainers
left in a run directory (docs/ARCHITECTURE.md, "Run directory") and shows it the way a
post-training run should be judged (docs/PIPELINE.md: evaluate after every phase;
docs/PREFLIGHT.md on what to log: loss, lr, grad norm, tokens): loss and learning rate per step,
gradient norm, reward and accuracy per RL step, KL and entropy, response length, held-out
accuracy per stage as bars, and sample completions before and after training.

Every held-out score carries its n and 95% interval (``posttrain eval`` writes them:
``<metric>/ci_low``, ``<metric>/ci_high``), and every change between two evaluations of a task
its paired 95% interval over the same problems (``eval.metrics.paired_difference`` on
``results.json``'s ``per_problem`` scores) and whether that interval excludes 0. The headline
follows one task: ``eval.headline_task`` of the pipeline (``pipeline.json``) or of the
evaluation (``results.json``), else the first task evaluated.

A run directory is either a single trainer's run (``metrics.jsonl`` at its top) or a
pipeline run whose stages are sub-directories, each a run directory of its own. Held-out
evaluations are ``eval/*.json`` files (with optional per-sample ``*.jsonl`` beside them)
anywhere in the tree. Every plot is optional: a metric that is absent is simply not drawn,
so the same code reports an SFT-only run, an RL-only run and a whole pipeline.

The page has no external assets (no scripts, no fonts, no CDN): it opens offline, can be
mailed, and is stable to archive.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from posttrain.errors import ConfigError
from posttrain.eval.metrics import PairedDifference, paired_difference

# Stage directories of a pipeline run, in the order they run (others follow, by name).
STAGE_ORDER = ("baseline", "sft", "dpo", "rm", "rl", "final")
# Keys an eval JSON may use for its headline score, most specific first.
SCORE_KEYS = ("accuracy", "acc", "pass@1", "score", "mean_score", "reward/mean")
PIPELINE_STATE_FILE = "pipeline.json"


# ----------------------------------------------------------------------------- reading
@dataclass
class StageRun:
    """One trainer's run directory inside the report (a pipeline stage, or the run itself)."""

    name: str
    path: Path
    metrics: list[dict[str, Any]] = field(default_factory=list)

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of one metric: the records that carry a finite number for ``key``."""
        steps, values = [], []
        for index, record in enumerate(self.metrics):
            value = as_number(record.get(key))
            if value is None or not math.isfinite(value):
                continue
            step = as_number(record.get("step"))
            steps.append(step if step is not None else float(index))
            values.append(value)
        return steps, values

    def keys(self) -> set[str]:
        return {key for record in self.metrics for key, value in record.items() if as_number(value) is not None}

    def last(self, key: str) -> float | None:
        _, values = self.series(key)
        return values[-1] if values else None

    def first(self, key: str) -> float | None:
        _, values = self.series(key)
        return values[0] if values else None


@dataclass
class EvalResult:
    """One held-out evaluation of one task: which model (stage label), its headline score, its samples."""

    label: str
    task: str
    path: Path
    metrics: dict[str, Any]
    score_key: str | None
    score: float | None
    samples: list[dict[str, Any]] = field(default_factory=list)
    problems: dict[str, list[Any]] = field(default_factory=dict)  # results.json's per_problem: ids, scores
    headline_task: str | None = None  # the task the evaluation names as its headline


@dataclass
class RunReport:
    run_dir: Path
    stages: list[StageRun]
    evals: list[EvalResult]
    rl_samples: list[dict[str, Any]]
    pipeline: list[dict[str, Any]] = field(default_factory=list)  # pipeline.json's stages (status, wall_s)
    headline_task: str | None = None  # pipeline.json's eval.headline_task


def as_number(value: Any) -> float | None:
    """A metric value as float: numbers and the strings "nan"/"inf" that metrics.jsonl uses; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in {"nan", "inf", "-inf", "+inf"}:
        return float(value)
    return None


def read_jsonl(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Records of a JSONL file; torn or non-object lines (a crash mid-write) are skipped."""
    records: list[dict[str, Any]] = []
    if not path.is_file():
        return records
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
                if limit is not None and len(records) >= limit:
                    break
    return records


def _stage_sort_key(path: Path, declared: list[str]) -> tuple[int, int, str]:
    name = path.name
    if name in declared:
        return (0, declared.index(name), name)
    for rank, prefix in enumerate(STAGE_ORDER):
        if name == prefix or name.startswith(prefix + "_") or name.startswith(prefix + "-"):
            return (1, rank, name)
    return (2, 0, name)


def _declared_stage_order(run_dir: Path) -> list[str]:
    state_file = run_dir / PIPELINE_STATE_FILE
    if not state_file.is_file():
        return []
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, OSError):
        return []
    stages = state.get("stages", []) if isinstance(state, dict) else []
    return [str(stage.get("name")) for stage in stages if isinstance(stage, dict) and stage.get("name")]


def find_stage_runs(run_dir: Path) -> list[StageRun]:
    """The trainer runs in ``run_dir``: itself if it has metrics.jsonl, else its sub-directories that do."""
    if (run_dir / "metrics.jsonl").is_file():
        return [StageRun(run_dir.name, run_dir, read_jsonl(run_dir / "metrics.jsonl"))]
    declared = _declared_stage_order(run_dir)
    children = [child for child in run_dir.iterdir() if child.is_dir() and (child / "metrics.jsonl").is_file()]
    children.sort(key=lambda child: _stage_sort_key(child, declared))
    return [StageRun(child.name, child, read_jsonl(child / "metrics.jsonl")) for child in children]


def headline_score(data: dict[str, Any]) -> tuple[str | None, float | None]:
    """The score an eval JSON reports first: a top-level or ``metrics`` key among SCORE_KEYS.

    >>> headline_score({"task": "add", "metrics": {"accuracy": 0.25, "format": 0.9}})
    ('accuracy', 0.25)
    >>> headline_score({"pass@1": 0.5})
    ('pass@1', 0.5)
    >>> headline_score({"note": "nothing numeric"})
    (None, None)
    """
    scopes = [data]
    for nested in ("metrics", "results", "summary"):
        if isinstance(data.get(nested), dict):
            scopes.append(data[nested])
    for key in SCORE_KEYS:
        for scope in scopes:
            value = as_number(scope.get(key))
            if value is not None:
                return key, value
    return None, None


def _samples_file_for(json_path: Path) -> Path | None:
    for candidate in (
        json_path.with_name("samples.jsonl") if json_path.stem == "results" else None,
        json_path.with_suffix(".jsonl"),
        json_path.with_name(json_path.stem + ".samples.jsonl"),
        json_path.with_name(json_path.stem + "_samples.jsonl"),
    ):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def _eval_label(run_dir: Path, json_path: Path, data: dict[str, Any]) -> str:
    """Which model an eval file describes: its ``label``, else the directory owning ``eval/``
    (a pipeline stage: baseline, sft, rl), else the file's name."""
    for key in ("label", "stage"):
        if isinstance(data.get(key), str) and data[key]:
            return data[key]
    owner = json_path.parent.parent  # <owner>/eval/<file>.json
    if json_path.stem == "results":
        return owner.name if owner != run_dir else (run_dir.name)
    if owner != run_dir:
        return f"{owner.name}/{json_path.stem}"
    return json_path.stem


def _task_metrics(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(task name, metrics) pairs of an eval JSON: ``posttrain eval``'s ``{"tasks": {name: metrics}}``,
    or a flat file whose metrics sit at the top or under ``metrics``."""
    tasks = data.get("tasks")
    if isinstance(tasks, dict) and tasks and all(isinstance(v, dict) for v in tasks.values()):
        return list(tasks.items())
    name = str(data.get("task", "")) if not isinstance(data.get("task"), dict) else ""
    return [(name, data)]


def find_evals(run_dir: Path, sample_limit: int = 2000) -> list[EvalResult]:
    """Every ``eval/*.json`` under ``run_dir`` (its own and its stages'), one result per task, in stage order."""
    declared = _declared_stage_order(run_dir)
    results: list[EvalResult] = []
    eval_dirs = [run_dir / "eval"] + [child / "eval" for child in sorted(run_dir.iterdir()) if child.is_dir()]
    for eval_dir in eval_dirs:
        if not eval_dir.is_dir():
            continue
        for json_path in sorted(eval_dir.glob("*.json")):
            try:
                data = json.loads(json_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, OSError):
                continue
            if not isinstance(data, dict):
                continue
            label = _eval_label(run_dir, json_path, data)
            samples_path = _samples_file_for(json_path)
            samples = read_jsonl(samples_path, limit=sample_limit) if samples_path else []
            tasks = _task_metrics(data)
            per_problem = data.get("per_problem") if isinstance(data.get("per_problem"), dict) else {}
            named = data.get("headline_task") if isinstance(data.get("headline_task"), str) else None
            for task, metrics in tasks:
                key, score = headline_score(metrics)
                own = [s for s in samples if len(tasks) == 1 or s.get("task") == task]
                problems = per_problem.get(task) if isinstance(per_problem.get(task), dict) else {}
                results.append(EvalResult(label, task, json_path, metrics, key, score, own, problems, named))

    def order(result: EvalResult) -> tuple[int, int, str]:
        return _stage_sort_key(Path(result.label.split("/")[0]), declared)

    results.sort(key=order)  # stable: tasks keep their file order within a stage
    return results


def load_report(run_dir: str | Path) -> RunReport:
    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist")
    stages = find_stage_runs(path)
    evals = find_evals(path)
    rl_samples: list[dict[str, Any]] = []
    for stage in stages:
        if (stage.path / "samples.jsonl").is_file():
            rl_samples = read_jsonl(stage.path / "samples.jsonl")
    if not stages and not evals:
        raise ConfigError(
            f"{run_dir} holds no metrics.jsonl (at its top or in a stage sub-directory) and no eval/*.json: "
            "is it a run directory?"
        )
    return RunReport(path, stages, evals, rl_samples, _pipeline_stages(path), _pipeline_headline_task(path))


def _pipeline_headline_task(run_dir: Path) -> str | None:
    try:
        state = json.loads((run_dir / PIPELINE_STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    task = state.get("headline_task") if isinstance(state, dict) else None
    return task if isinstance(task, str) else None


def _pipeline_stages(run_dir: Path) -> list[dict[str, Any]]:
    try:
        state = json.loads((run_dir / PIPELINE_STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return []
    stages = state.get("stages") if isinstance(state, dict) else None
    return [stage for stage in stages or [] if isinstance(stage, dict)]


def pipeline_rows(report: RunReport) -> list[dict[str, str]]:
    """One row per pipeline stage: kind, status, wall time (empty for a single trainer's run)."""
    rows = []
    for stage in report.pipeline:
        wall = as_number(stage.get("wall_s"))
        rows.append({"stage": str(stage.get("name", "")), "kind": str(stage.get("kind", "")),
                     "status": str(stage.get("status", "")),
                     "wall": "-" if wall is None else (f"{wall:.0f} s" if wall < 120 else f"{wall / 60:.1f} min")})
    total = sum(as_number(stage.get("wall_s")) or 0.0 for stage in report.pipeline)
    if rows and total:
        rows.append({"stage": "total", "kind": "", "status": "", "wall": f"{total / 60:.1f} min"})
    return rows


# ----------------------------------------------------------------------------- plots
@dataclass(frozen=True)
class PlotSpec:
    """One figure: ``keys`` drawn per stage (one panel per stage that has any of them)."""

    title: str
    keys: tuple[str, ...]
    ylabel: str = ""
    log_y: bool = False
    band: dict[str, str] = field(default_factory=dict)  # key -> key of its std (shaded ±1 std)
    prefix_keys: tuple[str, ...] = ()  # also draw every metric whose name starts with one of these


PLOTS: tuple[PlotSpec, ...] = (
    PlotSpec("Loss", ("loss", "val/loss"), "loss"),
    PlotSpec("Learning rate", ("lr",), "lr"),
    PlotSpec("Gradient norm (before clipping)", ("grad_norm",), "grad norm", log_y=True),
    PlotSpec("Reward and accuracy per RL step", ("reward/mean", "acc", "eval/acc"), "reward / accuracy",
             band={"reward/mean": "reward/std"}, prefix_keys=("reward/",)),
    PlotSpec("KL to the reference", ("kl",), "KL"),
    PlotSpec("Entropy", ("entropy",), "nats / token"),
    PlotSpec("Response length", ("response_len/mean", "response_len/max"), "tokens"),
    PlotSpec("Clipped fractions", ("clip_frac", "response_len/clipped_frac"), "fraction"),
    PlotSpec("Reward-model margin and accuracy", ("margin", "val/acc", "val/margin"), ""),
    PlotSpec("DPO implicit rewards", ("rewards/chosen", "rewards/rejected", "rewards/margins", "val/rewards/margins"),
             "reward"),
    PlotSpec("DPO preference accuracy", ("rewards/accuracies", "val/rewards/accuracies", "val/mean_logp_accuracy"),
             "fraction"),
    PlotSpec("Throughput", ("tokens_per_sec",), "tokens / s"),
    PlotSpec("Time per RL step", ("time/generate", "time/score", "time/logprob", "time/update"), "seconds"),
)
# reward/<component> lines also excluded: std has its own band, and these are not rewards.
_NOT_COMPONENTS = {"reward/std", "reward/mean", "reward/min", "reward/max"}


def _plot_keys(spec: PlotSpec, stage: StageRun, available: set[str]) -> list[str]:
    keys = [key for key in spec.keys if key in available]
    for prefix in spec.prefix_keys:
        keys += sorted(k for k in available if k.startswith(prefix) and k not in keys and k not in _NOT_COMPONENTS)
    return keys


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _figure_png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    _matplotlib().close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plot_panels(spec: PlotSpec, stages: list[StageRun]) -> list[tuple[StageRun, list[str]]]:
    """The (stage, metric keys) panels of ``spec``: stages that logged at least one finite value of its keys."""
    panels = []
    for stage in stages:
        keys = [key for key in _plot_keys(spec, stage, stage.keys()) if stage.series(key)[0]]
        if keys:
            panels.append((stage, keys))
    return panels


def render_plot(spec: PlotSpec, stages: list[StageRun]) -> str | None:
    """A base64 PNG of ``spec`` (one panel per stage that has its metrics), or None if none has them."""
    panels = plot_panels(spec, stages)
    if not panels:
        return None
    plt = _matplotlib()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(min(5.2 * len(panels), 11), 3.2), squeeze=False)
    for ax, (stage, keys) in zip(axes[0], panels):
        for key in keys:
            steps, values = stage.series(key)
            style = "o-" if len(steps) <= 30 else "-"
            line = ax.plot(steps, values, style, markersize=3, linewidth=1.4, label=key)[0]
            std_key = spec.band.get(key)
            if std_key:
                band = dict(zip(*stage.series(std_key)))
                pairs = [(s, v, band[s]) for s, v in zip(steps, values) if s in band]
                if pairs:
                    xs, ys, sd = zip(*pairs)
                    ax.fill_between(xs, [y - d for y, d in zip(ys, sd)], [y + d for y, d in zip(ys, sd)],
                                    color=line.get_color(), alpha=0.15, linewidth=0)
        shown = [v for key in keys for v in stage.series(key)[1]]
        if spec.log_y and min(shown) > 0 and max(shown) / min(shown) > 20:  # log only where it helps
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(stage.name, fontsize=10)
        ax.set_xlabel("step")
        if spec.ylabel:
            ax.set_ylabel(spec.ylabel)
        ax.grid(alpha=0.3)
        if len(keys) > 1 or spec.band:
            ax.legend(fontsize=8)
    fig.suptitle(spec.title, fontsize=11)
    fig.tight_layout()
    return _figure_png(fig)


def _task_names(evals: list[EvalResult]) -> list[str]:
    return list(dict.fromkeys(result.task for result in evals if result.score is not None))


def render_accuracy_bars(evals: list[EvalResult]) -> str | None:
    """Held-out score per evaluated model (one group of bars per task), or None when no eval has a score."""
    scored = [result for result in evals if result.score is not None]
    if not scored:
        return None
    plt = _matplotlib()
    labels = list(dict.fromkeys(result.label for result in scored))
    tasks = _task_names(scored)
    percent = all(0.0 <= result.score <= 1.0 for result in scored)
    width = min(0.8, 0.6 * len(tasks)) / len(tasks)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.5 * len(labels) * max(1, len(tasks) * 0.7) + 1.5), 3.4))
    ax.set_xlim(-0.6, len(labels) - 0.4)
    single_task_colors = ["#9aa5b1"] + ["#3b7dd8"] * max(0, len(labels) - 2) + ["#2a9d55"]
    for task_index, task in enumerate(tasks):
        xs, values = [], []
        for label_index, label in enumerate(labels):
            match = next((r for r in scored if r.label == label and r.task == task), None)
            if match is not None:
                xs.append(label_index + (task_index - (len(tasks) - 1) / 2) * width)
                values.append(100 * match.score if percent else match.score)
        colors = ([single_task_colors[labels.index(labels[round(x)])] for x in xs]
                  if len(tasks) == 1 and len(labels) > 1 else None)
        bars = ax.bar(xs, values, width=width * 0.95, color=colors, label=task or None)
        for bar, value in zip(bars, values):
            ax.annotate(f"{value:.1f}{'%' if percent else ''}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=9, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(labels)), labels, rotation=15 if len(labels) > 4 else 0)
    keys = sorted({result.score_key for result in scored if result.score_key})
    ax.set_ylabel((", ".join(keys) or "score") + (" (%)" if percent else ""))
    if percent:
        ax.set_ylim(0, 108)
    if len(tasks) > 1:
        ax.legend(fontsize=8, loc="upper left")
    title = "Held-out evaluation per stage" + (f": {tasks[0]}" if len(tasks) == 1 and tasks[0] else "")
    ax.set_title(title, fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _figure_png(fig)


# ----------------------------------------------------------------------------- samples
_PROMPT_KEYS = ("prompt", "question", "input")
_COMPLETION_KEYS = ("completion", "response", "output", "text")
_SCORE_SAMPLE_KEYS = ("score", "correct", "reward", "acc")


def _text_of(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # chat messages
        parts = [str(m.get("content", "")) for m in value if isinstance(m, dict) and m.get("role") != "system"]
        return "\n".join(parts) if parts else json.dumps(value)
    if isinstance(value, dict) and "content" in value:
        return str(value["content"])
    return "" if value is None else json.dumps(value)


def _first(record: dict[str, Any], keys: Iterable[str]) -> Any:
    for key in keys:
        if key in record:
            return record[key]
    return None


def sample_key(record: dict[str, Any], index: int) -> str:
    """What identifies the prompt of a per-sample record (its id, else its prompt text, else its position)."""
    for key in ("id", "index", "prompt_id"):
        if key in record:
            return f"{key}:{record[key]}"
    prompt = _first(record, _PROMPT_KEYS)
    return _text_of(prompt) if prompt is not None else f"#{index}"


def before_after_rows(evals: list[EvalResult], limit: int = 8) -> tuple[list[str], list[dict[str, Any]]]:
    """Join the first and last evaluations' per-sample records on their prompt.

    Returns (stage labels shown, rows); each row has ``prompt``, ``answer`` and per label a
    ``(completion, score)`` pair. Prompts whose score changed come first, so the table
    shows what training changed rather than the first N prompts.
    """
    with_samples = [result for result in evals if result.samples]
    if not with_samples:
        return [], []
    task = with_samples[0].task  # one task's prompts: the first evaluated one that has samples
    with_samples = [result for result in with_samples if result.task == task]
    shown = [with_samples[0]] if len(with_samples) == 1 else [with_samples[0], *with_samples[1:-1][-1:], with_samples[-1]]
    labels = [result.label for result in shown]
    joined: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    for result in shown:
        for index, record in enumerate(result.samples):
            if record.get("sample", 0) not in (0, None):
                continue  # n > 1 completions per prompt: show the first
            key = sample_key(record, index)
            if key not in joined:
                if result is not shown[0]:
                    continue  # only prompts the first evaluation has
                joined[key] = {"prompt": _text_of(_first(record, _PROMPT_KEYS)),
                               "answer": _text_of(_first(record, ("answer", "reference", "target", "expected")))}
                order.append(key)
            completion = _text_of(_first(record, _COMPLETION_KEYS))
            joined[key][result.label] = (completion, as_number(_first(record, _SCORE_SAMPLE_KEYS)))
    rows = [joined[key] for key in order]

    def changed(row: dict[str, Any]) -> bool:
        scores = {row[label][1] for label in labels if label in row}
        return len(scores) > 1

    rows.sort(key=lambda row: not changed(row))  # stable: changed ones first, in original order
    return labels, rows[:limit]


def rl_sample_rows(records: list[dict[str, Any]], per_end: int = 3) -> list[dict[str, Any]]:
    """The first and last few RL training samples (step, prompt, completion, reward)."""
    if not records:
        return []
    picked = records[:per_end] + (records[-per_end:] if len(records) > per_end else [])
    seen, rows = set(), []
    for record in picked:
        marker = id(record)
        if marker in seen:
            continue
        seen.add(marker)
        rows.append({
            "step": record.get("step", ""),
            "prompt": _text_of(_first(record, _PROMPT_KEYS)),
            "completion": _text_of(_first(record, _COMPLETION_KEYS)),
            "reward": as_number(_first(record, ("reward", "score"))),
        })
    return rows


def trajectory_turn_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The segments (kind, token count, text) of the logged multi-turn trajectory with the most
    turns (the latest among equals); [] when no sample is a trajectory with segment texts.

    >>> trajectory_turn_rows([{"trajectory": {"turns": 2, "segments": [
    ...     {"kind": "prompt", "token_ids": [1, 2]}, {"kind": "sampled", "token_ids": [3], "text": "code"},
    ...     {"kind": "env", "token_ids": [4, 5], "text": "<output>"}]}}])[1]
    {'kind': 'env', 'tokens': 2, 'text': '<output>'}
    """
    trajectories = [r["trajectory"] for r in records if isinstance(r.get("trajectory"), dict)
                    and all("text" in s for s in r["trajectory"].get("segments", [])[1:])]
    if not trajectories:
        return []
    best = max(reversed(trajectories), key=lambda t: t.get("turns", 0))
    return [{"kind": s["kind"], "tokens": len(s["token_ids"]), "text": s["text"]} for s in best["segments"][1:]]


def alarm_rows(report: RunReport) -> list[dict[str, str]]:
    """The RL alarms (``alarm/<name>`` in metrics.jsonl, train.rl_alarms) of each stage that watched
    any: one row per alarm that fired, with the logged steps at which it did, or one row saying
    none fired; [] when no stage logged alarms."""
    from posttrain.train.rl_alarms import ALARMS, alarm_summary

    rows = []
    for stage in report.stages:
        watched, fired = alarm_summary(stage.metrics)
        if not watched:
            continue
        rows.extend({"stage": stage.name, "alarm": name, "fired at": steps, "meaning": ALARMS[name]}
                    for name, steps in fired.items())
        if not fired:
            rows.append({"stage": stage.name, "alarm": "none fired", "fired at": "-",
                         "meaning": f"watched: {', '.join(watched)}"})
    return rows


# ----------------------------------------------------------------------------- summary
def summary_rows(report: RunReport) -> list[dict[str, str]]:
    """One row per stage and per evaluation: what the terminal table and the page's table show."""
    rows = []
    for stage in report.stages:
        steps, _ = stage.series("loss")
        all_steps = [as_number(r.get("step")) for r in stage.metrics if as_number(r.get("step")) is not None]
        row = {"stage": stage.name, "steps": str(int(max(all_steps))) if all_steps else "-"}
        for key, label in (("loss", "loss"), ("val/loss", "val loss"), ("reward/mean", "reward"), ("acc", "acc")):
            first, last = stage.first(key), stage.last(key)
            row[label] = "-" if last is None else (
                f"{first:.3g} → {last:.3g}" if first is not None and len(stage.series(key)[1]) > 1 else f"{last:.3g}")
        rows.append(row)
    if any(stage.last("eval/acc") is not None for stage in report.stages):
        for row, stage in zip(rows, report.stages):
            row["held-out acc"] = held_out_accuracy(stage)
    return rows


def held_out_accuracy(stage: StageRun) -> str:
    """An RL run's held-out accuracy from its metric lines (``eval/acc``): first → last, the
    last with its 95% interval and n, e.g. ``0.1 → 0.4 [0.2, 0.6] n=20``; ``-`` without one."""
    _, values = stage.series("eval/acc")
    if not values:
        return "-"
    text = f"{values[0]:.3g} → {values[-1]:.3g}" if len(values) > 1 else f"{values[-1]:.3g}"
    low, high, count = stage.last("eval/acc/ci_low"), stage.last("eval/acc/ci_high"), stage.last("eval/count")
    if low is not None and high is not None:
        text += f" [{low:.3g}, {high:.3g}]"
    return text + (f" n={count:.0f}" if count is not None else "")


def paired_change(before: EvalResult, after: EvalResult) -> PairedDifference | None:
    """``after``'s score minus ``before``'s over the same problems with its paired 95% interval
    (``eval.metrics.paired_difference``), from both files' ``per_problem`` scores; None when
    either lacks them or they cover different problems.

    >>> def result(label, values):
    ...     return EvalResult(label, "t", Path("."), {}, "accuracy", sum(values) / len(values),
    ...                       problems={"ids": list("abcdef"), "accuracy": values})
    >>> change = paired_change(result("base", [0, 0, 0, 0, 0, 0]), result("rl", [1, 1, 1, 1, 1, 1]))
    >>> change.delta, round(change.low, 4), change.high, change.excludes_zero  # 6 of 6 newly right
    (1.0, 0.0815, 1.0, True)
    """
    key = after.score_key
    if key is None or key != before.score_key:
        return None
    pairs = []
    for result in (before, after):
        ids, values = result.problems.get("ids"), result.problems.get(key)
        if not isinstance(ids, list) or not isinstance(values, list) or len(ids) != len(values) or not ids:
            return None
        pairs.append(([str(i) for i in ids], values))
    (ids_before, values_before), (ids_after, values_after) = pairs
    if len(set(ids_before)) == len(ids_before) and len(set(ids_after)) == len(ids_after):
        if set(ids_before) != set(ids_after):
            return None
        by_id = dict(zip(ids_before, values_before))
        values_before = [by_id[i] for i in ids_after]
    elif ids_before != ids_after:
        return None
    return paired_difference(values_before, values_after)


def _points(value: float, percent: bool) -> str:
    return f"{100 * value:+.1f}" if percent else f"{value:+.4g}"


def change_text(change: PairedDifference | None, delta: float, percent: bool) -> str:
    """A change as the tables print it: ``+4.0 pts [-2.0, +10.0] incl. 0`` (paired 95% interval,
    whether it excludes 0), or the bare difference when it cannot be paired.

    >>> change_text(PairedDifference(0.04, -0.02, 0.1, 100), 0.04, True)
    '+4.0 pts [-2.0, +10.0] incl. 0'
    >>> change_text(None, 0.5, True)
    '+50.0 pts'
    """
    unit = " pts" if percent else ""
    if change is None:
        return f"{_points(delta, percent)}{unit}"
    verdict = "excl. 0" if change.excludes_zero else "incl. 0"
    return (f"{_points(change.delta, percent)}{unit} [{_points(change.low, percent)}, "
            f"{_points(change.high, percent)}] {verdict}")


def _score_text(result: EvalResult) -> tuple[str, str]:
    """(score, its 95% interval) of an evaluation: ``80.0%`` and ``[71.1, 86.7]``, or ``-``."""
    percent = 0.0 <= result.score <= 1.0
    value = f"{100 * result.score:.1f}%" if percent else f"{result.score:.4g}"
    low = as_number(result.metrics.get(f"{result.score_key}/ci_low"))
    high = as_number(result.metrics.get(f"{result.score_key}/ci_high"))
    if low is None or high is None:
        return value, "-"
    return value, (f"[{100 * low:.1f}, {100 * high:.1f}]" if percent else f"[{low:.4g}, {high:.4g}]")


def eval_rows(report: RunReport) -> list[dict[str, str]]:
    """One row per (model, task) with a score: the score, its 95% interval and n, and its change
    over the task's previous and first evaluations with the paired 95% interval of each change
    (``change_text``); "vs previous" only when some task was evaluated three times or more."""
    rows = []
    earlier: dict[str, list[EvalResult]] = {}
    scored = [result for result in report.evals if result.score is not None]
    several_tasks = len(_task_names(report.evals)) > 1
    with_previous = any(sum(r.task == task for r in scored) > 2 for task in _task_names(scored))
    for result in scored:
        percent = 0.0 <= result.score <= 1.0
        value, interval = _score_text(result)
        seen = earlier.setdefault(result.task, [])
        changes = {}
        for column, base in (("vs previous", seen[-1] if seen else None), ("vs first", seen[0] if seen else None)):
            changes[column] = "-" if base is None else change_text(paired_change(base, result),
                                                                     result.score - base.score, percent)
        seen.append(result)
        count = next((result.metrics[k] for k in ("num_prompts", "n", "count", "num_samples") if k in result.metrics),
                     len(result.samples) or "")
        row = {"model": result.label}
        if several_tasks:
            row["task"] = result.task
        row.update({"metric": result.score_key or "score", "score": value, "95% CI": interval,
                    "n": str(int(count)) if isinstance(count, float) and count.is_integer() else str(count)})
        if with_previous:
            row["vs previous"] = changes["vs previous"]
        row["vs first"] = changes["vs first"]
        rows.append(row)
    return rows


def headline_task(report: RunReport) -> str | None:
    """The task the headline follows: the pipeline's ``eval.headline_task``, else the one an
    evaluation names, else the first task with a score (when it is evaluated at all)."""
    tasks = _task_names(report.evals)
    named = [report.headline_task] + [result.headline_task for result in report.evals]
    return next((task for task in named if task in tasks), tasks[0] if tasks else None)


def headline(report: RunReport) -> str | None:
    """One line following the headline task (``headline_task``) across stages: each stage's
    score with its 95% interval, then the last one's change over the first (and over the one
    before, with three or more) with its paired 95% interval, or None.

    e.g. ``held-out addition (n=100): baseline 25.0% [17.6, 34.2] -> rl 78.0% [68.9, 85.0];
    rl vs baseline +53.0 pts [+43.0, +63.0] excl. 0``
    """
    task = headline_task(report)
    results = [result for result in report.evals if result.score is not None and result.task == task]
    if not results:
        return None
    chain = " -> ".join(f"{result.label} {' '.join(t for t in _score_text(result) if t != '-')}" for result in results)
    count = as_number(results[-1].metrics.get("num_prompts"))
    line = f"held-out {task + ' ' if task else ''}{f'(n={count:.0f})' if count is not None else ''}".rstrip()
    line = f"{line}: {chain}"
    last, percent = results[-1], 0.0 <= results[-1].score <= 1.0
    for base in ([results[0]] + ([results[-2]] if len(results) > 2 else [])) if len(results) > 1 else []:
        change = change_text(paired_change(base, last), last.score - base.score, percent)
        line += f"; {last.label} vs {base.label} {change}"
    return line


def print_summary(report: RunReport, console=None) -> None:
    """The short terminal summary: one table of stages, one of held-out scores with the gain."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    stage_rows = summary_rows(report)
    if stage_rows:
        table = Table(title=f"run {report.run_dir}", title_justify="left")
        for column in stage_rows[0]:
            table.add_column(column, justify="left" if column == "stage" else "right")
        for row in stage_rows:
            table.add_row(*row.values())
        console.print(table)
    for row in alarm_rows(report):
        fired = row["alarm"] != "none fired"
        console.print(f"alarms: {row['stage']}: " + (f"{row['alarm']} fired at {row['fired at']} ({row['meaning']})"
                                                      if fired else f"none fired ({row['meaning']})"),
                      highlight=False, style="bold red" if fired else None)
    scored = eval_rows(report)
    if scored:
        table = Table(title="held-out evaluation", title_justify="left")
        columns = [column for column in scored[0] if column != "metric"]
        for column in columns:
            table.add_column(column, justify="left" if column in ("model", "task") else "right")
        for row in scored:
            table.add_row(*(row[column] for column in columns))
        console.print(table)
        line = headline(report)
        if line and len(scored) > 1:
            console.print(line, highlight=False, soft_wrap=True, markup=False)
        if any(row.get("95% CI", "-") != "-" for row in scored):
            console.print("[a, b]: 95% interval over the n problems; a change's interval is paired over the same "
                          "problems (excl. 0: not noise at 95%)", highlight=False, style="dim", soft_wrap=True,
                          markup=False)


# ----------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;background:#f6f7f9;color:#1d2430}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 10px;border-bottom:1px solid #dde1e6;padding-bottom:4px}
.sub{color:#5b6573;font-size:13px;margin-bottom:16px}
.card{background:#fff;border:1px solid #e2e5ea;border-radius:6px;padding:12px;margin:10px 0}
.grid{display:grid;grid-template-columns:1fr 1fr;column-gap:12px} .grid .card{margin:6px 0} .grid .wide{grid-column:1 / -1}
table.small{width:auto;min-width:50%}
img{max-width:100%;display:block;margin:0 auto}
table{border-collapse:collapse;width:100%;font-size:13px;background:#fff}
th,td{border:1px solid #e2e5ea;padding:5px 8px;text-align:left;vertical-align:top}
th{background:#eef1f5} td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{white-space:pre-wrap;word-break:break-word;margin:0;font-size:12px;font-family:ui-monospace,Menlo,Consolas,monospace;max-height:220px;overflow:auto}
.ok{color:#1e7d45;font-weight:600} .bad{color:#b3261e;font-weight:600}
.gain{font-size:15px;margin:6px 0}
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _score_cell(score: float | None) -> str:
    if score is None:
        return ""
    css = "ok" if score >= 1.0 else ("bad" if score <= 0.0 else "")
    mark = "✓" if score >= 1.0 else ("✗" if score <= 0.0 else f"{score:.2f}")
    return f'<span class="{css}">{mark}</span>'


def _table(rows: list[dict[str, str]], numeric_from: int = 1) -> str:
    if not rows:
        return ""
    columns = list(rows[0])
    head = "".join(f"<th>{_esc(column)}</th>" for column in columns)
    body = "".join(
        "<tr>" + "".join(
            f'<td{" class=num" if index >= numeric_from else ""}>{_esc(row.get(column, ""))}</td>'
            for index, column in enumerate(columns)) + "</tr>"
        for row in rows
    )
    return f"<table class=small><tr>{head}</tr>{body}</table>"


def render_html(report: RunReport) -> str:
    """The whole page as a string (plots inlined as base64 PNG)."""
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<title>posttrain report: {_esc(report.run_dir.name)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>posttrain report: {_esc(report.run_dir.name)}</h1>",
        f'<div class=sub>{_esc(report.run_dir.resolve())} · stages: '
        f'{_esc(", ".join(stage.name for stage in report.stages) or "none")}</div>',
    ]
    scored = eval_rows(report)
    bars = render_accuracy_bars(report.evals)
    if scored or bars:
        parts.append("<h2>Held-out evaluation</h2>")
        line = headline(report)
        if line and len(scored) >= 2:
            parts.append(f"<div class=gain>{_esc(line)}</div>")
        if bars:
            parts.append(f'<div class=card><img alt="held-out accuracy per stage" src="data:image/png;base64,{bars}"></div>')
        parts.append(_table(scored))
    stage_rows = summary_rows(report)
    if stage_rows:
        parts.append("<h2>Stages</h2>" + _table(stage_rows))
    alarms = alarm_rows(report)
    if alarms:
        parts.append("<h2>Alarms</h2>" + _table(alarms, numeric_from=len(alarms[0])))
    timing = pipeline_rows(report)
    if timing:
        parts.append("<h2>Pipeline</h2>" + _table(timing, numeric_from=3))
    plots = [(spec, len(plot_panels(spec, report.stages)), render_plot(spec, report.stages)) for spec in PLOTS]
    plots = [(spec, panels, png) for spec, panels, png in plots if png]
    if plots:
        parts.append("<h2>Training curves</h2><div class=grid>")
        for spec, panels, png in plots:
            wide = " wide" if panels > 1 else ""  # multi-stage figures span the row; single ones pair up
            parts.append(f'<div class="card{wide}"><img alt="{_esc(spec.title)}" src="data:image/png;base64,{png}"></div>')
        parts.append("</div>")
    labels, rows = before_after_rows(report.evals)
    if rows:
        parts.append(f"<h2>Sample completions: {_esc(' → '.join(labels))}</h2>")
        head = "<th>prompt</th><th>answer</th>" + "".join(f"<th>{_esc(label)}</th>" for label in labels)
        body = []
        for row in rows:
            cells = [f"<td><pre>{_esc(row['prompt'])}</pre></td>", f"<td><pre>{_esc(row['answer'])}</pre></td>"]
            for label in labels:
                completion, score = row.get(label, ("", None))
                cells.append(f"<td>{_score_cell(score)}<pre>{_esc(completion)}</pre></td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        parts.append(f"<table><tr>{head}</tr>{''.join(body)}</table>")
    rl_rows = rl_sample_rows(report.rl_samples)
    if rl_rows:
        parts.append("<h2>RL training samples (first and last logged)</h2>")
        body = []
        for row in rl_rows:
            reward = "" if row["reward"] is None else f"{row['reward']:.3g}"
            body.append(f"<tr><td class=num>{_esc(row['step'])}</td><td><pre>{_esc(row['prompt'])}</pre></td>"
                        f"<td><pre>{_esc(row['completion'])}</pre></td><td class=num>{_esc(reward)}</td></tr>")
        body = "".join(body)
        parts.append(f"<table><tr><th>step</th><th>prompt</th><th>completion</th><th>reward</th></tr>{body}</table>")
    turns = trajectory_turn_rows(report.rl_samples)
    if turns:
        parts.append("<h2>An RL trajectory, turn by turn (the logged one with the most turns)</h2>"
                     "<p>Sampled tokens are trained; env tokens (tool output, template glue) are context only.</p>")
        body = "".join(f"<tr><td>{_esc(row['kind'])}</td><td class=num>{row['tokens']}</td>"
                       f"<td><pre>{_esc(row['text'])}</pre></td></tr>" for row in turns)
        parts.append(f"<table><tr><th>segment</th><th>tokens</th><th>text</th></tr>{body}</table>")
    if not plots and not scored and not rows:
        parts.append("<p>No metrics to plot yet.</p>")
    parts.append("</main></body></html>")
    return "\n".join(parts)


def write_report(run_dir: str | Path, output: str | Path | None = None, *, quiet: bool = False) -> Path:
    """Write ``report.html`` (or ``output``) for ``run_dir``; print the terminal summary unless quiet."""
    report = load_report(run_dir)
    target = Path(output) if output is not None else report.run_dir / "report.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text(render_html(report), encoding="utf-8")
    temporary.replace(target)
    if not quiet:
        print_summary(report)
    return target
