"""Tool calls: parsing them out of a turn's text, the tools that answer them, and running the
calls of many trajectories at once.

Formats (``tool_format``):
- ``inline`` (``data/inline.py``): a closed ```python block is a call of tool ``python``
  with ``{"code": ...}``; a block still open when the turn ended is a malformed call;
- ``chat_template`` (Hermes / Qwen style): ``<tool_call>\\n{"name": ..., "arguments": {...}}
  \\n</tool_call>``, several in one turn being parallel calls.

Tools are plain objects with ``name``, ``schema`` (an OpenAI function schema), ``stateful``
and ``run(arguments, state, timeout) -> (observation, is_error)``; ``state`` is a dict that
belongs to one trajectory. A malformed call, an unknown tool, a missing argument or an
exception inside a tool becomes an ``error: ...`` observation for the model, never an
exception in the trainer.

An environment (``module:Class`` or ``file.py:Class``, ``load_environment``) replaces the tools: one instance per
trajectory, ``reset(row) -> str | None`` and ``step(calls) -> (observation, done, reward)``.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from posttrain.data import inline
from posttrain.errors import ConfigError
from posttrain.plugins import load_object
from posttrain.sandbox.runner import Sandbox, SandboxLimits, choose_isolation


@dataclass
class ToolCall:
    """One call the model made. ``error`` is set when the call is malformed (bad JSON,
    unclosed block, ...); such a call is answered with ``error: <error>``."""

    name: str
    arguments: dict
    call_id: str
    error: str | None = None


@dataclass
class ToolResult:
    """What a call returned: the observation text, whether it is an error, and its seconds."""

    observation: str
    is_error: bool
    seconds: float


# ---------------------------------------------------------------------------- parsing


def parse_inline(text: str, call_id: str = "call_0") -> tuple[ToolCall | None, int | None]:
    """The call one ``inline`` turn makes and the end offset of its closed block in ``text``:
    the first closed ```python block; a block left open -> a malformed call (end None); no
    block -> (None, None).

    >>> parse_inline("Compute:\\n```python\\nprint(1)\\n```\\nrest")
    (ToolCall(name='python', arguments={'code': 'print(1)'}, call_id='call_0', error=None), 32)
    >>> parse_inline("```python\\nprint(1)")[0].error
    'unclosed ```python block: close it with ``` on its own line'
    >>> parse_inline("The answer is 4.")
    (None, None)
    """
    block = inline.first_closed_block(text)
    if block is not None:
        error = None if block[0].strip() else "empty ```python block: put the code to run in it"
        return ToolCall("python", {"code": block[0]}, call_id, error=error), block[1]
    if inline.has_unclosed_block(text):
        return ToolCall("python", {}, call_id, error="unclosed ```python block: close it with ``` on its own line"), None
    return None, None


_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def parse_chat_calls(text: str, first_id: int = 0) -> tuple[str, list[ToolCall]]:
    """(content outside well-formed calls, calls) of one ``chat_template`` turn. A malformed
    block stays in the content as written and yields a call with ``error`` set. Calls get
    ids ``call_<first_id>``, ``call_<first_id + 1>``, ...

    >>> content, calls = parse_chat_calls('Hi.\\n<tool_call>\\n{"name": "f", "arguments": {"x": 1}}\\n</tool_call>'
    ...                                   '\\n<tool_call>\\n{"name": "g", "arguments": {oops}\\n</tool_call>')
    >>> content, [(c.name, c.arguments, c.call_id) for c in calls]
    ('Hi.\\n\\n<tool_call>\\n{"name": "g", "arguments": {oops}\\n</tool_call>', [('f', {'x': 1}, 'call_0'), ('', {}, 'call_1')])
    >>> calls[1].error
    'bad JSON in <tool_call>: Expecting property name enclosed in double quotes at char 28'
    """
    parts, calls, last = [], [], 0
    for match in _TOOL_CALL.finditer(text):
        parts.append(text[last : match.start()])
        last = match.end()
        call = _call_from_json(match.group(1).strip(), f"call_{first_id + len(calls)}")
        if call.error is not None:
            parts.append(match.group(0))
        calls.append(call)
    rest = text[last:]
    parts.append(rest)
    if "<tool_call>" in rest:
        calls.append(ToolCall("", {}, f"call_{first_id + len(calls)}", error="unclosed <tool_call> block"))
    return "".join(parts).strip(), calls


def _call_from_json(body: str, call_id: str) -> ToolCall:
    try:
        value = json.loads(body)
    except json.JSONDecodeError as error:
        return ToolCall("", {}, call_id, error=f"bad JSON in <tool_call>: {error.msg} at char {error.pos}")
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return ToolCall("", {}, call_id, error='a tool call must be a JSON object {"name": ..., "arguments": {...}}')
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        return ToolCall(value["name"], {}, call_id, error=f"arguments of '{value['name']}' must be a JSON object")
    return ToolCall(value["name"], arguments, call_id)


# ------------------------------------------------------------------------ observations


def truncate_to_tokens(text: str, tokenizer, max_tokens: int) -> str:
    """``text`` unchanged if it tokenises to at most ``max_tokens`` ids, else the decoded first
    ``max_tokens // 2`` and last ``max_tokens - max_tokens // 2`` ids around a marker
    ``\\n...[N tokens cut]...\\n`` (the marker's own few tokens come on top of the budget)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= max_tokens:
        return text
    head, tail = max_tokens // 2, max_tokens - max_tokens // 2
    cut = len(ids) - max_tokens
    tail_text = tokenizer.decode(ids[len(ids) - tail :]) if tail else ""
    return f"{tokenizer.decode(ids[:head])}\n...[{cut} tokens cut]...\n{tail_text}"


def error_tail(stderr: str, lines: int = 3) -> str:
    """The last ``lines`` lines of a traceback (where it failed and the exception), leaving
    out blank lines and the ``~~^~~`` position markers.

    >>> error_tail('Traceback (most recent call last):\\n  File "<cell 1>", line 1, in <module>\\n    1 / 0\\n'
    ...            '    ~~^~~\\nZeroDivisionError: division by zero\\n')
    '  File "<cell 1>", line 1, in <module>\\n    1 / 0\\nZeroDivisionError: division by zero'
    """
    kept = [line for line in stderr.splitlines() if line.strip(" \t~^")]
    return "\n".join(kept[-lines:])


# ------------------------------------------------------------------------------ tools

PYTHON_SCHEMA = {
    "type": "function",
    "function": {
        "name": "python",
        "description": "Run Python code in a fresh sandboxed interpreter and return what it prints.",
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "The Python code to run; print the results."}},
            "required": ["code"],
        },
    },
}


