"""Read data files and normalise row shapes into one conversation form.

Files: JSONL (read line by line here, so a malformed line is reported with its exact line
number), JSON (an array of rows, or JSON Lines in a ``.json`` file), Parquet and local
``datasets`` directories (``save_to_disk`` output, read with the ``datasets`` library).
Rows are numbered from 1: the line in a JSONL file, the row index otherwise. Every problem
raises ``DataError("<file>:<n>: <problem>")``, one line.

Row shapes (seed 004 section 3 names the roles; the OpenAI shape is the reference):

- ``{"messages": [...], "tools": [...]}``: messages ``{"role": "system"|"user"|"assistant"|"tool",
  "content": str, "tool_calls": [...], "train": bool, "weight": float}``;
- ``{"conversations": [...]}``: the same list under the seed's key, or ShareGPT
  ``{"from": "human"|"gpt"|"system"|"function_call"|"observation"|..., "value": str}``;
- ``{"prompt": str|messages, "completion": str|messages}``: only the completion is trained
  (assistant turns inside the prompt are marked ``train: false`` unless they say otherwise).

Preference rows ``{"prompt", "chosen", "rejected"}`` are rendered by the reward-model code
with ``normalise_messages`` + ``render.render_conversation``.

Tool calls are normalised to the shape chat templates expect (Hugging Face chat-template
docs): ``{"type": "function", "function": {"name": str, "arguments": dict}}``; JSON-string
arguments (the OpenAI wire shape) are parsed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from posttrain.errors import DataError

ROLES = ("system", "user", "assistant", "tool")

# ShareGPT / LLaMA-Factory "from" names and common synonyms -> OpenAI roles
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "system": "system",
    "developer": "system",
    "tool": "tool",
    "observation": "tool",
    "function": "tool",
    "ipython": "tool",
    "function_call": "assistant",  # ShareGPT: value is a JSON tool call
}


@dataclass
class Conversation:
    """One normalised row: messages in OpenAI shape plus the tool definitions."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    line: int = 0
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- reading files
def read_rows(
    path: str | Path,
    *,
    limit: int | None = None,
    skip_bad: bool = False,
    bad_rows: list[tuple[int, str]] | None = None,
) -> Iterator[tuple[int, dict]]:
    """Yield ``(n, row)`` for each row of a JSONL/JSON/Parquet file or ``datasets`` directory.

    ``n`` is 1-based: the line number in JSONL, the row index otherwise. A malformed row raises
    DataError naming ``file:n``; with ``skip_bad`` it is appended to ``bad_rows`` as
    ``(n, message)`` and skipped instead. ``limit`` counts rows read, bad ones included.
    """
    for n, row in read_rows_or_errors(path, limit=limit):
        if isinstance(row, DataError):
            if not skip_bad:
                raise row
            if bad_rows is not None:
                bad_rows.append((n, str(row)))
            continue
        yield n, row


