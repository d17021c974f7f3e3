"""User-facing errors.

Anything a user can cause (bad config key, malformed data row, missing model directory,
impossible settings) raises a subclass of ``UserError`` whose message is ONE line that
names the file/line or config key. The CLI prints ``error: <message>`` and exits with
status 2, never a traceback. Programming errors stay ordinary exceptions.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

MAX_MESSAGE_CHARS = 1000


class UserError(Exception):
    """A problem with the user's input; the message is one line, shown as is, but never longer
    than ``MAX_MESSAGE_CHARS``: a message that quotes a hostile value (a huge field of a row,
    an expanded config list) keeps its start and its end, with the number of characters cut."""

    def __init__(self, message: object = "", *args: object):
        super().__init__(bounded_message(str(message)), *args)


def bounded_message(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` when it fits in ``limit`` characters, else its start and end around
    ``... (N characters cut) ...``.

    >>> cut = bounded_message("a" * 100 + "b" * 100, 100)
    >>> cut, len(cut) <= 100
    ('aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa ... (140 characters cut) ... bbbbbbbbbbbbbbbbbbbbbbbbb', True)
    """
    if len(text) <= limit:
        return text
    tail = limit // 4
    head = max(limit - tail - 40, 1)
    return f"{text[:head]} ... ({len(text) - head - tail} characters cut) ... {text[-tail:]}"


class ConfigError(UserError):
    """Invalid configuration: unknown key, wrong type, impossible value."""


class DataError(UserError):
    """A malformed data file or row; the message names file and line."""


class ModelLoadError(UserError):
    """A model or tokenizer could not be found or loaded."""


# The config section the running code reads its settings from, so that a message can name a key
# as the user writes it: ``data.allow_audit_errors`` in ``posttrain sft``, ``rl.ptx.data.allow_audit_errors``
# for the PPO-ptx rows of a pipeline's RL stage. Set by ``config_section``; read by ``config_key``.
_SECTION: ContextVar[str] = ContextVar("posttrain_config_section", default="")


@contextmanager
def config_section(name: str) -> Iterator[None]:
    """Within the block, ``config_key`` names keys inside section ``name`` (nested blocks join their names).

    >>> with config_section("rl"), config_section("ptx"):
    ...     config_key("data.allow_audit_errors")
    'rl.ptx.data.allow_audit_errors'
    >>> config_key("data.allow_audit_errors")
    'data.allow_audit_errors'
    """
    token = _SECTION.set(f"{_SECTION.get()}{name}.")
    try:
        yield
    finally:
        _SECTION.reset(token)


def config_key(key: str) -> str:
    """``key`` (dotted, relative to the section of the config being run) as the user writes it
    in their config file (``config_section``)."""
    return _SECTION.get() + key
