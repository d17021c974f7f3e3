"""The agentic demo data (examples/data/make_agentic_arithmetic.py): the checked-in files are what
the generator writes, every answer is right, and no held-out problem is trained on."""

from __future__ import annotations

import doctest
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
SCRIPT = DATA / "make_agentic_arithmetic.py"
FILES = ("agentic_sft.jsonl", "agentic_rl_train.jsonl", "agentic_eval.jsonl", "subtraction_eval.jsonl")
EXPRESSION = re.compile(r"(\(?\d+ [-+*] \d+\)?(?: [-+*] \d+)?)[?.]$")


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def problem(question: str) -> tuple[str, frozenset | tuple]:
    """The expression of a question, with the operands of + and * in either order made equal."""
    text = EXPRESSION.search(question).group(1)
    numbers = [int(n) for n in re.findall(r"\d+", text)]
    shape = re.sub(r"\d+", "n", text)
    if shape in ("n * n", "n + n"):
        return shape, frozenset(numbers)
    if shape in ("n * n - n", "n * n + n"):
        return shape, (frozenset(numbers[:2]), numbers[2])
    if shape == "(n + n) * n":
        return shape, (frozenset(numbers[:2]), numbers[2])
    return shape, tuple(numbers)


def value(question: str) -> int:
    text = EXPRESSION.search(question).group(1)
    assert re.fullmatch(r"[\d ()+*-]+", text)
    return eval(text)  # digits, spaces, parentheses and + - * only (checked above)


def test_checked_in_files_are_what_the_generator_writes(tmp_path):
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], check=True, capture_output=True)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name
    spec = importlib.util.spec_from_file_location("make_agentic_arithmetic", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert doctest.testmod(module).failed == 0


def test_answers_are_right_and_held_out_problems_are_never_trained():
    sft = rows(DATA / "agentic_sft.jsonl")
    tool = [row["messages"] for row in sft if any(m.get("tool_calls") for m in row["messages"])]
    mixture = [row["messages"] for row in sft if not any(m.get("tool_calls") for m in row["messages"])]
    assert len(tool) == 300 and len(mixture) == 100
    two_calls = 0
    for messages in tool:
        answer = str(value(messages[0]["content"]))
        calls = [m["tool_calls"][0]["function"] for m in messages if m.get("tool_calls")]
        outputs = [m["content"] for m in messages if m["role"] == "tool"]
        assert all(call["name"] == "python" and call["arguments"]["code"].endswith(")") for call in calls)
        assert len(outputs) == len(calls) in (1, 2) and outputs[-1] == answer
        if len(calls) == 2:  # step by step: the product first, then the rest from the first output
            two_calls += 1
            assert outputs[0] in calls[1]["arguments"]["code"] and str(eval(calls[0]["arguments"]["code"][6:-1])) == outputs[0]
        assert messages[-1] == {"role": "assistant", "content": f"The answer is {answer}."}
    assert 20 <= two_calls <= 60
    prompts = {name: rows(DATA / name) for name in FILES[1:]}
    for name, file_rows in prompts.items():
        assert all(str(value(row["messages"][0]["content"])) == row["answer"] for row in file_rows), name
    trained_tool = {problem(m[0]["content"]) for m in tool}
    rl = {problem(row["messages"][0]["content"]) for row in prompts["agentic_rl_train.jsonl"]}
    held_out = {problem(row["messages"][0]["content"]) for row in prompts["agentic_eval.jsonl"]}
    assert len(held_out) == 100 and len(rl) == 400 and not held_out & (rl | trained_tool) and not rl & trained_tool
    direct = {problem(m[0]["content"]) for m in mixture if EXPRESSION.search(m[0]["content"])}
    subtraction = {problem(row["messages"][0]["content"]) for row in prompts["subtraction_eval.jsonl"]}
    assert len(subtraction) == 100 and {shape for shape, _ in subtraction} == {"n - n"}
    assert not subtraction & direct and len([p for p in direct if p[0] == "n - n"]) == 40
