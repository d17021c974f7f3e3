"""The RL pre-flight: every reward tried on sample rows, the agent's token budget and the
train/held-out overlap, before any model loads (docs/PREFLIGHT.md, "RL: before the model loads").

``check_rewards`` calls every reward of a spec (a single reward, or each term of a composite)
on ``SAMPLE_ROWS`` training rows drawn with a fixed seed. Each row's reference answer is
written as a model would write it (``reference_forms``: plain, ``The answer is ...``,
``\\boxed{...}``, ``<answer>...</answer>``, ``#### ...``; for ``code`` rows the row's
``canonical_solution``, plain and fenced) and next to it come perturbed answers: a wrong value
in each of those forms, a hedge naming the reference and a wrong value (``130 or 131``), an
empty reply and the prompt echoed back. A reward is refused (``ConfigError``, one line naming
the reward's key, the row's ``file:line`` and what it returned) when it raises, returns the
wrong number of scores or a non-finite one, and, if it judges answers, when it pays full marks
(``correct``, or a score of 1.0 or more for a reward that reports no correctness) for none of
the reference's forms, or pays a perturbed answer as much as the reference or full marks.

What is judged on answers: ``math``, ``code`` and ``reasoning_gym``; a ``module:function``
declared ``correctness: true``, a veRL ``compute_score`` (it is handed the ground truth), a
TRL function that names a column of the rows (it reads a reference), and any reward whose
output says per sample what was correct. Rewards of form (``format``, ``length``, a TRL
function reading no column, a posttrain-style function without correctness) are called on
the same completions and must only return finite scores, one per completion. A learned
reward model (``model``) is not called (it would load a model); ``preflight: false`` on a
reward or a composite's term skips it; the summary names both.

The probe of ``posttrain inspect --probe`` (sampling groups from the starting model) lives with
the command: it needs a model. Deviation from the checklist in spirit only: rows are sampled,
not all checked, to keep the cost under a second for built-in rewards (stated per line).
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Sequence

from posttrain.config import AgentConfig, RLConfig, plain_reward_spec
from posttrain.data.formats import prompt_from_row, read_rows_or_errors
from posttrain.errors import ConfigError
from posttrain.rewards.output import PromptText
from posttrain.rewards.registry import (
    BUILTIN_REWARDS,
    TRLReward,
    UserReward,
    VerlReward,
    build_reward,
    reward_fields,
    verl_ground_truth,
)

SAMPLE_ROWS = 8
SAMPLE_SEED = 0
SHOW_LINES = 5  # line numbers named per finding
ANSWER_REWARDS = ("math", "code", "reasoning_gym")
FORM_REWARDS = ("format", "length")
REFERENCE_KEYS = ("answer", "solution", "ground_truth")  # where a reference answer is looked for, in order
FORMS = (("plain", "{}"), ("The answer is", "The answer is {}."), ("\\boxed{}", "\\boxed{{{}}}"),
         ("<answer>", "<answer>{}</answer>"), ("####", "#### {}"))
CODE_FORMS = (("plain", "{}"), ("fenced", "```python\n{}\n```"))
WRONG_PROGRAM = "    raise NotImplementedError\n"
HINT = "reward pre-flight, before the model loads; preflight: false on the reward skips it"


@dataclass
class RewardRow:
    """One row as a reward sees it: ``prompt`` (the text, a ``PromptText`` when the row was a
    conversation), ``metadata`` (the row's other fields) and ``where`` (``file:line``)."""

    prompt: str
    metadata: dict[str, Any]
    where: str


@dataclass
class Candidate:
    """A completion tried on a row: ``text``, ``label`` (how it was made) and ``reference``
    (True: the reference answer in some form, False: a perturbed answer)."""

    text: str
    label: str
    reference: bool


@dataclass
class RewardCheck:
    """What the pre-flight did with one reward (or composite term): ``key`` (its config key),
    ``name``, ``status`` (``judged`` on answers, ``form`` only, or ``skipped``), ``note`` (why
    skipped, or the forms of the reference it pays), ``rows`` / ``completions`` tried,
    ``rows_without_reference`` (``file:line`` of rows skipped for want of one), ``seconds``."""

    key: str
    name: str
    status: str
    note: str = ""
    rows: int = 0
    completions: int = 0
    rows_without_reference: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        if self.status == "skipped":
            return f"  {self.key} ({self.name}): skipped ({self.note})"
        cost = f"{self.rows} rows, {self.completions} completions, {self.seconds:.2f} s"
        missing = ""
        what = "a canonical_solution" if self.name == "code" else "a reference answer"
        if self.rows_without_reference:
            shown = ", ".join(self.rows_without_reference[:SHOW_LINES])
            missing = f"; {len(self.rows_without_reference)} row(s) without {what} skipped ({shown})"
        if self.status == "judged" and not self.rows:
            return f"  {self.key} ({self.name}): not judged: no sampled row has {what.partition(' ')[2]}{missing}"
        slow = ", most of it math-verify's worker starting (training reuses it)" if self.name == "math" and self.seconds > 0.3 else ""
        if self.status == "form":
            return f"  {self.key} ({self.name}): a form reward, not judged on answers: one finite score each ({cost}){missing}"
        return (f"  {self.key} ({self.name}): full marks for the reference ({self.note}), less for wrong, hedged, "
                f"empty, echoed ({cost}{slow}){missing}")


@dataclass
class RewardPreflight:
    """The checks of every reward of a spec; ``summary_lines`` prints them."""

    checks: list[RewardCheck]
    sampled: int
    seconds: float

    def summary_lines(self) -> list[str]:
        return [f"reward pre-flight: {self.sampled} sampled training rows, {self.seconds:.2f} s"] + [
            check.line() for check in self.checks]


# ----------------------------------------------------------------------------- the answers tried
def wrong_value(reference: str) -> str:
    """A value that is not ``reference``: a number plus one, the next letter, the other of a
    yes/no or true/false pair, else ``42`` (``43`` when the reference is 42).

    >>> wrong_value("130"), wrong_value("-2.5"), wrong_value("3/4"), wrong_value("B"), wrong_value("Yes"), wrong_value("x^2")
    ('131', '-1.5', '7/4', 'C', 'no', '42')
    """
    text = reference.strip()
    try:
        return str(int(text.replace(",", "")) + 1)
    except ValueError:
        pass
    try:
        value = Fraction(text)
        return str(value + 1) if "/" in text else str(float(value) + 1)
    except (ValueError, ZeroDivisionError):
        pass
    pairs = {"yes": "no", "no": "yes", "true": "false", "false": "true"}
    if text.lower() in pairs:
        return pairs[text.lower()]
    if len(text) == 1 and text.isalpha():
        return chr((ord(text.upper()) - ord("A") + 1) % 26 + ord("A"))
    return "42" if text != "42" else "43"


def reference_text(value: Any) -> str | None:
    """A reference answer as text (a string, a finite number, a list holding one), or None.

    >>> reference_text(130), reference_text([" 4 "]), reference_text({"a": 1}), reference_text(""), reference_text(float("nan"))
    ('130', '4', None, None, None)
    """
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def candidates(prompt: str, reference: str | None, *, code: bool = False) -> list[Candidate]:
    """The completions tried on a row: the reference in every form, then the perturbed answers.
    Without a reference: only the empty reply and the echoed prompt.

    >>> [c.text for c in candidates("What is 2+2?", "4")][:3], [c.label for c in candidates("q", None)]
    (['4', 'The answer is 4.', '\\\\boxed{4}'], ['empty', 'the prompt echoed'])
    """
    found: list[Candidate] = []
    if reference is not None:
        if code:
            found += [Candidate(form.format(reference), f"the reference solution, {label}", True) for label, form in CODE_FORMS]
            found += [Candidate(form.format(WRONG_PROGRAM), f"a wrong program, {label}", False) for label, form in CODE_FORMS]
        else:
            wrong = wrong_value(reference)
            found += [Candidate(form.format(reference), label, True) for label, form in FORMS]
            found += [Candidate(form.format(wrong), f"a wrong value, {label}", False) for label, form in FORMS]
            found += [Candidate(form.format(f"{reference} or {wrong}"), f"a hedge, {label}", False)
                      for label, form in FORMS]
    found += [Candidate("", "empty", False), Candidate(str(prompt), "the prompt echoed", False)]
    return found


# ----------------------------------------------------------------------------- the rewards of a spec
@dataclass
class RewardUnit:
    """One reward the pre-flight calls: a whole non-composite spec or one term of a composite."""

    key: str
    name: str
    spec: Any
    skip: str | None = None  # why it is not called


def reward_units(spec: Any, key: str = "reward") -> list[RewardUnit]:
    """The rewards of ``spec`` one by one (a composite's terms), each with the reason it is
    skipped, if it is (``preflight: false``; a learned reward model).

    >>> [(u.key, u.name, u.skip) for u in reward_units({"name": "composite", "terms": {"math": {}, "rm": {"reward": "model", "path": "x"}}})]
    [('reward.terms.math', 'math', None), ('reward.terms.rm', 'model', 'a learned reward model: not loaded before training')]
    """
    spec = plain_reward_spec(spec)
    name = spec if isinstance(spec, str) else str(spec.get("name")) if isinstance(spec, dict) else str(spec)
    off = isinstance(spec, dict) and spec.get("preflight") is False
    if name != "composite":
        return [RewardUnit(key, name, spec, _skip_reason(name, off))]
    units = []
    for term_name, term in (spec.get("terms") or {}).items():
        term = dict(term or {})
        term.pop("weight", None)
        term_reward = term.pop("reward", None) or term_name
        term_off = off or term.get("preflight") is False
        units.append(RewardUnit(f"{key}.terms.{term_name}", term_reward, {"name": term_reward, **term},
                                _skip_reason(term_reward, term_off)))
    return units


def _skip_reason(name: str, off: bool) -> str | None:
    if off:
        return "preflight: false"
    if name == "model":
        return "a learned reward model: not loaded before training"
    return None


def judges_answers(unit: RewardUnit, reward: Any) -> bool:
    """Whether ``reward`` (built from ``unit``) decides right from wrong answers (module docstring)."""
    if unit.name in ANSWER_REWARDS:
        return True
    if unit.name in FORM_REWARDS or unit.name in BUILTIN_REWARDS:
        return False
    if getattr(reward, "correctness", False) or isinstance(reward, VerlReward):
        return True
    return isinstance(reward, TRLReward) and bool(reward_fields(unit.spec, unit.key))


def row_reference(unit: RewardUnit, reward: Any, metadata: dict[str, Any]) -> str | None:
    """The reference answer ``unit``'s reward reads on a row (``code``: the canonical solution), or None."""
    params = {**unit.spec, **(unit.spec.get("params") or {})} if isinstance(unit.spec, dict) else {}
    if unit.name == "code":
        return reference_text(metadata.get("canonical_solution"))
    if unit.name == "math":
        return reference_text(metadata.get(str(params.get("answer_key", "answer"))))
    if unit.name == "reasoning_gym" and isinstance(metadata.get("entry"), dict):
        return reference_text(metadata["entry"].get("answer"))
    if isinstance(reward, VerlReward):
        return reference_text(verl_ground_truth(metadata))
    if isinstance(reward, TRLReward):
        for column in reward_fields(unit.spec, unit.key):
            if reference_text(metadata.get(column)) is not None:
                return reference_text(metadata[column])
    for column in REFERENCE_KEYS:
        if reference_text(metadata.get(column)) is not None:
            return reference_text(metadata[column])
    return None


# ----------------------------------------------------------------------------- the check
def sample_rows(rows: Sequence[RewardRow], sample: int = SAMPLE_ROWS, seed: int = SAMPLE_SEED) -> list[RewardRow]:
    """``sample`` rows drawn with ``seed`` (all of them when there are fewer), in file order.

    >>> [r.where for r in sample_rows([RewardRow("q", {}, f"f:{i}") for i in range(1, 4)], 8)]
    ['f:1', 'f:2', 'f:3']
    """
    if len(rows) <= sample:
        return list(rows)
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), sample))]


