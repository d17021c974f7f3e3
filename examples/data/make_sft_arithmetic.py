"""Write the SFT file of the quickstart pipeline: two-digit additions with correct worked answers.

    python examples/data/make_sft_arithmetic.py          # writes sft_arithmetic.jsonl beside this script

The problems are the first ``--count`` rows of ``rl_arithmetic_train.jsonl`` (written by
``make_rl_arithmetic.py``), so none of them is in the held-out file ``rl_arithmetic_eval.jsonl``
that ``configs/quickstart.yaml`` evaluates on. Each answer adds the tens, then the ones, then
the two partial sums, and ends with ``The answer is N.``, the format the quickstart's format
reward checks: a 135M model gets each small step right far more often than the whole sum at
once (docs/PIPELINE.md: SFT teaches the format and the procedure; RL then sharpens it).

Rows are chat conversations ``{"messages": [user, assistant]}``. Deterministic.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROBLEM = re.compile(r"What is (\d+) \+ (\d+)\?")


def worked_answer(a: int, b: int) -> str:
    """The target reply for ``a + b`` (two-digit operands).

    Compact on purpose (no spaces around digits: each space is a token of its own), so
    every generated reply is short on a CPU.

    >>> worked_answer(57, 73)
    '50+70=120, 7+3=10, 120+10=130. The answer is 130.'
    >>> worked_answer(41, 35)
    '40+30=70, 1+5=6, 70+6=76. The answer is 76.'
    """
    tens, ones = a // 10 * 10 + b // 10 * 10, a % 10 + b % 10
    return f"{a // 10 * 10}+{b // 10 * 10}={tens}, {a % 10}+{b % 10}={ones}, {tens}+{ones}={a + b}. The answer is {a + b}."


def sft_rows(prompt_rows: list[dict]) -> list[dict]:
    rows = []
    for row in prompt_rows:
        match = PROBLEM.fullmatch(row["prompt"])
        if match is None:
            raise ValueError(f"not a two-number addition: {row['prompt']!r}")
        a, b = int(match.group(1)), int(match.group(2))
        if str(a + b) != str(row["answer"]):
            raise ValueError(f"wrong reference answer in {row}")
        rows.append({"messages": [{"role": "user", "content": row["prompt"]},
                                  {"role": "assistant", "content": worked_answer(a, b)}]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=600, help="problems (from the start of the RL training file)")
    parser.add_argument("--source", type=Path, default=HERE / "rl_arithmetic_train.jsonl")
    parser.add_argument("--out", type=Path, default=HERE / "sft_arithmetic.jsonl")
    args = parser.parse_args()
    prompts = [json.loads(line) for line in args.source.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = sft_rows(prompts[: args.count])
    args.out.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {len(rows)} worked answers to {args.out}")


if __name__ == "__main__":
    main()
