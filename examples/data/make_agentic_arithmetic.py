"""Write the agentic demo files: arithmetic the bundled 135M model cannot do in its head but can
with a Python tool, asked the ways people ask a calculator-using assistant.

    python examples/data/make_agentic_arithmetic.py       # writes the files beside this script

The tool task (``FORMS``; each with several phrasings, ``Form.questions``):

- products of three-digit numbers ("What is 487 * 923?", "Multiply 487 by 923."), products of
  three (large results: "What is 412 * 388 * 905?");
- multi-step expressions (``a * b - c``, ``a * b + c``, ``(a + b) * c``, ``a * b - c * d``,
  ``(a - b) * (c + d)``, ``a * (b + c)``, ``(a + b) * c - d``), also described step by step in
  words ("First add 312 and 45, then multiply the sum by 17.") or with named numbers ("Let p =
  412, q = 38 and r = 905. What is p * q + r?": the code assigns the same names);
- negative results (``a - b * c``, ``(a - b) * c``, ``-a + b``, ``a - b`` with ``b`` larger:
  "Subtract 4507 from 312.");
- division: rounded to one, two or three decimal places or to a whole number, the remainder,
  the whole quotient (no rounding tie is ever asked);
- word problems with one to three operations and sometimes a distractor number the answer must
  not use ("A farm has 37 cows and 126 fields. Each field has 418 apple trees. How many apple
  trees are on the farm?"): products of two or three factors, what is left after taking
  several equal parts away, additions of equal parts, results that are negative (a balance, a
  score), remainders and whole quotients (pieces of ribbon, full boxes), rounding up (buses for
  a number of people) and shares rounded to cents.

Many phrasings are composed from parts rather than written one by one, so that a 135M model
learns to read the quantities and the operation instead of recognising a sentence: division
with each operator word (``/``, ``÷``, "divided by") and each way of naming a rounding ("two
decimal places", "the nearest hundredth"); word problems from scenes (containers of items,
rates over time, a stock that shrinks each period, items shared out among people) with a
distractor sentence before or after the facts. None equals a held-out phrasing, even up to case
and punctuation (tests/test_agentic_data.py).

Files:

- ``agentic_sft.jsonl``: the cold start, OpenAI messages: the question; an assistant message
  calling the ``python`` tool (``{"code": "print(487 * 923)"}``, sometimes ``x = ...`` then
  ``print(x)``; a rounding's code opens with a comment that copies how the question names the
  precision, ``# to the nearest hundredth``); the tool result; ``The answer is 449501.``, the
  printed value copied exactly (sign included). One call computes the whole answer,
  multi-step expressions included. Train it with ``data.tool_format: inline`` (the bundled
  template has no tools). A fifth of the rows are a tool-free mixture that keeps other
  skills: two-digit subtractions and additions answered directly (the tool is for the hard
  problems), and short chat answers from ``sft_chat.jsonl`` (counting, sorting, capitals; no
  arithmetic). The cold start is kept small on purpose, so that RL has room to add on top. Its
  forms are drawn with flattened shares (``sft_weight``: the problems' shares to the power 0.5),
  so a rare form still gets enough rows to be learned.
- ``agentic_chat_sft.jsonl``: the same rows for ``data.tool_format: chat_template``: every
  arithmetic row carries ``"tools": [the python tool's schema]`` (posttrain's
  ``agent.tools.PYTHON_SCHEMA``, the schema an agent prompt announces), so the rendered system
  turn is the one RL and eval prompts start with; chat rows carry none.
- ``agentic_rl_train.jsonl``: RL prompts ``{"messages": [user], "answer": "449501", "form":
  ..., "operands": {...}}`` of the tool task, the forms that take reading or division weighted
  up (``rl_weight``: RL learns from the prompts the cold start solves sometimes); ``form`` and
  ``operands`` are metadata, a reward ignores them.
- ``agentic_eval.jsonl``: held-out prompts of the tool task, same shape and forms: the
  *same-form* set, drawn and phrased before any training row, so that changes to the
  training files leave it unchanged. Other forms and phrasings, never generated here, are written by
  ``make_agentic_heldout.py``.
- ``subtraction_eval.jsonl``: held-out two-digit subtractions, a control task outside the
  training data (does tool training break what the model did without tools?). A control must
  not move when the tool data changes: the file is fixed (the 100 subtractions every earlier
  measurement used) and read, never rewritten; the mixture's subtractions avoid it.

No problem is shared between the SFT, RL and held-out files (two problems are the same when
they have the same form and the same numbers in any order); no held-out subtraction is in the
SFT mixture. The mixture's additions come from ``rl_arithmetic_train.jsonl``, so none is in
the quickstart's held-out ``rl_arithmetic_eval.jsonl``. Deterministic: the same seed writes the
same files.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

from posttrain.agent.tools import PYTHON_SCHEMA  # the python tool's schema, as the agent offers it

HERE = Path(__file__).resolve().parent
EXPRESSION_QUESTIONS = ("What is {e}?", "Compute {e}.", "Calculate {e}.", "What is the value of {e}?", "Work out {e}.",
                        "Evaluate {e}.")
CODE = (("print({e})", 0.6), ("x = {e}\nprint(x)", 0.25), ("result = {e}\nprint(result)", 0.15))
ADDITION = re.compile(r"What is (\d+) \+ (\d+)\?")
ARITHMETIC_CHAT = re.compile(r"\d\s*[-+*/x]\s*\d|^Conversion:|^Step ", re.MULTILINE)


def rounding_tie(a: int, b: int, places: int) -> bool:
    """True when ``a / b`` lies exactly halfway between two values with ``places`` decimals
    (Python's round() then goes to the even one, which a person would not expect).

    >>> rounding_tie(1, 8, 2), rounding_tie(5, 2, 0), rounding_tie(17, 6, 2)
    (True, True, False)
    """
    scaled = Fraction(a, b) * 10 ** places
    return scaled - math.floor(scaled) == Fraction(1, 2)


def _three(rng: random.Random) -> int:
    return rng.randint(100, 999)


def _two(rng: random.Random) -> int:
    return rng.randint(11, 99)


def _division(rng: random.Random, places: int | None = None) -> dict:
    while True:
        a, b = rng.randint(100, 9999), rng.randint(7, 99)
        if a % b and (places is None or not rounding_tie(a, b, places)):
            return {"a": a, "b": b}


def _draw_product_minus(rng: random.Random) -> dict:
    a, b = _two(rng), _two(rng)
    return {"a": a, "b": b, "c": rng.randint(100, min(999, a * b - 1))}  # a * b - c stays positive


def _draw_negative_product(rng: random.Random) -> dict:
    b, c = _two(rng), _two(rng)
    return {"a": rng.randint(10, min(999, b * c - 1)), "b": b, "c": c}  # a - b * c < 0


def _draw_negative_difference(rng: random.Random) -> dict:
    a = rng.randint(10, 98)
    return {"a": a, "b": rng.randint(a + 1, 99), "c": _two(rng)}  # (a - b) * c < 0


def _draw_leftover(rng: random.Random) -> dict:
    b, c = _two(rng), _two(rng)
    return {"a": rng.randint(b * c + 1, b * c + 999), "b": b, "c": c}  # a - b * c stays positive


def _draw_with_distractor(rng: random.Random, **operands: int) -> dict:
    return {**operands, "d": rng.randint(2, 99)}


# Division asked with each of the usual operator words and roundings, in several frames.
DIVIDES = ("/", "÷", "divided by")
PLACES = {
    0: ("the nearest whole number", "a whole number", "the nearest integer"),
    1: ("one decimal place", "1 decimal place", "the nearest tenth"),
    2: ("two decimal places", "2 decimal places", "the nearest hundredth"),
    3: ("three decimal places", "3 decimal places", "the nearest thousandth"),
}


def rounding_questions(places: int) -> tuple[str, ...]:
    """Every phrasing of ``round(a / b, places)``: three frames x operator words x roundings.

    >>> len(rounding_questions(2)), rounding_questions(1)[0]
    (21, 'What is {a} / {b}, rounded to one decimal place?')
    """
    frames = [f"What is {{a}} {op} {{b}}, rounded to {to}?" for op in DIVIDES for to in PLACES[places]]
    frames += [f"Round {{a}} {op} {{b}} to {to}." for op in DIVIDES for to in PLACES[places]]
    frames += [f"Divide {{a}} by {{b}} and round to {to}." for to in PLACES[places]]
    return tuple(frames)


# Word problems written from parts, so that the model reads the quantities rather than
# recognising a sentence: a scene (container, item, preposition), a question, and sometimes a
# sentence with a number the answer does not use, before or after the facts.
SCENES = (("shelves", "books", "on each shelf"), ("crates", "bottles", "in each crate"), ("trays", "cupcakes", "on each tray"),
          ("buses", "passengers", "on each bus"), ("floors", "windows", "on each floor"), ("bags", "marbles", "in each bag"),
          ("boxes", "pens", "in each box"), ("racks", "plates", "on each rack"), ("teams", "players", "in each team"),
          ("pallets", "cans", "on each pallet"))
TOTAL_QUESTIONS = ("How many {item} are there in all?", "What is the total number of {item}?",
                   "How many {item} are there altogether?")
DISTRACTORS = ("The building is {d} years old.", "{d} people work there.", "It is {d} km from the town.",
               "The owner bought it {d} months ago.")


def scene_product_questions() -> tuple[str, ...]:
    """``a * b`` as a scene: ``{a}`` containers of ``{b}`` items, sometimes a distractor ``{d}``.

    >>> questions = scene_product_questions(); len(questions), questions[0]
    (110, 'There are {a} shelves with {b} books on each shelf. How many books are there in all?')
    """
    out = []
    for index, (container, item, where) in enumerate(SCENES):
        facts = f"There are {{a}} {container} with {{b}} {item} {where}."
        for number, ask in enumerate(TOTAL_QUESTIONS):
            ask = ask.format(item=item)
            out.append(f"{facts} {ask}")
            distractor = DISTRACTORS[(index + number) % len(DISTRACTORS)]
            out += [f"{distractor} {facts} {ask}", f"{facts} {distractor} {ask}"]
    for container, item, where in SCENES:  # the items counted first
        out += [f"Each of {{a}} {container} holds {{b}} {item}. How many {item} is that?",
                f"{{b}} {item} go {where}, and there are {{a}} {container}. How many {item} are needed?"]
    return tuple(out)


RATES = (("A pump moves", "liters", "minute"), ("A baker bakes", "loaves", "day"), ("A cyclist rides", "meters", "minute"),
         ("A mill grinds", "kilograms", "hour"), ("A robot packs", "parcels", "hour"), ("A farm collects", "eggs", "week"))


def rate_questions() -> tuple[str, ...]:
    """``a * b`` as a rate over a time: ``{a}`` units per period, for ``{b}`` periods.

    >>> rate_questions()[0]
    'A pump moves {a} liters every minute. How many liters in {b} minutes?'
    """
    out = []
    for who, unit, period in RATES:
        out += [f"{who} {{a}} {unit} every {period}. How many {unit} in {{b}} {period}s?",
                f"{who} {{a}} {unit} per {period}. How many {unit} after {{b}} {period}s?"]
    return tuple(out)


def chained_rate_questions() -> tuple[str, ...]:
    """``a * b * c``: ``{a}`` units an hour, ``{b}`` hours a day, for ``{c}`` days.

    >>> chained_rate_questions()[0]
    'A pump moves {a} liters an hour for {b} hours a day. How many liters in {c} days?'
    """
    out = []
    for who, unit, _ in RATES:
        out += [f"{who} {{a}} {unit} an hour for {{b}} hours a day. How many {unit} in {{c}} days?",
                f"{who} {{a}} {unit} each hour. It works {{b}} hours a day for {{c}} days. How many {unit} is that?"]
    return tuple(out)


def decrease_questions() -> tuple[str, ...]:
    """``a - b * c``: a stock of ``{a}`` that loses ``{b}`` each period for ``{c}`` periods.

    >>> decrease_questions()[0]
    'A store has {a} cans and sells {b} cans each day. How many cans are left after {c} days?'
    """
    stocks = (("A store has", "cans", "sells", "day"), ("A depot holds", "tires", "ships", "week"),
              ("A printer has", "sheets", "uses", "hour"), ("A school has", "pencils", "hands out", "month"))
    out = []
    for has, item, verb, period in stocks:
        out += [f"{has} {{a}} {item} and {verb} {{b}} {item} each {period}. How many {item} are left after {{c}} {period}s?",
                f"{has} {{a}} {item}. It {verb} {{b}} {item} a {period}. How many {item} remain after {{c}} {period}s?"]
    return tuple(out)


def sharing_questions(whole: bool) -> tuple[str, ...]:
    """``a // b`` (each share, ``whole``) or ``a % b`` (what remains) of ``{a}`` items shared out
    among ``{b}`` people.

    >>> sharing_questions(True)[0]
    '{a} stickers are shared equally among {b} kids. How many stickers does each kid get?'
    """
    pairs = (("stickers", "kids", "kid"), ("coins", "players", "player"), ("seeds", "gardeners", "gardener"),
             ("tickets", "classes", "class"))
    out = []
    for item, people, person in pairs:
        facts = (f"{{a}} {item} are shared equally among {{b}} {people}.",
                 f"{{a}} {item} are divided equally between {{b}} {people}.")
        asks = ((f"How many {item} does each {person} get?", f"How many whole {item} does each {person} get?") if whole
                else (f"How many {item} remain?", f"How many {item} are not given out?"))
        out += [f"{fact} {ask}" for fact in facts for ask in asks]
    return tuple(out)


@dataclass(frozen=True)
class Form:
    """One problem shape: ``python`` is the expression the tool call computes (``{a}``...
    replaced by the operands; ``math`` is importable), ``text`` the same written for a person
    (``{e}`` in a question), ``questions`` its phrasings, ``draw`` the operands
    (``d``: a distractor number the answer does not use), ``weight`` its share of the problems."""

    name: str
    weight: float
    draw: Callable[[random.Random], dict]
    python: str
    questions: tuple[str, ...]
    text: str = ""


FORMS = (
    Form("a * b", 0.12, lambda r: {"a": _three(r), "b": _three(r)}, "{a} * {b}",
         EXPRESSION_QUESTIONS + ("Multiply {a} by {b}.", "What is {a} times {b}?", "What is the product of {a} and {b}?"),
         "{a} * {b}"),
    Form("a * b - c", 0.04, _draw_product_minus, "{a} * {b} - {c}", EXPRESSION_QUESTIONS, "{a} * {b} - {c}"),
    Form("a * b + c", 0.04, lambda r: {"a": _two(r), "b": _two(r), "c": _three(r)}, "{a} * {b} + {c}",
         EXPRESSION_QUESTIONS, "{a} * {b} + {c}"),
    Form("(a + b) * c", 0.04, lambda r: {"a": _three(r), "b": _three(r), "c": _two(r)}, "({a} + {b}) * {c}",
         EXPRESSION_QUESTIONS + ("What is {c} times the sum of {a} and {b}?",), "({a} + {b}) * {c}"),
    Form("a * b * c", 0.03, lambda r: {"a": _three(r), "b": _three(r), "c": _three(r)}, "{a} * {b} * {c}",
         EXPRESSION_QUESTIONS + ("Multiply {a}, {b} and {c}.", "What is the product of {a}, {b} and {c}?"),
         "{a} * {b} * {c}"),
    Form("a * b - c * d", 0.03, lambda r: {"a": _three(r), "b": _two(r), "c": _three(r), "d": _two(r)},
         "{a} * {b} - {c} * {d}", EXPRESSION_QUESTIONS, "{a} * {b} - {c} * {d}"),
    Form("(a - b) * (c + d)", 0.03, lambda r: {"a": _three(r), "b": _three(r), "c": _two(r), "d": _two(r)},
         "({a} - {b}) * ({c} + {d})", EXPRESSION_QUESTIONS, "({a} - {b}) * ({c} + {d})"),
    Form("a * (b + c)", 0.03, lambda r: {"a": _two(r), "b": _three(r), "c": _three(r)}, "{a} * ({b} + {c})",
         EXPRESSION_QUESTIONS + ("Multiply {a} by the sum of {b} and {c}.",), "{a} * ({b} + {c})"),
    Form("(a + b) * c - d", 0.02, lambda r: {"a": _three(r), "b": _three(r), "c": _two(r), "d": _three(r)},
         "({a} + {b}) * {c} - {d}", EXPRESSION_QUESTIONS, "({a} + {b}) * {c} - {d}"),
    Form("steps: (a + b) * c", 0.03, lambda r: {"a": _three(r), "b": _three(r), "c": _two(r)}, "({a} + {b}) * {c}",
         ("First add {a} and {b}, then multiply the sum by {c}.", "Add {a} to {b} and multiply the total by {c}.")),
    Form("steps: a * b - c", 0.03, lambda r: {"a": _three(r), "b": _two(r), "c": _three(r)}, "{a} * {b} - {c}",
         ("Subtract {c} from the product of {a} and {b}.", "Find the product of {a} and {b}, then take away {c}.")),
    Form("vars: a * b", 0.01, lambda r: {"a": _three(r), "b": _three(r)}, "{a} * {b}",
         ("Let p = {a} and q = {b}. What is p * q?",)),
    Form("vars: (a + b) * c", 0.02, lambda r: {"a": _three(r), "b": _three(r), "c": _two(r)}, "({a} + {b}) * {c}",
         ("Let u = {a}, v = {b} and w = {c}. Find (u + v) * w.", "Given a = {a}, b = {b} and c = {c}, what is (a + b) * c?")),
    Form("vars: a * b + c", 0.02, lambda r: {"a": _three(r), "b": _two(r), "c": _three(r)}, "{a} * {b} + {c}",
         ("Let p = {a}, q = {b} and r = {c}. What is p * q + r?", "Given m = {a}, n = {b} and k = {c}, compute m * n + k.")),
    Form("a - b * c", 0.04, _draw_negative_product, "{a} - {b} * {c}",
         EXPRESSION_QUESTIONS + ("Subtract the product of {b} and {c} from {a}.", "What is {a} less {b} times {c}?"),
         "{a} - {b} * {c}"),
    Form("(a - b) * c", 0.03, _draw_negative_difference, "({a} - {b}) * {c}",
         EXPRESSION_QUESTIONS + ("Multiply the difference of {a} and {b} by {c}.",
                                 "What is {c} times the difference between {a} and {b}?"), "({a} - {b}) * {c}"),
    Form("-a + b", 0.03, lambda r: {"a": r.randint(1000, 9999), "b": _three(r)}, "-{a} + {b}", EXPRESSION_QUESTIONS,
         "-{a} + {b}"),
    Form("a - b", 0.03, lambda r: {"a": _three(r), "b": r.randint(1000, 9999)}, "{a} - {b}",
         ("What is {a} - {b}?", "What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}."), "{a} - {b}"),
    Form("round(a / b, 2)", 0.04, lambda r: _division(r, 2), "round({a} / {b}, 2)",
         ("What is {a} divided by {b}? Round the result to two decimals.",) + rounding_questions(2)),
    Form("round(a / b, 1)", 0.02, lambda r: _division(r, 1), "round({a} / {b}, 1)",
         ("Divide {a} by {b}. Give the result with one decimal.",) + rounding_questions(1)),
    Form("round(a / b, 3)", 0.02, lambda r: _division(r, 3), "round({a} / {b}, 3)",
         ("Compute {a} / {b} to 3 decimal places.",) + rounding_questions(3)),
    Form("round(a / b)", 0.03, lambda r: _division(r, 0), "round({a} / {b})",
         rounding_questions(0)),
    Form("a % b", 0.03, _division, "{a} % {b}",
         ("What is the remainder when {a} is divided by {b}?", "What is {a} mod {b}?",
          "Divide {a} by {b}. What is the remainder?", "What is left over when {a} is divided by {b}?",
          "Find the remainder of {a} ÷ {b}.")),
    Form("a // b", 0.03, _division, "{a} // {b}",
         ("What is {a} divided by {b}, without the remainder?", "How many whole times does {b} go into {a}?",
          "What is the whole-number quotient of {a} divided by {b}?", "What is {a} ÷ {b}, ignoring the remainder?")),
    Form("word: a * b", 0.08, lambda r: _draw_with_distractor(r, a=_three(r), b=_three(r)), "{a} * {b}",
         ("A warehouse has {a} shelves with {b} boxes on each shelf. How many boxes are there?",
          "A printer prints {a} pages per hour. How many pages does it print in {b} hours?",
          "A farm has {d} cows and {a} fields. Each field has {b} apple trees. How many apple trees are on the farm?",
          "A school orders {a} packs of pencils for its {d} classes. Each pack holds {b} pencils. "
          "How many pencils are ordered?",
          "A car travels {a} km each day. How many km does it travel in {b} days?",
          "A theater has {a} rows with {b} seats in each row. How many seats does it have?",
          "Each of {a} students pays {b} cents for a trip. How many cents are paid in total?",
          "A garden has {a} rows of {b} tulips and {d} bees. How many tulips are in the garden?",
          "A machine fills {a} bottles a minute. How many bottles does it fill in {b} minutes?",
          "A city has {d} parks and {a} streets with {b} houses on each street. How many houses are there?")
         + scene_product_questions() + rate_questions()),
    Form("word: a * b * c", 0.04, lambda r: {"a": _three(r), "b": _two(r), "c": _two(r)}, "{a} * {b} * {c}",
         ("A school has {c} buildings, each with {b} classrooms of {a} chairs. How many chairs are there?",
          "A factory runs {c} machines for {b} hours, and each machine makes {a} parts an hour. "
          "How many parts are made?",
          "There are {c} boxes, each holding {b} packs of {a} cards. How many cards are there?")
         + chained_rate_questions()),
    Form("word: a - b * c", 0.04, lambda r: _draw_leftover(r), "{a} - {b} * {c}",
         ("A shop has {a} apples and sells {c} bags of {b} apples each. How many apples are left?",
          "A farmer has {a} kg of rice and fills {c} sacks with {b} kg each. How many kg of rice are left?",
          "A library owns {a} books and lends {b} books to each of {c} schools. How many books does it keep?")
         + decrease_questions()),
    Form("word: a + b * c", 0.02, lambda r: {"a": _three(r), "b": _two(r), "c": _three(r)}, "{a} + {b} * {c}",
         ("A jar has {a} coins, and {b} bags of {c} coins each are added. How many coins are in the jar now?",
          "A stadium has {a} seats and adds {b} new rows of {c} seats. How many seats does it have now?")),
    Form("word: a - b", 0.04, lambda r: {"a": _three(r), "b": r.randint(1000, 9999)}, "{a} - {b}",
         ("A bank account has {a} dollars. A payment of {b} dollars is taken out. What is the balance now?",
          "A company earned {a} dollars and spent {b} dollars. What is its profit?",
          "A balloon is {a} meters above sea level and drops {b} meters. How high is it now, in meters?",
          "A game score is {a} points, and a penalty takes away {b} points. What is the score now?")),
    Form("word: (a + b) * c", 0.02, lambda r: {"a": _three(r), "b": _three(r), "c": _two(r)}, "({a} + {b}) * {c}",
         ("A ticket costs {a} cents and a drink costs {b} cents. How many cents do {c} tickets and {c} drinks cost?",
          "A truck carries {a} kg of sand and {b} kg of stone on each trip. How many kg does it carry in {c} trips?")),
    Form("word: a % b", 0.03, lambda r: _draw_with_distractor(r, **_division(r)), "{a} % {b}",
         ("{a} cookies are packed into bags of {b}. How many cookies are left over?",
          "{a} eggs are put into cartons of {b}; {d} cartons are already full. How many eggs do not fill a carton?",
          "{a} students are split into groups of {b}. How many students are not in a full group?",
          "A ribbon of {a} cm is cut into pieces of {b} cm. How many cm are left over?") + sharing_questions(False)),
    Form("word: a // b", 0.03, _division, "{a} // {b}",
         ("A ribbon of {a} cm is cut into pieces of {b} cm. How many whole pieces are there?",
          "{a} apples are packed {b} to a box. How many full boxes are there?",
          "How many rows of {b} chairs can be filled completely with {a} chairs?") + sharing_questions(True)),
    Form("word: ceil(a / b)", 0.02, _division, "math.ceil({a} / {b})",
         ("A bus holds {b} people. How many buses are needed for {a} people?",
          "Each box holds {b} books. How many boxes are needed to pack {a} books?",
          "A van carries {b} boxes per trip. How many trips are needed to move {a} boxes?")),
    Form("word: round(a / b, 2)", 0.02, lambda r: _division(r, 2), "round({a} / {b}, 2)",
         ("A bill of {a} dollars is split equally among {b} friends. How many dollars does each pay, rounded to "
          "two decimal places?",
          "{a} liters of juice are poured equally into {b} jugs. How many liters are in each jug, rounded to 2 "
          "decimal places?")),
)
FORMS_BY_NAME = {form.name: form for form in FORMS}


@dataclass(frozen=True)
class Problem:
    form: str
    operands: tuple[tuple[str, int], ...]  # sorted (name, value) pairs

    @property
    def values(self) -> dict:
        return dict(self.operands)

    @property
    def key(self) -> tuple:
        """What makes two problems the same: the form and its numbers in any order (a
        distractor ``d`` aside)."""
        return self.form, tuple(sorted(v for k, v in self.operands if k != "d"))

    @property
    def python(self) -> str:
        return FORMS_BY_NAME[self.form].python.format(**self.values)

    @property
    def answer(self) -> str:
        """What the tool call prints, the exact answer.

        >>> Problem("a - b * c", (("a", 56), ("b", 12), ("c", 86))).answer
        '-976'
        >>> Problem("round(a / b, 2)", (("a", 17), ("b", 6))).answer, Problem("word: ceil(a / b)", (("a", 41), ("b", 8))).answer
        ('2.83', '6')
        """
        return str(eval(self.python, {"math": math, "round": round}))  # our own expression, never a model's


def draw_problem(rng: random.Random, weights: list[float] | None = None) -> Problem:
    form = rng.choices(FORMS, weights=weights or [f.weight for f in FORMS])[0]
    return Problem(form.name, tuple(sorted(form.draw(rng).items())))


def tool_problems(rng: random.Random, count: int, weights: list[float] | None = None,
                  seen: set | None = None) -> list[Problem]:
    """``count`` distinct problems (``Problem.key``), in draw order, none of them in ``seen``
    (which gains their keys)."""
    seen = set() if seen is None else seen
    problems = []
    while len(problems) < count:
        problem = draw_problem(rng, weights)
        if problem.key not in seen:
            seen.add(problem.key)
            problems.append(problem)
    return problems


RL_EMPHASIS = 3.0


def rl_weight(form: Form) -> float:
    """A form's share of the RL prompts: ``RL_EMPHASIS`` times its SFT share for the forms that
    take reading (word problems, steps or names in words), division of any kind and a leading
    minus; plain products and sums, which the cold start already solves nearly always (their
    groups all right: no signal, dropped by dynamic sampling), keep their share.

    >>> rl_weight(FORMS_BY_NAME["a * b"]) == FORMS_BY_NAME["a * b"].weight, rl_weight(FORMS_BY_NAME["a % b"]) > 0.05
    (True, True)
    """
    reading = form.name.startswith(("word:", "steps:", "vars:"))
    division = any(op in form.name for op in ("%", "//", "/"))
    return form.weight * (RL_EMPHASIS if reading or division or form.name.startswith("-") else 1.0)


SFT_FLATTENING = 0.5


def sft_weight(form: Form) -> float:
    """A form's share of the cold-start trajectories: its share of the problems raised to
    ``SFT_FLATTENING``, so that rare forms (rounding up, word problems with a sum inside, steps
    in words) get enough rows to be learned at all, and the common products, which a 135M model
    learns from a few rows, fewer. The same-form held-out set keeps the problems' own shares.

    >>> round(sft_weight(FORMS_BY_NAME["a * b"]) / sft_weight(FORMS_BY_NAME["word: ceil(a / b)"]), 2)
    2.45
    """
    return form.weight ** SFT_FLATTENING


def phrasing(rng: random.Random, problem: Problem) -> str:
    """One of the problem's phrasings, its ``{e}`` (the expression as text) filled in."""
    form = FORMS_BY_NAME[problem.form]
    return rng.choice(form.questions).replace("{e}", form.text)


def question(rng: random.Random, problem: Problem) -> str:
    return phrasing(rng, problem).format(**problem.values)


def prompt_row(rng: random.Random, problem: Problem) -> dict:
    """An RL or held-out prompt; ``operands``: the numbers its question shows (a distractor
    only when this phrasing has one)."""
    template = phrasing(rng, problem)
    shown = {name: value for name, value in problem.values.items() if "{" + name + "}" in template}
    return {"messages": [{"role": "user", "content": template.format(**problem.values)}], "answer": problem.answer,
            "form": problem.form, "operands": shown}


def python_call(code: str) -> dict:
    return {"type": "function", "function": {"name": "python", "arguments": {"code": code}}}


ROUNDING_NAMES = tuple(to for names in PLACES.values() for to in names) + ("two decimals", "one decimal")


def rounding_comment(question_text: str) -> str:
    """For a question that asks for a rounding, a first code line that copies how it names the
    precision: the model reads "the nearest hundredth" right before it writes ``round(..., 2)``
    instead of many tokens back (without it a 135M cold start wrote ``, 2`` for most roundings);
    empty for any other question.

    >>> rounding_comment("Round 457 / 42 to the nearest integer."), rounding_comment("What is 4 * 5?")
    ('# to the nearest integer\\n', '')
    """
    named = [to for to in ROUNDING_NAMES if to in question_text]
    return f"# to {max(named, key=len)}\n" if named else ""


def code_for(rng: random.Random, problem: Problem, question_text: str) -> str:
    code = rng.choices([c for c, _ in CODE], weights=[w for _, w in CODE])[0].format(e=problem.python)
    code = rounding_comment(question_text) + code if "round(" in code else code
    return f"import math\n{code}" if "math." in code else code


def named_code(template: str, problem: Problem) -> str:
    """For a question that names its numbers ("Let p = {a}, q = {b} ..."): the same names
    assigned in the code, then the expression written with them.

    >>> named_code("Let p = {a} and q = {b}. What is p * q?", Problem("vars: a * b", (("a", 12), ("b", 34))))
    'p = 12\\nq = 34\\nprint(p * q)'
    """
    names = re.findall(r"\b([a-z]) = \{([a-z])\}", template)
    expression = FORMS_BY_NAME[problem.form].python
    for name, operand in names:
        expression = expression.replace("{" + operand + "}", name)
    assignments = "".join(f"{name} = {problem.values[operand]}\n" for name, operand in names)
    return f"{assignments}print({expression})"


def tool_trajectory(rng: random.Random, problem: Problem) -> dict:
    """The question, one python call that computes the whole answer, its output, the answer: the
    output, copied exactly. (Two calls, the product first, taught a 135M model to answer with
    the product: after an output it could not tell a step from the result.)"""
    answer = problem.answer
    template = phrasing(rng, problem)
    user = {"role": "user", "content": template.format(**problem.values)}
    if problem.form.startswith("vars:"):
        return {"messages": [
            user,
            {"role": "assistant", "content": "", "tool_calls": [python_call(named_code(template, problem))]},
            {"role": "tool", "content": answer},
            {"role": "assistant", "content": f"The answer is {answer}."},
        ]}
    return {"messages": [
        user,
        {"role": "assistant", "content": "", "tool_calls": [python_call(code_for(rng, problem, user["content"]))]},
        {"role": "tool", "content": answer},
        {"role": "assistant", "content": f"The answer is {answer}."},
    ]}


def direct(user: str, answer: int) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": f"The answer is {answer}."}]}


def subtractions(rng: random.Random) -> list[tuple[int, int]]:
    """Every two-digit ``a - b`` with ``a > b``, shuffled."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, a)]
    rng.shuffle(pairs)
    return pairs


def control_subtractions(path: Path) -> set[tuple[int, int]]:
    """The ``(a, b)`` of the fixed subtraction control (``What is a - b?``, checked)."""
    found = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        match = re.fullmatch(r"What is (\d+) - (\d+)\?", row["messages"][0]["content"])
        if match is None or int(match.group(1)) - int(match.group(2)) != int(row["answer"]):
            raise ValueError(f"{path}: not a checked two-number subtraction: {row}")
        found.add((int(match.group(1)), int(match.group(2))))
    return found


def chat_rows(path: Path, rng: random.Random, count: int) -> list[dict]:
    """``count`` short single-turn rows of ``path`` with no arithmetic in them."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    usable = [row for row in rows
              if [m["role"] for m in row["messages"]] == ["user", "assistant"]
              and len(row["messages"][1]["content"]) <= 200
              and not any(ARITHMETIC_CHAT.search(m["content"]) for m in row["messages"])]
    if len(usable) < count:
        raise ValueError(f"{path}: only {len(usable)} short tool-free chat rows, {count} wanted")
    return [{"messages": row["messages"]} for row in rng.sample(usable, count)]


