"""A multi-turn trajectory as segments of token ids: the rendered prompt, then the model's
sampled ids and the environment's ids (tool outputs and template glue) in the order the model
saw them. Only sampled tokens are trained (``response_mask``); every id is kept exactly as the
engine returned it or as the environment text was tokenised once, when it was appended.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

from posttrain.rewards.math import answers_match_plain, extract_answer, extract_last_number, numbers_in
from posttrain.rollout.base import Completion

SegmentKind = Literal["prompt", "sampled", "env"]


# Finish reasons of a trajectory that ran into a limit (the rest end with the model's answer).
BUDGET_FINISHES = ("length", "max_turns", "max_tool_calls")


@dataclass
class Segment:
    """One run of ids of one kind. ``logprobs`` (sampled segments only, when the engine
    reported them): the engine's log-probability of each id, ``len(logprobs) == len(token_ids)``."""

    token_ids: list[int]
    kind: SegmentKind
    logprobs: list[float] | None = None


@dataclass
class Trajectory:
    """One agentic rollout of prompt ``prompt_index``.

    ``finish_reason``: ``stop`` (the model ended its answer with an end-of-turn token),
    ``length`` (token budget used up), ``max_turns`` or ``max_tool_calls``.
    ``final_text``: decoded sampled text after the last env segment without any tool call in
    it (``answer_text``; what a final-answer reward reads), empty when the last call was
    never answered; ``answer_from_tool``: the final answer is the value a successful call
    printed (``answer_from_tool``; what the tool-call bonus pays for); ``last_tool_output``:
    the last tool output the model read (as it read it: defused and cut), None when no call
    was answered or the last call never got its output (what ``wrong_copy`` reads); ``text``: the decoded
    response (every segment after the prompt, special tokens kept, for logs); ``messages``:
    the conversation as OpenAI messages.

    >>> t = Trajectory(0, [Segment([1, 2], "prompt"), Segment([5, 6], "sampled", [-0.5, -0.25]),
    ...                    Segment([7], "env"), Segment([8], "sampled", [-1.0])])
    >>> t.response_ids, t.response_mask, t.sampled_logprobs, t.env_tokens
    ([5, 6, 7, 8], [1, 1, 0, 1], [-0.5, -0.25, -1.0], 1)
    """

    prompt_index: int
    segments: list[Segment]
    finish_reason: str = ""
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    tool_seconds: float = 0.0
    env_reward: float = 0.0
    turn_rewards: list[float] = field(default_factory=list)
    final_text: str = ""
    answer_from_tool: bool = False
    last_tool_output: str | None = None
    text: str = ""
    messages: list[dict] = field(default_factory=list)

    @property
    def prompt_ids(self) -> list[int]:
        return list(self.segments[0].token_ids)

    @property
    def stop_or_length(self) -> str:
        """The finish reason in single-turn terms: ``length`` when a limit ended it (a clipped
        completion for overlong filtering and the clipped fraction), else ``stop``."""
        return "length" if self.finish_reason in BUDGET_FINISHES else "stop"

    def as_completion(self) -> Completion:
        """The trajectory as a single-turn completion: every response id, and as its text the
        final answer after the last tool output (what a reward reads)."""
        return Completion(self.prompt_index, self.response_ids, self.final_text, self.stop_or_length)

    @property
    def response_ids(self) -> list[int]:
        """[R] every id after the prompt, sampled and env, in order."""
        return [i for segment in self.segments[1:] for i in segment.token_ids]

    @property
    def response_mask(self) -> list[int]:
        """[R] 1 at sampled ids (trained), 0 at env ids."""
        return [int(segment.kind == "sampled") for segment in self.segments[1:] for _ in segment.token_ids]

    @property
    def sampled_logprobs(self) -> list[float] | None:
        """[number of sampled ids] the engine's log-probs, or None if any sampled segment lacks them."""
        sampled = [segment for segment in self.segments if segment.kind == "sampled"]
        if any(segment.logprobs is None for segment in sampled):
            return None
        return [value for segment in sampled for value in segment.logprobs]

    @property
    def env_tokens(self) -> int:
        return sum(len(segment.token_ids) for segment in self.segments if segment.kind == "env")

    @property
    def input_ids(self) -> list[int]:
        """[P + R] the whole sequence: prompt then response."""
        return [i for segment in self.segments for i in segment.token_ids]

    def to_record(self) -> dict:
        """A JSON-able record (a ``samples.jsonl`` line): counters and every segment's ids and
        kind, so the trained mask can be rechecked from the file alone."""
        return {
            "prompt_index": self.prompt_index,
            "finish_reason": self.finish_reason,
            "turns": self.turns,
            "tool_calls": self.tool_calls,
            "tool_errors": self.tool_errors,
            "tool_seconds": round(self.tool_seconds, 4),
            "env_reward": self.env_reward,
            "turn_rewards": list(self.turn_rewards),
            "answer_from_tool": self.answer_from_tool,
            "final_text": self.final_text,
            "last_tool_output": self.last_tool_output,
            "segments": [{"kind": segment.kind, "token_ids": list(segment.token_ids)} for segment in self.segments],
        }


