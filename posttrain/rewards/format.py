"""Format reward: does the completion follow the required shape?

Is the output format compliant (instruction following; docs/PIPELINE.md, "Rewards"), and a
format term against answer-only reward hacking (the DeepSeek-R1 report uses one too). Three
checks, each optional; the score is 1.0 when every enabled check passes (or the fraction
passed with ``partial=True``), and each check is a component ``format/<check>``:

- ``regex``: ``re.search(pattern, completion, re.DOTALL)`` (anchor with ``^...$`` for a
  whole-text match);
- ``tags``: every tag in ``required_tags`` appears exactly once as ``<tag>...</tag>``, the
  tags in the given order;
- ``tool_call``: the completion holds a JSON tool call ``{"name": str, "arguments": {...}}``
  (inside ``<tool_call>...</tool_call>``, a ```` ```json ```` fence, or as the whole text);
  when the row's metadata lists ``tools`` (OpenAI shape) the name must be one of them.

Not a correctness check (``RewardOutput.correct`` stays None): a format reward alone gives no
accuracy; beside ``math`` in a composite, accuracy is the ``math`` term's.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Sequence

from posttrain.errors import ConfigError
from posttrain.rewards.output import RewardOutput, check_batch


def has_tags_in_order(text: str, tags: Sequence[str]) -> bool:
    """Each ``<tag>...</tag>`` exactly once, in the order given.

    >>> has_tags_in_order("<think>a</think> <answer>b</answer>", ["think", "answer"])
    True
    >>> has_tags_in_order("<answer>b</answer><think>a</think>", ["think", "answer"])
    False
    >>> has_tags_in_order("<think>a</think><think>b</think><answer>c</answer>", ["think", "answer"])
    False
    """
    position = 0
    for tag in tags:
        opening, closing = f"<{tag}>", f"</{tag}>"
        if text.count(opening) != 1 or text.count(closing) != 1:
            return False
        start, end = text.find(opening), text.find(closing)
        if start < position or end < start:
            return False
        position = end + len(closing)
    return True


def _tool_names(tools) -> set[str] | None:
    if not tools:
        return None
    names = set()
    for tool in tools:
        if isinstance(tool, dict):
            fn = tool.get("function", tool)
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                names.add(fn["name"])
    return names or None


_JSON_FENCE = re.compile(r"```json\s*\n")


def _spans(text: str, opening: re.Pattern, closing: str) -> list[str]:
    """Contents of the ``opening ... closing`` spans of ``text``, left to right, each ending at
    the first ``closing`` after its opening (as a non-greedy regex would) in linear time: an
    opening never closed ends the search instead of rescanning the rest once per opening."""
    found, position = [], 0
    while (start := opening.search(text, position)) is not None:
        end = text.find(closing, start.end())
        if end < 0:
            break
        found.append(text[start.end() : end])
        position = end + len(closing)
    return found


def _json(text: str):
    """``json.loads``, or None for text that is not JSON or nests too deeply to decode."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def parse_tool_call(text: str) -> dict | None:
    """The first JSON tool call found in ``text``, arguments decoded, or None. Hostile text
    (thousands of unclosed ``<tool_call>`` tags, JSON nested 100,000 deep) is read in linear
    time and is no call.

    >>> parse_tool_call('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>')
    {'name': 'add', 'arguments': {'a': 1}}
    >>> parse_tool_call('{"name": "add", "arguments": "{\\\\"a\\\\": 1}"}')
    {'name': 'add', 'arguments': {'a': 1}}
    >>> parse_tool_call('call add with a=1') is None
    True
    """
    candidates = _spans(text, re.compile(re.escape("<tool_call>")), "</tool_call>")
    candidates += _spans(text, _JSON_FENCE, "```")
    candidates.append(text)
    for candidate in candidates:
        call = _json(candidate.strip())
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            continue
        arguments = call.get("arguments", call.get("parameters", {}))
        if isinstance(arguments, str):
            arguments = _json(arguments)
        if isinstance(arguments, dict):
            return {"name": call["name"], "arguments": arguments}
    return None


@dataclass
class FormatReward:
    """1.0 when every enabled check passes, else 0.0 (fraction with ``partial=True``).

    >>> reward = FormatReward(required_tags=["think", "answer"])
    >>> reward(["q", "q"], ["<think>x</think><answer>1</answer>", "1"]).scores
    [1.0, 0.0]
    >>> tool = FormatReward(tool_call=True)
    >>> tool(["q"] * 2, ['{"name": "f", "arguments": {}}', '{"name": "g", "arguments": {}}'],
    ...      [{"tools": [{"type": "function", "function": {"name": "f"}}]}] * 2).scores
    [1.0, 0.0]
    """

    pattern: str | None = None
    required_tags: list[str] = field(default_factory=list)
    tool_call: bool = False
    partial: bool = False
    name: str = "format"

    def __post_init__(self) -> None:
        if self.pattern is None and not self.required_tags and not self.tool_call:
            raise ConfigError("pattern: the format reward needs at least one of pattern, required_tags, tool_call")
        try:
            self._regex = re.compile(self.pattern, re.DOTALL) if self.pattern is not None else None
        except re.error as e:
            raise ConfigError(f"pattern: invalid regular expression ({e})") from None

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict] | None = None):
        metadata = check_batch(prompts, completions, metadata)
        checks: dict[str, list[float]] = {}
        if self._regex is not None:
            checks["regex"] = [float(self._regex.search(c) is not None) for c in completions]
        if self.required_tags:
            checks["tags"] = [float(has_tags_in_order(c, self.required_tags)) for c in completions]
        if self.tool_call:
            values = []
            for c, meta in zip(completions, metadata):
                call = parse_tool_call(c)
                allowed = _tool_names(meta.get("tools"))
                values.append(float(call is not None and (allowed is None or call["name"] in allowed)))
            checks["tool_call"] = values
        per_row = list(zip(*checks.values()))
        if self.partial:
            scores = [sum(row) / len(row) for row in per_row]
        else:
            scores = [float(all(row)) for row in per_row]
        components = {self.name: list(scores)}
        if len(checks) > 1:
            components.update({f"{self.name}/{k}": v for k, v in checks.items()})
        return RewardOutput(scores, components)
