"""Library output through Python's ``logging``: the ``posttrain`` logger and its children.

Everything posttrain says while it works (audit summaries, run announcements, end-of-run
summaries, warnings) is a log record, so code that embeds posttrain decides what to show:
``logging.getLogger("posttrain").setLevel(logging.WARNING)`` silences the chatter, a handler of
its own collects it. As the Python logging HOWTO asks of libraries ("Configuring Logging for a
Library"), the library itself adds only a ``NullHandler``; the command line
(``posttrain.cli.main``) installs ``ConsoleHandler``, which prints each message as it is, to
stdout or stderr as before, so the terminal output of ``posttrain ...`` is unchanged.

Progress of long phases (``Progress``) lives here too, below every layer, so the rollout engine
can report the sequences it finishes to whichever phase (an evaluation, a trainer's step) is
running: a live bar on a terminal, plain lines on stderr at most every ``PLAIN_INTERVAL_S``
seconds otherwise, so a user tailing a log file sees a run that is alive.
"""

from __future__ import annotations

import contextvars
import logging
import math
import sys
import time
from typing import Any, Mapping

logger = logging.getLogger("posttrain")
logger.addHandler(logging.NullHandler())

STDOUT = "posttrain_stdout"  # record attribute: print this record on stdout (reports a command is asked for)


def say(message: str, *, stdout: bool = False, name: str = "posttrain") -> None:
    """Log ``message`` at INFO on logger ``name``; the console prints it on stdout when ``stdout``
    (what a command reports, e.g. the data audit), else on stderr (progress, announcements)."""
    logging.getLogger(name).info(message, extra={STDOUT: stdout})


def say_stdout(message: str) -> None:
    """``say(message, stdout=True)``: a drop-in for ``print`` where a function takes a ``print_fn``."""
    say(message, stdout=True)


