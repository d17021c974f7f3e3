"""Preference pairs: rows ``{"prompt", "chosen", "rejected"}`` read, checked, rendered,
audited and planned once, for every trainer that learns from comparisons (``train.rm``'s
reward model, ``train.dpo``).

Shapes follow TRL's "preference" dataset type (https://huggingface.co/docs/trl/dataset_formats):
an explicit prompt with string or message-list responses, or an implicit prompt, where
``chosen`` and ``rejected`` are whole conversations. Each side is checked like an SFT
conversation (``formats.check_turns``: no empty assistant reply, no tool result without a
tool call), and a pair whose two sides are the same is refused: it carries no preference
(with a margin it even pushes one response above itself). Two whole conversations must
answer one prompt: they may part only at an assistant message (TRL's implicit prompt is their
shared beginning); sides that part at a user, system or tool message answer different
prompts, and comparing their replies says nothing about which reply is better.

Both sides of a pair are rendered with the chat template exactly as SFT data is and cut after
their score token (``data.scored_sequence``), go through the SFT pre-flight audit
(``data.audit``: consistency, end-of-turn token, empty masks, length) and always share a
micro-batch: the step planner (``data.batching.StepPlanner``) runs over PAIRS, a pair's length
being what it costs a micro-batch (``pair_length``).

Deviation: pairs whose either side exceeds ``data.max_length`` are dropped (or refused with
``truncation: error``) rather than cut, because cutting removes the score token.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from typing import Any, Sequence

from posttrain.data.audit import (AuditReport, Finding, PreparedData, _mixture_report, audit_sample, count_drawn_samples,
                                   note_control_text, preflight)
from posttrain.data.batching import StepPlanner
from posttrain.data.formats import (
    BadRowError,
    _type_name,
    check_turns,
    normalise_messages,
    normalise_tools,
    read_rows_or_errors,
    visible_text,
)
from posttrain.data.mixture import data_sources, draw_items, is_mixture, read_mixture, setting_text
from posttrain.data.scored_sequence import ScoredSequence, render_for_scoring, render_response, to_scored_sequence
from posttrain.errors import ConfigError, DataError, config_key
from posttrain.log import say_stdout


@dataclass
class PreferencePair:
    """Both sides of one comparison, rendered up to their score tokens."""

    chosen: ScoredSequence
    rejected: ScoredSequence
    margin: float = 0.0
    group: str | None = None
    line: int = 0

    @property
    def tokens(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


@dataclass(frozen=True)
class PairKeys:
    """The row keys a trainer reads besides the pair itself: ``margin`` (a per-pair number,
    ``rm.margin_key``) and ``group`` (splits held-out accuracy, ``rm.group_key`` /
    ``dpo.group_key``); None reads nothing (margin 0, no group)."""

    margin: str | None = None
    group: str | None = None


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


# ----------------------------------------------------------------------------- rendering


def _margin_and_group(row: dict, where: str, keys: PairKeys) -> tuple[float, str | None]:
    margin = 0.0
    if keys.margin is not None and row.get(keys.margin) is not None:
        value = row[keys.margin]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataError(f"{where}: {keys.margin} must be a number, got {value!r}")
        margin = float(value)
    group = None if keys.group is None or row.get(keys.group) is None else str(row[keys.group])
    return margin, group


def render_pair_samples(row: dict, tokenizer: Any, *, line: int, source: str, keys: PairKeys,
                        allow_special_tokens_in_text: bool | Sequence[str] = False
                        ) -> tuple[Any, Any, float, str | None]:
    """(chosen, rejected) ``RenderedSample``s of one row, through the same template and
    rendering as SFT data (control-token text refused unless ``data.allow_special_tokens_in_text``
    allows it), plus the pair's margin and group."""

    where = f"{source}:{line}"
    prompt, chosen, rejected = preference_messages(row, where)
    tools = normalise_tools(row.get("tools"), f"{where}: tools")
    margin, group = _margin_and_group(row, where, keys)
    sides = [render_response(prompt, side, tokenizer, tools=tools, line=line, source=source,
                             allow_special_tokens_in_text=allow_special_tokens_in_text)
             for side in (chosen, rejected)]
    return sides[0], sides[1], margin, group


