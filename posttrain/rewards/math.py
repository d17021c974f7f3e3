"""Math reward: extract the final answer from a completion and check it against the reference.

Checks whether the final answer is right (docs/PIPELINE.md, "Rewards"; math-verify for the
equivalence of expressions). The answer
is taken by the first extractor (in the configured order) that finds one:

- ``boxed``: the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces);
- ``hash``: the text after the last ``####`` (GSM8K style), up to the end of that line;
- ``answer_tag``: the last ``<answer>...</answer>`` (reasoning-gym / R1 style);
- ``last_number``: the last number in the text (``1,000``, ``-2.5``, ``3/4``).

Equivalence is decided by the ``math-verify`` library (symbolic and numeric: ``\\frac12``
equals ``0.5``) when it can parse both sides; otherwise (or with ``use_math_verify=False``)
by a normalised comparison: numbers compared numerically, other text by case-insensitive
equality after stripping ``$``, spaces and a trailing period.

Percent is a unit, read one way: ``42\\%``, ``42 \\%``, ``42%``, ``42\\text{ percent}`` and
``42 percent`` are the number 42, on either side, so ``\\boxed{42\\%}`` equals a reference
of ``42`` or ``42\\%`` and never ``0.42`` (math-verify alone accepts both readings). A percent
sign that does not end a value (``4%2``: in LaTeX ``%`` starts a comment) matches nothing.

Every comparison is bounded in size and time, in any thread (math-verify's own timeouts use
SIGALRM, which works only in the main thread, and cannot stop a long integer power at all):

- size: an answer or reference longer than ``MAX_ANSWER_CHARS`` characters, nested deeper than
  ``MAX_NESTING`` brackets, or writing a power (towers too: ``9^{9^{9}}``) or factorial whose
  value has more than ``MAX_VALUE_DIGITS`` digits is not compared;
- time: math-verify (sympy) runs in a separate worker process with a memory limit; a
  comparison gets ``verify_seconds`` and a worker that overruns is killed and replaced.

A sample refused by a bound scores 0 and is counted: the reward's component
``<name>/unverified`` is 1.0 for it (RL logs ``reward/<name>/unverified``, the share of the
step's samples; ``posttrain eval`` reports the count) and ``details["unverified"]`` says why.
The component is present only in batches where some sample was refused.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import logging
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Sequence

from posttrain.errors import ConfigError
from posttrain.rewards.output import RewardOutput, check_batch

MAX_ANSWER_CHARS = 1000
MAX_NESTING = 20
MAX_VALUE_DIGITS = 10_000
VERIFY_SECONDS = 5.0


def extract_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` (or ``\fbox{...}``), braces balanced. Linear in the
    length of the text (braces are matched in one pass), however many boxes are left open.

    >>> extract_boxed(r"so \boxed{1} then \boxed{\frac{3}{4}}.")
    '\\frac{3}{4}'
    >>> extract_boxed("no box") is None
    True
    >>> extract_boxed(r"\boxed{7} \boxed{open")
    '7'
    """
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    closing, open_braces = {}, []
    for brace in re.finditer(r"[{}]", text):
        if brace.group() == "{":
            open_braces.append(brace.start())
        elif open_braces:
            closing[open_braces.pop()] = brace.start()
    for start in reversed(starts):
        end = closing.get(start - 1)
        if end is not None:
            return text[start:end].strip()
    return None


def extract_after_hashes(text: str) -> str | None:
    """Text after the last ``####`` on its line.

    >>> extract_after_hashes("work...\\n#### 1,234\\n")
    '1,234'
    """
    if "####" not in text:
        return None
    tail = text.rsplit("####", 1)[1].strip().splitlines()
    return tail[0].strip() if tail and tail[0].strip() else None


def extract_answer_tag(text: str) -> str | None:
    """Content of the last ``<answer>...</answer>``: between the last closing tag and the last
    opening tag before it (linear in the length of the text).

    >>> extract_answer_tag("<think>hm</think><answer> 12 </answer>")
    '12'
    """
    end = text.rfind("</answer>")
    start = text.rfind("<answer>", 0, end) if end >= 0 else -1
    return text[start + len("<answer>") : end].strip() if start >= 0 else None