@dataclass
class PythonTool:
    """The built-in ``python`` tool: runs code with ``Sandbox.run_cells`` under a per-call
    wall-clock limit. Observation: stdout (trailing newlines dropped); on an exception, stdout
    then the last ``traceback_lines`` lines of the traceback; on a limit, the limit that fired
    (``timeout after Xs`` for the wall clock, the tool's timeout or the sandbox's own
    ``wall_seconds`` if smaller; ``timeout after Xs of CPU time``; ``error: out of memory``).

    A call succeeds only when its cell ran to its end, as the sandbox's harness reports it
    (``Sandbox.run_cells``): a cell that exits, is killed or ends the interpreter any other
    way is an error, whatever its exit status.

    ``session=True``: each trajectory keeps one interpreter state, rebuilt on every call by
    replaying that trajectory's earlier successful cells (output dropped) before the new
    one, in a fresh sandbox run; each replayed cell too must run to its end, else the call is
    an error. The cells live in the trajectory's ``state`` dict, so no two trajectories share
    anything. Replays count towards the call's timeout and recompute (random values,
    clocks) rather than restore.
    """

    sandbox: Sandbox
    session: bool = False
    traceback_lines: int = 3
    name: str = "python"
    schema: dict = field(default_factory=lambda: json.loads(json.dumps(PYTHON_SCHEMA)))

    @property
    def stateful(self) -> bool:
        return self.session

    def run(self, arguments: dict, state: dict, timeout: float) -> tuple[str, bool]:
        code = arguments.get("code")
        if not isinstance(code, str):
            return "error: argument 'code' of tool 'python' must be a string", True
        cells = state.setdefault("python_cells", []) if self.session else []
        limits = replace(self.sandbox.limits, wall_seconds=min(timeout, self.sandbox.limits.wall_seconds),
                         cpu_seconds=min(max(1, math.ceil(timeout)), self.sandbox.limits.cpu_seconds))
        result = self.sandbox.run_cells([*cells, code], limits=limits)
        stdout = result.stdout.rstrip("\n")
        if result.status == "ok":
            if self.session:
                cells.append(code)
            return stdout, False
        if result.status in ("timeout", "output_limit"):
            return limit_text(result.limit or f"wall_seconds={limits.wall_seconds:g}"), True
        tail = error_tail(result.stderr, self.traceback_lines) or unfinished_text(
            result.cells_completed, len(cells) + 1, result.returncode)
        return (f"{stdout}\n{tail}" if stdout else tail), True


