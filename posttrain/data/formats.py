"""Read data files and normalise row shapes into one conversation form.

Files: JSONL (read line by line here, so a malformed line is reported with its exact line
number), JSON (an array of rows, or JSON Lines in a ``.json`` file), Parquet and local
``datasets`` directories (``save_to_disk`` output, read with the ``datasets`` library).
Rows are numbered from 1: the line in a JSONL file, the row index otherwise. Every problem
raises ``DataError("<file>:<n>: <problem>")``, one line.

Row shapes (the OpenAI chat-completions message shape is the reference):

- ``{"messages": [...], "tools": [...]}``: messages ``{"role": "system"|"user"|"assistant"|"tool",
  "content": str, "tool_calls": [...], "train": bool, "weight": float}``;
- ``{"conversations": [...]}``: the same list under another common key, or ShareGPT
  ``{"from": "human"|"gpt"|"system"|"function_call"|"observation"|..., "value": str}``;
- ``{"prompt": str|messages, "completion": str|messages}``: only the completion is trained
  (assistant turns inside the prompt are marked ``train: false`` unless they say otherwise);
- ``{"text": str}`` (TRL's language-modelling rows): no chat template, loss on every token
  (``text_from_row``, rendered by ``render.render_text``);
- RL prompt rows ``{"prompt"|"messages", ...}`` (``prompt_from_row``), veRL's parquet shape
  included (``reward_model.ground_truth`` is the ``answer``).

Sources may also be hub datasets and folders of data files (``datasets.load_dataset``), and
``data.columns`` renames fields, dotted paths into nested ones (``apply_columns``), before any
of this reads a row. A data setting that lists several sources is read source by source through
``read_rows_or_errors`` and mixed by ``data.mixture`` (docs/DATA.md).

Preference rows ``{"prompt", "chosen", "rejected"}`` are read by ``data.preference`` (shared by
``posttrain rm`` and ``posttrain dpo``) and rendered with ``render.render_conversation``.

Tool calls are normalised to the shape chat templates expect (Hugging Face chat-template
docs): ``{"type": "function", "function": {"name": str, "arguments": dict}}``; JSON-string
arguments (the OpenAI wire shape) are parsed.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from posttrain.errors import DataError, config_key
from posttrain.hub import hub_status

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
class BadRowError(DataError):
    """One malformed row, raised because ``data.skip_bad`` is off: with it on, the row would be
    counted and skipped. (A problem with the whole file, or a setting such as
    ``data.truncation=error``, stays a plain DataError: ``skip_bad`` cannot help there.)"""


def read_rows(
    path: str | Path,
    *,
    limit: int | None = None,
    skip_bad: bool = False,
    bad_rows: list[tuple[int, str]] | None = None,
    columns: Mapping[str, str] | None = None,
) -> Iterator[tuple[int, dict]]:
    """Yield ``(n, row)`` for each row of a JSONL/JSON/Parquet file, a ``datasets`` directory
    or a hub dataset (``org/name[@config][:split]``, see ``read_rows_or_errors``).

    ``n`` is 1-based: the line number in JSONL, the row index otherwise. A malformed row raises
    BadRowError naming ``file:n``; with ``skip_bad`` it is appended to ``bad_rows`` as
    ``(n, message)`` and skipped instead. ``limit`` counts rows read, bad ones included.
    ``columns`` (``data.columns``) renames fields first (``apply_columns``).
    """
    for n, row in read_rows_or_errors(path, limit=limit, columns=columns):
        if isinstance(row, DataError):
            if not skip_bad:
                raise BadRowError(str(row))
            if bad_rows is not None:
                bad_rows.append((n, str(row)))
            continue
        yield n, row


def read_rows_or_errors(path: str | Path, *, limit: int | None = None,
                        columns: Mapping[str, str] | None = None) -> Iterator[tuple[int, dict | DataError]]:
    """Like ``read_rows`` but yields ``(n, DataError)`` for a malformed row instead of raising.

    ``path`` is a local file or directory, or, when no such path exists, a dataset spec
    ``NAME[@CONFIG][:SPLIT]`` read with ``datasets.load_dataset(NAME, CONFIG, split=SPLIT)``
    (split ``train`` by default; Hugging Face datasets docs, "Load"): a hub id ``org/name``,
    or a local folder of data files (``data/train-*.parquet``, a downloaded hub repository).
    ``columns`` maps each row through ``apply_columns`` before anything else reads it.

    A problem with the whole file (missing, unreadable, not a data file, an unreachable hub)
    raises DataError: no row can be read, so ``skip_bad`` has nothing to skip.
    """
    local = Path(path).expanduser()
    if local.exists():
        rows = _iter_raw(local)
    else:
        name, config, split = parse_dataset_spec(str(path))
        if Path(name).expanduser().is_dir():
            rows = _iter_raw(Path(name).expanduser(), config=config, split=split)
        elif is_hub_dataset_id(name):
            rows = _iter_arrow_rows(Path(str(path)), _load_hub_dataset(name, config, split, str(path)))
        else:
            raise DataError(f"data file {path} does not exist")
    for count, (n, row) in enumerate(rows):
        if limit is not None and count >= limit:
            return
        if not isinstance(row, DataError):
            problem = row_shape_problem(row)
            if problem is not None:
                row = DataError(f"{path}:{n}: {problem}")
        if columns and not isinstance(row, DataError):
            try:
                row = apply_columns(row, columns, f"{path}:{n}")
            except DataError as exc:
                row = exc
        yield n, row


# ----------------------------------------------------------------------------- datasets library sources
DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".pq", ".gz", ".csv", ".arrow", ".txt")


def parse_dataset_spec(spec: str) -> tuple[str, str | None, str]:
    """``NAME[@CONFIG][:SPLIT]`` -> ``(name, config, split)``; the split defaults to ``train`` and
    may use the datasets slicing syntax (``train[:100]``).

    >>> parse_dataset_spec("openai/gsm8k@main:test[:50]")
    ('openai/gsm8k', 'main', 'test[:50]')
    >>> parse_dataset_spec("org/name")
    ('org/name', None, 'train')
    """
    name, _, split = spec.partition(":")
    name, _, config = name.partition("@")
    return name, config or None, split or "train"


def is_hub_dataset_id(name: str) -> bool:
    """``org/name`` that is not a local path nor a data file name (what ``load_dataset`` fetches).

    >>> is_hub_dataset_id("openai/gsm8k"), is_hub_dataset_id("data/train.jsonl"), is_hub_dataset_id("./a/b")
    (True, False, False)
    """
    parts = name.split("/")
    return (len(parts) == 2 and all(re.fullmatch(r"[A-Za-z0-9][\w.-]*", part) for part in parts)
            and not name.lower().endswith(DATA_SUFFIXES))


def is_hub_dataset_spec(spec: str) -> bool:
    """A data setting that names a hub dataset (no local path by that name): checked when it loads."""
    return not Path(spec).expanduser().exists() and is_hub_dataset_id(parse_dataset_spec(spec)[0])


def _load_hub_dataset(name: str, config: str | None, split: str, where: str):
    """``datasets.load_dataset(name, config, split=split)``; one-line DataError when it fails. Without
    a reachable hub the call runs in datasets' offline mode, so a cached copy still loads and a
    missing one fails at once instead of after minutes of retries."""

    reachable, host = hub_status()
    try:
        with _hub_offline(not reachable):
            return _load_dataset(name, config, split)
    except Exception as exc:  # datasets / huggingface_hub raise many types
        if not reachable:
            raise DataError(
                f"{where}: cannot load dataset '{name}': the Hugging Face hub ({host}) is not reachable from this "
                f"machine and the dataset is not in the local datasets cache; download it where the hub is "
                f"reachable and give its local folder (or save_to_disk directory) instead") from None
        raise DataError(f"{where}: cannot load dataset '{name}' with datasets.load_dataset ({_one_line(exc)})") from None


def _load_dataset(name: str, config: str | None, split: str):
    import datasets

    with _quiet_datasets():
        return datasets.load_dataset(name, config, split=split)


class _quiet_datasets:
    """No datasets progress bars or info logs while posttrain reads data (the audit reports it)."""

    def __enter__(self):
        import datasets

        self.verbosity = datasets.logging.get_verbosity()
        self.bars = datasets.is_progress_bar_enabled()
        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
        return self

    def __exit__(self, *exc_info):
        import datasets

        datasets.logging.set_verbosity(self.verbosity)
        if self.bars:
            datasets.enable_progress_bars()
        return False


class _hub_offline:
    """Switch datasets and huggingface_hub to offline mode for one call (both read the flag at call time)."""

    def __init__(self, active: bool):
        self.active = active

    def __enter__(self):
        if self.active:
            import datasets.config
            from huggingface_hub import constants

            self.saved = (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE)
            datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
        return self

    def __exit__(self, *exc_info):
        if self.active:
            import datasets.config
            from huggingface_hub import constants

            datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = self.saved
        return False


# ----------------------------------------------------------------------------- column mapping
def apply_columns(row: dict, columns: Mapping[str, str], where: str) -> dict:
    """``data.columns``: ``{target: source}``; set ``row[target]`` to the value at the dotted path
    ``source`` (``reward_model.ground_truth`` reads ``row["reward_model"]["ground_truth"]``; a
    number indexes a list: ``messages.0.content``). Other fields stay. DataError naming
    ``where`` and the key when a path is absent from the row.

    >>> apply_columns({"question": "2+2?", "reward_model": {"ground_truth": "4"}},
    ...               {"prompt": "question", "answer": "reward_model.ground_truth"}, "f:1")["answer"]
    '4'
    >>> apply_columns({"q": "hi"}, {"prompt": "question"}, "f.parquet:3")
    Traceback (most recent call last):
    ...
    posttrain.errors.DataError: f.parquet:3: data.columns.prompt: no field 'question' in this row (fields: q)
    """
    out = dict(row)
    for target, source in columns.items():
        found, value = lookup_path(row, source)
        if not found:
            fields = ", ".join(sorted(row)) or "none"
            raise DataError(f"{where}: {config_key('data.columns')}.{target}: no field '{source}' in this row (fields: {fields})")
        out[target] = value
    return out


def lookup_path(row: Any, path: str) -> tuple[bool, Any]:
    """``(found, value)`` at the dotted ``path`` in nested dicts and lists."""
    value = row
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            return False, None
    return True, value


def _iter_raw(path: Path, *, config: str | None = None, split: str = "train") -> Iterator[tuple[int, dict | DataError]]:
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file() or not _holds_data_files(path):
            yield from _iter_dataset_dir(path, split)
        else:  # a folder of data files (a hub repository's layout): datasets picks the builder
            yield from _iter_arrow_rows(path, _load_folder(path, config, split))
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


def _open_binary(path: Path):
    if path.suffix == ".gz":
        import gzip

        return gzip.open(path, "rb")
    return open(path, "rb")


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict | DataError]]:
    """Rows of a JSON Lines file, read as bytes and decoded line by line, so that invalid UTF-8
    is one bad row naming its line and its byte offset in the file (in the decompressed text
    for ``.gz``), which ``skip_bad`` can skip. Lines end at ``\\n`` (``\\r\\n`` too), as editors
    count them; a UTF-8 byte-order mark on line 1 is ignored."""
    offset = 0  # file offset of the current line
    try:
        with _open_binary(path) as handle:
            for n, raw in enumerate(handle, start=1):
                start, offset = offset, offset + len(raw)
                skip = len(UTF8_BOM) if n == 1 and raw.startswith(UTF8_BOM) else 0
                try:
                    text = raw[skip:].decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield n, DataError(f"{path}:{n}: not UTF-8 text ({_decode_problem(exc, start + skip, start)})")
                    continue
                if not text.strip():
                    continue
                yield n, _parse_object(text, f"{path}:{n}")
    except (OSError, EOFError) as exc:  # a corrupt or truncated .gz, a read error
        raise DataError(f"{path}: cannot read ({_one_line(exc)})") from None


UTF8_BOM = b"\xef\xbb\xbf"


def _decode_problem(exc: UnicodeDecodeError, object_start: int, line_start: int) -> str:
    """``invalid start byte (0xff) at byte offset 1234 of the file, column 5``: ``exc`` came from
    decoding bytes that start at file offset ``object_start``. The offset (0-based, as ``xxd`` and
    ``od`` print it) is where the bad sequence starts; the column is 1-based, in bytes from
    ``line_start``. For a bad continuation byte the bytes shown end with that byte."""
    offset = object_start + exc.start
    end = exc.end + 1 if "continuation" in exc.reason else exc.end
    shown = " ".join(f"0x{byte:02x}" for byte in exc.object[exc.start : end])
    return f"{exc.reason} ({shown}) at byte offset {offset} of the file, column {offset - line_start + 1}"


def _parse_object(text: str, where: str) -> dict | DataError:
    text = text.rstrip()
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        at = "the end of the line" if exc.pos >= len(text) else f"column {exc.colno}"
        return DataError(f"{where}: malformed JSON ({exc.msg} at {at})")
    except RecursionError:  # the parser's own depth limit: deeper than any row may be
        return DataError(f"{where}: {TOO_DEEP} (at column {_too_deep_at(text) + 1})")
    if not isinstance(row, dict):
        return DataError(f"{where}: a row must be a JSON object, got {_type_name(row)}")
    return row


def _iter_json(path: Path) -> Iterator[tuple[int, dict | DataError]]:
    raw = path.read_bytes()
    skip = len(UTF8_BOM) if raw.startswith(UTF8_BOM) else 0
    try:
        text = raw[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        if _looks_like_json_lines(raw[skip:].decode("utf-8", errors="replace")):
            yield from _iter_jsonl(path)  # the bad bytes are one bad row, named by its line
            return
        line = raw[: skip + exc.start].count(b"\n") + 1
        line_start = raw.rfind(b"\n", 0, skip + exc.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({_decode_problem(exc, skip, line_start)})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.pos > 0 and text.lstrip().startswith("{"):  # JSON Lines saved as .json
            yield from _iter_jsonl(path)
            return
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        if text.lstrip().startswith("{") and sum(line.startswith("{") for line in text.splitlines()) > 1:
            yield from _iter_jsonl(path)  # JSON Lines saved as .json: the deep line is one bad row
            return
        position = _too_deep_at(text)
        line = text.count("\n", 0, position) + 1
        column = position - text.rfind("\n", 0, position)
        raise DataError(f"{path}:{line}: {TOO_DEEP} (at column {column}), so no row of this file can be read") from None
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


def _looks_like_json_lines(text: str) -> bool:
    """A ``.json`` file holding JSON Lines: an object first, and more than one value."""
    if not text.lstrip().startswith("{"):
        return False
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        return exc.pos > 0
    return False


def _load_parquet(path: Path):
    from datasets import Dataset

    try:
        with _quiet_datasets():
            return Dataset.from_parquet(str(path), keep_in_memory=True)
    except Exception as exc:  # pyarrow raises many types for a bad file
        raise DataError(f"{path}: cannot read Parquet ({_one_line(exc)})") from None


def _iter_dataset_dir(path: Path, split: str = "train") -> Iterator[tuple[int, dict | DataError]]:
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path}: not a datasets directory saved with save_to_disk, nor a folder of data files "
                        f"({_one_line(exc)})") from None
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise DataError(f"{path}: a DatasetDict without a '{split}' split (splits: {', '.join(dataset)})")
        dataset = dataset[split]
    yield from _iter_arrow_rows(path, dataset)


def _holds_data_files(path: Path) -> bool:
    return any(child.is_file() and child.name.lower().endswith(DATA_SUFFIXES) for child in path.rglob("*")
               if ".git" not in child.parts)


def _load_folder(path: Path, config: str | None, split: str):
    try:
        return _load_dataset(str(path), config, split)
    except Exception as exc:
        raise DataError(f"{path}: cannot load this folder with datasets.load_dataset ({_one_line(exc)})") from None


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


# ----------------------------------------------------------------------------- text every reader can use
MAX_ROW_NESTING = 100
TOO_DEEP = f"JSON nested more than {MAX_ROW_NESTING} levels deep"
_SURROGATE = re.compile("[\ud800-\udfff]")


def row_shape_problem(row: Any) -> str | None:
    r"""What makes a parsed row unusable by every reader, or None: nesting deeper than
    ``MAX_ROW_NESTING`` levels (a chat row needs about ten; far deeper ones exhaust the
    recursion of the JSON, template and hashing code that reads rows), or a lone UTF-16
    surrogate (``\ud800``: a valid JSON escape, yet no Unicode character, so no tokenizer can
    encode the text; RFC 8259, section 8.2). Keys count as text. The problem names the field
    by its path in the row (``messages[1].content``).

    The walk is iterative, so a row nested too deeply for recursion is still measured.

    >>> row_shape_problem({"messages": [{"role": "user", "content": "hi \ud800"}]})
    'messages[0].content: a lone surrogate (\\ud800) at character 3: not Unicode text, so no tokenizer can encode it'
    >>> row_shape_problem({"messages": [{"role": "user", "content": "hi \U0001f600"}]}) is None
    True
    """
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(row, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            found = None if value.isascii() else _SURROGATE.search(value)
            if found is not None:
                return (f"{_field_path(path)}: a lone surrogate ({ascii(found.group())[1:-1]}) at character "
                        f"{found.start()}: not Unicode text, so no tokenizer can encode it")
            continue
        if len(path) >= MAX_ROW_NESTING and isinstance(value, (dict, list)) and value:
            return f"{TOO_DEEP} (under '{_field_path(path[:1])}')"
        if isinstance(value, dict):
            for key, item in reversed(value.items()):
                key_text = str(key)
                found = None if key_text.isascii() else _SURROGATE.search(key_text)
                if found is not None:
                    return (f"{_field_path(path) or 'the row'}: a key holds a lone surrogate "
                            f"({ascii(found.group())[1:-1]}): not Unicode text, so no tokenizer can encode it")
                stack.append((item, path + (key_text,)))
        elif isinstance(value, list):
            stack.extend((item, path + (index,)) for index, item in reversed(list(enumerate(value))))
    return None


def _field_path(path: tuple[str | int, ...], shown: int = 6) -> str:
    """``("messages", 1, "content")`` -> ``messages[1].content``; a long path keeps its first
    and last parts, a long key its first 40 characters, so the error stays one short line."""
    parts = [f"[{part}]" if isinstance(part, int) else ("." if index else "") + _short_text(part, 40)
             for index, part in enumerate(path)]
    if len(parts) > shown:
        parts = parts[: shown // 2] + [f"...({len(parts) - shown} more)..."] + parts[-(shown // 2):]
    return "".join(parts)


def _short_text(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _too_deep_at(text: str) -> int:
    """Index in JSON ``text`` of the bracket that opens level ``MAX_ROW_NESTING + 1`` (brackets
    inside strings skipped); the length of the text when none does."""
    depth, in_string, escaped = 0, False, False
    for index, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > MAX_ROW_NESTING:
                return index
        elif char in "]}":
            depth -= 1
    return len(text)


# ----------------------------------------------------------------------------- row shapes
PROMPT_KEYS = ("messages", "prompt")  # where an RL prompt row holds its prompt, first found wins
PROMPT_LIKE_KEYS = ("question", "problem", "query", "instruction", "input")  # columns a prompt often sits in elsewhere


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
    >>> prompt_from_row({"question": "2+2?", "answer": "4"}, "f.jsonl:3")
    Traceback (most recent call last):
    ...
    posttrain.errors.DataError: f.jsonl:3: an RL prompt row needs a 'messages' or 'prompt' key (keys: answer, question); map it with data.columns: {prompt: question} (data.columns.prompt=question)
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be an object, got {_type_name(row)}")
    key = next((k for k in PROMPT_KEYS if k in row), None)
    if key is None:
        keys = ", ".join(sorted(row)) or "none"
        column = next((k for k in PROMPT_LIKE_KEYS if isinstance(row.get(k), str)), None)
        columns = config_key("data.columns")
        hint = (f"; map it with {columns}: {{prompt: {column}}} ({columns}.prompt={column})"
                if column is not None else f"; map one with {columns}: {{prompt: <field>}}")
        raise DataError(f"{where}: an RL prompt row needs a 'messages' or 'prompt' key (keys: {keys}){hint}")
    value = row[key]
    if not isinstance(value, (str, list, dict)):
        raise DataError(f"{where}: {key} must be a string or a list of messages, got {_type_name(value)}")
    messages = normalise_messages(value, f"{where}: {key}")
    if not any(isinstance(m.get("content"), str) and not is_blank(m["content"]) for m in messages):
        raise DataError(f"{where}: {key} is empty")
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}] + messages
    tools = normalise_tools(row.get("tools"), f"{where}: tools")
    return Conversation(messages=messages, tools=tools, extra=verl_answer({k: v for k, v in row.items() if k != key}))


def verl_answer(metadata: dict[str, Any]) -> dict[str, Any]:
    """veRL's RL row shape, read as it is: ``reward_model.ground_truth`` becomes ``answer`` when the
    row has none (veRL docs, "Prepare Data for Post-Training": ``data_source``, ``prompt`` as chat
    messages, ``ability``, ``reward_model: {style, ground_truth}``, ``extra_info``); every field
    stays in the metadata too.

    >>> verl_answer({"data_source": "openai/gsm8k", "reward_model": {"style": "rule", "ground_truth": "72"}})["answer"]
    '72'
    """
    reward_model = metadata.get("reward_model")
    if "answer" not in metadata and isinstance(reward_model, dict) and reward_model.get("ground_truth") is not None:
        return {**metadata, "answer": reward_model["ground_truth"]}
    return metadata


def text_from_row(row: dict) -> str | None:
    """The text of a language-modelling row (TRL's ``{"text": ...}``, trained on every token), or
    None when the row is a conversation (TRL SFT trainer docs, "Dataset formats").

    >>> text_from_row({"text": "The sky is blue."}), text_from_row({"messages": [], "text": "x"})
    ('The sky is blue.', None)
    """
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        return None
    if any(key in row for key in ("messages", "conversations", "prompt", "completion", "chosen")):
        return None
    return row["text"]


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
            f"{where}: no conversation found: expected 'messages', 'conversations', 'prompt'+'completion' or 'text' "
            f"(keys: {keys})"
        )
    if not messages:
        raise DataError(f"{where}: the conversation is empty")
    if require_assistant and not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"{where}: no assistant turn (nothing to train on)")
    if "messages" in row or "conversations" in row:
        names = [f"{key}[{index}]" for index in range(len(messages))]
    else:
        names = [f"prompt[{index}]" for index in range(len(prompt))] + [f"completion[{index}]" for index in range(len(completion))]
    check_turns(messages, where, names)
    tools = normalise_tools(row.get("tools"), f"{where}: tools")
    extra = {key: value for key, value in row.items() if key not in ("messages", "conversations", "prompt", "completion", "tools")}
    return Conversation(messages=messages, tools=tools, extra=extra)


def check_turns(messages: list[dict[str, Any]], where: str, names: list[str] | None = None) -> None:
    """Refuse a conversation that a chat template would render but no model should learn from.

    - an assistant message with blank content and no tool calls ("empty assistant reply"):
      trained, it teaches the model to end its turn at once; whitespace is as empty as "";
    - a ``tool`` message whose nearest earlier non-tool message is not an assistant message
      with ``tool_calls``: a tool result nothing asked for (the OpenAI chat format answers
      each assistant tool call with tool messages that follow it).

    ``names[i]`` names message ``i`` in the error (default ``messages[i]``); DataError, one
    line, ``<where>: <name>: <problem>``.

    >>> check_turns([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}], "f.jsonl:3")
    Traceback (most recent call last):
    ...
    posttrain.errors.DataError: f.jsonl:3: messages[1]: empty assistant reply (blank content and no tool calls)
    """
    names = names or [f"messages[{index}]" for index in range(len(messages))]
    caller = None  # index of the message a tool result answers: the assistant turn before the tool run
    pending: list[str | None] = []  # ids (None: no id) of that turn's calls not answered yet
    for index, message in enumerate(messages):
        role = message["role"]
        if role == "assistant" and not message.get("tool_calls") and is_blank(message["content"]):
            raise DataError(f"{where}: {names[index]}: empty assistant reply (blank content and no tool calls)")
        if role != "tool":
            if pending and caller is not None and role == "assistant":
                raise DataError(f"{where}: {names[caller]}: {len(pending)} tool call(s) never answered before "
                                f"{names[index]}")
            caller = index
            pending = [call.get("id") for call in message.get("tool_calls") or []] if role == "assistant" else []
            continue
        if caller is None:
            raise DataError(f"{where}: {names[index]}: tool result with no assistant tool call before it "
                            f"(the conversation starts with it)")
        previous = messages[caller]
        if previous["role"] != "assistant" or not previous.get("tool_calls"):
            what = "an assistant message without tool_calls" if previous["role"] == "assistant" else f"a {previous['role']} message"
            raise DataError(f"{where}: {names[index]}: tool result with no assistant tool call before it "
                            f"({names[caller]} is {what})")
        answered = message.get("tool_call_id")
        if not pending:
            raise DataError(f"{where}: {names[index]}: more tool results than {names[caller]} made calls")
        if answered is not None and answered not in pending and any(pending):
            raise DataError(f"{where}: {names[index]}: tool_call_id {answered!r} answers no pending call of "
                            f"{names[caller]} (pending: {', '.join(str(p) for p in pending)})")
        pending.remove(answered if answered in pending else pending[0])


# Characters that render as nothing: zero-width spaces and joiners, the BOM, word joiner, the
# combining grapheme joiner and the Hangul fillers (Unicode category Cf plus a few letters).
_INVISIBLE = {"\u034f", "\u115f", "\u1160", "\u3164", "\uffa0"}


def visible_text(text: str) -> str:
    r"""``text`` in NFKC form without invisible characters and with runs of whitespace made one
    space: what a reader sees, for emptiness and sameness checks.

    >>> visible_text("  4\u200b +\r\n 4 "), visible_text("\ufeff\u2060\u3164")
    ('4 + 4', '')
    """
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch for ch in text if ch not in _INVISIBLE and unicodedata.category(ch) != "Cf")
    return " ".join(text.split())


def is_blank(text: str) -> bool:
    """True when ``text`` shows nothing: whitespace and invisible characters only."""
    return not visible_text(text)


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


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:200] + "...") if len(text) > 200 else text or type(exc).__name__