_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def numbers_in(text: str) -> list[str]:
    """Every number in the text, in order, thousands separators removed.

    >>> numbers_in("3 apples and 1,250.5 pears, so -7/2")
    ['3', '1250.5', '-7/2']
    """
    return [found.replace(",", "") for found in _NUMBER.findall(text)]


def extract_last_number(text: str) -> str | None:
    """The last number in the text, thousands separators removed.

    >>> extract_last_number("3 apples and 1,250.5 pears, so -7/2")
    '-7/2'
    >>> extract_last_number("Total: 1,250.")
    '1250'
    """
    found = numbers_in(text)
    return found[-1] if found else None


EXTRACTORS = {
    "boxed": extract_boxed,
    "hash": extract_after_hashes,
    "answer_tag": extract_answer_tag,
    "last_number": extract_last_number,
}


def check_extract_methods(methods: str | Sequence[str]) -> list[str]:
    """Extraction methods as a list (one name may be given as a string); ConfigError naming
    the ``extract`` parameter when one is unknown or none is given.

    >>> check_extract_methods("boxed")
    ['boxed']
    >>> check_extract_methods(["boxed", "guess"])
    Traceback (most recent call last):
    ...
    posttrain.errors.ConfigError: extract: unknown method(s) ['guess']; choose from ['answer_tag', 'boxed', 'hash', 'last_number']
    """
    methods = [methods] if isinstance(methods, str) else list(methods)
    unknown = [m for m in methods if m not in EXTRACTORS]
    if unknown or not methods:
        raise ConfigError(f"extract: unknown method(s) {unknown}; choose from {sorted(EXTRACTORS)}")
    return methods


def extract_answer(text: str, methods: Sequence[str] = ("boxed", "hash", "answer_tag", "last_number")) -> str | None:
    """Apply extractors in order; the first that finds something wins.

    >>> extract_answer("The answer is 4. \\\\boxed{5}")
    '5'
    >>> extract_answer("The answer is 4.", ["boxed"]) is None
    True
    """
    for method in methods:
        found = EXTRACTORS[method](text)
        if found:
            return found
    return None


# ------------------------------------------------------------------------------ percent

_SPACING = r"(?:\s|\\[,;:! ]|~)*"
_PERCENT_MARK = (r"(?:\\%|%|\uff05|\\(?:text|textrm|mathrm)\s*\{\s*(?:\\?%|per\s*cent)\s*\}|\bper\s*cent\b)")
_UNIT_PERCENT = re.compile(_SPACING + _PERCENT_MARK + r"(?=" + _SPACING + r"(?:$|[,;)\]]|\\right|\\\}|\\\)|\\\]))",
                           re.IGNORECASE)
_ANY_PERCENT = re.compile(_PERCENT_MARK, re.IGNORECASE)


def without_percent(text: str) -> str | None:
    r"""``text`` with each percent sign that ends a value removed (percent is a unit: ``42%``
    is 42); None when a percent sign is left anywhere else (``4%2``), which matches nothing.

    >>> [without_percent(t) for t in [r"42\%", "42 %", r"12.5\,\%", "42 percent", r"42\text{ percent}"]]
    ['42', '42', '12.5', '42', '42']
    >>> without_percent(r"10\%, 20\%"), without_percent("4%2"), without_percent("0.42")
    ('10, 20', None, '0.42')
    """
    kept = _UNIT_PERCENT.sub("", text)
    return None if _ANY_PERCENT.search(kept) else kept.strip()


# -------------------------------------------------------------------------------- bounds

_DECIMAL = re.compile(r"-?\d+(?:\.\d+)?")
_POWER_OP = re.compile(r"\s*(?:\^|\*\*)\s*")
_POWER_START = re.compile(r"\d+(?:\.\d+)?\s*(?:\^|\*\*)")
_FACTORIAL = re.compile(r"(\d+)\s*!|\{([^{}]*)\}\s*!|\(([^()]*)\)\s*!")