def read_rows_or_errors(path: str | Path, *, limit: int | None = None) -> Iterator[tuple[int, dict | DataError]]:
    """Like ``read_rows`` but yields ``(n, DataError)`` for a malformed row instead of raising."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    for count, item in enumerate(_iter_raw(path)):
        if limit is not None and count >= limit:
            return
        yield item


def _iter_raw(path: Path) -> Iterator[tuple[int, dict | DataError]]:
    if path.is_dir():
        yield from _iter_dataset_dir(path)
        return
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if suffix in (".jsonl", ".ndjson", ".jsonl.gz"):
        yield from _iter_jsonl(path)
    elif suffix == ".json":
        yield from _iter_json(path)
    elif suffix in (".parquet", ".pq"):
        yield from _iter_arrow_rows(path, _load_parquet(path))
    else:
        raise DataError(f"{path}: unknown data file type '{path.suffix}' (use .jsonl, .json, .parquet or a datasets directory)")


def _open_text(path: Path):
    if path.suffix == ".gz":
        import gzip

        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict | DataError]]:
    try:
        with _open_text(path) as handle:
            for n, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                yield n, _parse_object(text, f"{path}:{n}")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _parse_object(text: str, where: str) -> dict | DataError:
    text = text.rstrip()
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        at = "the end of the line" if exc.pos >= len(text) else f"column {exc.colno}"
        return DataError(f"{where}: malformed JSON ({exc.msg} at {at})")
    if not isinstance(row, dict):
        return DataError(f"{where}: a row must be a JSON object, got {_type_name(row)}")
    return row


def _iter_json(path: Path) -> Iterator[tuple[int, dict | DataError]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.pos > 0 and text.lstrip().startswith("{"):  # JSON Lines saved as .json
            yield from _iter_jsonl(path)
            return
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) == 1 and not {"messages", "conversations", "prompt"} & set(data):
            data = data[lists[0]]  # {"data": [...]} / {"train": [...]}
        else:
            data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: a JSON data file must hold an array of rows, got {_type_name(data)}")
    for n, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            yield n, DataError(f"{path}:{n}: a row must be a JSON object, got {_type_name(row)}")
        else:
            yield n, row


def _load_parquet(path: Path):
    from datasets import Dataset

    try:
        return Dataset.from_parquet(str(path), keep_in_memory=True)
    except Exception as exc:  # pyarrow raises many types for a bad file
        raise DataError(f"{path}: cannot read Parquet ({_one_line(exc)})") from None


def _iter_dataset_dir(path: Path) -> Iterator[tuple[int, dict | DataError]]:
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path}: not a datasets directory saved with save_to_disk ({_one_line(exc)})") from None
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(dataset)})")
        dataset = dataset["train"]
    yield from _iter_arrow_rows(path, dataset)


def _iter_arrow_rows(path: Path, dataset) -> Iterator[tuple[int, dict | DataError]]:
    for n, row in enumerate(dataset, start=1):
        yield n, _drop_nulls(row)


def _drop_nulls(value: Any) -> Any:
    """Arrow fills absent struct fields with None (``tool_calls: None`` on every message); drop them."""
    if isinstance(value, dict):
        return {key: _drop_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_drop_nulls(item) for item in value]
    return value


# ----------------------------------------------------------------------------- row shapes
PROMPT_KEYS = ("messages", "prompt")  # where an RL prompt row holds its prompt, first found wins


def prompt_from_row(row: dict, where: str, *, system: str | None = None) -> Conversation:
    """Check and normalise one RL prompt row: ``{"messages"|"prompt": ..., <metadata>...}``.

    The prompt is a non-empty string (one user message) or a list of messages (OpenAI or
    ShareGPT shape) with some text. ``system`` is put first when the prompt has no system
    message. ``extra`` holds every other key (``answer``, ``tests``, ``tools``, ...): the
    reward's metadata. Raises DataError (one line, naming ``where``) on a missing prompt, a
    wrong type, or an empty prompt.

    >>> prompt_from_row({"prompt": "2+2?", "answer": "4"}, "f.jsonl:1", system="Be brief.").messages
    [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': '2+2?'}]
    >>> prompt_from_row({"prompt": "  "}, "f.jsonl:2")
    Traceback (most recent call last):
    ...
    posttrain.errors.DataError: f.jsonl:2: prompt is empty
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be an object, got {_type_name(row)}")
    key = next((k for k in PROMPT_KEYS if k in row), None)
    if key is None:
        keys = ", ".join(sorted(row)) or "none"
        raise DataError(f"{where}: an RL prompt row needs a 'messages' or 'prompt' key (keys: {keys})")
    value = row[key]
    if not isinstance(value, (str, list, dict)):
        raise DataError(f"{where}: {key} must be a string or a list of messages, got {_type_name(value)}")
    messages = normalise_messages(value, f"{where}: {key}")
    if not any(isinstance(m.get("content"), str) and m["content"].strip() for m in messages):
        raise DataError(f"{where}: {key} is empty")
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}] + messages
    tools = normalise_tools(row.get("tools"), f"{where}: tools")
    return Conversation(messages=messages, tools=tools, extra={k: v for k, v in row.items() if k != key})