def check_rewards(spec: Any, rows: Sequence[RewardRow], *, key: str = "reward", sample: int = SAMPLE_ROWS,
                  seed: int = SAMPLE_SEED) -> RewardPreflight:
    """Call every reward of ``spec`` on ``sample`` of ``rows`` (module docstring); raise
    ``ConfigError`` (one line: the reward's key, the row, what it returned) on the first
    failure; return what was checked."""
    started = time.perf_counter()
    chosen = sample_rows(rows, sample, seed)
    checks = []
    for unit in reward_units(spec, key):
        if unit.skip is not None:
            checks.append(RewardCheck(unit.key, unit.name, "skipped", unit.skip))
            continue
        checks.append(check_unit(unit, build_reward(unit.spec, unit.key), chosen))
    return RewardPreflight(checks, len(chosen), time.perf_counter() - started)


def check_unit(unit: RewardUnit, reward: Any, rows: Sequence[RewardRow]) -> RewardCheck:
    """Check one reward on ``rows`` (one call for all of them; a failing call is repeated row by
    row to name the row)."""
    started = time.perf_counter()
    judged = judges_answers(unit, reward)
    label = getattr(reward, "name", None) if isinstance(reward, (UserReward, TRLReward, VerlReward)) else None
    shown = f"reward {label or unit.name!r}"
    tried: list[tuple[RewardRow, list[Candidate]]] = []
    without: list[str] = []
    for row in rows:
        reference = row_reference(unit, reward, row.metadata)
        if reference is None:
            without.append(row.where)
            if judged:
                continue
        tried.append((row, candidates(row.prompt, reference, code=unit.name == "code")))
    outputs = _call_all(unit, reward, shown, tried) if tried else []
    judged = judged or any(out.correct is not None for out in outputs)
    forms: list[set[str]] = []
    for (row, cands), out in zip(tried, outputs):
        for cand, score in zip(cands, out.scores):
            if not math.isfinite(score):
                raise ConfigError(f"{unit.key}: {shown} returned {score} for {_quoted(cand)} on {row.where} ({HINT})")
        if judged and any(c.reference for c in cands):
            forms.append(_judge(unit, shown, row, cands, out))
    paid = set.intersection(*forms) if forms else set()
    note = ", ".join(label for label, _ in (CODE_FORMS if unit.name == "code" else FORMS) if label in paid) or "some form"
    return RewardCheck(unit.key, unit.name, "judged" if judged else "form", note, len(tried),
                       sum(len(c) for _, c in tried), without if judged else [], time.perf_counter() - started)


