"""Write the agentic demo's other-form held-out sets: calculator questions in phrasings and forms
the training generator (``make_agentic_arithmetic.py``) never uses, one file per form.

    python examples/data/make_agentic_heldout.py       # writes the four files beside this script

The same-form set (``agentic_eval.jsonl``) measures the skill on the problems it was taught;
these measure whether it transfers. Each form has its own templates, written here and shared
with nothing else:

- ``agentic_heldout_word.jsonl``: word problems in scenarios training never shows (distance,
  production over days, pages of a book), some with a distractor number, some with three
  factors or a product then a subtraction;
- ``agentic_heldout_division.jsonl``: division asked in other words (``÷``, "to the nearest
  hundredth", one decimal place, items shared among groups, complete groups);
- ``agentic_heldout_negative.jsonl``: negative results in other words ("minus the product
  of", "times the difference", ``x - y`` given ``x`` and ``y``, a leading minus sign);
- ``agentic_heldout_multistep.jsonl``: expression shapes training never uses (``a * (b - c) +
  d``, ``(a + b) * (c - d)``, ``a * b + c * d``) and a computation described step by step in
  words.

Rows: ``{"messages": [user], "answer": ..., "form": ..., "operands": {...}}``, like the training
generator's, so the same eval task and reward read them. The answer is the exact value (a
rounding question never lands on a tie). No held-out problem's numbers all appear in one
training question (``agentic_sft.jsonl``, ``agentic_rl_train.jsonl``, ``agentic_eval.jsonl``:
run the training generator first). Deterministic: the same seed writes the same files.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
TRAINING_FILES = ("agentic_sft.jsonl", "agentic_rl_train.jsonl", "agentic_eval.jsonl")


def tie(a: int, b: int, places: int) -> bool:
    """``a / b`` exactly halfway between two values with ``places`` decimals.

    >>> tie(1, 8, 2), tie(3, 4, 1), tie(7, 3, 1)
    (True, True, False)
    """
    scaled = Fraction(a, b) * 10 ** places
    return scaled - math.floor(scaled) == Fraction(1, 2)


def _quotient(rng: random.Random, places: int | None = None) -> dict:
    while True:
        a, b = rng.randint(200, 9999), rng.randint(6, 97)
        if a % b and (places is None or not tie(a, b, places)):
            return {"a": a, "b": b}


def _positive_leftover(rng: random.Random) -> dict:
    b, c = rng.randint(12, 95), rng.randint(12, 60)
    return {"a": rng.randint(b * c + 1, b * c + 5000), "b": b, "c": c}


def _below_product(rng: random.Random) -> dict:
    b, c = rng.randint(12, 98), rng.randint(12, 98)
    return {"a": rng.randint(20, b * c - 1), "b": b, "c": c}


def _difference_first(rng: random.Random) -> dict:
    a = rng.randint(12, 97)
    return {"a": a, "b": rng.randint(a + 1, 98), "c": rng.randint(12, 98)}


def _multistep_ab_cd(rng: random.Random) -> dict:
    c = rng.randint(20, 98)
    return {"a": rng.randint(101, 998), "b": rng.randint(101, 998), "c": c, "d": rng.randint(2, c - 1)}


@dataclass(frozen=True)
class Template:
    """``question`` with ``{a}``... (``{d}`` may be a distractor), the ``python`` expression of
    its exact answer, and ``draw`` for the operands."""

    question: str
    python: str
    draw: Callable[[random.Random], dict]


FORMS: dict[str, tuple[Template, ...]] = {
    "word": (
        Template("Sam runs {a} meters every day. How many meters does he run in {b} days?", "{a} * {b}",
                 lambda r: {"a": r.randint(1001, 9999), "b": r.randint(12, 98)}),
        Template("A bakery makes {a} rolls an hour and stays open {b} hours a day. How many rolls does it make in "
                 "{c} days?", "{a} * {b} * {c}",
                 lambda r: {"a": r.randint(101, 998), "b": r.randint(6, 23), "c": r.randint(12, 98)}),
        Template("A book has {b} pages with {a} words on each page. Its author wrote it in {d} weeks. How many words "
                 "are in the book?", "{a} * {b}",
                 lambda r: {"a": r.randint(101, 998), "b": r.randint(101, 998), "d": r.randint(3, 52)}),
        Template("A water tank holds {a} liters. Every hour {b} liters flow out. How many liters are still in it "
                 "after {c} hours?", "{a} - {b} * {c}", _positive_leftover),
        Template("There are {d} trucks at a depot. Each of {a} crates weighs {b} kilograms. What do the crates weigh "
                 "together, in kilograms?", "{a} * {b}",
                 lambda r: {"a": r.randint(101, 998), "b": r.randint(101, 998), "d": r.randint(3, 40)}),
    ),
    "division": (
        Template("What is {a} ÷ {b} to the nearest hundredth?", "round({a} / {b}, 2)", lambda r: _quotient(r, 2)),
        Template("Split {a} into {b} equal parts. How big is each part, to one decimal place?", "round({a} / {b}, 1)",
                 lambda r: _quotient(r, 1)),
        Template("If {a} marbles are shared evenly among {b} children, how many marbles are left over?", "{a} % {b}",
                 _quotient),
        Template("How many complete teams of {b} players can be formed from {a} players?", "{a} // {b}", _quotient),
        Template("Give {a} divided by {b} as a decimal rounded to 2 places.", "round({a} / {b}, 2)",
                 lambda r: _quotient(r, 2)),
    ),
    "negative": (
        Template("Find {a} minus the product of {b} and {c}.", "{a} - {b} * {c}", _below_product),
        Template("What is {c} times the difference {a} minus {b}?", "({a} - {b}) * {c}", _difference_first),
        Template("If x = {a} and y = {b}, what is x - y?", "{a} - {b}",
                 lambda r: {"a": r.randint(101, 998), "b": r.randint(1001, 9999)}),
        Template("Evaluate -{a} + {b} - {c}.", "-{a} + {b} - {c}",
                 lambda r: {"a": r.randint(1001, 9999), "b": r.randint(101, 998), "c": r.randint(101, 998)}),
        Template("Start at {a} and take away {b}, {c} times in a row. Where do you end up?", "{a} - {b} * {c}",
                 _below_product),
    ),
    "multistep": (
        Template("Find the value of {a} * ({b} - {c}) + {d}.", "{a} * ({b} - {c}) + {d}",
                 lambda r: {"a": r.randint(12, 98), "b": r.randint(300, 998), "c": r.randint(101, 299),
                            "d": r.randint(101, 998)}),
        Template("How much is ({a} + {b}) * ({c} - {d})?", "({a} + {b}) * ({c} - {d})", _multistep_ab_cd),
        Template("{a} * {b} + {c} * {d} = ?", "{a} * {b} + {c} * {d}",
                 lambda r: {"a": r.randint(101, 998), "b": r.randint(12, 98), "c": r.randint(101, 998),
                            "d": r.randint(12, 98)}),
        Template("Take {a}, multiply it by {b}, then add {c}.", "{a} * {b} + {c}",
                 lambda r: {"a": r.randint(101, 998), "b": r.randint(101, 998), "c": r.randint(1001, 9999)}),
        Template("Multiply {a} by {b}, then subtract {c} from the result.", "{a} * {b} - {c}",
                 lambda r: {"a": r.randint(101, 998), "b": r.randint(12, 98), "c": r.randint(1001, 9999)}),
    ),
}
NUMBER = re.compile(r"\d+")


def answer(python: str, operands: dict) -> str:
    """The exact answer as Python prints it.

    >>> answer("round({a} / {b}, 1)", {"a": 7, "b": 3}), answer("-{a} + {b} - {c}", {"a": 5, "b": 1, "c": 2})
    ('2.3', '-6')
    """
    return str(eval(python.format(**operands), {"round": round}))  # our own expression, never a model's


def training_numbers(directory: Path) -> list[Counter]:
    """The numbers of every user question in the training generator's files, one multiset each."""
    found = []
    for name in TRAINING_FILES:
        for line in (directory / name).read_text(encoding="utf-8").splitlines():
            question = next(m["content"] for m in json.loads(line)["messages"] if m["role"] == "user")
            found.append(Counter(int(n) for n in NUMBER.findall(question)))
    return found


