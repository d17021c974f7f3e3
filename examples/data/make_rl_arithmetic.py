"""Write the RL arithmetic prompt files: two-digit additions with their answers.

    python examples/data/make_rl_arithmetic.py            # writes the four files beside this script

Rows are ``{"prompt": "What is 37 + 48?", "answer": "85"}``: the prompt is a plain string (the
chat template is applied at load time) and ``answer`` is the metadata the ``math`` reward
checks. Two phrasings of the same problems are written:

- ``rl_arithmetic_{train,eval}.jsonl``: "What is 37 + 48?" (the pipeline quickstart, whose SFT
  stage teaches the answer format first);
- ``rl_arithmetic_form_{train,eval}.jsonl``: "What is 37 + 48? Reply in the form: 37 + 48 = <sum>"
  (RL straight from the bundled model, ``configs/grpo_quickstart.yaml``: with this phrasing the
  untrained model mostly answers in one short line, about 10% of them right, which gives GRPO
  groups with signal; with the plain phrasing it talks for 30+ tokens before any sum). The held-out file never shares a problem with the training file, not even with the
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
TEMPLATES = {
    "rl_arithmetic": "What is {a} + {b}?",
    "rl_arithmetic_form": "What is {a} + {b}? Reply in the form: {a} + {b} = <sum>",
}


def make_problems(seed: int, n_train: int, n_eval: int, low: int = 10, high: int = 99,
                  template: str = TEMPLATES["rl_arithmetic"]) -> tuple[list[dict], list[dict]]:
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
            out.append({"prompt": template.format(a=a, b=b), "answer": str(a + b)})
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
    for name, template in TEMPLATES.items():
        train, held_out = make_problems(args.seed, args.train, args.eval, template=template)
        write_jsonl(args.out / f"{name}_train.jsonl", train)
        write_jsonl(args.out / f"{name}_eval.jsonl", held_out)
        print(f"wrote {len(train)} train and {len(held_out)} held-out problems to {args.out}/{name}_*.jsonl")


if __name__ == "__main__":
    main()