def _call_all(unit: RewardUnit, reward: Any, shown: str, tried: list[tuple[RewardRow, list[Candidate]]]) -> list[Any]:
    """The reward's output per row (one batched call; row by row to name the row that fails)."""
    prompts = [row.prompt for row, cands in tried for _ in cands]
    completions = [c.text for _, cands in tried for c in cands]
    metadata = [row.metadata for row, cands in tried for _ in cands]
    try:
        out = _scored(reward, prompts, completions, metadata)
    except Exception:
        for row, cands in tried:  # find the row
            try:
                _scored(reward, [row.prompt] * len(cands), [c.text for c in cands], [row.metadata] * len(cands))
            except Exception as exc:
                raise ConfigError(f"{unit.key}: {shown} {_failure(exc)} on {row.where} ({HINT})") from None
        raise ConfigError(f"{unit.key}: {shown} fails on a batch of {len(tried)} rows but on none alone "
                          f"(first {tried[0][0].where}; {HINT})") from None
    split, start = [], 0
    for _, cands in tried:
        end = start + len(cands)
        split.append(_Slice(out.scores[start:end], None if out.correct is None else out.correct[start:end]))
        start = end
    return split


@dataclass
class _Slice:
    scores: list[float]
    correct: list[bool] | None


def _scored(reward: Any, prompts: list[str], completions: list[str], metadata: list[dict]) -> Any:
    out = reward(prompts, completions, metadata)
    scores = getattr(out, "scores", None)
    if scores is None or len(scores) != len(completions):
        got = f"{len(scores)} scores" if scores is not None else type(out).__name__
        raise ValueError(f"returned {got} for a batch of {len(completions)} completions")
    return out