def seen_in_training(used: Counter, trained: list[Counter]) -> bool:
    """All the numbers an answer uses (``used``) appear together in one training question.

    >>> seen_in_training(Counter([12, 7]), [Counter([7, 12, 300])]), seen_in_training(Counter([12, 12]), [Counter([12])])
    (True, False)
    """
    return any(not (used - numbers) for numbers in trained)


def form_rows(rng: random.Random, form: str, count: int, trained: list[Counter]) -> list[dict]:
    """``count`` distinct problems of ``form``, its templates taken in turn."""
    templates = FORMS[form]
    rows, keys = [], set()
    while len(rows) < count:
        index = len(rows) % len(templates)
        template = templates[index]
        operands = template.draw(rng)
        used = Counter(v for k, v in operands.items() if "{" + k + "}" in template.python)
        key = (index, tuple(sorted(operands.items())))
        if key in keys or seen_in_training(used, trained):
            continue
        keys.add(key)
        rows.append({"messages": [{"role": "user", "content": template.question.format(**operands)}],
                     "answer": answer(template.python, operands), "form": form, "template": index,
                     "operands": operands})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--count", type=int, default=50, help="problems per form")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    trained = training_numbers(HERE)
    for form in FORMS:
        rows = form_rows(rng, form, args.count, trained)
        path = args.out / f"agentic_heldout_{form}.jsonl"
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
