"""User-facing errors.

Anything a user can cause (bad config key, malformed data row, missing model directory,
impossible settings) raises a subclass of ``UserError`` whose message is ONE line that
names the file/line or config key. The CLI prints ``error: <message>`` and exits with
status 2, never a traceback. Programming errors stay ordinary exceptions.
"""


class UserError(Exception):
    """A problem with the user's input; the message is one line, shown as is."""


class ConfigError(UserError):
    """Invalid configuration: unknown key, wrong type, impossible value."""


class DataError(UserError):
    """A malformed data file or row; the message names file and line."""


class ModelLoadError(UserError):
    """A model or tokenizer could not be found or loaded."""
