"""The arithmetic preference data of the DPO and RM quickstarts
(examples/data/make_preference_arithmetic.py): the checked-in files are what the generator
writes, every chosen addition is exactly the worked answer the SFT quickstart teaches
(make_sft_arithmetic.worked_answer), every rejected addition is that style with an error in it
(or no answer at all), and no held-out addition of the RL quickstart is in it."""

from __future__ import annotations

import doctest
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
SCRIPT = DATA / "make_preference_arithmetic.py"
FILES = ("preference_arithmetic_train.jsonl", "preference_arithmetic_val.jsonl")
WORKED = re.compile(r"(\d+)([-+])(\d+)=(-?\d+), (\d)([*+])(\d)=(-?\d+), (-?\d+)\+(-?\d+)=(-?\d+)\. The answer is (-?\d+)\.")


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


def operands(row: dict) -> tuple[int, int] | None:
    """The two operands of an addition question (any phrasing), else None."""
    prompt = row["prompt"]
    match = re.search(r"(\d+) \+ (\d+)", prompt) or re.search(r"has (\d+) \w+ and gets (\d+) more", prompt)
    return (int(match.group(1)), int(match.group(2))) if match else None


def test_checked_in_files_are_what_the_generator_writes(tmp_path):
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], check=True, capture_output=True)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name
    assert doctest.testmod(load(SCRIPT)).failed == 0


def test_chosen_additions_are_the_sft_worked_answer_and_rejected_ones_the_same_style_with_an_error():
    worked_answer = load(DATA / "make_sft_arithmetic.py").worked_answer
    additions = 0
    for name in FILES:
        for row in rows(name):
            pair = operands(row)
            if pair is None:
                continue
            additions += 1
            a, b = pair
            assert row["chosen"] == worked_answer(a, b) and row["answer"] == str(a + b), row
            if row["error"] == "evasive":
                assert not re.search(r"\d+[-+*]\d+=", row["rejected"]), row
                continue
            match = WORKED.fullmatch(row["rejected"])
            assert match is not None, row  # the same style, step for step
            assert row["rejected"] != row["chosen"] and match.group(12) != str(a + b), row  # and a wrong answer
    assert additions >= 300


def test_the_first_48_pairs_the_dpo_quickstart_trains_on_have_no_one_line_addition():
    first = rows(FILES[0])[:48]
    additions = [row for row in first if operands(row) is not None]
    assert len(additions) >= 24 and all(WORKED.fullmatch(row["chosen"]) for row in additions)


def test_no_rl_held_out_addition_is_in_the_preference_data():
    held_out = set()
    for line in (DATA / "rl_arithmetic_eval.jsonl").read_text().splitlines():
        a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", json.loads(line)["prompt"]).groups())
        held_out.add((min(a, b), max(a, b)))
    for name in FILES:
        for row in rows(name):
            pair = operands(row)
            assert pair is None or (min(pair), max(pair)) not in held_out, row
    train, val = ({row["prompt"] for row in rows(name)} for name in FILES)
    assert not train & val
