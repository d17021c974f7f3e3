"""Reading data files and normalising row shapes: exact line numbers, one-line errors."""

from __future__ import annotations

import json

import pytest

from posttrain.data.formats import conversation_from_row, normalise_messages, read_rows
from posttrain.errors import DataError

ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_jsonl_line_numbers_blank_lines_and_limit(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(ROW), "", json.dumps({"x": 1}), json.dumps(ROW)])
    assert [n for n, _ in read_rows(path)] == [1, 3, 4]
    assert [n for n, _ in read_rows(path, limit=2)] == [1, 3]


def test_malformed_jsonl_names_the_line_or_is_skipped(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(ROW), '{"messages": [', "[1, 2]", json.dumps(ROW)])
    with pytest.raises(DataError, match=r"d\.jsonl:2: malformed JSON \(.* at the end of the line\)$"):
        list(read_rows(path))
    bad = []
    assert [n for n, _ in read_rows(path, skip_bad=True, bad_rows=bad)] == [1, 4]
    assert [n for n, _ in bad] == [2, 3] and "d.jsonl:3: a row must be a JSON object, got a list" in bad[1][1]


def test_json_parquet_and_datasets_dir(tmp_path):
    from datasets import Dataset

    rows = [ROW, {"prompt": "p", "completion": "c"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(row) for row in rows))
    for name in ("a.json", "b.json", "lines.json"):
        assert list(read_rows(tmp_path / name)) == [(1, rows[0]), (2, rows[1])], name
    tool_row = {
        "messages": [
            {"role": "user", "content": "w?"},
            {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
            {"role": "tool", "content": "1", "tool_calls": None},
            {"role": "assistant", "content": "done", "tool_calls": None},
        ]
    }
    Dataset.from_list([tool_row, tool_row]).to_parquet(str(tmp_path / "c.parquet"))
    Dataset.from_list([tool_row]).save_to_disk(str(tmp_path / "ds"))
    for path in (tmp_path / "c.parquet", tmp_path / "ds"):
        (n, row), *_ = list(read_rows(path))
        conversation = conversation_from_row(row, f"{path}:{n}")
        # Arrow's null-filled struct fields are dropped, JSON-string arguments parsed
        assert conversation.messages[1] == {
            "role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]
        }
        assert "tool_calls" not in conversation.messages[2] and "tool_calls" not in conversation.messages[3]


def test_unreadable_inputs(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list(read_rows(tmp_path / "missing.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown data file type '.csv'"):
        list(read_rows(tmp_path / "x.csv"))
    (tmp_path / "bad.json").write_text('[{"a": 1},\n {"b": }]')
    with pytest.raises(DataError, match=r"bad\.json:2: malformed JSON"):
        list(read_rows(tmp_path / "bad.json"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="not a datasets directory"):
        list(read_rows(tmp_path / "empty_dir"))


def test_row_shapes_normalise_to_openai_messages():
    sharegpt = {
        "conversations": [
            {"from": "system", "value": "s"},
            {"from": "human", "value": "q"},
            {"from": "function_call", "value": '{"name": "calc", "arguments": {"x": 2}}'},
            {"from": "observation", "value": "4"},
            {"from": "gpt", "value": "four"},
        ]
    }
    messages = conversation_from_row(sharegpt, "f:1").messages
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert messages[2]["tool_calls"] == [{"type": "function", "function": {"name": "calc", "arguments": {"x": 2}}}]
    assert conversation_from_row({"conversations": ROW["messages"]}, "f:1").messages == ROW["messages"]

    pc = conversation_from_row(
        {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}], "completion": "d"},
        "f:2",
    )
    assert pc.messages == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "train": False},  # only the completion is trained
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    parts = normalise_messages([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "w")
    assert parts == [{"role": "user", "content": "ab"}]
    tools = conversation_from_row({**ROW, "tools": json.dumps([{"name": "f", "parameters": {}}])}, "f:3").tools
    assert tools == [{"type": "function", "function": {"name": "f", "parameters": {}}}]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"txt": "hi"}, r"f:7: no conversation found: expected 'messages', 'conversations', 'prompt'\+'completion' or 'text' \(keys: txt\)"),
        ({"messages": []}, "f:7: the conversation is empty"),
        ({"messages": "hi"}, r"f:7: no assistant turn"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "f:7: no assistant turn"),
        ({"messages": [{"role": "narrator", "content": "x"}]}, r"f:7: messages\[0\]: unknown role 'narrator'"),
        ({"messages": [{"from": "alien", "value": "x"}]}, r"f:7: messages\[0\]: unknown role 'alien'"),
        ({"messages": [{"content": "x"}]}, r"f:7: messages\[0\]: message has no 'role'"),
        ({"messages": [{"role": "user"}]}, r"f:7: messages\[0\]: user message has no content"),
        ({"messages": [{"role": "user", "content": 3}]}, r"f:7: messages\[0\]: content must be a string, got int"),
        ({"messages": [{"role": "user", "content": "x", "train": True}]}, r"only assistant messages can be trained"),
        ({"messages": [{"role": "assistant", "content": "x", "train": "yes"}]}, r"'train' must be true or false"),
        ({"messages": [{"role": "assistant", "content": "x", "weight": -1}]}, r"'weight' must be a non-negative number"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, r"content part 0 is 'image_url'"),
        ({"messages": 5}, r"f:7: messages: expected a string or a list of messages, got int"),
        ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}]},
         r"tool_calls\[0\]: arguments of 'f' are not valid JSON"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, r"only assistant messages can carry tool_calls"),
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, "preference row"),
    ],
)
def test_bad_rows_are_one_line_errors(row, message):
    with pytest.raises(DataError, match=message) as info:
        conversation_from_row(row, "f:7")
    assert "\n" not in str(info.value)