class ConsoleHandler(logging.Handler):
    """Prints a record's message alone (no level or logger name), on stdout when the record asks for
    it, else on stderr; the streams are looked up at each record, so redirection and capture work."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stdout if getattr(record, STDOUT, False) else sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


def install_console(level: int = logging.INFO) -> ConsoleHandler:
    """Attach one ``ConsoleHandler`` to the ``posttrain`` logger (idempotent) and return it."""
    for handler in logger.handlers:
        if isinstance(handler, ConsoleHandler):
            return handler
    handler = ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler


# ----------------------------------------------------------------------------- progress
PLAIN_INTERVAL_S = 30.0  # seconds between two plain progress lines of one phase (not a terminal)

_current_phase: contextvars.ContextVar["Progress | None"] = contextvars.ContextVar("posttrain_phase", default=None)
_shared_bar: dict[str, Any] = {"bar": None, "users": 0}  # one rich display for nested phases


def format_metric(value: Any) -> str:
    """A metric for a progress line: 4 significant digits, scientific outside [1e-3, 1e5).

    >>> format_metric(0.123456), format_metric(1.5e-7), format_metric(12)
    ('0.1235', '1.50e-07', '12')
    """
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5 or not math.isfinite(value):
            return f"{value:.4g}"
        return f"{value:.2e}"
    return str(value)


def format_seconds(seconds: float) -> str:
    """``75`` -> ``'1m15s'``, ``4000`` -> ``'1h06m'``, ``9.4`` -> ``'9s'``.

    >>> format_seconds(9.4), format_seconds(75), format_seconds(4000)
    ('9s', '1m15s', '1h06m')
    """
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Progress of one phase (training steps, an evaluation, a reference pass) with elapsed time,
    ETA and a few key metrics.

    On a terminal (stderr a tty): a live bar; a phase opened inside another (an evaluation in
    the middle of RL) adds its own line to the same display. Otherwise plain lines on stderr
    through the ``posttrain.progress`` logger: one when the phase starts, then at most one every
    ``interval_s`` seconds (default ``PLAIN_INTERVAL_S``) while it advances or while the engine
    reports that it is still generating (``heartbeat``), and one when it ends.

    ``total`` None: the amount of work is not known in advance (multi-turn agent rollouts):
    counts and elapsed time, no ETA. ``generation``: the phase counts the sequences the rollout
    engine finishes (``sequences_generated``); other phases only take the engine's heartbeats.

    >>> with Progress(total=3, description="sft", enabled=False) as bar:
    ...     bar.update(1, {"loss": 1.5})
    """

    def __init__(self, total: int | None, description: str, *, enabled: bool = True,
                 keys: tuple[str, ...] = ("loss",), initial: int = 0, unit: str = "", generation: bool = False,
                 interval_s: float | None = None):
        self.total = total
        self.description = description
        self.keys = keys
        self.enabled = enabled
        self.done = initial
        self.unit = unit
        self.generation = generation
        self.interval_s = PLAIN_INTERVAL_S if interval_s is None else interval_s
        self.started = time.monotonic()
        self.summary = ""
        self._start_done = initial
        self._last_line = -math.inf
        self._ended = False
        self._task = None
        self._token: contextvars.Token | None = None
        self._interactive = enabled and sys.stderr.isatty()

    # -- the phase
    def __enter__(self) -> "Progress":
        self.started = time.monotonic()
        self._token = _current_phase.set(self)
        if self._interactive:
            self._task = _shared_rich_bar().add_task(self.description, total=self.total, completed=self.done,
                                                     metrics="")
        elif self.enabled:
            self._plain_line(now=self.started)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._token is not None:
            _current_phase.reset(self._token)
            self._token = None
        if self._task is not None:
            bar = _shared_bar["bar"]
            if _shared_bar["users"] > 1:  # a nested phase: its line goes, the outer display stays
                bar.remove_task(self._task)
            _release_rich_bar()
            self._task = None
        elif self.enabled and exc_info[0] is None and not self._ended:
            self._plain_line(now=time.monotonic(), final=True)

    # -- reports
    def update(self, advance: int = 1, metrics: Mapping[str, Any] | None = None) -> None:
        """``advance`` units done; ``metrics`` (those named in ``keys``) shown beside the count."""
        self.done += advance
        if metrics:
            self.summary = "  ".join(f"{key}={format_metric(metrics[key])}" for key in self.keys if key in metrics)
        if self._task is not None:
            _shared_bar["bar"].update(self._task, advance=advance, metrics=self.summary)
        elif self.enabled:
            now = time.monotonic()
            if self.done == self.total:
                self._plain_line(now=now, final=True)
            elif now - self._last_line >= self.interval_s:
                self._plain_line(now=now)

    def heartbeat(self) -> None:
        """Still working (a decode step, a micro-batch): a plain line when one is due. The live
        bar keeps its elapsed time current by itself."""
        if self.enabled and self._task is None:
            now = time.monotonic()
            if now - self._last_line >= self.interval_s:
                self._plain_line(now=now)

    def eta_seconds(self, now: float | None = None) -> float | None:
        """Seconds left at the pace of this phase so far (None before the first unit or without a total)."""
        units = self.done - self._start_done
        if units <= 0 or self.total is None:
            return None
        now = time.monotonic() if now is None else now
        return (now - self.started) / units * max(0, self.total - self.done)

    def plain_text(self, now: float | None = None, *, final: bool = False) -> str:
        """The plain progress line: ``[name] done/total unit  elapsed 1m05s  eta 30s  metrics``;
        ``final``: ``done in 1m35s`` in place of elapsed time and ETA.

        >>> bar = Progress(8, "dpo reference", unit="pairs", enabled=False)
        >>> bar.done = 2
        >>> bar.plain_text(bar.started + 30.0)
        '[dpo reference] 2/8 pairs  elapsed 30s  eta 1m30s'
        >>> Progress(None, "eval: score", enabled=False).plain_text(final=True).startswith("[eval: score]  done in")
        True
        """
        now = time.monotonic() if now is None else now
        count = f"{self.done}/{self.total}" if self.total is not None else (f"{self.done}" if self.done else "")
        head = f"[{self.description}] {count}{' ' + self.unit if self.unit and count else ''}"
        parts = [head.rstrip(), f"{'done in' if final else 'elapsed'} {format_seconds(now - self.started)}"]
        eta = self.eta_seconds(now)
        if eta is not None and not final:
            parts.append(f"eta {format_seconds(eta)}")
        if self.summary:
            parts.append(self.summary)
        return "  ".join(parts)

    def _plain_line(self, *, now: float, final: bool = False) -> None:
        self._last_line = now
        self._ended = final
        logging.getLogger("posttrain.progress").info(self.plain_text(now, final=final), extra={STDOUT: False})


def _shared_rich_bar():
    """The one rich display nested phases share, started by the first user."""
    if _shared_bar["bar"] is None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress as RichProgress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        _shared_bar["bar"] = RichProgress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"),
            transient=False,
        )
        _shared_bar["bar"].start()
    _shared_bar["users"] += 1
    return _shared_bar["bar"]


def _release_rich_bar() -> None:
    _shared_bar["users"] -= 1
    if _shared_bar["users"] <= 0 and _shared_bar["bar"] is not None:
        _shared_bar["bar"].stop()
        _shared_bar["bar"], _shared_bar["users"] = None, 0


def current_phase() -> Progress | None:
    """The innermost phase running in this context (None outside every phase)."""
    return _current_phase.get()


def sequences_generated(count: int) -> None:
    """The rollout engine finished ``count`` sequences: a generation phase advances by them,
    any other phase takes it as a heartbeat."""
    phase = _current_phase.get()
    if phase is None:
        return
    if phase.generation:
        phase.update(count)
    else:
        phase.heartbeat()


def heartbeat() -> None:
    """Long-running library code is still working (one decode step): lets the current phase
    print a plain line when one is due."""
    phase = _current_phase.get()
    if phase is not None:
        phase.heartbeat()
