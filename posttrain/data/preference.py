"""Preference rows ``{"prompt", "chosen", "rejected"}``: read and checked once, for every trainer
that learns from comparisons (the reward model of ``train.rm`` today; DPO-style trainers reuse it).

Shapes follow TRL's "preference" dataset type (https://huggingface.co/docs/trl/dataset_formats):
an explicit prompt with string or message-list responses, or an implicit prompt, where
``chosen`` and ``rejected`` are whole conversations. Each side is checked like an SFT
conversation (``formats.check_turns``: no empty assistant reply, no tool result without a
tool call), and a pair whose two sides are the same is refused: it carries no preference
(with a margin it even pushes one response above itself). Two whole conversations must
answer one prompt: they may part only at an assistant message (TRL's implicit prompt is their
shared beginning); sides that part at a user, system or tool message answer different
prompts, and comparing their replies says nothing about which reply is better. Rendering and the pre-flight audit
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
    a malformed row, on a pair whose chosen and rejected conversations are the same
    (surrounding whitespace of each message ignored), and on sides that answer different
    prompts (``check_one_prompt``).

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
    check_one_prompt(chosen, rejected, where)
    return prompt, chosen, rejected


def check_one_prompt(chosen: list[dict[str, Any]], rejected: list[dict[str, Any]], where: str) -> None:
    """DataError unless ``chosen`` and ``rejected`` continue one prompt: after the messages they
    share (compared exactly: role, content, tool calls and every other rendered field), both
    go on with an assistant message. A pair that parts at a user, system or tool message, or
    where one side stops while the other adds context, compares replies to different prompts.

    >>> ask = {"role": "user", "content": "2+2?"}
    >>> check_one_prompt([ask, {"role": "assistant", "content": "4"}], [ask, {"role": "assistant", "content": "5"}], "f:1")
    >>> check_one_prompt([ask, {"role": "assistant", "content": "4"}],
    ...                  [{"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "5"}], "f:2")
    Traceback (most recent call last):
    ...
    posttrain.errors.DataError: f:2: chosen and rejected answer different prompts: they part at chosen[0] (user '2+2?') and rejected[0] (user '3+3?'); a pair compares two replies to one prompt
    """
    shared = 0
    while shared < min(len(chosen), len(rejected)) and _rendered(chosen[shared]) == _rendered(rejected[shared]):
        shared += 1
    parts = [side[shared] if shared < len(side) else None for side in (chosen, rejected)]
    if all(part is not None and part["role"] == "assistant" for part in parts):
        return
    described = " and ".join(f"{name}[{shared}] ({_glimpse(part)})" for name, part in zip(("chosen", "rejected"), parts))
    raise DataError(f"{where}: chosen and rejected answer different prompts: they part at {described}; "
                    f"a pair compares two replies to one prompt")


def _rendered(message: dict[str, Any]) -> str:
    """A message as the chat template sees it (``train`` and ``weight`` only steer the loss)."""
    return json.dumps({key: value for key, value in message.items() if key not in ("train", "weight")},
                      sort_keys=True, ensure_ascii=False, default=str)


def _glimpse(message: dict[str, Any] | None, limit: int = 30) -> str:
    """``user '2+2?'``: a message's role and the start of its text, for an error line."""
    if message is None:
        return "the conversation ends"
    text = " ".join(message["content"].split())
    return f"{message['role']} {(text if len(text) <= limit else text[:limit] + '...')!r}"


def _comparable(messages: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """What a side says, for the sameness check: role, visible content (NFKC, no invisible
    characters, whitespace runs as one space), tool calls."""
    return [(m["role"], visible_text(m["content"]), json.dumps(m.get("tool_calls"), sort_keys=True)) for m in messages]