def test_docstring_examples():
    import doctest

    import posttrain.data.formats as formats

    assert doctest.testmod(formats).failed == 0


# ----------------------------------------------------------------------------- rows that must not train
def test_invalid_utf8_is_a_bad_row_naming_its_line_and_file_offset(tmp_path):
    """The offset is the byte's place in the whole file, however many lines and read chunks come
    before it; skip_bad skips only that line."""
    from posttrain.data.formats import BadRowError

    lines = [json.dumps({"messages": [{"role": "user", "content": "ünïcode " * (40 * k)},
                                      {"role": "assistant", "content": "fine"}]}).encode() for k in range(1, 200)]
    target = 137  # 1-based line holding the bad byte, well past the first read chunk
    lines[target - 1] = lines[target - 1].replace(b"fine", b"fi\xc3\x28ne")  # a lead byte then no continuation
    data = b"\r\n".join(lines) + b"\r\n"
    path = tmp_path / "u.jsonl"
    path.write_bytes(data)
    offset = data.index(b"\xc3\x28")
    column = offset - (data.rindex(b"\n", 0, offset) + 1) + 1
    assert offset > 65536
    expected = (f"{path}:{target}: not UTF-8 text (invalid continuation byte (0xc3 0x28) at byte offset {offset} of "
                f"the file, column {column})")
    with pytest.raises(BadRowError) as info:
        list(read_rows(path))
    assert str(info.value) == expected
    bad = []
    kept = [n for n, _ in read_rows(path, skip_bad=True, bad_rows=bad)]
    assert bad == [(target, expected)] and kept == [n for n in range(1, 200) if n != target]

    # the same bytes as JSON Lines in a .json file: still one bad row; as a JSON array: the file is unreadable
    (tmp_path / "u.json").write_bytes(data)
    assert len([n for n, _ in read_rows(tmp_path / "u.json", skip_bad=True)]) == 198
    array = b"[" + b",\n".join(lines) + b"]"
    (tmp_path / "a.json").write_bytes(array)
    array_offset = array.index(b"\xc3\x28")
    with pytest.raises(DataError, match=rf"a\.json:{target}: not UTF-8 text \(invalid continuation byte \(0xc3 0x28\) at byte "
                                        rf"offset {array_offset} of the file") as info:
        list(read_rows(tmp_path / "a.json", skip_bad=True))
    assert not isinstance(info.value, BadRowError)  # a whole-file problem: nothing to skip