def limit_text(limit: str) -> str:
    """What the model sees for a sandbox limit (``SandboxResult.limit``, ``name=value``).

    >>> limit_text("wall_seconds=2.5"), limit_text("cpu_seconds=3")
    ('timeout after 2.5s', 'timeout after 3s of CPU time')
    """
    name, _, value = limit.partition("=")
    if name == "wall_seconds":
        return f"timeout after {float(value):g}s"
    if name == "cpu_seconds":
        return f"timeout after {value}s of CPU time"
    if name == "memory_mb":
        return f"error: out of memory (the sandbox allows {value} MB)"
    return "error: output limit exceeded"


def unfinished_text(completed: int, cells: int, returncode: int | None) -> str:
    """Why a call without a traceback failed: which cell did not run to its end.

    >>> unfinished_text(1, 3, 0)
    'error: cell 2 of this session did not run to its end when replayed'
    >>> unfinished_text(0, 1, 0)
    'error: the cell ended the interpreter before it ran to its end (exit status 0)'
    """
    if completed < cells - 1:
        return f"error: cell {completed + 1} of this session did not run to its end when replayed"
    if completed < cells:
        return f"error: the cell ended the interpreter before it ran to its end (exit status {returncode})"
    return f"error: the interpreter exited with status {returncode} after the cell ran"


def python_tool(session: bool = False, isolation: str = "auto", unsafe_process_isolation: bool = False,
                limits: SandboxLimits | None = None) -> PythonTool:
    """The ``python`` tool on its own sandbox; like the code reward, ``process`` isolation
    (no security boundary) only with ``unsafe_process_isolation=True``."""
    chosen = choose_isolation(isolation, unsafe_process_isolation)
    return PythonTool(Sandbox(limits or SandboxLimits(), isolation=chosen), session=session)


@dataclass
class UserTool:
    """A plain Python function as a tool; ``schema`` comes from its signature and docstring."""

    name: str
    schema: dict
    function: Callable[..., Any]
    stateful: bool = False

    def __call__(self, arguments: dict) -> str:
        return self.run(arguments, {}, 0.0)[0]

    def run(self, arguments: dict, state: dict, timeout: float) -> tuple[str, bool]:
        """Call the function; its result as text, or ``error: <Type>: <message>``. In-process
        code is trusted and has no timeout (only the sandboxed ``python`` tool has one)."""
        try:
            value = self.function(**arguments)
        except Exception as error:  # the model caused it; it sees the error, the run goes on
            return error_text(error), True
        return (value if isinstance(value, str) else json.dumps(value, default=str)), False


def error_text(error: BaseException) -> str:
    """``error: <Type>: <message>`` on one line, as the model sees an exception."""
    message = " ".join(str(error).split())
    return f"error: {type(error).__name__}: {message}" if message else f"error: {type(error).__name__}"


def load_user_tool(spec: str, key: str = "agent.tools") -> UserTool:
    """``module:function`` or ``file.py:function`` -> a tool (``posttrain.plugins.load_object``,
    the resolver ``reward:`` uses). The function needs type hints and a docstring with an
    ``Args:`` entry per argument (``transformers.utils.get_json_schema``)."""
    from transformers.utils import get_json_schema

    function = load_object(spec, key)
    if not callable(function) or isinstance(function, type):
        raise ConfigError(f"{key}: {spec!r} is not a function")
    try:
        schema = get_json_schema(function)
    except Exception as error:
        reason = " ".join(str(error).split())
        raise ConfigError(f"{key}: {spec!r} needs type hints and a docstring describing each argument ({reason})") from None
    return UserTool(schema["function"]["name"], schema, function)


def load_environment(spec: str, key: str = "agent.environment") -> type:
    """``module:Class`` or ``file.py:Class`` -> the class (instantiated once per trajectory with
    no arguments; docs/AGENTIC.md, "Environments")."""
    cls = load_object(spec, key)
    if not isinstance(cls, type) or not callable(getattr(cls, "reset", None)) or not callable(getattr(cls, "step", None)):
        raise ConfigError(f"{key}: {spec!r} must be a class with reset(row) and step(calls) methods")
    return cls