def answer_text(text: str, opening: str, call_end: Callable[[str], int | None]) -> str:
    """``text`` with every tool call cut out, closed or left open (an open one runs to the end
    of the text): no reward reads an answer from code that ran, or never ran. A call starts at
    ``opening``; ``call_end(rest)`` is the end offset of the call that ``rest`` (the text from
    that opening on) starts with, None when it is left open. Each tool format of the turn loop
    supplies its own (``agent.loop.TOOL_FORMATS``).

    >>> def call_end(rest):
    ...     close = rest.find("]]", 2)
    ...     return None if close < 0 else close + 2
    >>> answer_text("A [[f(1)]] B [[g(", "[[", call_end)
    'A  B '
    """
    kept, position = [], 0
    while True:
        start = text.find(opening, position)
        if start < 0:
            kept.append(text[position:])
            break
        kept.append(text[position:start])
        end = call_end(text[start:])
        if end is None:
            break
        position = start + end
    return "".join(kept)


def call_source(arguments: dict) -> str:
    """What a call asked for, as text: the ``code`` of a python call, else its JSON arguments."""
    code = arguments.get("code")
    return code if isinstance(code, str) else json.dumps(arguments, ensure_ascii=False, sort_keys=True)


def answer_from_tool(answer: str, calls: Sequence[tuple[str, str]]) -> bool:
    """True when the final ``answer`` (``extract_answer``: boxed, ``####``, answer tag, last
    number) equals the last value a successful call printed (its last number, else its last
    line), and that call's source (``call_source``) does not spell the value out.

    ``calls``: (source, output as the model read it) of every call that succeeded and whose
    output entered the context. A no-op (``pass``, nothing printed), a failed call, an output
    that did not fit the budget, ``print(42)`` and printing many candidates (only the last
    counts) earn nothing; a call that computes a guess (``print(40 + 2)``) still does.

    >>> answer_from_tool("The answer is 42.", [("print(6 * 7)", "42")])
    True
    >>> answer_from_tool("The answer is 42.", [("print(42)", "42")]), answer_from_tool("42", [("pass", "")])
    (False, False)
    >>> answer_from_tool("The answer is 42.", [("print(list(range(40, 45)))", "[40, 41, 42, 43, 44]")])
    False
    """
    value = extract_answer(answer)
    if not value or len(value) > 100:
        return False
    numeric = re.fullmatch(r"-?[\d.,/]+", value) is not None
    for source, output in calls:
        printed = printed_value(output)
        if printed is None or not answers_match_plain(value, printed):
            continue
        spelled = any(answers_match_plain(value, number) for number in numbers_in(source) if len(number) <= 100)
        if not spelled and not numeric:
            spelled = value.strip().lower() in source.lower()
        if not spelled:
            return True
    return False


def printed_value(output: str) -> str | None:
    """The value a tool output gives: its last number, else its last non-empty line; None for
    an empty output or a value over 100 characters.

    >>> printed_value("x = 3\\n-4144"), printed_value("done\\nParis"), printed_value("  ")
    ('-4144', 'Paris', None)
    """
    printed = extract_last_number(output)
    if printed is None:
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        printed = lines[-1] if lines else None
    return printed if printed is not None and len(printed) <= 100 else None


def wrong_copy(final_text: str, last_tool_output: str | None, answer: Any) -> bool | None:
    """Whether the final answer fails to copy a tool output that had the right answer: None
    when the last tool output the model read did not print ``answer`` (the reference) or there
    was none; else True when the final answer's value (``extract_answer``: boxed, ``####``,
    answer tag, last number) differs from the printed one, or there is no final answer.

    >>> wrong_copy("The answer is 4144.", "-4144", "-4144"), wrong_copy("The answer is -4144.", "-4144", -4144)
    (True, False)
    >>> wrong_copy("The answer is 12.", "13", "12") is None, wrong_copy("", "12", "12")
    (True, True)
    """
    if last_tool_output is None or answer is None or isinstance(answer, (list, dict)):
        return None
    printed = printed_value(last_tool_output)
    if printed is None or not answers_match_plain(printed, str(answer)):
        return None
    value = extract_answer(final_text)
    return not value or len(value) > 100 or not answers_match_plain(value, printed)