def _log10_of_number(number: str) -> float:
    whole = number.lstrip("-").split(".")[0].lstrip("0")
    if len(whole) > 300:
        return float(len(whole))
    value = abs(float(number))
    return math.log10(value) if value > 0 else -math.inf


def _log10_power(text: str, start: int, depth: int = 0) -> tuple[float | None, int]:
    """(log10 of the absolute value, end offset) of the numeric power written at ``text[start]``:
    a number, raised by ``^`` / ``**`` to a number or a numeric power (towers included);
    None when the exponent is anything else (a variable, a sum)."""
    number = _DECIMAL.match(text, start)
    if number is None or depth > MAX_NESTING:
        return (math.inf if number is not None else None), start
    base_log, end = _log10_of_number(number.group()), number.end()
    operator = _POWER_OP.match(text, end)
    if operator is None:
        return base_log, end
    position = operator.end()
    if text.startswith("{", position):
        close = _matching_close(text, position)
        if close is None:
            return None, position
        inner = text[position + 1 : close].strip()
        exponent_log, inner_end = _log10_power(inner, 0, depth + 1)
        if inner_end != len(inner):
            exponent_log = None
        end = close + 1
    else:
        exponent_log, end = _log10_power(text, position, depth + 1)
    if exponent_log is None:
        return None, end
    if base_log <= 0:  # |base| <= 1: the power is no larger than 1 in absolute value
        return 0.0, end
    return (10 ** exponent_log if exponent_log < 300 else math.inf) * base_log, end


def _matching_close(text: str, open_at: int) -> int | None:
    depth = 0
    for brace in re.finditer(r"[{}]", text[open_at:]):
        depth += 1 if brace.group() == "{" else -1
        if depth == 0:
            return open_at + brace.start()
    return None


def value_digits(text: str) -> float:
    r"""Upper estimate of the digits of the largest numeric power (``2^{100}``, ``9^{9^{9}}``,
    ``9**9**9``) or factorial (``1000!``, ``(10^{7})!``) written in ``text``: values a sympy
    comparison would have to compute exactly. 0 when there are none.

    >>> int(value_digits(r"2^{100}")), value_digits(r"9^{9^{9}}") > 1e8, int(value_digits("1000!"))
    (31, True, 2568)
    >>> value_digits(r"x^{2} + 1"), value_digits(r"(10^{7})!") > 6e7
    (0.0, True)
    """
    worst = 0.0
    for found in _POWER_START.finditer(text):
        log10_value, _ = _log10_power(text, found.start())
        if log10_value is not None:
            worst = max(worst, log10_value + 1)
    for found in _FACTORIAL.finditer(text):
        operand = next(group for group in found.groups() if group is not None).strip()
        log10_n, end = _log10_power(operand, 0)
        if log10_n is None or end != len(operand):
            continue
        if log10_n > 15:
            return math.inf
        n = 10 ** log10_n
        worst = max(worst, math.lgamma(n + 1) / math.log(10) + 1)
    return worst


def size_refusal(text: str) -> str | None:
    r"""Why ``text`` is too big to compare (None when it is not): longer than
    ``MAX_ANSWER_CHARS``, brackets nested deeper than ``MAX_NESTING``, or a power or factorial
    of more than ``MAX_VALUE_DIGITS`` digits.

    >>> size_refusal(r"\frac{1}{2}") is None, size_refusal(r"9^{9^{9^{9}}}"), size_refusal("7" * 5000)
    (True, 'a value of more than 10000 digits', 'longer than 1000 characters')
    """
    if len(text) > MAX_ANSWER_CHARS:
        return f"longer than {MAX_ANSWER_CHARS} characters"
    depth = deepest = 0
    for bracket in re.findall(r"[{}()\[\]]", text):
        depth = depth + 1 if bracket in "{([" else max(0, depth - 1)
        deepest = max(deepest, depth)
    if deepest > MAX_NESTING:
        return f"brackets nested deeper than {MAX_NESTING}"
    if value_digits(text) > MAX_VALUE_DIGITS:
        return f"a value of more than {MAX_VALUE_DIGITS} digits"
    return None