def test_bom_and_gzip_jsonl(tmp_path):
    import gzip

    text = json.dumps(ROW) + "\n" + json.dumps(ROW) + "\n"
    (tmp_path / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert [n for n, _ in read_rows(tmp_path / "b.jsonl")] == [1, 2]
    (tmp_path / "g.jsonl.gz").write_bytes(gzip.compress(text.encode() + b'{"x": "\xff"}\n'))
    with pytest.raises(DataError, match=r"g\.jsonl\.gz:3: not UTF-8 text \(invalid start byte \(0xff\) at byte offset "
                                        rf"{len(text.encode()) + 7} of the file, column 8\)"):
        list(read_rows(tmp_path / "g.jsonl.gz"))
    (tmp_path / "t.jsonl.gz").write_bytes(gzip.compress(text.encode())[:-12])
    with pytest.raises(DataError, match=r"t\.jsonl\.gz: cannot read"):
        list(read_rows(tmp_path / "t.jsonl.gz"))


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": [{"role": "user", "content": "Say something."}, {"role": "assistant", "content": ""}]},
         r"^f:7: messages\[1\]: empty assistant reply \(blank content and no tool calls\)$"),
        ({"conversations": [{"from": "human", "value": "Tell me a joke."}, {"from": "gpt", "value": " \n\t "}]},
         r"^f:7: conversations\[1\]: empty assistant reply"),
        ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "   "},
                     {"role": "user", "content": "b"}], "completion": "c"},
         r"^f:7: prompt\[1\]: empty assistant reply"),
        ({"prompt": "Capital of Peru?", "completion": "\n\n"}, r"^f:7: completion\[0\]: empty assistant reply"),
        ({"messages": [{"role": "user", "content": "Look it up."}, {"role": "tool", "content": "{\"rows\": 3}"},
                       {"role": "assistant", "content": "There are 3 rows."}]},
         r"^f:7: messages\[1\]: tool result with no assistant tool call before it \(messages\[0\] is a user message\)$"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Let me check."},
                       {"role": "tool", "content": "42"}, {"role": "assistant", "content": "It is 42."}]},
         r"^f:7: messages\[2\]: tool result with no assistant tool call before it \(messages\[1\] is an assistant "
         r"message without tool_calls\)$"),
        ({"messages": [{"role": "tool", "content": "orphan"}, {"role": "user", "content": "x"},
                       {"role": "assistant", "content": "y"}]},
         r"^f:7: messages\[0\]: tool result with no assistant tool call before it \(the conversation starts with it\)$"),
    ],
)
def test_empty_replies_and_uncalled_tool_results_are_refused(row, message):
    with pytest.raises(DataError, match=message):
        conversation_from_row(row, "f:7")


def test_tool_results_after_a_tool_call_and_blank_content_beside_calls_are_fine():
    call = {"type": "function", "function": {"name": "lookup", "arguments": {"q": "x"}}}
    row = {"messages": [
        {"role": "user", "content": "Find x and y."},
        {"role": "assistant", "content": "", "tool_calls": [call, call]},  # blank text beside calls is normal
        {"role": "tool", "content": "x=1"}, {"role": "tool", "content": "y=2"},
        {"role": "assistant", "content": None, "tool_calls": [call]}, {"role": "tool", "content": "again"},
        {"role": "assistant", "content": "x=1, y=2."},
    ]}
    assert len(conversation_from_row(row, "f:1").messages) == 7


def test_file_level_errors_are_not_bad_rows(tmp_path):
    """Only a row can be skipped: a missing file, a directory, an unknown type are plain DataErrors."""
    from posttrain.data.formats import BadRowError

    (tmp_path / "d").mkdir()
    (tmp_path / "x.csv").write_text("a,b\n")
    for path in (tmp_path / "missing.jsonl", tmp_path / "d", tmp_path / "x.csv"):
        with pytest.raises(DataError) as info:
            list(read_rows(path, skip_bad=True))
        assert not isinstance(info.value, BadRowError)
    path = write_jsonl(tmp_path / "r.jsonl", ["[1]"])
    with pytest.raises(BadRowError, match=r"r\.jsonl:1: a row must be a JSON object"):
        list(read_rows(path))


# ----------------------------------------------------------------------------- text no reader can use
CALL_ROW = {"messages": [{"role": "user", "content": "sum?"},
                         {"role": "assistant", "content": "", "tool_calls": [
                             {"type": "function", "function": {"name": "add", "arguments": '{"a": "\\udc80"}'}}]},
                         {"role": "tool", "content": "3"}, {"role": "assistant", "content": "3"}]}


