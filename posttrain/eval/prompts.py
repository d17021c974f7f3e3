"""Prompt rows: what generating from a prompt file needs, for RL's rollouts and for every
held-out evaluation (``eval.generate.evaluate_rows``).

A row holds the prompt rendered ONCE into ids (docs/ARCHITECTURE.md, "One tokenisation"), the
text a reward sees as the prompt (``rewards.output.PromptText``: the last user message,
remembering the conversation), the row's other keys as metadata for the reward (``answer``,
``tests``, ...) and where it came from, for error messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from posttrain.rewards.output import PromptText


@dataclass
class PromptRow:
    """One prompt: its rendered ids, its text for the reward, the row's metadata, its line in
    the file, and ``where`` errors name it (default ``<source>:<line>``, or ``prompt row <line>``
    without a source)."""

    prompt_ids: list[int]
    text: str
    metadata: dict[str, Any]
    line: int
    where: str = ""
    source: str = ""  # the file (data source) the row came from, when it came from one

    def __post_init__(self) -> None:
        if not self.where:
            self.where = f"{self.source}:{self.line}" if self.source else f"prompt row {self.line}"


def prompt_text(messages: Any) -> str:
    """The text a reward sees as the prompt: the last user message (or the string itself).

    >>> prompt_text([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}])
    '2+2?'
    """
    if isinstance(messages, str):
        return messages
    for message in reversed(messages):
        if message.get("role") in ("user", "human") or message.get("from") in ("user", "human"):
            return str(message.get("content", message.get("value", "")))
    return str(messages[-1].get("content", ""))


def reward_prompt(prompt: str | list[dict[str, Any]]) -> PromptText:
    """What a reward reads as the prompt of ``prompt`` (a string or chat messages): its text,
    remembering the messages of a conversation (TRL's conversational rewards get them)."""
    return PromptText(prompt_text(prompt), None if isinstance(prompt, str) else list(prompt))


def prompt_rows(prepared: Any) -> list[PromptRow]:
    """The rows of a checked, rendered prompt file (``data.audit.load_prompt_data``: a row
    holds its prompt under ``messages`` or ``prompt``; every other key is metadata for the
    reward, ``answer``, ``tests``, ...)."""
    return [PromptRow(p.prompt_ids, PromptText(prompt_text(p.messages), p.messages if p.conversational else None),
                      p.metadata, p.line, source=p.source) for p in prepared.prompts]


def agent_prompts(agent: Any, rows: Sequence[PromptRow], row_indices: Sequence[int]) -> list[Any]:
    """The agent's view (``agent.build.Agent.prompt``) of the rows at ``row_indices``."""
    return [agent.prompt(getattr(rows[i].text, "messages", None) or str(rows[i].text), rows[i].prompt_ids,
                         rows[i].metadata, where=rows[i].where) for i in row_indices]
