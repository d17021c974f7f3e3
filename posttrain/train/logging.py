"""The run directory and the logging every trainer shares.

``runs/<name>/`` holds (DESIGN.md, "Run directory"): ``config.yaml`` (the resolved config),
``metrics.jsonl`` (one JSON object per logged step), TensorBoard event files under ``tb/``,
``checkpoints/step_<N>/``, ``final/`` (HF format), and per-trainer extras (``samples.jsonl``,
``eval/*.json``, ``report.html``).

Only rank 0 writes; other ranks get a ``MetricsLogger`` with ``enabled=False`` so trainers
call the same functions everywhere.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel

from posttrain.errors import ConfigError


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


def prepare_run_dir(
    output_dir: str | Path, name: str, config: BaseModel, *, resuming: bool, overwrite: bool = False, write: bool = True
) -> RunDir:
    """Create ``output_dir/name`` and save the resolved config.

    A fresh (not resuming) run refuses a directory that already holds metrics, so an earlier
    run is never silently mixed with a new one, unless ``overwrite`` (which starts the metrics
    file afresh). ``write=False`` (non-zero ranks) only computes the paths.
    """
    from posttrain.config import config_to_yaml

    run = RunDir(Path(output_dir) / name)
    if not write:
        return run
    if not resuming and run.metrics.exists() and run.metrics.stat().st_size > 0:
        if not overwrite:
            raise ConfigError(
                f"run.name: {run.path} already holds a run; set train.resume=latest to continue it, "
                f"run.overwrite=true to start over, or choose another run.name"
            )
        run.metrics.unlink()
    run.path.mkdir(parents=True, exist_ok=True)
    run.checkpoints.mkdir(exist_ok=True)
    run.config.write_text(config_to_yaml(config))
    return run


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible rather than invalid
    return value


class MetricsLogger:
    """Writes metrics to ``metrics.jsonl`` (append, flushed per line) and TensorBoard."""

    def __init__(self, run: RunDir | None, *, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled and run is not None
        self.run = run
        self._file = None
        self._tb = None
        if not self.enabled:
            return
        self._file = open(run.metrics, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run.tensorboard))

    def log(self, metrics: Mapping[str, Any], step: int) -> dict[str, Any]:
        """Record one line; numbers go to TensorBoard under their metric names."""
        record = {"step": step, **{key: _plain(value) for key, value in metrics.items() if key != "step"}}
        if not self.enabled:
            return record
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)
        return record

    def close(self) -> None:
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


def optimizer_step_metrics(result: Any, *, step: int, epoch: float, tokens: int, trained_tokens: int | None = None,
                           **extra: Any) -> dict[str, Any]:
    """The metric line of one optimizer step, shared by the SFT and reward-model trainers.

    ``result`` is the step's ``train.loop.StepResult`` (``loss``, ``grad_norm``, ``lr``,
    ``seconds``); ``tokens`` counts every token of the step over all ranks (no padding);
    ``trained_tokens`` counts the positions the loss averages over, sum(m_t) of seed 004
    §2.1, over all ranks, for trainers with a token loss mask. ``extra`` keys are appended
    as they are. Meanings and units of every key: docs/METRICS.md.

    Keys: ``step``, ``epoch`` (fractional, at the end of the step), ``lr`` (the rate this
    step used), ``loss``, ``grad_norm`` (before clipping), ``tokens_per_step`` (trained
    tokens when there is a mask, else all tokens), ``tokens_per_sec``, ``step_time_s``; with
    ``trained_tokens`` also ``masked_token_count`` (= trained tokens: the effective batch
    size seed 004 asks to log), ``untrained_token_count`` (tokens - trained tokens:
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


def format_metric(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.2e}"
    return str(value)


class Progress:
    """A progress bar with ETA and a few key metrics; plain lines when not on a terminal.

    >>> with Progress(total=3, description="sft", enabled=False) as bar:
    ...     bar.update(1, {"loss": 1.5})
    """

    def __init__(self, total: int, description: str, *, enabled: bool = True, keys: tuple[str, ...] = ("loss",),
                 initial: int = 0, plain_every: int = 10):
        self.total = total
        self.description = description
        self.keys = keys
        self.enabled = enabled
        self.done = initial
        self.plain_every = plain_every
        self.started = time.monotonic()
        self._start_done = initial
        self._bar = None
        self._task = None
        self._interactive = enabled and sys.stderr.isatty()

    def __enter__(self) -> "Progress":
        if self._interactive:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
                TimeElapsedColumn, TimeRemainingColumn

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total, completed=self.done, metrics="")
        return self

    def _summary(self, metrics: Mapping[str, Any]) -> str:
        return "  ".join(f"{key}={format_metric(metrics[key])}" for key in self.keys if key in metrics)

    def eta_seconds(self) -> float | None:
        steps = self.done - self._start_done
        if steps <= 0:
            return None
        return (time.monotonic() - self.started) / steps * (self.total - self.done)

    def update(self, advance: int = 1, metrics: Mapping[str, Any] | None = None) -> None:
        self.done += advance
        summary = self._summary(metrics or {})
        if self._bar is not None:
            self._bar.update(self._task, advance=advance, metrics=summary)
        elif self.enabled and (self.done % self.plain_every == 0 or self.done == self.total):
            eta = self.eta_seconds()
            eta_text = f" eta {eta:.0f}s" if eta is not None else ""
            print(f"[{self.description}] {self.done}/{self.total}{eta_text}  {summary}", file=sys.stderr, flush=True)

    def __exit__(self, *exc_info: Any) -> None:
        if self._bar is not None:
            self._bar.stop()