def check_trajectory(trajectory: Trajectory) -> None:
    """Raise AssertionError unless the segment invariant holds: the first segment (and only
    it) is the prompt, no segment is empty, sampled log-probs (when present) match the ids.

    >>> check_trajectory(Trajectory(0, [Segment([1], "prompt"), Segment([], "env")]))
    Traceback (most recent call last):
    ...
    AssertionError: segment 1 (env) is empty
    """
    segments = trajectory.segments
    assert segments and segments[0].kind == "prompt", "the first segment must be the prompt"
    for index, segment in enumerate(segments):
        assert segment.kind in ("prompt", "sampled", "env"), f"segment {index}: unknown kind {segment.kind!r}"
        assert index == 0 or segment.kind != "prompt", f"segment {index} is a second prompt segment"
        assert segment.token_ids, f"segment {index} ({segment.kind}) is empty"
        if segment.kind == "sampled" and segment.logprobs is not None:
            assert len(segment.logprobs) == len(segment.token_ids), (
                f"segment {index}: {len(segment.logprobs)} logprobs for {len(segment.token_ids)} ids")


def trajectory_record(trajectory: Trajectory, tokenizer: Any = None) -> dict:
    """What samples.jsonl and the step metrics keep of a trajectory: its segments (ids, kind,
    and with a ``tokenizer`` each one's decoded text, for reading it turn by turn), the whole
    response text and the tool counts."""
    record = trajectory.to_record()
    del record["prompt_index"]  # an index into one generate call's prompts (one rank's); the sample has its group
    if tokenizer is not None:
        for segment in record["segments"][1:]:
            segment["text"] = tokenizer.decode(segment["token_ids"], skip_special_tokens=False)
    record.update(text=trajectory.text, finish_reason=trajectory.finish_reason, turns=trajectory.turns,
                  tool_calls=trajectory.tool_calls, tool_errors=trajectory.tool_errors,
                  tool_seconds=trajectory.tool_seconds, env_tokens=trajectory.env_tokens,
                  env_reward=trajectory.env_reward)
    return record


def trajectory_metrics(records: Sequence[dict], prefix: str = "agent",
                       answers: Sequence[Any] | None = None) -> dict[str, float]:
    """Means per trajectory: turns, tool calls, tool errors, tool seconds, env tokens, the
    share that called a tool, the share whose answer a tool printed (``answer_from_tool``)
    and the share that ended on a limit (docs/METRICS.md).

    With ``answers`` (each record's reference answer, None where unknown) also the reading of
    tool output: ``tool_printed_right_rate``, the share of trajectories whose last tool output
    printed the reference answer, and ``wrong_copy_rate``, the share of those whose final
    answer is not that printed value (``wrong_copy``; 0.0 when no trajectory qualifies).

    >>> record = lambda final, output: {"turns": 2, "tool_calls": 1, "tool_errors": 0, "tool_seconds": 0.1,
    ...     "env_tokens": 5, "finish_reason": "stop", "final_text": final, "last_tool_output": output}
    >>> metrics = trajectory_metrics([record("The answer is 4144.", "-4144"), record("It is -4144.", "-4144"),
    ...                               record("The answer is 7.", "8"), record("No idea.", None)],
    ...                              answers=["-4144", "-4144", "7", "7"])
    >>> metrics["agent/tool_printed_right_rate"], metrics["agent/wrong_copy_rate"]
    (0.5, 0.5)
    """
    if not records:
        return {}
    count = len(records)
    mean = lambda key: sum(float(r[key]) for r in records) / count  # noqa: E731
    metrics = {f"{prefix}/turns": mean("turns"), f"{prefix}/tool_calls": mean("tool_calls"),
               f"{prefix}/tool_errors": mean("tool_errors"), f"{prefix}/tool_seconds": mean("tool_seconds"),
               f"{prefix}/env_tokens": mean("env_tokens"),
               f"{prefix}/tool_call_rate": sum(r["tool_calls"] > 0 for r in records) / count,
               f"{prefix}/answer_from_tool_rate": sum(bool(r.get("answer_from_tool")) for r in records) / count,
               f"{prefix}/budget_truncated_frac": sum(r["finish_reason"] in BUDGET_FINISHES for r in records) / count}
    if answers is not None:
        if len(answers) != count:
            raise ValueError(f"{len(answers)} answers for {count} trajectories")
        copies = [wrong_copy(r.get("final_text", ""), r.get("last_tool_output"), answer)
                  for r, answer in zip(records, answers)]
        right = [copy for copy in copies if copy is not None]
        metrics[f"{prefix}/tool_printed_right_rate"] = len(right) / count
        metrics[f"{prefix}/wrong_copy_rate"] = sum(right) / len(right) if right else 0.0
    return metrics