# ---------------------------------------------------------------------------- comparison

_PLAIN_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?")


def _as_number(text: str) -> Fraction | None:
    """An exact number for plain decimals and fractions (no exponents: ``1e999999999`` would be
    computed in full)."""
    cleaned = text.replace(",", "").replace(" ", "")
    if not _PLAIN_NUMBER.fullmatch(cleaned):
        return None
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def _normalise(text: str) -> str:
    text = text.strip().strip("$").strip()
    text = re.sub(r"\\text\{(.*?)\}", r"\1", text)
    return re.sub(r"\s+", "", text).rstrip(".").lower()


def answers_match_plain(predicted: str, reference: str) -> bool:
    """Fallback equivalence: numbers numerically (exact fractions), else normalised text.

    >>> answers_match_plain("1,000", "1000"), answers_match_plain("0.5", "1/2"), answers_match_plain("Paris.", "paris")
    (True, True, True)
    >>> answers_match_plain("3", "4")
    False
    """
    p, r = _normalise(predicted), _normalise(reference)
    pn, rn = _as_number(p), _as_number(r)
    if pn is not None and rn is not None:
        return pn == rn
    return p == r


@dataclass(frozen=True)
class Verdict:
    """``correct``: the answers are equivalent; ``unverified``: why they were not compared (a
    size or time bound; the sample scores 0 and is counted), else None."""

    correct: bool
    unverified: str | None = None


def check_answer(predicted: str, reference: str, use_math_verify: bool = True,
                 verify_seconds: float = VERIFY_SECONDS) -> Verdict:
    r"""Compare ``predicted`` with ``reference`` within the size and time bounds.

    >>> check_answer(r"\frac{1}{2}", "0.5"), check_answer(r"42\%", "0.42")
    (Verdict(correct=True, unverified=None), Verdict(correct=False, unverified=None))
    >>> check_answer(r"10^{10^{10}}", "42")
    Verdict(correct=False, unverified='a value of more than 10000 digits')
    """
    for text in (predicted, reference):
        refusal = size_refusal(text)
        if refusal is not None:
            return Verdict(False, refusal)
    predicted, reference = without_percent(predicted), without_percent(reference)
    if predicted is None or reference is None:
        return Verdict(False)
    if use_math_verify:
        reply = _VERIFIERS.ask(predicted, reference, verify_seconds)
        if reply.get("unverified"):
            return Verdict(False, reply["unverified"])
        if reply.get("verdict") is not None:
            return Verdict(bool(reply["verdict"]) or answers_match_plain(predicted, reference))
    return Verdict(answers_match_plain(predicted, reference))


def answers_match(predicted: str, reference: str, use_math_verify: bool = True) -> bool:
    r"""True if ``predicted`` is equivalent to ``reference`` (``check_answer``'s verdict).

    >>> answers_match(r"\frac{1}{2}", "0.5"), answers_match("x = 3", "3"), answers_match("7", "8")
    (True, True, False)
    """
    return check_answer(predicted, reference, use_math_verify).correct


# ------------------------------------------------------------------ math-verify in a worker

WORKER_START_SECONDS = 120.0  # importing sympy on a busy machine; not part of any sample's budget
_KILL_GRACE_SECONDS = 1.0  # past the budget, before a worker that does not answer is killed
_WORKER_MEMORY_BYTES = 1 << 30  # address space a worker may add to what it holds after start
_WORKER_COMMAND = "from posttrain.rewards.math import serve_verifier; serve_verifier()"


class _Overrun(BaseException):
    """Raised in a worker when a comparison used up its seconds (a BaseException, so neither
    math-verify nor sympy swallows it)."""


