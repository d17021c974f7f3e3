"""Write the RL arithmetic prompt files: two-digit additions with their answers.

    python examples/data/make_rl_arithmetic.py            # writes the two files beside this script

Rows are ``{"prompt": "What is 37 + 48?", "answer": "85"}``: the prompt is a plain string (the
chat template is applied at load time) and ``answer`` is the metadata the ``math`` reward
checks. The held-out file never shares a problem with the training file, not even with the
operands swapped (``37 + 48`` in one means neither ``37 + 48`` nor ``48 + 37`` in the other),
so held-out accuracy measures what RL taught, not what it memorised.

Deterministic: the same seed writes the same files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATE = "What is {a} + {b}?"


def make_problems(seed: int, n_train: int, n_eval: int, low: int = 10, high: int = 99) -> tuple[list[dict], list[dict]]:
    """Disjoint train / held-out lists of addition problems (operand order ignored for disjointness)."""
    pairs = sorted({(min(a, b), max(a, b)) for a in range(low, high + 1) for b in range(low, high + 1)})
    if n_train + n_eval > len(pairs):
        raise ValueError(f"only {len(pairs)} distinct problems between {low} and {high}")
    rng = random.Random(seed)
    rng.shuffle(pairs)
    held_out, train = pairs[:n_eval], pairs[n_eval:n_eval + n_train]

    def rows(chosen: list[tuple[int, int]]) -> list[dict]:
        out = []
        for a, b in chosen:
            if rng.random() < 0.5:  # both operand orders appear
                a, b = b, a
            out.append({"prompt": TEMPLATE.format(a=a, b=b), "answer": str(a + b)})
        return out

    return rows(train), rows(held_out)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=2000, help="training problems")
    parser.add_argument("--eval", type=int, default=200, help="held-out problems")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    train, held_out = make_problems(args.seed, args.train, args.eval)
    write_jsonl(args.out / "rl_arithmetic_train.jsonl", train)
    write_jsonl(args.out / "rl_arithmetic_eval.jsonl", held_out)
    print(f"wrote {len(train)} train and {len(held_out)} held-out problems to {args.out}")


if __name__ == "__main__":
    main()