def _failure(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    match = re.search(r"returned .* for a batch of \d+( completions)?", text)
    if isinstance(exc, ValueError) and match:
        return match.group(0)
    return f"raised {type(exc).__name__}" + (f": {text}" if text else "")


def _quoted(cand: Candidate, limit: int = 60) -> str:
    text = cand.text if len(cand.text) <= limit else cand.text[:limit] + "..."
    return f"{cand.label} ({text!r})"


def _judge(unit: RewardUnit, shown: str, row: RewardRow, cands: list[Candidate], out: _Slice) -> set[str]:
    """Refuse a row whose reference forms all miss full marks or whose perturbed answer scores
    as much as the best reference; return the labels of the forms paid in full."""

    def full(i: int) -> bool:
        return out.correct[i] if out.correct is not None else out.scores[i] >= 1.0

    refs = [i for i, c in enumerate(cands) if c.reference]
    paid = [i for i in refs if full(i)]
    if not paid:
        scores = ", ".join(f"{out.scores[i]:g}" for i in refs)
        what = "correct" if out.correct is not None else "a score of 1.0 or more"
        raise ConfigError(f"{unit.key}: {shown} pays {scores} for the reference answer of {row.where} "
                          f"({_quoted(cands[refs[0]])} and its other forms: {', '.join(cands[i].label for i in refs[1:])}); "
                          f"full marks ({what}) expected for at least one ({HINT})")
    best = max(out.scores[i] for i in paid)
    for i, cand in enumerate(cands):
        if cand.reference:
            continue
        if full(i) or out.scores[i] >= best:
            verdict = " (full marks)" if full(i) else ""
            raise ConfigError(f"{unit.key}: {shown} pays {out.scores[i]:g}{verdict} for {_quoted(cand)} on {row.where}, "
                              f"where the reference answer gets {best:g}: a wrong answer must score less ({HINT})")
    return {cands[i].label.removeprefix("the reference solution, ") for i in paid}


# ----------------------------------------------------------------------------- budgets, overlap
def agent_budget_lines(agent: AgentConfig, max_new_tokens: int) -> list[str]:
    """The agent's token budget in words (nothing without ``agent:``); ``ConfigError`` naming
    the keys for a setting no trajectory can use: tools offered with ``agent.max_turns: 1``
    (a call on the last turn is never run).

    >>> agent_budget_lines(AgentConfig(tools=["python"], max_turns=3, max_tool_calls=2, max_total_tokens=192), 48)[0]
    'agent budget: 3 turns x 48 tokens + 2 tool outputs x <= 128 tokens = 400 > agent.max_total_tokens 192: a trajectory is cut short (finish "length") once it has used 192'
    """
    if not agent.enabled:
        return []
    if agent.tools and agent.max_turns == 1 and agent.max_tool_calls > 0:
        raise ConfigError("agent.max_turns: 1 with agent.tools: a tool call is never run (calls on the last turn "
                          "end the trajectory); set agent.max_turns >= 2 or agent.max_tool_calls=0")
    tool_outputs = min(agent.max_tool_calls, agent.max_turns - 1)
    wanted = agent.max_turns * max_new_tokens + tool_outputs * agent.max_tool_output_tokens
    text = (f"agent budget: {agent.max_turns} turns x {max_new_tokens} tokens + {tool_outputs} tool outputs x <= "
            f"{agent.max_tool_output_tokens} tokens = {wanted}")
    if wanted > agent.max_total_tokens:
        return [f"{text} > agent.max_total_tokens {agent.max_total_tokens}: a trajectory is cut short "
                f"(finish \"length\") once it has used {agent.max_total_tokens}"]
    return [f"{text} <= agent.max_total_tokens {agent.max_total_tokens}: every turn gets its full rollout.max_new_tokens"]


def normalised_prompt(text: str) -> str:
    """A prompt compared for overlap: whitespace runs made one space, case folded.

    >>> normalised_prompt("  What is\\n2 + 2? ") == normalised_prompt("what IS 2 + 2?")
    True
    """
    return " ".join(str(text).split()).casefold()


def overlap_lines(train_prompts: Sequence[str], eval_prompts: Sequence[str], eval_lines: Sequence[int],
                  eval_source: str) -> list[str]:
    """One summary line: how many held-out prompts also occur in the training prompts (after
    ``normalised_prompt``) and the first lines of them.

    >>> overlap_lines(["What is 2+2?"], ["what is  2+2?", "What is 3+3?"], [1, 2], "eval.jsonl")
    ['held-out overlap: 1 of 2 prompts of eval.jsonl also in the training data (line 1): held-out accuracy overstates what generalises']
    >>> overlap_lines(["a"], ["b"], [1], "eval.jsonl")
    ['held-out overlap: none of 1 prompts of eval.jsonl occurs in the training data']
    """
    seen = {normalised_prompt(p) for p in train_prompts}
    hits = [line for prompt, line in zip(eval_prompts, eval_lines) if normalised_prompt(prompt) in seen]
    if not hits:
        return [f"held-out overlap: none of {len(eval_prompts)} prompts of {eval_source} occurs in the training data"]
    shown = ", ".join(str(line) for line in hits[:SHOW_LINES]) + (f", ... (+{len(hits) - SHOW_LINES})" if len(hits) > SHOW_LINES else "")
    return [f"held-out overlap: {len(hits)} of {len(eval_prompts)} prompts of {eval_source} also in the training data "
            f"(line{'s' if len(hits) > 1 else ''} {shown}): held-out accuracy overstates what generalises"]


# ----------------------------------------------------------------------------- the whole RL pre-flight
def rl_preflight(config: RLConfig, train: Sequence[RewardRow], held_out: Sequence[RewardRow], *,
                 key: str = "reward") -> list[str]:
    """What ``posttrain rl`` (``inspect --config``, ``pipeline``) checks after reading its
    prompt rows and before any model loads: every reward on sample training rows
    (``check_rewards``), the agent's token budget (``agent_budget_lines``) and the held-out
    prompts that also occur in the training data (``overlap_lines``). Returns the summary
    lines; raises ``ConfigError`` (one line) on a refused reward or an impossible budget.
    Prompt lengths against ``data.max_prompt_length`` are the prompt audit's
    (``data.audit.load_prompt_data``). ``key`` names the reward in messages."""
    lines = check_rewards(config.reward, train, key=key).summary_lines()
    lines += agent_budget_lines(config.agent, config.rollout.max_new_tokens)
    if held_out:
        source = held_out[0].where.rpartition(":")[0]
        lines += overlap_lines([row.prompt for row in train], [row.prompt for row in held_out],
                               [row.where.rpartition(":")[2] for row in held_out], source)
    return lines


def reward_rows(rows: Sequence[Any], source: str) -> list[RewardRow]:
    """Rows that have ``text`` (what the reward reads as the prompt), ``metadata`` and ``line``
    (``eval.prompts.PromptRow``) as the pre-flight reads them, named ``source:line`` (a row's own
    ``source`` first: the file of a data mixture it came from)."""
    return [RewardRow(row.text, row.metadata, f"{getattr(row, 'source', '') or source}:{row.line}") for row in rows]


def read_reward_rows(path: str, *, columns: dict[str, str] | None = None, system: str | None = None,
                     limit: int | None = None) -> list[RewardRow]:
    """The rows of an RL prompt file as a reward reads them, without a tokenizer (the pipeline
    checks its RL stage's reward before its first stage loads a model); a bad row raises the
    prompt audit's one-line DataError.

    ``prompt``: the last user message's text (``eval.prompts.prompt_text``), remembering the
    messages when the row gave a conversation."""
    rows = []
    for line, row in read_rows_or_errors(path, limit=limit, columns=columns):
        where = f"{path}:{line}"
        if not isinstance(row, dict):
            raise row
        prompt = prompt_from_row(row, where, system=system)
        users = [m for m in prompt.messages if m.get("role") == "user"] or prompt.messages
        conversational = isinstance(row.get("messages", row.get("prompt")), (list, dict))
        text = PromptText(str(users[-1].get("content", "")), prompt.messages if conversational else None)
        rows.append(RewardRow(text, prompt.extra, where))
    return rows