def _verify_here(predicted: str, reference: str) -> bool | None:
    """math-verify's verdict in this process, without its own timeouts; None when it cannot
    parse either side."""
    from math_verify import parse, verify

    gold = _parse_either(parse, reference)
    pred = _parse_either(parse, predicted)
    if not gold or not pred:
        return None
    return bool(verify(gold, pred, timeout_seconds=None))


def _parse_either(parse, text: str):
    """Parse as LaTeX math first (extracted answers lost their delimiters), then as is."""
    if "$" not in text:
        parsed = parse(f"${text}$", parsing_timeout=None)
        if parsed:
            return parsed
    return parse(text, parsing_timeout=None)


def serve_verifier() -> None:
    """The worker process: answer JSON lines ``[predicted, reference, seconds]`` from stdin with
    ``{"verdict": true | false | null}`` or ``{"unverified": why}`` on stdout, one line each.
    Each comparison runs under a SIGALRM of ``seconds``; the address space is limited."""
    import resource
    import signal

    replies = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout = sys.stderr  # nothing a library prints can corrupt the replies
    logging.disable(logging.CRITICAL)
    _verify_here("1", "1")  # import and warm the parsers before saying ready
    try:
        with open("/proc/self/statm") as statm:
            held = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (held + _WORKER_MEMORY_BYTES, resource.RLIM_INFINITY))
    except (OSError, ValueError):
        pass

    def overrun(signum, frame):
        raise _Overrun

    signal.signal(signal.SIGALRM, overrun)
    replies.write('{"ready": true}\n')
    for line in sys.stdin:
        predicted, reference, seconds = json.loads(line)
        try:
            signal.setitimer(signal.ITIMER_REAL, seconds)
            reply = {"verdict": _verify_here(predicted, reference)}
        except _Overrun:
            reply = {"unverified": f"took more than {seconds:g} s"}
        except MemoryError:
            reply = {"unverified": "ran out of memory"}
        except Exception:
            reply = {"verdict": None}
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        replies.write(json.dumps(reply) + "\n")


class _Worker:
    """One verifier process; ``ask`` waits at most the sample's seconds (plus a grace) for its
    answer and kills the process when it does not come, or when it reports an overrun."""

    def __init__(self) -> None:
        package_root = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)
        self.process = subprocess.Popen([sys.executable, "-c", _WORKER_COMMAND], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        env={**os.environ, "PYTHONPATH": path})
        self.ready = False
        self.alive = True
        self._pending = b""

    def _line(self, deadline: float) -> bytes | None:
        """The next reply line; None when the deadline passed, b"" when the process ended."""
        fd = self.process.stdout.fileno()
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b""
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return line

    def start(self) -> bool:
        """Wait for the worker to say ready; False (and the worker is gone) if it never does."""
        if not self.ready:
            self.ready = bool(self._line(time.monotonic() + WORKER_START_SECONDS))
            if not self.ready:
                self.kill()
        return self.ready

    def ask(self, predicted: str, reference: str, seconds: float) -> dict:
        started = time.monotonic()
        try:
            self.process.stdin.write((json.dumps([predicted, reference, seconds]) + "\n").encode())
            self.process.stdin.flush()
        except OSError:
            self.kill()
            return {"unverified": "the verifier process ended"}
        line = self._line(started + seconds + _KILL_GRACE_SECONDS)
        if line is None:
            self.kill()
            return {"unverified": f"took more than {seconds:g} s"}
        if not line:
            self.kill()
            return {"unverified": "the verifier process ended (memory limit or crash)"}
        reply = json.loads(line)
        if reply.get("unverified"):  # interrupted mid-computation: sympy's caches may be half-written
            self.kill()
        return reply

    def kill(self) -> None:
        self.alive = False
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def close(self) -> None:
        """End an idle worker: closing its stdin ends its loop."""
        try:
            self.process.stdin.close()
            self.process.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


