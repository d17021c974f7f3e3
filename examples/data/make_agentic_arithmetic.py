"""Write the agentic demo files: arithmetic the bundled 135M model cannot do in its head but can
with a Python tool.

    python examples/data/make_agentic_arithmetic.py       # writes the four files beside this script

The tool task: three-digit by three-digit multiplication ("What is 487 * 923?") and mixed
expressions ("Compute 38 * 47 - 129.", "Evaluate (234 + 567) * 12."), asked in several
phrasings.

- ``agentic_sft.jsonl``: the cold start, OpenAI messages: the question; an assistant message
  calling the ``python`` tool (``{"code": "print(487 * 923)"}``, sometimes ``x = ...`` then
  ``print(x)``); the tool result; ``The answer is 449501.`` Half of the ``a * b +/- c``
  problems go step by step: the product first, then a second call on its output. Train it with
  ``data.tool_format: inline`` (the bundled template has no tools). About a quarter of the rows
  are a tool-free mixture that keeps other skills: two-digit subtractions and additions answered
  directly (the tool is for the hard problems), and short chat answers from ``sft_chat.jsonl``
  (counting, sorting, capitals; no arithmetic). The cold start is kept small on purpose, so
  that RL has room to add on top of it.
- ``agentic_rl_train.jsonl``: RL prompts ``{"messages": [user], "answer": "449501"}`` of the
  tool task.
- ``agentic_eval.jsonl``: held-out prompts of the tool task, same shape.
- ``subtraction_eval.jsonl``: held-out two-digit subtractions, a control task outside the
  training data (does tool training break what the model did without tools?).

No problem is shared between the SFT, RL and held-out files, not even with the operands of
``+`` or ``*`` swapped; no held-out subtraction is in the SFT mixture. The mixture's
additions come from ``rl_arithmetic_train.jsonl``, so none is in the quickstart's held-out
``rl_arithmetic_eval.jsonl``. Deterministic: the same seed writes the same files.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUESTIONS = ("What is {e}?", "Compute {e}.", "Calculate {e}.", "What is the value of {e}?", "Work out {e}.", "Evaluate {e}.")
CODE = (("print({e})", 0.6), ("x = {e}\nprint(x)", 0.25), ("result = {e}\nprint(result)", 0.15))
# the problem shapes of the tool task: (form, share of the problems)
FORMS = (("a * b", 0.55), ("a * b - c", 0.15), ("a * b + c", 0.15), ("(a + b) * c", 0.15))
ADDITION = re.compile(r"What is (\d+) \+ (\d+)\?")
ARITHMETIC_CHAT = re.compile(r"\d\s*[-+*/x]\s*\d|^Conversion:|^Step ", re.MULTILINE)


def expression(form: str, a: int, b: int, c: int = 0) -> str:
    """The text of a problem.

    >>> expression("a * b", 487, 923), expression("(a + b) * c", 234, 567, 12)
    ('487 * 923', '(234 + 567) * 12')
    """
    return form.replace("a", str(a)).replace("b", str(b)).replace("c", str(c))


def value(form: str, a: int, b: int, c: int = 0) -> int:
    """The exact value of a problem.

    >>> value("a * b", 487, 923), value("a * b - c", 38, 47, 129), value("(a + b) * c", 234, 567, 12)
    (449501, 1657, 9612)
    """
    if form == "a * b":
        return a * b
    if form == "a * b - c":
        return a * b - c
    if form == "a * b + c":
        return a * b + c
    if form == "(a + b) * c":
        return (a + b) * c
    raise ValueError(f"unknown form {form!r}")


def key(form: str, a: int, b: int, c: int = 0) -> tuple:
    """What makes two problems the same: the operands of ``+`` and ``*`` in either order.

    >>> key("a * b", 923, 487) == key("a * b", 487, 923), key("a * b - c", 47, 38, 129)
    (True, ('a * b - c', 38, 47, 129))
    """
    return (form, min(a, b), max(a, b), c)


def draw_problem(rng: random.Random) -> tuple[str, int, int, int]:
    """One tool-task problem ``(form, a, b, c)``: operands sized so no 135M model does it in its head."""
    form = rng.choices([f for f, _ in FORMS], weights=[w for _, w in FORMS])[0]
    if form == "a * b":
        return form, rng.randint(100, 999), rng.randint(100, 999), 0
    if form == "(a + b) * c":
        return form, rng.randint(100, 999), rng.randint(100, 999), rng.randint(11, 99)
    a, b = rng.randint(11, 99), rng.randint(11, 99)
    return form, a, b, rng.randint(100, min(999, a * b - 1))  # a * b - c stays positive


def tool_problems(rng: random.Random, count: int) -> list[tuple[str, int, int, int]]:
    """``count`` distinct problems (``key``), in draw order."""
    seen, problems = set(), []
    while len(problems) < count:
        problem = draw_problem(rng)
        if key(*problem) not in seen:
            seen.add(key(*problem))
            problems.append(problem)
    return problems


def question(rng: random.Random, problem: tuple[str, int, int, int]) -> str:
    return rng.choice(QUESTIONS).format(e=expression(*problem))


def prompt_row(rng: random.Random, problem: tuple[str, int, int, int]) -> dict:
    return {"messages": [{"role": "user", "content": question(rng, problem)}], "answer": str(value(*problem))}


def python_call(code: str) -> dict:
    return {"type": "function", "function": {"name": "python", "arguments": {"code": code}}}


def step_by_step(problem: tuple[str, int, int, int]) -> bool:
    """Half of the ``a * b +/- c`` trajectories compute the product first, then the rest: two
    calls, so the cold start also shows a model reading one output and calling again. Decided
    by the problem alone (the shared generator's draws stay as they were)."""
    return problem[0] in ("a * b - c", "a * b + c") and random.Random(repr(problem)).random() < 0.5


def tool_trajectory(rng: random.Random, problem: tuple[str, int, int, int]) -> dict:
    """The question, one python call (two for a step-by-step ``a * b +/- c``), the outputs,
    the answer."""
    code = rng.choices([c for c, _ in CODE], weights=[w for _, w in CODE])[0].format(e=expression(*problem))
    answer = str(value(*problem))
    user = {"role": "user", "content": question(rng, problem)}
    if step_by_step(problem):
        form, a, b, c = problem
        product = a * b
        sign = "-" if form == "a * b - c" else "+"
        return {"messages": [
            user,
            {"role": "assistant", "content": "", "tool_calls": [python_call(f"print({a} * {b})")]},
            {"role": "tool", "content": str(product)},
            {"role": "assistant", "content": "", "tool_calls": [python_call(f"print({product} {sign} {c})")]},
            {"role": "tool", "content": answer},
            {"role": "assistant", "content": f"The answer is {answer}."},
        ]}
    return {"messages": [
        user,
        {"role": "assistant", "content": "", "tool_calls": [python_call(code)]},
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


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft", type=int, default=300, help="tool trajectories in the cold-start file")
    parser.add_argument("--subtractions", type=int, default=40, help="direct two-digit subtractions in the SFT mixture")
    parser.add_argument("--additions", type=int, default=20, help="direct two-digit additions in the SFT mixture")
    parser.add_argument("--chat", type=int, default=40, help="short chat rows in the SFT mixture")
    parser.add_argument("--rl", type=int, default=400, help="RL training prompts")
    parser.add_argument("--eval", type=int, default=100, help="held-out prompts (tool task and subtraction each)")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    problems = tool_problems(rng, args.eval + args.rl + args.sft)
    held_out, rl, sft = problems[: args.eval], problems[args.eval : args.eval + args.rl], problems[args.eval + args.rl :]
    pairs = subtractions(rng)
    held_out_subtractions, mixture_subtractions = pairs[: args.eval], pairs[args.eval : args.eval + args.subtractions]

    sft_rows = [tool_trajectory(rng, problem) for problem in sft]
    sft_rows += [direct(f"What is {a} - {b}?", a - b) for a, b in mixture_subtractions]
    sft_rows += addition_rows(HERE / "rl_arithmetic_train.jsonl", rng, args.additions)
    sft_rows += chat_rows(HERE / "sft_chat.jsonl", rng, args.chat)
    rng.shuffle(sft_rows)
    files = {
        "agentic_sft.jsonl": sft_rows,
        "agentic_rl_train.jsonl": [prompt_row(rng, problem) for problem in rl],
        "agentic_eval.jsonl": [prompt_row(rng, problem) for problem in held_out],
        "subtraction_eval.jsonl": [{"messages": [{"role": "user", "content": f"What is {a} - {b}?"}], "answer": str(a - b)}
                                   for a, b in held_out_subtractions],
    }
    for name, rows in files.items():
        write_jsonl(args.out / name, rows)
        print(f"wrote {len(rows)} rows to {args.out / name}")


if __name__ == "__main__":
    main()
