"""The run directory and the logging every trainer shares.

``runs/<name>/`` holds (docs/ARCHITECTURE.md, "Run directory"): ``config.yaml`` (the resolved config),
``metrics.jsonl`` (one JSON object per logged step), TensorBoard event files under ``tb/``,
``checkpoints/step_<N>/``, ``final/`` (HF format), and per-trainer extras (``samples.jsonl``,
``eval/*.json``, ``report.html``).

Only rank 0 writes; other ranks get a ``MetricsLogger`` with ``enabled=False`` so trainers
call the same functions everywhere. The progress display trainers show (``Progress``: a live
bar on a terminal, plain lines at intervals otherwise) is ``posttrain.log.Progress``, shared
with the library layers below (the rollout engine reports generated sequences to it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from pydantic import BaseModel

from posttrain.errors import ConfigError
from posttrain.config import config_to_yaml
from posttrain.log import Progress  # noqa: F401  (the trainers import it from here)
from posttrain.train.checkpoint import storage_errors


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tb"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def final(self) -> Path:
        return self.path / "final"

    @property
    def samples(self) -> Path:
        return self.path / "samples.jsonl"

    @property
    def eval(self) -> Path:
        return self.path / "eval"

    @property
    def report(self) -> Path:
        return self.path / "report.html"


def holds_run(path: str | Path) -> bool:
    """Whether ``path`` holds (part of) a run: logged metrics, a checkpoint or a final model."""
    run = RunDir(Path(path))
    has_metrics = run.metrics.is_file() and run.metrics.stat().st_size > 0
    has_checkpoints = run.checkpoints.is_dir() and any(run.checkpoints.glob("step_*"))
    return has_metrics or has_checkpoints or run.final.exists()


def clear_run(run: RunDir) -> None:
    """Delete what a run wrote (checkpoints, final/, metrics, samples, evaluations,
    TensorBoard events, report, config): ``run.overwrite`` starts clean. Other files in the
    directory (the lock, anything the user put there) stay."""
    import shutil

    for path in (run.checkpoints, run.final, run.tensorboard, run.eval):
        shutil.rmtree(path, ignore_errors=True)
    for path in (run.metrics, run.samples, run.report, run.config):
        path.unlink(missing_ok=True)


def prepare_run_dir(
    output_dir: str | Path, name: str, config: BaseModel, *, resuming: bool, overwrite: bool = False, write: bool = True
) -> RunDir:
    """Create ``output_dir/name`` and save the resolved config.

    A fresh (not resuming) run refuses a directory that already holds a run (metrics, a
    checkpoint or final/), so an earlier run is never silently mixed with a new one, unless
    ``overwrite``, which deletes the earlier run's files first (``clear_run``): its
    checkpoints could otherwise be resumed or prune the new run's own. ``write=False``
    (non-zero ranks) only computes the paths.
    """

    run = RunDir(Path(output_dir) / name)
    if not write:
        return run
    if not resuming:
        if holds_run(run.path) and not overwrite:
            raise ConfigError(
                f"run.name: {run.path} already holds a run; set train.resume=latest to continue it, "
                f"run.overwrite=true to start over, or choose another run.name"
            )
        if overwrite:
            clear_run(run)
    run.path.mkdir(parents=True, exist_ok=True)
    run.checkpoints.mkdir(exist_ok=True)
    run.config.write_text(config_to_yaml(config))
    return run


def truncate_jsonl(path: Path, keep_through_step: int) -> None:
    """Keep the records of ``path`` whose ``step`` is at most ``keep_through_step``; a torn or
    unreadable line (a crash mid-write) is dropped. Rewritten atomically; no file, no-op."""
    import os

    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= keep_through_step:
            kept.append(line + "\n")
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("".join(kept), encoding="utf-8")
    os.replace(temporary, path)


def truncate_run_logs(run: RunDir, step: int) -> None:
    """Cut ``metrics.jsonl``, ``samples.jsonl`` and ``eval/step_<N>.json`` back to ``step``
    (the checkpoint a run resumes from), so the steps it runs again are logged once."""
    truncate_jsonl(run.metrics, step)
    truncate_jsonl(run.samples, step)
    for record in run.eval.glob("step_*.json") if run.eval.is_dir() else ():
        tail = record.stem.rsplit("_", 1)[-1]
        if tail.isdigit() and int(tail) > step:
            record.unlink(missing_ok=True)


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible rather than invalid
    return value


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(-1, 2)
        return handle.read(1)


def run_metrics_logger(run: RunDir, run_config: Any, is_main: bool) -> "MetricsLogger":
    """The metrics logger of a training run as its ``run:`` config section asks (TensorBoard,
    W&B); only the main rank writes."""
    return MetricsLogger(run, tensorboard=run_config.tensorboard, enabled=is_main, wandb=run_config.wandb,
                         wandb_project=run_config.wandb_project)


class MetricsLogger:
    """Writes metrics to ``metrics.jsonl`` (append, flushed per line), TensorBoard and, with
    ``wandb``, Weights & Biases (``WandbBackend``); ``log_samples`` adds a table of generated
    samples to TensorBoard (a text summary) and W&B (a ``wandb.Table``)."""

    def __init__(self, run: RunDir | None, *, tensorboard: bool = True, enabled: bool = True,
                 wandb: bool = False, wandb_project: str = "posttrain"):
        self.enabled = enabled and run is not None
        self.run = run
        self._file = None
        self._tb = None
        self._wandb = None
        if not self.enabled:
            return
        if wandb:
            self._wandb = WandbBackend(run, project=wandb_project)
        self._file = open(run.metrics, "a", encoding="utf-8")
        if self._file.tell() > 0 and _last_byte(run.metrics) != b"\n":
            self._file.write("\n")  # a torn last line (crash mid-write) must not glue onto the next record
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run.tensorboard))

    def log(self, metrics: Mapping[str, Any], step: int) -> dict[str, Any]:
        """Record one line; numbers go to TensorBoard under their metric names."""
        record = {"step": step, **{key: _plain(value) for key, value in metrics.items() if key != "step"}}
        if not self.enabled:
            return record

        with storage_errors("writing metrics", self.run.metrics, "; the checkpoints are intact"):
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(record, step)
        return record

    def log_samples(self, tag: str, records: Sequence[Mapping[str, Any]], step: int) -> None:
        """A table of generated samples at ``step``: one row per record, one column per key
        whose values are text or numbers (``sample_table``), as a Markdown table in
        TensorBoard's text tab (``tag``) and a ``wandb.Table`` under ``tag`` in W&B. Nothing
        when the logger is disabled or ``records`` is empty."""
        if not self.enabled or not records:
            return
        columns, rows = sample_table(records)
        if self._tb is not None:
            self._tb.add_text(tag, markdown_table(columns, rows), step)
        if self._wandb is not None:
            self._wandb.log_table(tag, columns, rows, step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class WandbBackend:
    """Metrics to Weights & Biases (``run.wandb: true``), beside metrics.jsonl and TensorBoard.

    ``wandb.init(project, name=<run name>, dir=<run dir>, config=<the resolved config.yaml>,
    id=..., resume="allow")``: the W&B run id is kept in ``<run>/wandb_id`` so a resumed run
    continues the same W&B run (W&B docs, "Resume a run"). Mode, entity and credentials come
    from W&B's own environment variables: ``WANDB_MODE=offline`` writes under ``<run>/wandb``
    for a later ``wandb sync`` (W&B docs, "Use W&B offline"). Numbers are logged at their
    optimizer step (``wandb.log(..., step=step, commit=False)``: W&B writes a step's row when a
    later step arrives or the run finishes, so a second line at the same step, such as RL's
    held-out evaluation after its last step or a samples table, joins that row instead of being
    dropped as out of order); a missing ``wandb`` package is a one-line ConfigError naming
    ``run.wandb``.
    """

    def __init__(self, run: RunDir, *, project: str):
        try:
            import wandb
        except ImportError:
            raise ConfigError("run.wandb: the wandb package is not installed (pip install wandb, or the "
                              "posttrain[wandb] extra)") from None
        import uuid

        import yaml

        id_file = run.path / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        config = yaml.safe_load(run.config.read_text(encoding="utf-8")) if run.config.is_file() else {}
        self._run = wandb.init(project=project, name=run.path.name, dir=str(run.path), config=config, id=run_id,
                               resume="allow", settings=wandb.Settings(console="off", silent=True))

    def log(self, record: Mapping[str, Any], step: int) -> None:
        numbers = {key: value for key, value in record.items()
                   if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
        self._run.log(numbers, step=step, commit=False)

    def log_table(self, tag: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        import wandb

        self._run.log({tag: wandb.Table(columns=columns, data=rows)}, step=step, commit=False)

    def close(self) -> None:
        self._run.finish()


def sample_table(records: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows) of a samples table: the keys whose values are text, numbers or booleans
    in any record, in the order first seen; a record without a column gets "".

    >>> sample_table([{"prompt": "1+1?", "completion": "2", "reward": 1.0, "trajectory": {}}, {"prompt": "2+2?"}])
    (['prompt', 'completion', 'reward'], [['1+1?', '2', 1.0], ['2+2?', '', '']])
    """
    columns: list[str] = []
    for record in records:
        columns += [key for key, value in record.items()
                    if isinstance(value, (str, int, float, bool)) and key not in columns]
    return columns, [[record.get(column, "") for column in columns] for record in records]


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], cell_chars: int = 2000) -> str:
    """A Markdown table for TensorBoard's text tab: pipes escaped, line breaks as ``<br>``,
    cells cut at ``cell_chars``.

    >>> print(markdown_table(["prompt", "reward"], [["a|b\\nc", 0.5]]))
    | prompt | reward |
    | --- | --- |
    | a\\|b<br>c | 0.5 |
    """
    def cell(value: Any) -> str:
        text = str(value)[:cell_chars]
        return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def optimizer_step_metrics(result: Any, *, step: int, epoch: float, tokens: int, trained_tokens: int | None = None,
                           **extra: Any) -> dict[str, Any]:
    """The metric line of one optimizer step, shared by the SFT and reward-model trainers.

    ``result`` is the step's ``train.loop.StepResult`` (``loss``, ``grad_norm``, ``lr``,
    ``seconds``); ``tokens`` counts every token of the step over all ranks (no padding);
    ``trained_tokens`` counts the positions the loss averages over, sum(m_t)
    (docs/PREFLIGHT.md, "Effective batch"), over all ranks, for trainers with a token loss mask. ``extra`` keys are appended
    as they are. Meanings and units of every key: docs/METRICS.md.

    Keys: ``step``, ``epoch`` (fractional, at the end of the step), ``lr`` (the rate this
    step used), ``loss``, ``grad_norm`` (before clipping), ``tokens_per_step`` (trained
    tokens when there is a mask, else all tokens), ``tokens_per_sec``, ``step_time_s``; with
    ``trained_tokens`` also ``masked_token_count`` (= trained tokens: the effective batch
    size docs/PREFLIGHT.md asks to log), ``untrained_token_count`` (tokens - trained tokens:
    prompts, other roles, first tokens) and ``trained_tokens_per_sec``.

    >>> from types import SimpleNamespace
    >>> result = SimpleNamespace(loss=2.5, grad_norm=1.0, lr=1e-4, seconds=2.0)
    >>> line = optimizer_step_metrics(result, step=3, epoch=0.123456, tokens=100, trained_tokens=30)
    >>> line["epoch"], line["tokens_per_step"], line["masked_token_count"], line["untrained_token_count"]
    (0.1235, 30, 30, 70)
    >>> line["tokens_per_sec"], line["trained_tokens_per_sec"]
    (50.0, 15.0)
    >>> sorted(optimizer_step_metrics(result, step=3, epoch=0.5, tokens=100, pairs_per_step=4))
    ['epoch', 'grad_norm', 'loss', 'lr', 'pairs_per_step', 'step', 'step_time_s', 'tokens_per_sec', 'tokens_per_step']
    """
    seconds = max(result.seconds, 1e-9)
    metrics: dict[str, Any] = {
        "step": step,
        "epoch": round(epoch, 4),
        "lr": result.lr,
        "loss": result.loss,
        "grad_norm": result.grad_norm,
        "tokens_per_step": tokens if trained_tokens is None else trained_tokens,
    }
    if trained_tokens is not None:
        metrics["masked_token_count"] = trained_tokens
        metrics["untrained_token_count"] = tokens - trained_tokens
        metrics["trained_tokens_per_sec"] = trained_tokens / seconds
    metrics["tokens_per_sec"] = tokens / seconds
    metrics["step_time_s"] = result.seconds
    return metrics | extra


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file (a torn last line from a crash is ignored)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
