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
equality after stripping ``$``, spaces and a trailing period. math-verify's own timeouts
use SIGALRM, which only works in the main thread; elsewhere they are switched off.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Sequence

from posttrain.errors import ConfigError
from posttrain.rewards.output import RewardOutput, check_batch


def extract_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` (or ``\fbox{...}``), braces balanced.

    >>> extract_boxed(r"so \boxed{1} then \boxed{\frac{3}{4}}.")
    '\\frac{3}{4}'
    >>> extract_boxed("no box") is None
    True
    """
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
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
    """Content of the last ``<answer>...</answer>``.

    >>> extract_answer_tag("<think>hm</think><answer> 12 </answer>")
    '12'
    """
    found = re.findall(r"<answer>(.*?)</answer>", text, flags=re.DOTALL)
    return found[-1].strip() if found else None


_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def extract_last_number(text: str) -> str | None:
    """The last number in the text, thousands separators removed.

    >>> extract_last_number("3 apples and 1,250.5 pears, so -7/2")
    '-7/2'
    >>> extract_last_number("Total: 1,250.")
    '1250'
    """
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


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


def _as_number(text: str) -> Fraction | None:
    cleaned = text.replace(",", "").replace(" ", "")
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


def answers_match(predicted: str, reference: str, use_math_verify: bool = True) -> bool:
    r"""True if ``predicted`` is equivalent to ``reference``.

    >>> answers_match(r"\frac{1}{2}", "0.5"), answers_match("x = 3", "3"), answers_match("7", "8")
    (True, True, False)
    """
    if use_math_verify:
        verdict = _math_verify(predicted, reference)
        if verdict is not None:
            return verdict or answers_match_plain(predicted, reference)
    return answers_match_plain(predicted, reference)


_mv_logger_quiet = False


def _math_verify(predicted: str, reference: str) -> bool | None:
    """math-verify's verdict, or None when it is missing or cannot parse either side."""
    global _mv_logger_quiet
    try:
        from math_verify import parse, verify
    except ImportError:
        return None
    if not _mv_logger_quiet:  # it warns on every call with timeouts off (worker threads)
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        for name in ("math_verify.parser", "math_verify.grader", "math_verify.utils"):
            logging.getLogger(name).setLevel(logging.ERROR)
        _mv_logger_quiet = True
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold = _parse_either(parse, reference, timeout)
        pred = _parse_either(parse, predicted, timeout)
        if not gold or not pred:
            return None
        return bool(verify(gold, pred, timeout_seconds=timeout))
    except Exception:
        return None


def _parse_either(parse, text: str, timeout):
    """Parse as LaTeX math first (extracted answers lost their delimiters), then as is."""
    if "$" not in text:
        parsed = parse(f"${text}$", parsing_timeout=timeout)
        if parsed:
            return parsed
    return parse(text, parsing_timeout=timeout)


@dataclass
class MathReward:
    r"""1.0 if the extracted final answer equals ``metadata[answer_key]``, else 0.0.

    Rows without ``answer_key`` score 0.0. ``details`` carries the extracted answer.

    >>> reward = MathReward()
    >>> out = reward(["q1", "q2", "q3"], [r"so \boxed{\frac{1}{2}}", "#### 41", "no idea"],
    ...              [{"answer": "0.5"}, {"answer": "42"}, {"answer": "1"}])
    >>> out.scores
    [1.0, 0.0, 0.0]
    >>> [d["extracted"] for d in out.details]
    ['\\frac{1}{2}', '41', None]
    """

    extract: list[str] = field(default_factory=lambda: ["boxed", "hash", "answer_tag", "last_number"])
    answer_key: str = "answer"
    use_math_verify: bool = True
    name: str = "math"

    def __post_init__(self) -> None:
        self.extract = check_extract_methods(self.extract)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict] | None = None):
        metadata = check_batch(prompts, completions, metadata)
        scores, details = [], []
        for completion, meta in zip(completions, metadata):
            extracted = extract_answer(completion, self.extract)
            reference = meta.get(self.answer_key)
            correct = extracted is not None and reference is not None and answers_match(
                extracted, str(reference), self.use_math_verify
            )
            scores.append(1.0 if correct else 0.0)
            details.append({"extracted": extracted, "reference": reference})
        return RewardOutput(scores, {self.name: list(scores)}, details=details)
