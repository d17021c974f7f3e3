"""The agentic demo data (examples/data/make_agentic_arithmetic.py and make_agentic_heldout.py):
the checked-in files are what the generators write, every answer is right (checked here with
formulas of its own, not the generators'), tool outputs are what the code prints and the final
answer copies the last one exactly (negative results included), and no held-out problem is
trained on."""

from __future__ import annotations

import contextlib
import doctest
import importlib.util
import io
import json
import math
import re
import subprocess
import sys
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
TRAINING = DATA / "make_agentic_arithmetic.py"
HELDOUT = DATA / "make_agentic_heldout.py"
TRAINING_FILES = ("agentic_sft.jsonl", "agentic_chat_sft.jsonl", "agentic_rl_train.jsonl", "agentic_eval.jsonl")
HELDOUT_FORMS = ("word", "division", "negative", "multistep")
HELDOUT_FILES = tuple(f"agentic_heldout_{form}.jsonl" for form in HELDOUT_FORMS)
NUMBER = re.compile(r"\d+")


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines()]


def rounded(places: int):
    """A check that ``answer`` is ``a / b`` rounded to ``places`` decimals (no tie is asked)."""
    def check(o: dict, answer: str) -> bool:
        decimals = answer.partition(".")[2]
        return len(decimals) <= places and abs(Fraction(answer) - Fraction(o["a"], o["b"])) < Fraction(1, 2 * 10 ** places)
    return check


def exact(formula):
    return lambda o, answer: answer == str(formula(o))


