"""Code reward: run the completion's program against the row's tests in the sandbox.

A rule-based reward in the sense of execution feedback for code (Chen et al. 2021,
"Evaluating Large Language Models Trained on Code", the HumanEval paper, which runs
unit tests in a sandbox). Score = fraction of tests passed, run in
``posttrain.sandbox`` (model-written code is hostile input).

Tests come from ``metadata[tests_key]`` in one of these shapes:

- assert-style: a string or a list of strings of Python; each string is one test
  (``"assert add(1, 2) == 3"``; a HumanEval ``test`` program followed by
  ``check(entry_point)`` is one test). Tests never run in the program's interpreter: the
  program runs in the sandbox and answers calls; the tests run in a separate judge
  process that calls the program's functions with plain data and gets plain data back
  (``posttrain.sandbox.judge``), so a completion cannot patch what the tests use,
  find them in memory, or return objects that lie about equality.
  ``metadata["code_prefix"]`` (HumanEval: the prompt) is trusted row data: the judge runs
  it itself, so the tests' helpers (HumanEval/32's ``poly``) are the row's, never the
  completion's. The function the tests call is ``metadata["entry_point"]``, else the last
  function the prefix defines, else every name the tests use that neither the prefix, the
  test nor the builtins define;
- stdin/stdout: ``{"stdin": ..., "stdout": ...}`` or a list of them (also the keys
  ``input``/``output``); the program runs once per case and passes when its stdout equals
  the expected one, compared line by line with trailing whitespace ignored.

The program is the fenced code block of the completion (```` ```python ```` or a bare
fence; the first one by default; an unclosed fence counts until the end), or the whole
completion when it has none, prefixed by ``metadata["code_prefix"]`` when present (HumanEval:
the prompt, so a completion may be just the function body). A row without tests scores 0:
an empty test list must not reward an empty program.

Isolation: ``namespace`` (see ``posttrain.sandbox.runner``) is required. ``process``
isolation, or ``auto`` where namespaces are unavailable, is refused with a one-line
``ConfigError`` unless ``unsafe_process_isolation=True``: it runs model-written code with
the whole filesystem in view, behind an audit hook that is not a security boundary.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Literal, Sequence

from posttrain.errors import ConfigError, DataError
from posttrain.rewards.output import RewardOutput, check_batch
from posttrain.sandbox.runner import PROCESS_REFUSED, Sandbox, SandboxLimits, choose_isolation

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_CODE_LANGS = {"", "python", "py", "python3"}


def extract_code(completion: str, which: Literal["first", "last", "all"] = "first") -> str:
    """The fenced Python block(s) of ``completion``, or the whole text if there is none.

    >>> extract_code("Here:\\n```python\\ndef f():\\n    return 1\\n```\\nDone.")
    'def f():\\n    return 1\\n'
    >>> extract_code("    return x + 1\\n")
    '    return x + 1\\n'
    >>> extract_code("```python\\nprint(1)\\n")  # cut off by the token limit
    'print(1)\\n'
    """
    blocks = [body for lang, body in _FENCE.findall(completion) if lang.lower() in _CODE_LANGS]
    if not blocks:
        return completion
    if which == "first":
        return blocks[0]
    if which == "last":
        return blocks[-1]
    return "\n".join(blocks)


def build_program(completion: str, meta: dict, which: Literal["first", "last", "all"] = "first") -> str:
    code = extract_code(completion, which)
    prefix = meta.get("code_prefix") or ""
    if prefix and not prefix.endswith("\n"):
        prefix += "\n"
    return prefix + code


def normalise_tests(tests) -> tuple[list[str], list[tuple[str, str]]]:
    """Split a row's tests into (assert-style snippets, (stdin, expected stdout) cases)."""
    if tests is None:
        return [], []
    if isinstance(tests, (str, dict)):
        tests = [tests]
    snippets, cases = [], []
    for t in tests:
        if isinstance(t, str):
            snippets.append(t)
        elif isinstance(t, dict):
            stdin = t.get("stdin", t.get("input", ""))
            expected = t.get("stdout", t.get("output"))
            if expected is None:
                raise ValueError(f"stdin/stdout test case needs 'stdout' (or 'output'): {sorted(t)}")
            cases.append((str(stdin), str(expected)))
        else:
            raise ValueError(f"a test must be a string or a {{stdin, stdout}} object, not {type(t).__name__}")
    return snippets, cases


def outputs_match(actual: str, expected: str) -> bool:
    """Line-by-line equality ignoring trailing whitespace and trailing blank lines.

    >>> outputs_match("1 2 \\n3\\n\\n", "1 2\\n3"), outputs_match("1\\n", "2\\n")
    (True, False)
    """
    norm = lambda s: [line.rstrip() for line in s.strip("\n").splitlines()]  # noqa: E731
    return norm(actual) == norm(expected)