def conversation_from_row(row: dict, where: str, *, require_assistant: bool = True) -> Conversation:
    """Normalise one SFT row (messages / conversations / ShareGPT / prompt+completion)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be an object, got {_type_name(row)}")
    if "messages" in row or "conversations" in row:
        key = "messages" if "messages" in row else "conversations"
        messages = normalise_messages(row[key], f"{where}: {key}")
    elif "prompt" in row and "completion" in row:
        prompt = normalise_messages(row["prompt"], f"{where}: prompt", default_role="user")
        completion = normalise_messages(row["completion"], f"{where}: completion", default_role="assistant")
        for message in prompt:
            if message["role"] == "assistant":
                message.setdefault("train", False)
        messages = prompt + completion
    elif "prompt" in row and "chosen" in row:
        raise DataError(f"{where}: a preference row (prompt/chosen/rejected) is reward-model data, not SFT data")
    else:
        keys = ", ".join(sorted(row)) or "none"
        raise DataError(
            f"{where}: no conversation found: expected 'messages', 'conversations' or 'prompt'+'completion' (keys: {keys})"
        )
    if not messages:
        raise DataError(f"{where}: the conversation is empty")
    if require_assistant and not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"{where}: no assistant turn (nothing to train on)")
    tools = normalise_tools(row.get("tools"), f"{where}: tools")
    extra = {key: value for key, value in row.items() if key not in ("messages", "conversations", "prompt", "completion", "tools")}
    return Conversation(messages=messages, tools=tools, extra=extra)


def normalise_messages(value: Any, where: str, *, default_role: str = "user") -> list[dict[str, Any]]:
    """A string or a list of messages (OpenAI or ShareGPT shape) -> list of OpenAI-shape messages.

    A string becomes one message of ``default_role``. Raises DataError naming ``where`` and the
    message number on an unknown role, missing content, or a wrong type.

    >>> normalise_messages("hi", "x")
    [{'role': 'user', 'content': 'hi'}]
    >>> normalise_messages([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}], "x")
    [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'}]
    """
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, dict) and ("role" in value or "from" in value):
        value = [value]
    if not isinstance(value, list):
        raise DataError(f"{where}: expected a string or a list of messages, got {_type_name(value)}")
    return [_normalise_message(message, f"{where}[{index}]") for index, message in enumerate(value)]


def _normalise_message(message: Any, where: str) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise DataError(f"{where}: a message must be an object, got {_type_name(message)}")
    sharegpt = "from" in message and "role" not in message
    raw_role = message.get("from") if sharegpt else message.get("role")
    if raw_role is None:
        raise DataError(f"{where}: message has no 'role'")
    if not isinstance(raw_role, str):
        raise DataError(f"{where}: role must be a string, got {_type_name(raw_role)}")
    role = ROLE_ALIASES.get(raw_role.lower()) if sharegpt else (raw_role if raw_role in ROLES else None)
    if role is None:
        known = ", ".join(sorted(ROLE_ALIASES) if sharegpt else ROLES)
        raise DataError(f"{where}: unknown role '{raw_role}' (known: {known})")
    out = {key: item for key, item in message.items() if key not in ("from", "value", "role")}
    out = {"role": role, **out}
    if sharegpt:
        if raw_role.lower() == "function_call":
            out["tool_calls"] = [_parse_sharegpt_call(message.get("value"), where)]
            out["content"] = ""
        else:
            out["content"] = message.get("value")
    content = out.get("content")
    if isinstance(content, list):
        out["content"] = _join_text_parts(content, where)
    tool_calls = out.get("tool_calls")
    if tool_calls is not None:
        if role != "assistant":
            raise DataError(f"{where}: only assistant messages can carry tool_calls (role is '{role}')")
        out["tool_calls"] = normalise_tool_calls(tool_calls, f"{where}.tool_calls")
        if not out["tool_calls"]:
            del out["tool_calls"]
    if out.get("content") is None:
        if out.get("tool_calls"):
            out["content"] = ""  # OpenAI allows null content beside tool calls; templates concatenate strings
        else:
            raise DataError(f"{where}: {role} message has no content")
    if not isinstance(out["content"], str):
        raise DataError(f"{where}: content must be a string, got {_type_name(out['content'])}")
    if "train" in out:
        if not isinstance(out["train"], bool):
            raise DataError(f"{where}: 'train' must be true or false, got {out['train']!r}")
        if out["train"] and role != "assistant":
            raise DataError(f"{where}: only assistant messages can be trained ('train': true on a {role} message)")
    if "weight" in out:
        weight = out["weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0 or weight != weight:
            raise DataError(f"{where}: 'weight' must be a non-negative number, got {weight!r}")
        out["weight"] = float(weight)
    return out


def _join_text_parts(parts: list, where: str) -> str:
    texts = []
    for index, part in enumerate(parts):
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, dict) else _type_name(part)
            raise DataError(f"{where}: content part {index} is '{kind}'; only text content is supported")
    return "".join(texts)


def _parse_json_text(text: str, where: str, what: str) -> Any:
    """``json.loads(text)``; a one-line DataError ``<where>: <what> not valid JSON (<why>)``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: {what} not valid JSON ({exc.msg})") from None


def _parse_sharegpt_call(value: Any, where: str) -> dict:
    if isinstance(value, str):
        value = _parse_json_text(value, where, "function_call value is")
    if not isinstance(value, dict):
        raise DataError(f"{where}: function_call value must be a JSON object with 'name' and 'arguments'")
    return value


def normalise_tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """Tool calls -> ``[{"type": "function", "function": {"name", "arguments": dict}, ("id")}]``."""
    if not isinstance(value, list):
        raise DataError(f"{where}: must be a list, got {_type_name(value)}")
    calls = []
    for index, call in enumerate(value):
        here = f"{where}[{index}]"
        if not isinstance(call, dict):
            raise DataError(f"{here}: a tool call must be an object, got {_type_name(call)}")
        function = call.get("function", call)
        if not isinstance(function, dict):
            raise DataError(f"{here}: 'function' must be an object")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise DataError(f"{here}: tool call has no function name")
        arguments = function.get("arguments", function.get("parameters", {}))
        if isinstance(arguments, str):
            arguments = _parse_json_text(arguments, here, f"arguments of '{name}' are") if arguments.strip() else {}
        if not isinstance(arguments, dict):
            raise DataError(f"{here}: arguments of '{name}' must be an object, got {_type_name(arguments)}")
        normalised: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
        if call.get("id") is not None:
            normalised["id"] = call["id"]
        calls.append(normalised)
    return calls


def normalise_tools(value: Any, where: str) -> list[dict[str, Any]] | None:
    """Tool definitions (a list, or that list as a JSON string) -> list of OpenAI tool objects."""
    if value is None or value == [] or value == "":
        return None
    if isinstance(value, str):
        value = _parse_json_text(value, where, "is")
    if not isinstance(value, list):
        raise DataError(f"{where}: must be a list of tool definitions, got {_type_name(value)}")
    tools = []
    for index, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise DataError(f"{where}[{index}]: a tool definition must be an object")
        if "function" not in tool and "name" in tool:
            tool = {"type": "function", "function": tool}
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise DataError(f"{where}[{index}]: a tool definition needs function.name")
        tools.append(tool)
    return tools


def tool_names(tools: list[dict[str, Any]] | None) -> list[str]:
    return [tool["function"]["name"] for tool in tools or []]


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:200] + "...") if len(text) > 200 else text or type(exc).__name__