def render_pair(row: dict, tokenizer: Any, *, line: int, source: str, keys: PairKeys = PairKeys()) -> PreferencePair:
    """One row as a pair, strictly checked (DataError on any rendering problem)."""
    where = f"{source}:{line}"
    prompt, chosen, rejected = preference_messages(row, where)
    margin, group = _margin_and_group(row, where, keys)

    tools = normalise_tools(row.get("tools"), f"{where}: tools")
    return PreferencePair(
        chosen=render_for_scoring(prompt, chosen, tokenizer, tools=tools, line=line, source=source),
        rejected=render_for_scoring(prompt, rejected, tokenizer, tools=tools, line=line, source=source),
        margin=margin, group=group, line=line,
    )


# ----------------------------------------------------------------------------- loading


def load_pairs(path: Any, tokenizer: Any, data: Any, *, keys: PairKeys = PairKeys(),
               verbose: bool = True, seed: int = 0, key: str = "data.train") -> list[PreferencePair]:
    """Render every pair of one file and run the SFT pre-flight audit on both sides.

    ``data``: the trainer's ``data`` config section (``config.DataConfig``); ``keys``: the
    row keys of margin and group.

    The audit (``data.audit``) records consistency failures, missing end-of-turn tokens,
    empty masks and over-long sides exactly as for SFT data, prints its summary and refuses
    to start on a hard error (unless ``data.allow_audit_errors``). A pair with an over-long
    side is dropped (``truncation: right`` or ``drop``: cutting would remove the score
    token) or refused (``error``). Malformed rows (``preference_messages``: identical sides
    included) stop the run, or are skipped and counted with ``data.skip_bad``. ``path`` may be a
    list of sources (``data.mixture``, drawn with ``seed``; ``key`` names them in errors).
    """

    pairs, prepared = audit_pairs(path, tokenizer, data, keys=keys, seed=seed, key=key)
    preflight(prepared, allow_errors=data.allow_audit_errors, print_fn=say_stdout if verbose else None)
    return pairs


def audit_pairs(path: Any, tokenizer: Any, data: Any, *, keys: PairKeys = PairKeys(), seed: int = 0,
                key: str = "data.train") -> tuple[list[PreferencePair], PreparedData]:
    """``load_pairs`` without the verdict: the kept pairs and a ``data.audit.PreparedData``
    (both rendered sides of every kept pair, in file order, and the audit report), for
    ``load_pairs`` and ``posttrain inspect``. Raises BadRowError on the first malformed row
    unless ``data.skip_bad``. A list of sources (``data.mixture``): each distinct drawn row is
    rendered and audited once, in its source's report; pairs repeat as their rows were drawn."""

    if not is_mixture(path):
        rows = read_rows_or_errors(path, limit=data.limit, columns=data.columns)
        return _audit_pair_rows(rows, str(path), tokenizer, data, keys)
    started = time.perf_counter()
    mixture = read_mixture(data_sources(path, config_key(key)), limit=data.limit, seed=seed, columns=data.columns)
    parts = [_audit_pair_rows(mixture.drawn_rows(index), source.spec, tokenizer, data, keys)
             for index, source in enumerate(mixture.sources)]
    # a kept pair's two rendered sides follow each other in its source's samples
    with_sides = [list(zip(part_pairs, prepared.samples[0::2], prepared.samples[1::2])) for part_pairs, prepared in parts]
    drawn, kept, dropped = draw_items(mixture, with_sides, lambda item: item[0].line)
    report = _mixture_report(mixture, [prepared.audit for _, prepared in parts], kept, dropped, seed, "pairs")
    pairs = [pair for pair, _, _ in drawn]
    samples = [side for _, chosen, rejected in drawn for side in (chosen, rejected)]
    count_drawn_samples(report, samples)
    report.seconds = time.perf_counter() - started
    return pairs, PreparedData(samples=samples, audit=report)


