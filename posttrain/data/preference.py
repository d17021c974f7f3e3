"""Preference rows ``{"prompt", "chosen", "rejected"}``: read and checked once, for every trainer
that learns from comparisons (the reward model of ``train.rm`` today; DPO-style trainers reuse it).

Shapes follow TRL's "preference" dataset type (https://huggingface.co/docs/trl/dataset_formats):
an explicit prompt with string or message-list responses, or an implicit prompt, where
``chosen`` and ``rejected`` are whole conversations. Each side is checked like an SFT
conversation (``formats.check_turns``: no empty assistant reply, no tool result without a
tool call), and a pair whose two sides are the same is refused: it carries no preference
(with a margin it even pushes one response above itself). Rendering and the pre-flight audit
of both sides stay with the trainer (``train.rm``), which reads the score at a token of its
choosing.
"""

from __future__ import annotations

import json
from typing import Any

from posttrain.data.formats import _type_name, check_turns, normalise_messages, visible_text
from posttrain.errors import DataError


def preference_messages(row: dict, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) messages of one preference row.

    Shapes: ``{"prompt": str|messages, "chosen": str|messages, "rejected": str|messages}``
    (a string prompt is a user message, a string answer an assistant message), or
    ``{"chosen": conversation, "rejected": conversation}`` (prompt = empty; each
    conversation carries its own context). Raises DataError (one line naming ``where``) on
    a malformed row, and on a pair whose chosen and rejected conversations are the same
    (surrounding whitespace of each message ignored).

    >>> preference_messages({"prompt": "2+2?", "chosen": "4", "rejected": "5"}, "f.jsonl:1")[1]
    [{'role': 'assistant', 'content': '4'}]
    >>> preference_messages({"prompt": "2+2?", "chosen": "4", "rejected": " 4 "}, "f.jsonl:2")
    Traceback (most recent call last):
    ...
    posttrain.errors.DataError: f.jsonl:2: chosen and rejected are the same response (the pair expresses no preference)
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be an object, got {_type_name(row)}")
    missing = [key for key in ("chosen", "rejected") if key not in row]
    if missing:
        keys = ", ".join(sorted(row)) or "none"
        raise DataError(f"{where}: a preference row needs 'chosen' and 'rejected' (and usually 'prompt'); "
                        f"missing {', '.join(missing)} (keys: {keys})")
    prompt = normalise_messages(row["prompt"], f"{where}: prompt") if "prompt" in row else []
    chosen = normalise_messages(row["chosen"], f"{where}: chosen", default_role="assistant")
    rejected = normalise_messages(row["rejected"], f"{where}: rejected", default_role="assistant")
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if not side or side[-1]["role"] != "assistant":
            raise DataError(f"{where}: {name} must end with an assistant message")
    if not prompt and (chosen[0]["role"] == "assistant" or rejected[0]["role"] == "assistant"):
        raise DataError(f"{where}: no prompt: give 'prompt' or make chosen/rejected whole conversations")
    prompt_names = [f"prompt[{index}]" for index in range(len(prompt))]
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        check_turns(prompt + side, where, prompt_names + [f"{name}[{index}]" for index in range(len(side))])
    if _comparable(chosen) == _comparable(rejected):
        raise DataError(f"{where}: chosen and rejected are the same response (the pair expresses no preference)")
    return prompt, chosen, rejected


def _comparable(messages: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """What a side says, for the sameness check: role, visible content (NFKC, no invisible
    characters, whitespace runs as one space), tool calls."""
    return [(m["role"], visible_text(m["content"]), json.dumps(m.get("tool_calls"), sort_keys=True)) for m in messages]