def addition_rows(path: Path, rng: random.Random, count: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for row in rng.sample(rows, count):
        match = ADDITION.fullmatch(row["prompt"])
        if match is None or int(match.group(1)) + int(match.group(2)) != int(row["answer"]):
            raise ValueError(f"{path}: not a checked two-number addition: {row}")
        out.append(direct(row["prompt"], int(row["answer"])))
    return out


def with_tools(row: dict) -> dict:
    """A chat_template SFT row: arithmetic rows announce the python tool, chat rows do not."""
    arithmetic = row["messages"][1].get("tool_calls") or row["messages"][1]["content"].startswith("The answer is ")
    return {**row, "tools": [PYTHON_SCHEMA]} if arithmetic else row


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft", type=int, default=640, help="tool trajectories in the cold-start file")
    parser.add_argument("--subtractions", type=int, default=60, help="direct two-digit subtractions in the SFT mixture")
    parser.add_argument("--additions", type=int, default=30, help="direct two-digit additions in the SFT mixture")
    parser.add_argument("--chat", type=int, default=70, help="short chat rows in the SFT mixture")
    parser.add_argument("--rl", type=int, default=600, help="RL training prompts")
    parser.add_argument("--eval", type=int, default=100, help="held-out prompts (tool task and subtraction each)")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    seen: set = set()
    held_out = tool_problems(rng, args.eval, seen=seen)
    same_form_eval = [prompt_row(rng, problem) for problem in held_out]  # drawn first: training changes leave it be
    sft = tool_problems(rng, args.sft, weights=[sft_weight(form) for form in FORMS], seen=seen)
    rl = tool_problems(rng, args.rl, weights=[rl_weight(form) for form in FORMS], seen=seen)
    control = control_subtractions(HERE / "subtraction_eval.jsonl")
    mixture_subtractions = [pair for pair in subtractions(rng) if pair not in control][: args.subtractions]

    sft_rows = [tool_trajectory(rng, problem) for problem in sft]
    sft_rows += [direct(f"What is {a} - {b}?", a - b) for a, b in mixture_subtractions]
    sft_rows += addition_rows(HERE / "rl_arithmetic_train.jsonl", rng, args.additions)
    sft_rows += chat_rows(HERE / "sft_chat.jsonl", rng, args.chat)
    rng.shuffle(sft_rows)
    files = {
        "agentic_sft.jsonl": sft_rows,
        "agentic_chat_sft.jsonl": [with_tools(row) for row in sft_rows],
        "agentic_rl_train.jsonl": [prompt_row(rng, problem) for problem in rl],
        "agentic_eval.jsonl": same_form_eval,
    }
    for name, rows in files.items():
        write_jsonl(args.out / name, rows)
        print(f"wrote {len(rows)} rows to {args.out / name}")


if __name__ == "__main__":
    main()