def _audit_pair_rows(rows, path: str, tokenizer: Any, data: Any,
                     keys: PairKeys) -> tuple[list[PreferencePair], PreparedData]:
    """``audit_pairs`` for the ``(line, row or DataError)`` rows of one source named ``path``."""
    report = AuditReport(source=path)
    started = time.perf_counter()
    bad_rows: list[tuple[int, str]] = []
    pairs: list[PreferencePair] = []
    kept_samples: list[Any] = []
    too_long = "error" if data.truncation == "error" else "drop"
    for line, row in rows:
        if isinstance(row, DataError):
            if not data.skip_bad:
                raise BadRowError(str(row))
            bad_rows.append((line, str(row)))
            continue
        try:
            chosen, rejected, margin, group = render_pair_samples(
                row, tokenizer, line=line, source=str(path), keys=keys,
                allow_special_tokens_in_text=data.allow_special_tokens_in_text)
        except DataError as exc:
            if not data.skip_bad:
                raise BadRowError(str(exc)) from None
            bad_rows.append((line, str(exc)))
            note_control_text(report, line, exc)
            continue
        report.rows += 1
        kept = [audit_sample(side, report, data.max_length, too_long, f"{path}:{line}") for side in (chosen, rejected)]
        if any(side is None for side in kept):
            continue
        kept_samples.extend(kept)
        pairs.append(PreferencePair(to_scored_sequence(kept[0]), to_scored_sequence(kept[1]), margin, group, line))
    report.bad_rows.extend(Finding(line, message) for line, message in bad_rows)
    report.bad_rows.sort(key=lambda finding: finding.line)
    report.seconds = time.perf_counter() - started
    return pairs, PreparedData(samples=kept_samples, audit=report)


def load_preference_data(data: Any, tokenizer: Any, *, seed: int, keys: PairKeys = PairKeys(),
                         verbose: bool = True) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Train and held-out pairs of the ``data`` config section: ``data.val`` if set, else a
    ``data.val_fraction`` of the training pairs drawn with ``seed`` (``keys``: see ``load_pairs``)."""
    train = load_pairs(data.train, tokenizer, data, keys=keys, verbose=verbose, seed=seed)
    val: list[PreferencePair] = []
    if data.val:
        val = load_pairs(data.val, tokenizer, data, keys=keys, verbose=verbose, seed=seed, key="data.val")
    elif data.val_fraction > 0:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        held = set(order[: max(1, int(round(data.val_fraction * len(train))))])
        val = [p for i, p in enumerate(train) if i in held]
        train = [p for i, p in enumerate(train) if i not in held]
    if not train:
        raise DataError(f"{setting_text(data.train)}: no training pairs left after rendering")
    return train, val


# ----------------------------------------------------------------------------- planning


def pair_length(pair: PreferencePair, packing: bool) -> int:
    """Micro-batch tokens one pair costs: both sides packed, or two rows of the longer side."""
    if packing:
        return pair.tokens
    return 2 * max(len(pair.chosen.input_ids), len(pair.rejected.input_ids))


def make_pair_planner(pairs: Sequence[PreferencePair], train: Any, world_size: int) -> StepPlanner:
    """The SFT step planner over pairs (``train``: the trainer's ``train`` config section):
    each pair counts one towards the step normaliser; both sides of a pair share a micro-batch."""
    lengths = [pair_length(p, train.packing) for p in pairs]
    if max(lengths) > train.micro_batch_tokens:
        raise ConfigError(
            f"{config_key('train.micro_batch_tokens')} ({train.micro_batch_tokens}) is smaller than a {max(lengths)}-token "
            f"pair (both sides share a micro-batch): raise it or lower {config_key('data.max_length')}")
    return StepPlanner(
        lengths, [1] * len(pairs),
        global_batch_size=train.global_batch_size, global_batch_tokens=train.global_batch_tokens,
        micro_batch_tokens=train.micro_batch_tokens, packing=train.packing,
        world_size=world_size, seed=train.seed, shuffle=train.shuffle,
    )
