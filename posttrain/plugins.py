"""User code named in a config: ``module:name`` or ``file.py:name``.

One resolver for every plug-in point (``reward:``, ``agent.tools``, ``agent.environment``), so
they accept the same forms and fail the same way:

- ``my_pkg.rewards:brevity``: a module by dotted name, found on ``sys.path`` and then in the
  working directory (as ``python -m`` would find it), so a module beside the config works
  without ``PYTHONPATH``;
- ``examples/environments/calculator_env.py:CalculatorEnv``: a Python file (relative to the
  working directory, or absolute), imported once per path;
- ``name`` may be dotted (``Class.method``).

A path that does not resolve raises ``ConfigError`` with one line that starts with the key.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from posttrain.errors import ConfigError

FORMS = "'module:name' or 'file.py:name'"


def split_path(path: str) -> tuple[str, str] | None:
    """``(module or file, name)`` of ``module:name`` / ``file.py:name``; None when either is missing.

    >>> split_path("tools/calc.py:add"), split_path("my_tools:Env.make"), split_path("python")
    (('tools/calc.py', 'add'), ('my_tools', 'Env.make'), None)
    """
    module, colon, name = path.rpartition(":")
    if not colon or not module.strip() or not name.strip():
        return None
    return module.strip(), name.strip()


def import_module_path(module: str) -> ModuleType:
    """A module by dotted name (``sys.path``, then the working directory) or by file path
    (``rewards/mine.py``). Raises what the import raises (``ImportError`` when nothing is found)."""
    if module.endswith(".py"):
        path = Path(module).expanduser().resolve()
        if not path.is_file():
            raise ImportError(f"no file {module}")
        name = f"posttrain_user_{path.stem}_{abs(hash(str(path))):x}"
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, path)
            loaded = importlib.util.module_from_spec(spec)
            sys.modules[name] = loaded
            try:
                spec.loader.exec_module(loaded)
            except BaseException:
                del sys.modules[name]
                raise
        return sys.modules[name]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        cwd = str(Path.cwd())
        missing = (error.name or "").split(".")[0]
        if missing != module.split(".")[0] or "" in sys.path or cwd in sys.path:
            raise
        sys.path.append(cwd)  # the console script's sys.path[0] is its own bin/, not the working directory
        return importlib.import_module(module)


def load_object(path: str, key: str) -> Any:
    """The object ``path`` (``module:name`` or ``file.py:name``) names; ``key`` starts every error.

    >>> load_object("posttrain.errors:ConfigError", "agent.environment").__name__
    'ConfigError'
    >>> load_object("posttrain.errors:Nope", "agent.environment")
    Traceback (most recent call last):
    posttrain.errors.ConfigError: agent.environment: module 'posttrain.errors' has no attribute 'Nope' ('posttrain.errors:Nope')
    """
    parts = split_path(path) if isinstance(path, str) else None
    if parts is None:
        raise ConfigError(f"{key}: {path!r} must be {FORMS}")
    module_name, attribute = parts
    try:
        module = import_module_path(module_name)
    except Exception as error:  # the user's module: any failure of its import is theirs to fix
        reason = f"{type(error).__name__}: {' '.join(str(error).split())}"
        raise ConfigError(f"{key}: cannot import module '{module_name}' of {path!r} ({reason})") from None
    value: Any = module
    for part in attribute.split("."):
        if not hasattr(value, part):
            raise ConfigError(f"{key}: module '{module_name}' has no attribute '{attribute}' ({path!r})")
        value = getattr(value, part)
    return value