# the training forms, by name (the generator's own expressions are not used here)
TRAINING_CHECKS = {
    "a * b": exact(lambda o: o["a"] * o["b"]),
    "a * b - c": exact(lambda o: o["a"] * o["b"] - o["c"]),
    "a * b + c": exact(lambda o: o["a"] * o["b"] + o["c"]),
    "(a + b) * c": exact(lambda o: (o["a"] + o["b"]) * o["c"]),
    "a * b * c": exact(lambda o: o["a"] * o["b"] * o["c"]),
    "a - b * c": exact(lambda o: o["a"] - o["b"] * o["c"]),
    "(a - b) * c": exact(lambda o: (o["a"] - o["b"]) * o["c"]),
    "a - b": exact(lambda o: o["a"] - o["b"]),
    "round(a / b, 2)": rounded(2),
    "round(a / b)": rounded(0),
    "a % b": exact(lambda o: o["a"] - o["b"] * (o["a"] // o["b"])),
    "a // b": exact(lambda o: (o["a"] - o["a"] % o["b"]) // o["b"]),
    "word: a * b": exact(lambda o: o["a"] * o["b"]),
    "word: a - b": exact(lambda o: o["a"] - o["b"]),
    "word: (a + b) * c": exact(lambda o: o["a"] * o["c"] + o["b"] * o["c"]),
    "word: a % b": exact(lambda o: o["a"] % o["b"]),
    "word: ceil(a / b)": exact(lambda o: -(-o["a"] // o["b"])),
    "a * b - c * d": exact(lambda o: o["a"] * o["b"] - o["c"] * o["d"]),
    "(a - b) * (c + d)": exact(lambda o: o["a"] * (o["c"] + o["d"]) - o["b"] * (o["c"] + o["d"])),
    "a * (b + c)": exact(lambda o: o["a"] * o["b"] + o["a"] * o["c"]),
    "(a + b) * c - d": exact(lambda o: o["a"] * o["c"] + o["b"] * o["c"] - o["d"]),
    "steps: (a + b) * c": exact(lambda o: o["a"] * o["c"] + o["b"] * o["c"]),
    "steps: a * b - c": exact(lambda o: o["a"] * o["b"] - o["c"]),
    "vars: a * b": exact(lambda o: o["a"] * o["b"]),
    "vars: (a + b) * c": exact(lambda o: o["a"] * o["c"] + o["b"] * o["c"]),
    "vars: a * b + c": exact(lambda o: o["a"] * o["b"] + o["c"]),
    "-a + b": exact(lambda o: o["b"] - o["a"]),
    "round(a / b, 1)": rounded(1),
    "round(a / b, 3)": rounded(3),
    "word: a * b * c": exact(lambda o: o["a"] * o["b"] * o["c"]),
    "word: a - b * c": exact(lambda o: o["a"] - o["b"] * o["c"]),
    "word: a + b * c": exact(lambda o: o["a"] + o["b"] * o["c"]),
    "word: a // b": exact(lambda o: (o["a"] - o["a"] % o["b"]) // o["b"]),
    "word: round(a / b, 2)": rounded(2),
}
# the held-out forms, by (form, template index)
HELDOUT_CHECKS = {
    ("word", 0): exact(lambda o: o["a"] * o["b"]), ("word", 1): exact(lambda o: o["a"] * o["b"] * o["c"]),
    ("word", 2): exact(lambda o: o["a"] * o["b"]), ("word", 3): exact(lambda o: o["a"] - o["b"] * o["c"]),
    ("word", 4): exact(lambda o: o["a"] * o["b"]),
    ("division", 0): rounded(2), ("division", 1): rounded(1), ("division", 2): exact(lambda o: o["a"] % o["b"]),
    ("division", 3): exact(lambda o: o["a"] // o["b"]), ("division", 4): rounded(2),
    ("negative", 0): exact(lambda o: o["a"] - o["b"] * o["c"]), ("negative", 1): exact(lambda o: (o["a"] - o["b"]) * o["c"]),
    ("negative", 2): exact(lambda o: o["a"] - o["b"]), ("negative", 3): exact(lambda o: -o["a"] + o["b"] - o["c"]),
    ("negative", 4): exact(lambda o: o["a"] - o["b"] * o["c"]),
    ("multistep", 0): exact(lambda o: o["a"] * (o["b"] - o["c"]) + o["d"]),
    ("multistep", 1): exact(lambda o: (o["a"] + o["b"]) * (o["c"] - o["d"])),
    ("multistep", 2): exact(lambda o: o["a"] * o["b"] + o["c"] * o["d"]),
    ("multistep", 3): exact(lambda o: o["a"] * o["b"] + o["c"]), ("multistep", 4): exact(lambda o: o["a"] * o["b"] - o["c"]),
}


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def printed(code: str) -> str:
    """What the generator's own (trusted) tool-call code prints."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, {"math": math})
    return out.getvalue().rstrip("\n")


def test_checked_in_files_are_what_the_generators_write(tmp_path):
    subprocess.run([sys.executable, str(TRAINING), "--out", str(tmp_path)], check=True, capture_output=True)
    subprocess.run([sys.executable, str(HELDOUT), "--out", str(tmp_path)], check=True, capture_output=True)
    for name in TRAINING_FILES + HELDOUT_FILES:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name
    for script in (TRAINING, HELDOUT):
        result = doctest.testmod(load(script))
        assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("name", ["agentic_rl_train.jsonl", "agentic_eval.jsonl", *HELDOUT_FILES])
def test_every_prompt_answer_is_right_and_its_numbers_are_in_the_question(name):
    for row in rows(name):
        question, operands = row["messages"][0]["content"], row["operands"]
        check = TRAINING_CHECKS[row["form"]] if "template" not in row else HELDOUT_CHECKS[row["form"], row["template"]]
        assert check(operands, row["answer"]), (name, row)
        assert all(str(value) in NUMBER.findall(question) for value in operands.values()), (name, row)


def test_sft_outputs_are_what_the_code_prints_and_the_answer_copies_the_last_one():
    sft = rows("agentic_sft.jsonl")
    tool = [row["messages"] for row in sft if any(m.get("tool_calls") for m in row["messages"])]
    mixture = [row["messages"] for row in sft if not any(m.get("tool_calls") for m in row["messages"])]
    assert len(tool) == 640 and len(mixture) == 160
    negative = two_calls = 0
    for messages in tool:
        calls = [m["tool_calls"][0]["function"] for m in messages if m.get("tool_calls")]
        outputs = [m["content"] for m in messages if m["role"] == "tool"]
        assert all(call["name"] == "python" for call in calls) and len(outputs) == len(calls) in (1, 2)
        assert [printed(call["arguments"]["code"]) for call in calls] == outputs
        assert messages[-1] == {"role": "assistant", "content": f"The answer is {outputs[-1]}."}
        negative += outputs[-1].startswith("-")
        two_calls += len(calls) == 2
    assert negative >= 100 and two_calls == 0  # one call computes the whole answer
    # the words the model must read: division, remainders, word problems with distractors
    questions = [m[0]["content"] for m in tool]
    assert sum("remainder" in q or "left over" in q for q in questions) >= 15
    assert sum("rounded" in q or "round" in q.lower() for q in questions) >= 15
    assert sum("cows" in q or "classes" in q or "cartons are already full" in q for q in questions) >= 5


ROUND_CALL = re.compile(r"round\(\d+ / \d+(?:, (\d))?\)")
PRECISION_WORDS = {"0": ("whole number", "integer"), "1": ("one decimal", "1 decimal", "tenth"),
                   "2": ("two decimal", "2 decimal", "hundredth"), "3": ("three decimal", "3 decimal", "thousandth")}


def test_a_rounding_call_first_copies_the_questions_precision_and_rounds_to_it():
    rounding = 0
    for row in rows("agentic_sft.jsonl"):
        messages = row["messages"]
        if not messages[1].get("tool_calls"):
            continue
        code = messages[1]["tool_calls"][0]["function"]["arguments"]["code"]
        call = ROUND_CALL.search(code)
        if call is None:
            assert not code.startswith("#"), code
            continue
        rounding += 1
        comment, _, _ = code.partition("\n")
        assert comment.startswith("# to ") and comment[len("# to "):] in messages[0]["content"], (comment, messages[0])
        assert any(word in comment for word in PRECISION_WORDS[call.group(1) or "0"]), (comment, code)
    assert rounding >= 50


def test_the_chat_template_sft_file_announces_the_python_tool_on_arithmetic_rows_only():
    from posttrain.agent.tools import PYTHON_SCHEMA

    inline, chat = rows("agentic_sft.jsonl"), rows("agentic_chat_sft.jsonl")
    assert [row["messages"] for row in inline] == [row["messages"] for row in chat]
    for row in chat:
        arithmetic = bool(row["messages"][1].get("tool_calls")) or row["messages"][1]["content"].startswith("The answer is")
        assert row.get("tools") == ([PYTHON_SCHEMA] if arithmetic else None)


def question_numbers(name: str) -> list[Counter]:
    return [Counter(int(n) for n in NUMBER.findall(row["messages"][0]["content"])) for row in rows(name)]


def test_no_held_out_problem_is_trained_on():
    trained = question_numbers("agentic_sft.jsonl") + question_numbers("agentic_rl_train.jsonl")
    key = lambda row: (row["form"], tuple(sorted(v for k, v in row["operands"].items() if k != "d")))  # noqa: E731
    rl, same_form = {key(r) for r in rows("agentic_rl_train.jsonl")}, {key(r) for r in rows("agentic_eval.jsonl")}
    assert len(rl) == 600 and len(same_form) == 100 and not rl & same_form
    sft_questions = {m["messages"][0]["content"] for m in rows("agentic_sft.jsonl")}
    for name in ("agentic_eval.jsonl", *HELDOUT_FILES):
        for row in rows(name):
            used = Counter(v for k, v in row["operands"].items() if k != "d")
            assert not any(not (used - numbers) for numbers in trained), (name, row)
            assert row["messages"][0]["content"] not in sft_questions
    forms = {name: {row["form"] for row in rows(name)} for name in HELDOUT_FILES}
    assert all(forms[f"agentic_heldout_{form}.jsonl"] == {form} for form in HELDOUT_FORMS)
    assert all(len(rows(name)) == 50 for name in HELDOUT_FILES)
    # the phrasings of the held-out sets are never the training generator's
    training_module = load(TRAINING)
    training_phrasings = {q for form in training_module.FORMS for q in form.questions}
    heldout_phrasings = {t.question for templates in load(HELDOUT).FORMS.values() for t in templates}
    assert not training_phrasings & heldout_phrasings
    bare = lambda text: re.sub(r"[^a-z{}]+", " ", text.lower()).strip()  # noqa: E731  (case, digits, punctuation aside)
    assert not {bare(q) for q in training_phrasings} & {bare(q) for q in heldout_phrasings}
    # the subtraction control is fixed (read by the generator, never rewritten) and never trained on
    subtraction = {m[0]["content"] for m in (r["messages"] for r in rows("subtraction_eval.jsonl"))}
    direct = {r["messages"][0]["content"] for r in rows("agentic_sft.jsonl") if len(r["messages"]) == 2}
    assert len(subtraction) == 100 and not subtraction & direct
    assert sum(re.fullmatch(r"What is \d+ - \d+\?", q) is not None for q in direct) == 60
