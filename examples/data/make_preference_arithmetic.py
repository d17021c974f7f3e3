"""Write the arithmetic preference data set used by ``configs/rm_quickstart.yaml``.

Each row is a verifiable arithmetic question (sums, differences, products, small word
problems) with two answers: ``chosen`` is correct, ``rejected`` contains one error of a
named kind (``error`` key, used to break accuracy down by kind):

- ``slip``      the computation and the final answer are both off (a carrying slip, +-1..3, +-10);
- ``mismatch``  the computation is right but the final answer says another number;
- ``wrong_op``  the answer applies the wrong operation (adds instead of subtracting, ...);
- ``evasive``   no answer at all (restates the question or gives up).

The train and held-out files use disjoint questions. Deterministic for a given seed::

    python examples/data/make_preference_arithmetic.py            # the shipped files
    python examples/data/make_preference_arithmetic.py --train 2000 --val 400 --out /tmp/rm
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena"]
ITEMS = ["apples", "books", "coins", "marbles", "pencils", "stamps", "cards", "shells"]
ERROR_KINDS = ("slip", "mismatch", "wrong_op", "evasive")
SYMBOL = {"add": "+", "sub": "-", "mul": "*"}


def apply(op: str, a: int, b: int) -> int:
    return {"add": a + b, "sub": a - b, "mul": a * b}[op]


def question(rng: random.Random) -> dict:
    """A question, its operation and operands."""
    kind = rng.choice(["add", "sub", "mul", "word_add", "word_sub"])
    if kind in ("add", "word_add"):
        op, a, b = "add", rng.randint(2, 99), rng.randint(2, 99)
    elif kind in ("sub", "word_sub"):
        op = "sub"
        a = rng.randint(10, 99)
        b = rng.randint(1, a - 1)
    else:
        op, a, b = "mul", rng.randint(2, 12), rng.randint(2, 12)
    if kind == "word_add":
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        text = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
    elif kind == "word_sub":
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        text = f"{name} had {a} {item} and gave away {b}. How many {item} are left?"
    else:
        text = rng.choice([
            f"What is {a} {SYMBOL[op]} {b}?",
            f"Compute {a} {SYMBOL[op]} {b}.",
            f"Calculate {a} {SYMBOL[op]} {b}.",
        ])
    return {"prompt": text, "op": op, "a": a, "b": b}


def worked(op: str, a: int, b: int, result: int, final: int, rng: random.Random) -> str:
    closing = rng.choice(["The answer is {}.", "So the answer is {}.", "Answer: {}"])
    return f"{a} {SYMBOL[op]} {b} = {result}. " + closing.format(final)


def wrong_number(correct: int, rng: random.Random) -> int:
    while True:
        candidate = correct + rng.choice([-10, -3, -2, -1, 1, 2, 3, 10])
        if candidate != correct and candidate >= 0:
            return candidate


def pair(rng: random.Random, error: str) -> dict:
    q = question(rng)
    op, a, b = q["op"], q["a"], q["b"]
    correct = apply(op, a, b)
    chosen = worked(op, a, b, correct, correct, rng)
    if error == "slip":
        wrong = wrong_number(correct, rng)
        rejected = worked(op, a, b, wrong, wrong, rng)
    elif error == "mismatch":
        rejected = worked(op, a, b, correct, wrong_number(correct, rng), rng)
    elif error == "wrong_op":
        other = rng.choice([o for o in ("add", "sub", "mul") if o != op and apply(o, a, b) != correct])
        value = apply(other, a, b)
        rejected = worked(other, a, b, value, value, rng)
    else:
        rejected = rng.choice([
            "I am not sure how to solve this.",
            f"The question asks about {a} and {b}.",
            "This needs a calculator, so I cannot answer it.",
            f"Let me think about {a} and {b}. It is a number.",
        ])
    return {"prompt": q["prompt"], "chosen": chosen, "rejected": rejected, "error": error, "answer": correct}


def generate(count: int, rng: random.Random, seen: set[str]) -> list[dict]:
    rows = []
    while len(rows) < count:
        row = pair(rng, ERROR_KINDS[len(rows) % len(ERROR_KINDS)])
        if row["prompt"] in seen:
            continue
        seen.add(row["prompt"])
        rows.append(row)
    rng.shuffle(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=800, help="training pairs")
    parser.add_argument("--val", type=int, default=200, help="held-out pairs (questions unseen in train)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent), help="output directory")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    seen: set[str] = set()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, count in (("train", args.train), ("val", args.val)):
        rows = generate(count, rng, seen)
        path = out / f"preference_arithmetic_{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"wrote {len(rows)} pairs to {path}")


if __name__ == "__main__":
    main()