def environment_schemas(cls: type, key: str = "agent.environment") -> list[dict]:
    """The tools an environment class declares (its optional ``tools`` attribute: OpenAI
    function schemas), which a ``chat_template`` prompt announces; [] when it declares none.

    >>> class Env:
    ...     tools = [{"type": "function", "function": {"name": "calculate", "parameters": {}}}]
    >>> [schema["function"]["name"] for schema in environment_schemas(Env)]
    ['calculate']
    """
    schemas = getattr(cls, "tools", None) or []
    if not isinstance(schemas, (list, tuple)) or not all(
            isinstance(s, dict) and isinstance(s.get("function"), dict) and isinstance(s["function"].get("name"), str)
            for s in schemas):
        raise ConfigError(f"{key}: {cls.__name__}.tools must be a list of OpenAI function schemas "
                          '({"type": "function", "function": {"name": ..., "parameters": {...}}})')
    return list(schemas)


def parallel_map(fn: Callable, items: Sequence, concurrency: int) -> list:
    """``[fn(item) for item in items]`` on at most ``concurrency`` threads, order kept."""
    if len(items) <= 1 or concurrency <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(concurrency, len(items))) as pool:
        return list(pool.map(fn, items))


class ToolBox:
    """The tools by name; runs the calls of many trajectories at once.

    Calls of different trajectories run in parallel (``concurrency`` threads); the calls of one
    trajectory run in parallel too unless one of them goes to a stateful tool (a session), in
    which case they run in order.
    """

    def __init__(self, tools: Sequence[Any] = (), declared: Sequence[dict] = ()):
        self.tools: dict[str, Any] = {}
        for tool in tools:
            if tool.name in self.tools:
                raise ConfigError(f"agent.tools: two tools are named '{tool.name}'")
            self.tools[tool.name] = tool
        self.declared = [dict(schema) for schema in declared]  # an environment's tools: announced, never run here

    def schemas(self) -> list[dict]:
        """The OpenAI function schemas a ``chat_template`` prompt announces: the tools', then
        the environment's (``environment_schemas``)."""
        return [tool.schema for tool in self.tools.values()] + self.declared

    def run(self, jobs: Sequence[tuple[list[ToolCall], dict]], *, concurrency: int = 4,
            timeout: float = 5.0) -> list[list[ToolResult]]:
        """jobs: one ``(calls, state)`` per trajectory -> one result per call, same shape."""
        tasks: list[tuple[int, list[int]]] = []
        for index, (calls, _) in enumerate(jobs):
            if any(getattr(self.tools.get(call.name), "stateful", False) for call in calls):
                tasks.append((index, list(range(len(calls)))))
            else:
                tasks.extend((index, [k]) for k in range(len(calls)))

        def work(task: tuple[int, list[int]]) -> list[ToolResult]:
            index, positions = task
            calls, state = jobs[index]
            return [self.run_call(calls[k], state, timeout) for k in positions]

        results: list[list[ToolResult | None]] = [[None] * len(calls) for calls, _ in jobs]
        for (index, positions), done in zip(tasks, parallel_map(work, tasks, concurrency)):
            for k, result in zip(positions, done):
                results[index][k] = result
        return results  # type: ignore[return-value]

    def run_call(self, call: ToolCall, state: dict, timeout: float) -> ToolResult:
        start = time.perf_counter()
        text, is_error = self._answer(call, state, timeout)
        return ToolResult(text, is_error, time.perf_counter() - start)

    def _answer(self, call: ToolCall, state: dict, timeout: float) -> tuple[str, bool]:
        if call.error is not None:
            return f"error: {call.error}", True
        tool = self.tools.get(call.name)
        if tool is None:
            return f"error: unknown tool '{call.name}'; available: {', '.join(self.tools) or 'none'}", True
        required = tool.schema.get("function", {}).get("parameters", {}).get("required", [])
        missing = [name for name in required if name not in call.arguments]
        if missing:
            return f"error: tool '{call.name}' is missing argument '{missing[0]}'", True
        try:
            return tool.run(call.arguments, state, timeout)
        except Exception as error:
            return error_text(error), True