def last_function(source: str) -> str | None:
    """The name of the last top-level function ``source`` defines (HumanEval's entry point).

    >>> last_function("def poly(xs, x):\\n    return 0\\ndef find_zero(xs):\\n    'doc'\\n")
    'find_zero'
    """
    if not source.strip():
        return None
    try:
        body = ast.parse(source).body
    except SyntaxError:
        return None
    names = [node.name for node in body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return names[-1] if names else None


@dataclass
class CodeReward:
    """Fraction of ``metadata[tests_key]`` the completion's program passes (0.0 without tests);
    a correctness check: correct when every test passed (``RewardOutput.correct``).

    ``isolation``: ``auto`` (= ``namespace``, or a one-line error where namespaces are
    unavailable) or ``namespace``; ``process`` only with ``unsafe_process_isolation=True``.

    >>> reward = CodeReward(wall_seconds=5)
    >>> out = reward(["p"] * 3,
    ...     ["```python\\ndef add(a, b):\\n    return a + b\\n```", "def add(a, b):\\n    return a - b", ""],
    ...     [{"tests": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]}] * 3)
    >>> out.scores, out.correct
    ([1.0, 0.5, 0.0], [True, False, False])
    >>> CodeReward(wall_seconds=5)(["p"], ["print(int(input()) * 2)"], [{"tests": [{"stdin": "21", "stdout": "42"}]}]).scores
    [1.0]
    """

    tests_key: str = "tests"
    block: Literal["first", "last", "all"] = "first"
    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_mb: int = 1024
    max_output_bytes: int = 1_000_000
    max_workers: int | None = None
    isolation: Literal["auto", "namespace", "process"] = "auto"
    unsafe_process_isolation: bool = False
    name: str = "code"
    sandbox: Sandbox | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.block not in ("first", "last", "all"):
            raise ConfigError(f"block: must be first, last or all, not {self.block!r}")
        if self.wall_seconds <= 0 or self.cpu_seconds <= 0 or self.memory_mb <= 0:
            raise ConfigError("wall_seconds, cpu_seconds and memory_mb must be positive")
        if self.sandbox is None:
            limits = SandboxLimits(
                wall_seconds=self.wall_seconds,
                cpu_seconds=self.cpu_seconds,
                memory_mb=self.memory_mb,
                max_output_bytes=self.max_output_bytes,
            )
            isolation = choose_isolation(self.isolation, self.unsafe_process_isolation)
            try:
                self.sandbox = Sandbox(limits, isolation=isolation, max_workers=self.max_workers)
            except ValueError as e:
                raise ConfigError(f"isolation: {e}") from None
        elif self.sandbox.isolation == "process" and not self.unsafe_process_isolation:
            raise ConfigError("sandbox: " + PROCESS_REFUSED)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict] | None = None):
        metadata = check_batch(prompts, completions, metadata)
        jobs = []  # (row, kind, payload)
        totals = []
        for row, (completion, meta) in enumerate(zip(completions, metadata)):
            try:
                snippets, cases = normalise_tests(meta.get(self.tests_key))
            except ValueError as e:
                raise DataError(f"row {row}, key {self.tests_key!r}: {e}") from None
            program = build_program(completion, meta, self.block)
            totals.append(len(snippets) + len(cases))
            if snippets:
                prefix = meta.get("code_prefix") or ""
                entry = meta.get("entry_point") or last_function(prefix)
                jobs.append((row, "asserts", (program, snippets, prefix, entry)))
            for stdin, expected in cases:
                jobs.append((row, "stdio", (program, stdin, expected)))
        results = self.sandbox.map(self._run_job, jobs)
        passed = [0] * len(completions)
        statuses: list[list[str]] = [[] for _ in completions]
        for (row, _, _), (n_passed, status) in zip(jobs, results):
            passed[row] += n_passed
            statuses[row].append(status)
        scores = [p / t if t else 0.0 for p, t in zip(passed, totals)]
        details = [
            {"extracted": extract_code(c, self.block), "tests_passed": p, "tests_total": t, "status": s}
            for c, p, t, s in zip(completions, passed, totals, statuses)
        ]
        correct = [t > 0 and p == t for p, t in zip(passed, totals)]
        return RewardOutput(scores, {self.name: list(scores)}, details=details, correct=correct)

    def _run_job(self, job) -> tuple[int, str]:
        _, kind, payload = job
        if kind == "asserts":
            program, snippets, prefix, entry = payload
            result = self.sandbox.run_tests(program, snippets, trusted_prefix=prefix, entry_point=entry)
            return sum(result.tests_passed), result.status
        program, stdin, expected = payload
        result = self.sandbox.run(program, stdin=stdin)
        ok = result.ok and outputs_match(result.stdout, expected)
        return int(ok), result.status