class _VerifierPool:
    """Verifier workers shared by every caller of this process, at most ``size`` at once (a
    caller beyond that waits for a free one). A killed worker is replaced at once, so the
    next comparison rarely waits for a start. Forked children start their own workers."""

    def __init__(self, size: int = 4) -> None:
        self._size = size
        self._reset()
        atexit.register(self.close)

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self._size)
        self._idle: list[_Worker] = []
        self._broken = importlib.util.find_spec("math_verify") is None

    def ask(self, predicted: str, reference: str, seconds: float) -> dict:
        """The worker's reply, or ``{"verdict": None}`` when math-verify is missing or no worker
        can start (the caller then compares plainly)."""
        if os.getpid() != self._pid:
            self._reset()
        if self._broken:
            return {"verdict": None}
        with self._slots:
            with self._lock:
                worker = self._idle.pop() if self._idle else None
            worker = worker or _Worker()
            if not worker.start():
                self._broken = True
                logging.getLogger(__name__).warning(
                    "math: the math-verify worker process did not start; answers are compared plainly")
                return {"verdict": None}
            reply = worker.ask(predicted, reference, seconds)
            with self._lock:
                self._idle.append(worker if worker.alive else _Worker())
        return reply

    def close(self) -> None:
        if os.getpid() != self._pid:
            return
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.close()


_VERIFIERS = _VerifierPool()


@dataclass
class MathReward:
    r"""1.0 if the extracted final answer equals ``metadata[answer_key]``, else 0.0: a
    correctness check (``RewardOutput.correct`` is the verdict).

    Rows without ``answer_key`` score 0.0. ``details`` carries the extracted answer (and, for
    a comparison a size or time bound refused, ``unverified``: why). ``verify_seconds``: the
    time one comparison may take.

    >>> reward = MathReward()
    >>> out = reward(["q1", "q2", "q3"], [r"so \boxed{\frac{1}{2}}", "#### 41", "no idea"],
    ...              [{"answer": "0.5"}, {"answer": "42"}, {"answer": "1"}])
    >>> out.scores, out.correct
    ([1.0, 0.0, 0.0], [True, False, False])
    >>> [d["extracted"] for d in out.details]
    ['\\frac{1}{2}', '41', None]
    >>> out = reward(["q", "q"], [r"\boxed{9^{9^{9^{9}}}}", r"\boxed{42\%}"], [{"answer": "42"}, {"answer": "0.42"}])
    >>> out.scores, out.components["math/unverified"]
    ([0.0, 0.0], [1.0, 0.0])
    """

    extract: list[str] = field(default_factory=lambda: ["boxed", "hash", "answer_tag", "last_number"])
    answer_key: str = "answer"
    use_math_verify: bool = True
    verify_seconds: float = VERIFY_SECONDS
    name: str = "math"

    def __post_init__(self) -> None:
        self.extract = check_extract_methods(self.extract)
        if (isinstance(self.verify_seconds, bool) or not isinstance(self.verify_seconds, (int, float))
                or not 0 < self.verify_seconds <= 600):
            raise ConfigError(f"verify_seconds: must be a number of seconds in (0, 600], got {self.verify_seconds!r}")

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict] | None = None):
        metadata = check_batch(prompts, completions, metadata)
        scores, details, unverified, correct = [], [], [], []
        for completion, meta in zip(completions, metadata):
            extracted = extract_answer(completion, self.extract)
            reference = meta.get(self.answer_key)
            verdict = Verdict(False)
            if extracted is not None and reference is not None:
                verdict = check_answer(extracted, str(reference), self.use_math_verify, float(self.verify_seconds))
            scores.append(1.0 if verdict.correct else 0.0)
            correct.append(bool(verdict.correct))
            unverified.append(0.0 if verdict.unverified is None else 1.0)
            details.append({"extracted": extracted, "reference": reference,
                            **({} if verdict.unverified is None else {"unverified": verdict.unverified})})
        components = {self.name: list(scores)}
        if any(unverified):
            components[f"{self.name}/unverified"] = unverified
        return RewardOutput(scores, components, details=details, correct=correct)
