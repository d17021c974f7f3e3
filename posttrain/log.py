"""Library output through Python's ``logging``: the ``posttrain`` logger and its children.

Everything posttrain says while it works (audit summaries, run announcements, end-of-run
summaries, warnings) is a log record, so code that embeds posttrain decides what to show:
``logging.getLogger("posttrain").setLevel(logging.WARNING)`` silences the chatter, a handler of
its own collects it. As the Python logging HOWTO asks of libraries ("Configuring Logging for a
Library"), the library itself adds only a ``NullHandler``; the command line
(``posttrain.cli.main``) installs ``ConsoleHandler``, which prints each message as it is, to
stdout or stderr as before, so the terminal output of ``posttrain ...`` is unchanged.
"""

from __future__ import annotations

import logging
import sys

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
