"""Write the arithmetic preference data set used by ``configs/rm_quickstart.yaml`` and
``configs/dpo_quickstart.yaml``.

Each row is a verifiable arithmetic question with two answers: ``chosen`` is correct,
``rejected`` contains one error of a named kind (the ``error`` key; ``rm.group_key: error``
breaks held-out accuracy down by kind):

- ``slip``      a step and everything after it are off (+-1..3 or +-10, as a carrying slip);
- ``mismatch``  every step is right but the final answer says another number;
- ``wrong_op``  the answer applies the wrong operation (adds instead of subtracting, or, in a
                worked addition, multiplies the ones or subtracts the tens);
- ``evasive``   no answer at all (restates the question or gives up).

Every addition (two two-digit operands: the RL quickstart's "What is a + b?", "Compute a + b.",
small word problems) is answered in exactly the worked style the SFT quickstart teaches
(``make_sft_arithmetic.worked_answer``: "50+70=120, 7+3=10, 120+10=130. The answer is 130."),
and its rejected answer is that same style with the error in it (evasive aside): a preference
pair then differs in the error alone, and DPO's chosen side (and RPO's NLL on it) keeps the
style SFT taught instead of teaching one-line answers. Differences and products, which SFT
does not teach, are answered in one line. No question of the RL held-out file
(``rl_arithmetic_eval.jsonl``, either operand order) appears here, and the train and held-out
files of this set share no question. Deterministic for a given seed::

    python examples/data/make_preference_arithmetic.py            # the shipped files
    python examples/data/make_preference_arithmetic.py --train 2000 --val 400 --out /tmp/rm
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena"]
ITEMS = ["apples", "books", "coins", "marbles", "pencils", "stamps", "cards", "shells"]
ERROR_KINDS = ("slip", "mismatch", "wrong_op", "evasive")
SYMBOL = {"add": "+", "sub": "-", "mul": "*"}


def apply(op: str, a: int, b: int) -> int:
    return {"add": a + b, "sub": a - b, "mul": a * b}[op]


def question(rng: random.Random) -> dict:
    """A question, its operation and operands."""
    kind = rng.choice(["rl_add", "rl_add", "rl_add", "add", "sub", "mul", "word_add", "word_sub"])
    if kind in ("rl_add", "add", "word_add"):  # two-digit operands: the worked style needs tens and ones
        op, a, b = "add", rng.randint(10, 99), rng.randint(10, 99)
    elif kind in ("sub", "word_sub"):
        op = "sub"
        a = rng.randint(10, 99)
        b = rng.randint(1, a - 1)
    else:
        op, a, b = "mul", rng.randint(2, 12), rng.randint(2, 12)
    if kind == "rl_add":
        text = f"What is {a} + {b}?"
    elif kind == "word_add":
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        text = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
    elif kind == "word_sub":
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        text = f"{name} had {a} {item} and gave away {b}. How many {item} are left?"
    else:
        text = rng.choice([
            f"Compute {a} {SYMBOL[op]} {b}.",
            f"Calculate {a} {SYMBOL[op]} {b}.",
            f"What is {a} {SYMBOL[op]} {b}?",
        ])
    return {"prompt": text, "op": op, "a": a, "b": b}


def stepwise(a: int, b: int, tens_error: int = 0, ones_error: int = 0, final: int | None = None,
             ones_op: str = "+", tens_op: str = "+") -> str:
    """The SFT quickstart's worked addition (``make_sft_arithmetic.worked_answer``), optionally
    with an error in it: a slip in one step (propagated), a final answer that contradicts the
    work, or another operation in the tens or ones step.

    >>> stepwise(57, 73)
    '50+70=120, 7+3=10, 120+10=130. The answer is 130.'
    >>> stepwise(57, 73, ones_error=1), stepwise(57, 73, final=131)
    ('50+70=120, 7+3=11, 120+11=131. The answer is 131.', '50+70=120, 7+3=10, 120+10=130. The answer is 131.')
    >>> stepwise(57, 73, ones_op="*")
    '50+70=120, 7*3=21, 120+21=141. The answer is 141.'
    """
    ta, tb, oa, ob = a // 10 * 10, b // 10 * 10, a % 10, b % 10
    tens = (ta + tb if tens_op == "+" else ta - tb) + tens_error
    ones = (oa + ob if ones_op == "+" else oa * ob) + ones_error
    total = tens + ones
    return (f"{ta}{tens_op}{tb}={tens}, {oa}{ones_op}{ob}={ones}, {tens}+{ones}={total}. "
            f"The answer is {total if final is None else final}.")


def worked(op: str, a: int, b: int, result: int, final: int, rng: random.Random) -> str:
    closing = rng.choice(["The answer is {}.", "So the answer is {}.", "Answer: {}"])
    return f"{a} {SYMBOL[op]} {b} = {result}. " + closing.format(final)


def wrong_number(correct: int, rng: random.Random) -> int:
    while True:
        candidate = correct + rng.choice([-10, -3, -2, -1, 1, 2, 3, 10])
        if candidate != correct and candidate >= 0:
            return candidate


def pair(rng: random.Random, error: str, excluded: set[tuple[int, int]]) -> dict | None:
    q = question(rng)
    op, a, b = q["op"], q["a"], q["b"]
    if op == "add" and (min(a, b), max(a, b)) in excluded:
        return None
    correct = apply(op, a, b)
    addition = op == "add"  # the SFT worked style, on both sides
    chosen = stepwise(a, b) if addition else worked(op, a, b, correct, correct, rng)
    if error == "slip":
        if addition:
            slip = rng.choice([-10, 10]) if rng.random() < 0.5 else 0
            ones_slip = 0 if slip else rng.choice([-2, -1, 1, 2])
            if a % 10 + b % 10 + ones_slip < 0:  # a slip never writes a negative ones sum
                ones_slip = -ones_slip
            rejected = stepwise(a, b, tens_error=slip, ones_error=ones_slip)
        else:
            wrong = wrong_number(correct, rng)
            rejected = worked(op, a, b, wrong, wrong, rng)
    elif error == "mismatch":
        wrong = wrong_number(correct, rng)
        rejected = stepwise(a, b, final=wrong) if addition else worked(op, a, b, correct, wrong, rng)
    elif error == "wrong_op" and addition:
        ones_wrong = (a % 10) * (b % 10) != a % 10 + b % 10
        rejected = stepwise(a, b, ones_op="*") if ones_wrong else stepwise(a, b, tens_op="-")
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
    return {"prompt": q["prompt"], "chosen": chosen, "rejected": rejected, "error": error, "answer": str(correct)}


def rl_heldout_problems(path: Path) -> set[tuple[int, int]]:
    """Operand pairs (smaller first) of the RL held-out additions, to keep them out of this set."""
    import re

    if not path.is_file():
        return set()
    found = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"What is (\d+) \+ (\d+)\?", json.loads(line)["prompt"]) if line.strip() else None
        if match:
            a, b = int(match.group(1)), int(match.group(2))
            found.add((min(a, b), max(a, b)))
    return found


def generate(count: int, rng: random.Random, seen: set[str], excluded: set[tuple[int, int]]) -> list[dict]:
    rows = []
    while len(rows) < count:
        row = pair(rng, ERROR_KINDS[len(rows) % len(ERROR_KINDS)], excluded)
        if row is None or row["prompt"] in seen:
            continue
        seen.add(row["prompt"])
        rows.append(row)
    rng.shuffle(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=600, help="training pairs")
    parser.add_argument("--val", type=int, default=100, help="held-out pairs (questions unseen in train)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE), help="output directory")
    parser.add_argument("--exclude", default=str(HERE / "rl_arithmetic_eval.jsonl"),
                        help="RL held-out prompt file whose additions must not appear here")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    excluded = rl_heldout_problems(Path(args.exclude))
    seen: set[str] = set()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, count in (("train", args.train), ("val", args.val)):
        rows = generate(count, rng, seen, excluded)
        path = out / f"preference_arithmetic_{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"wrote {len(rows)} pairs to {path}")
    print(f"(left out the {len(excluded)} additions of {args.exclude})")


if __name__ == "__main__":
    main()