@pytest.mark.parametrize("line, field", [
    ('{"messages": [{"role": "user", "content": "hi \\ud800"}, {"role": "assistant", "content": "ok"}]}',
     r"messages\[0\]\.content: a lone surrogate \(\\ud800\) at character 3"),
    ('{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "\\udfff"}]}',
     r"conversations\[1\]\.value: a lone surrogate \(\\udfff\) at character 0"),
    ('{"prompt": "2+2?", "chosen": "4", "rejected": "5 \\ud83d"}', r"rejected: a lone surrogate \(\\ud83d\)"),
    ('{"prompt": "2+2?", "answer": ["\\ude00"]}', r"answer\[0\]: a lone surrogate"),
    ('{"text": "ok", "meta": {"\\ud800": 1}}', r"meta: a key holds a lone surrogate \(\\ud800\)"),
])
def test_a_lone_surrogate_anywhere_is_a_bad_row_naming_line_and_field(tmp_path, line, field):
    """Valid JSON escapes that decode to no Unicode character: refused at the reader, before any
    tokenizer sees them, for every row shape; skip_bad skips just that row."""
    from posttrain.data.formats import BadRowError

    good = json.dumps(ROW)
    path = write_jsonl(tmp_path / "s.jsonl", [good, line, good])
    with pytest.raises(BadRowError, match=rf"^{tmp_path / 's.jsonl'}:2: {field}") as info:
        list(read_rows(path))
    assert "\n" not in str(info.value) and len(str(info.value)) < 300
    bad = []
    assert [n for n, _ in read_rows(path, skip_bad=True, bad_rows=bad)] == [1, 3] and [n for n, _ in bad] == [2]
    array = tmp_path / "s.json"  # the same rows as a JSON array: the row index is named
    array.write_text("[" + ",\n".join([good, good, line]) + "]")
    with pytest.raises(BadRowError, match=rf"s\.json:3: {field}"):
        list(read_rows(array))


def test_a_surrogate_pair_is_one_character_and_reads_fine(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", ['{"messages": [{"role": "user", "content": "\\ud83d\\ude00"},'
                                             ' {"role": "assistant", "content": "ok"}]}'])
    assert [row["messages"][0]["content"] for _, row in read_rows(path)] == ["\U0001F600"]


def nested(levels: int, leaf: str = "1") -> str:
    """A value nested ``levels`` deep, alternating arrays and objects."""
    opening = "".join('[' if k % 2 else '{"k": ' for k in range(levels))
    closing = "".join(']' if k % 2 else '}' for k in reversed(range(levels)))
    return opening + leaf + closing


@pytest.mark.parametrize("levels", [150, 5_000, 100_000])
def test_a_row_nested_too_deeply_is_one_bad_row(tmp_path, levels):
    """Deeper than the JSON parser's recursion (100,000 levels) or only deeper than any reader
    should walk (150): one line naming the line, skippable; 90 levels still read."""
    from posttrain.data.formats import MAX_ROW_NESTING, BadRowError

    good = json.dumps(ROW)
    deep = '{"messages": ' + json.dumps(ROW["messages"]) + ', "extra": ' + nested(levels) + "}"
    path = write_jsonl(tmp_path / "d.jsonl", [good, deep, good, '{"text": "x", "extra": ' + nested(90) + "}"])
    with pytest.raises(BadRowError, match=rf"d\.jsonl:2: JSON nested more than {MAX_ROW_NESTING} levels deep") as info:
        list(read_rows(path))
    assert len(str(info.value)) < 200
    bad = []
    assert [n for n, _ in read_rows(path, skip_bad=True, bad_rows=bad)] == [1, 3, 4] and [n for n, _ in bad] == [2]
    jsonl_as_json = tmp_path / "d.json"  # JSON Lines saved as .json: the deep line is still one bad row
    jsonl_as_json.write_text(path.read_text())
    assert [n for n, _ in read_rows(jsonl_as_json, skip_bad=True)] == [1, 3, 4]


def test_a_json_array_nested_too_deeply_names_its_line(tmp_path):
    """Too deep for the parser inside a JSON array: the file cannot be read; the line and column
    of the first bracket past the limit are named."""
    from posttrain.data.formats import BadRowError

    path = tmp_path / "a.json"
    path.write_text("[\n" + json.dumps(ROW) + ",\n" + nested(100_000) + "\n]")
    column = nested(99).index("1") + 1  # the array is level 1, so the row's 100th bracket opens level 101
    with pytest.raises(DataError, match=rf"a\.json:3: JSON nested more than 100 levels deep \(at column {column}\), so "
                                        r"no row of this file can be read$") as info:
        list(read_rows(path, skip_bad=True))
    assert not isinstance(info.value, BadRowError)


@pytest.mark.parametrize("name, text, message", [
    ("s.jsonl", '{"messages": [{"role": "user", "content": "a\\udbff"}, {"role": "assistant", "content": "b"}]}',
     "s.jsonl:1: messages[0].content: a lone surrogate"),
    ("d.jsonl", '{"messages": ' + nested(100_000) + "}", "d.jsonl:1: JSON nested more than 100 levels deep"),
])
def test_inspect_names_the_line_of_a_surrogate_or_a_deep_row_without_a_traceback(tmp_path, name, text, message):
    """Through the real command line (a subprocess): one ``error:`` line, no traceback."""
    import subprocess
    import sys

    (tmp_path / name).write_text(text + "\n")
    result = subprocess.run([sys.executable, "-m", "posttrain", "inspect", name], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {message}"), result.stderr
