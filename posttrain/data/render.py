"""Conversation -> ``input_ids``, ``loss_mask`` (, ``weights``) through the tokenizer's chat template.

``docs/PREFLIGHT.md``: train only what the assistant says (its content, its tool calls and the
end-of-turn token it must learn to emit), never system, user or tool tokens; and make sure
``encode(messages) == prompt_ids ⊕ response_ids``, or the mask trains something that does
not exist at inference.

How the assistant spans are found, for ANY chat template and with no per-family code: for
every assistant message ``i`` render two prefixes with ``tokenizer.apply_chat_template``,

- ``P_i`` = messages[:i] + the generation prompt (exactly what inference feeds the model), and
- ``F_i`` = messages[:i+1] (the conversation up to and including the reply),

and tokenise each whole text. The reply's tokens are ``F_i[len(P_i):]``: valid when ``P_i`` is
a token prefix of ``F_i``. Consecutive turns share one sample when ``F_i`` is a token prefix of
``P_{i+1}`` (the template renders the history the same way as it grows). That is 2 template
calls per assistant turn. Tokenising every prefix in full would cost O(turns x length); for
tokenizers that encode the chunks between added tokens independently (byte-level BPE such as
SmolLM2, Llama-3, Qwen) ``ChunkEncoder`` tokenises each distinct chunk once per batch of rows,
with identical results (tested against the tokenizer), so a conversation costs about one
tokenisation.

Where the prefix property breaks:

- ``P_i`` not a prefix of ``F_i``: the reply's first tokens merge with the prompt (e.g. a
  generation prompt ending in a space) - a *consistency failure*, reported with the first
  differing token, decoded;
- ``F_i`` not a text prefix of ``P_{i+1}``: the template rewrites history (e.g. it drops earlier
  ``<think>`` blocks). The conversation is split into one sample per group of turns that
  render consistently (per assistant turn for such templates), or refused (``history_rewrite=
  "error"``);
- text prefix but not a token prefix: tokens merge across the turn boundary - a consistency
  failure, not a history rewrite (the text is the same; its tokenisation is not); the
  conversation is split there too, so the masks stay right (``split_reason`` tells the two
  apart).

End of turn: the trained span of a reply runs through its last special token (``<|im_end|>``,
``<|eot_id|>``, ``</s>``, ...); whitespace the template writes after it (``"\\n"``) is never
generated, so it is not trained (non-whitespace text after it is trained: the model must
write it). A trained reply with no special token in its span is reported
(``untrained_end_of_turn``): the model would never learn to stop.

Templates that silently drop tool calls, the text an assistant writes beside its tool calls
(Llama 3.1's template renders only the call: see its model card's prompt format,
https://www.llama.com/docs/model-cards-and-prompt-formats/llama3_1/), or tool results are
detected per conversation and raise DataError instead of training on a conversation that lost
them.

``tool_format="inline"`` (``data.tool_format``; ``data/inline.py``) renders python tool use
itself, for templates without tools: the messages after the last user message (assistant
tool calls, tool results, the final answer) become ONE assistant turn laid out as the RL turn
loop samples it, each piece tokenised on its own: ``P_run`` (the messages before, with the
generation prompt), then per call ``call_text(content, code)`` (trained) and
``output_text(result)`` (env: not trained, spans of role ``tool``), then the final text and
the template's end-of-turn token(s) (trained). Conversations whose last turn calls no tool
render through the template as usual.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal, Sequence

from posttrain.data.formats import normalise_messages
from posttrain.data.inline import call_text, first_closed_block, output_text
from posttrain.errors import ConfigError, DataError, config_key

TrainOn = Literal["all_assistant", "last_assistant"]
HistoryRewrite = Literal["split", "error"]
ToolFormat = Literal["chat_template", "inline"]


@dataclass
class Span:
    """Tokens ``[start, end)`` of a sample rendered from one message (or a run of messages)."""

    start: int
    end: int
    role: str  # "system", "user", "assistant", "tool", "system+user", or "generation prompt"
    message_index: int | None = None  # first message of the run; None for the generation prompt
    trained: bool = False
    # an inline tool turn (tool_format="inline") is one "assistant" span over the whole turn, with
    # nested spans for each tool output ("tool") and each assistant piece after one ("assistant")


@dataclass
class RenderedSample:
    """One training sequence. ``loss_mask[t] == 1``: token ``t`` is a training target (the shift
    to next-token labels happens once, in the loss). ``weights[t]``: its loss weight (0.0 where
    untrained), or None when no message carries a ``weight``."""

    input_ids: list[int]
    loss_mask: list[int]
    weights: list[float] | None = None
    line: int = 0
    source: str = ""
    spans: list[Span] = field(default_factory=list)
    truncated: bool = False
    split: bool = False  # one of several samples of one conversation (see split_reason)
    split_reason: str = ""  # "history rewrite" (the template re-renders earlier turns) or "token merge"
    consistency_errors: list[str] = field(default_factory=list)
    untrained_end_of_turn: list[int] = field(default_factory=list)  # 0-based message indices
    cut_end_of_turn: list[int] = field(default_factory=list)  # trained replies whose end-of-turn truncation cut off
    warnings: list[str] = field(default_factory=list)
    control_text: str = ""  # a control-token string the row's text holds, kept as the token (check_control_text)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def trained_token_count(self) -> int:
        return sum(self.loss_mask)

    @property
    def masked_token_ratio(self) -> float:
        """Trained tokens / all tokens (``docs/PREFLIGHT.md``)."""
        return self.trained_token_count / max(1, len(self.input_ids))


@dataclass
class _Turn:
    index: int  # message index of the assistant reply
    prompt_text: str
    full_text: str
    prompt_ids: list[int]
    full_ids: list[int]
    trained: bool
    weight: float | None


@dataclass
class _InlinePiece:
    """One piece of an inline tool turn: its text, tokenised on its own."""

    text: str
    kind: Literal["call", "output", "final"]
    message_index: int


@dataclass
class _InlineRun:
    """The final assistant turn of a conversation in the inline tool format: messages
    ``start..last`` (assistant tool calls, tool results, the final assistant reply)."""

    start: int
    last: int
    pieces: list[_InlinePiece]


@dataclass
class RenderJob:
    """One conversation to render (``render_batch``): normalised messages and where they came from."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    line: int = 0
    source: str = ""
    message_spans: bool = False

    @property
    def where(self) -> str:
        return location(self.source, self.line)


def location(source: str, line: int) -> str:
    """How errors name a row: ``file:line``, or ``line N`` when there is no file."""
    return f"{source}:{line}" if source else f"line {line}"


# ----------------------------------------------------------------------------- public API
def render_conversation(
    messages: list[dict[str, Any]],
    tokenizer,
    *,
    tools: list[dict[str, Any]] | None = None,
    train_on: TrainOn = "all_assistant",
    train_tool_calls: bool = True,
    history_rewrite: HistoryRewrite = "split",
    line: int = 0,
    source: str = "",
    chat_template_kwargs: dict[str, Any] | None = None,
    message_spans: bool = False,
    tool_format: ToolFormat = "chat_template",
    allow_special_tokens_in_text: AllowControlText = False,
) -> list[RenderedSample]:
    """Render normalised ``messages`` (``formats.normalise_messages``) into training samples.

    Returns one sample, or several when the template rewrites history (``history_rewrite=
    "split"``). Trained: every assistant message (``train_on="all_assistant"``) or the last one;
    messages with tool calls only if ``train_tool_calls``; a message's own ``train`` overrides
    both. ``weight`` on a message becomes the loss weight of its tokens. ``message_spans``
    renders one extra prefix per message so that ``spans`` shows every message boundary
    (for ``inspect``); without it, consecutive non-assistant messages form one span.
    ``tool_format="inline"``: python tool use in the last turn is laid out by posttrain
    (``data/inline.py``, module docstring), not by the template.
    Tool results are defused (``defuse_tool_results``) as the RL turn loop defuses tool output;
    any other text holding a control-token string is refused unless
    ``allow_special_tokens_in_text`` allows it (``check_control_text``).
    Raises DataError (naming ``source:line``) when the conversation cannot be rendered
    faithfully (template error, dropped tool calls or tool results, control-token text).
    """
    job = RenderJob(messages, tools, line, source, message_spans)
    (result,) = render_batch(
        [job], tokenizer, train_on=train_on, train_tool_calls=train_tool_calls,
        history_rewrite=history_rewrite, chat_template_kwargs=chat_template_kwargs, tool_format=tool_format,
        allow_special_tokens_in_text=allow_special_tokens_in_text,
    )
    if isinstance(result, DataError):
        raise result
    return result


def render_batch(
    jobs: Sequence[RenderJob],
    tokenizer,
    *,
    train_on: TrainOn = "all_assistant",
    train_tool_calls: bool = True,
    history_rewrite: HistoryRewrite = "split",
    chat_template_kwargs: dict[str, Any] | None = None,
    tool_format: ToolFormat = "chat_template",
    allow_special_tokens_in_text: AllowControlText = False,
) -> list[list[RenderedSample] | DataError]:
    """``render_conversation`` for many conversations, with ONE tokenizer call for all their prefix
    texts (a fast tokenizer spreads a batch over the CPU cores). Returns, per job, its samples or
    the DataError that makes it a bad row (a ``ControlTextError`` for control-token text)."""
    if tool_format not in ("chat_template", "inline"):
        raise ValueError(f"tool_format must be chat_template or inline, got {tool_format!r}")
    kwargs = dict(chat_template_kwargs or {})
    planned: list[tuple[int, list[str], _InlineRun | None, str] | DataError] = []
    all_texts: list[str] = []
    jobs = [replace(job, messages=defuse_tool_results(job.messages, tokenizer)) for job in jobs]
    for job in jobs:
        try:
            kept = check_control_text({"messages": job.messages, "tools": job.tools}, tokenizer,
                                      allow_special_tokens_in_text, job.where)
            run = _inline_run(job.messages, job.where) if tool_format == "inline" else None
            texts = _prefix_texts(job, tokenizer, kwargs, run)
        except DataError as exc:
            planned.append(exc)
            continue
        planned.append((len(all_texts), texts, run, kept))
        all_texts.extend(texts)
    all_ids = encode_texts(tokenizer, all_texts)
    results: list[list[RenderedSample] | DataError] = []
    for job, plan in zip(jobs, planned):
        if isinstance(plan, DataError):
            results.append(plan)
            continue
        offset, texts, run, kept = plan
        try:
            samples = _samples_from_prefixes(job, tokenizer, texts, all_ids[offset : offset + len(texts)], train_on,
                                             train_tool_calls, history_rewrite, kwargs, run)
        except DataError as exc:
            results.append(exc)
            continue
        for sample in samples:
            sample.control_text = kept
        results.append(samples)
    return results


def _turn_indices(messages, run: _InlineRun | None) -> list[int]:
    """The message index of every assistant turn; an inline tool turn counts once, at its start."""
    indices = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    return indices if run is None else [i for i in indices if i < run.start] + [run.start]


def _prefix_texts(job: RenderJob, tokenizer, kwargs: dict, run: _InlineRun | None = None) -> list[str]:
    """[P_0, F_0, P_1, F_1, ...]: the prompt and the prompt+reply text of every assistant turn.
    For an inline tool turn, F is the prompt + its final reply alone (where the template's
    end-of-turn token is read)."""
    messages, where = job.messages, job.where
    assistant_indices = _turn_indices(messages, run)
    if not assistant_indices:
        raise DataError(f"{where}: no assistant turn (nothing to train on)")
    if assistant_indices[0] == 0:
        raise DataError(f"{where}: the conversation starts with an assistant message; a chat template needs a user or system message first")
    texts: list[str] = []
    for i in assistant_indices:
        texts.append(_apply(tokenizer, messages[:i], job.tools, True, kwargs, where))
        reply = [{"role": "assistant", "content": messages[run.last]["content"]}] if run and i == run.start else messages[i : i + 1]
        texts.append(_apply(tokenizer, messages[:i] + reply, job.tools, False, kwargs, where))
    return texts


def _samples_from_prefixes(job: RenderJob, tokenizer, texts, ids, train_on, train_tool_calls, history_rewrite, kwargs,
                           run: _InlineRun | None = None) -> list[RenderedSample]:
    messages, tools, where, line, source = job.messages, job.tools, job.where, job.line, job.source
    assistant_indices = _turn_indices(messages, run)
    # an inline tool turn is selected by its final reply (last_assistant; its own "train" key)
    selectable = assistant_indices if run is None else assistant_indices[:-1] + [run.last]
    trained = _trained_turns(messages, selectable, train_on, train_tool_calls)
    turns = [
        _Turn(i, texts[2 * k], texts[2 * k + 1], ids[2 * k], ids[2 * k + 1], i in trained, messages[i].get("weight"))
        for k, i in enumerate(assistant_indices)
    ]
    pieces: list[tuple[list[int], _InlinePiece, bool]] = []
    has_eot = False
    if run is not None:  # the inline turn's reply: the pieces, each tokenised on its own
        turn = turns[-1]
        eot = _end_of_turn_ids(turn, _special_ids(tokenizer))
        has_eot = bool(eot)
        pieces = _inline_pieces(run, messages, tokenizer, eot, run.last in trained, train_tool_calls)
        turn.full_ids = turn.prompt_ids + [token for piece_ids, _, _ in pieces for token in piece_ids]
        turn.trained = any(piece_trained for _, _, piece_trained in pieces)
        turn.weight = next((messages[p.message_index].get("weight") for _, p, t in pieces
                            if t and messages[p.message_index].get("weight") is not None), None)
    checked = turns if run is None else turns[:-1]  # the inline turn is laid out here, not by the template
    warnings = _check_tool_rendering(messages if run is None else messages[: run.start], checked, tokenizer, tools, kwargs, where)

    groups, boundary_errors, rewritten = _group_turns(turns, tokenizer, history_rewrite, where)
    special_ids = _special_ids(tokenizer)
    use_weights = any(turn.trained and turn.weight is not None for turn in turns)
    samples = []
    for group in groups:
        if not any(turn.trained for turn in group):
            continue
        sample = _assemble(group, messages, tokenizer, special_ids, use_weights, line, source)
        if job.message_spans:
            try:
                sample.spans = _message_spans(group, messages, tokenizer, tools, kwargs, where, sample.spans)
            except DataError:  # some templates refuse a partial conversation: keep the coarser spans
                pass
        if pieces and group[-1] is turns[-1]:
            _lay_out_inline(sample, pieces, messages, run, has_eot)
        sample.split = len(groups) > 1
        sample.split_reason = ("history rewrite" if rewritten else "token merge") if sample.split else ""
        sample.consistency_errors = boundary_errors.get(id(group[0]), []) + sample.consistency_errors
        sample.warnings = list(warnings) + (["chat template rewrites history: conversation split per turn"] if rewritten else [])
        samples.append(sample)
    if not samples:  # nothing selected for training: keep one sample so the audit reports its empty mask
        sample = _assemble(groups[-1], messages, tokenizer, special_ids, use_weights, line, source)
        if pieces and groups[-1][-1] is turns[-1]:
            _lay_out_inline(sample, pieces, messages, run, has_eot)
        sample.warnings = list(warnings)
        samples.append(sample)
    return samples


def render_text(text: str, tokenizer, *, line: int = 0, source: str = "",
                allow_special_tokens_in_text: AllowControlText = False) -> RenderedSample:
    """A language-modelling row (TRL's ``{"text": ...}``): the text tokenised as it is (no chat
    template) with the end-of-sequence token appended, as TRL's SFT trainer does for such rows;
    every token is a target except the first, which nothing precedes. Empty text is a DataError
    naming the row; so is text holding a control-token string that ``allow_special_tokens_in_text``
    does not allow (``check_control_text``).

    >>> class Tok:
    ...     eos_token_id = 0
    ...     def __call__(self, text, add_special_tokens=True): return {"input_ids": [5, 6, 7]}
    >>> sample = render_text("abc", Tok(), line=3)
    >>> sample.input_ids, sample.loss_mask
    ([5, 6, 7, 0], [0, 1, 1, 1])
    """
    if not text.strip():
        raise DataError(f"{location(source, line)}: text is empty")
    kept = check_control_text(text, tokenizer, allow_special_tokens_in_text, location(source, line), path="text")
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    loss_mask = [0] + [1] * (len(ids) - 1)
    return RenderedSample(input_ids=ids, loss_mask=loss_mask, line=line, source=source,
                          spans=[Span(0, len(ids), "text", None, True)], control_text=kept)


def render_prompt(
    messages_or_str: str | list[dict[str, Any]],
    tokenizer,
    *,
    tools: list[dict[str, Any]] | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    where: str = "prompt",
    allow_special_tokens_in_text: AllowControlText = False,
) -> list[int]:
    """Prompt token ids ending with the generation prompt: what the model continues from (RL, eval).

    The same path as training (chat template text, then one tokenisation), so RL and eval see
    exactly the prompt tokens SFT trained after: tool results defused, other control-token text
    refused unless ``allow_special_tokens_in_text`` allows it (ControlTextError naming ``where``).
    """
    messages = normalise_messages(messages_or_str, where)  # validates; accepts ShareGPT; idempotent
    if not messages:
        raise DataError(f"{where}: a prompt must be a string or a non-empty list of messages")
    messages = defuse_tool_results(messages, tokenizer)
    check_control_text({"messages": messages, "tools": tools}, tokenizer, allow_special_tokens_in_text, where)
    text = _apply(tokenizer, messages, tools, True, dict(chat_template_kwargs or {}), where)
    return encode_texts(tokenizer, [text])[0]


# ----------------------------------------------------------------------------- control-token text
class ControlTextError(DataError):
    """A row's text holds the string of a control token (``control_tokens``) that
    ``allow_special_tokens_in_text`` does not allow: rendered, it would become that token."""


AllowControlText = bool | Sequence[str]  # data.allow_special_tokens_in_text: all, none, or these token strings


_JSON_ESCAPED = re.compile(r'["\\\x00-\x1f]')  # characters json.dumps writes escaped


@dataclass
class _ControlVocabulary:
    """What ``control_tokens`` and friends read from one tokenizer, computed once per tokenizer."""

    tokens: dict[str, int | None]
    normalise: Callable[[str], str] | None
    patterns: dict[frozenset[str], "re.Pattern[str] | None"] = field(default_factory=dict)

    @property
    def json_safe(self) -> bool:
        """No token holds a character ``json.dumps`` escapes (a JSON dump shows every token as is)."""
        return not _JSON_ESCAPED.search("".join(self.tokens))

    def pattern(self, ignore: frozenset[str] = frozenset()) -> "re.Pattern[str] | None":
        """A regex matching every token string but those in ``ignore``, longest first
        (leftmost-longest, as the tokenizer matches them); None when there is none."""
        if ignore not in self.patterns:
            contents = sorted((c for c in self.tokens if c not in ignore), key=len, reverse=True)
            self.patterns[ignore] = re.compile("|".join(map(re.escape, contents))) if contents else None
        return self.patterns[ignore]


def _control_vocabulary(tokenizer) -> _ControlVocabulary:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    normalizer = getattr(backend, "normalizer", None)
    key = (len(tokenizer) if hasattr(tokenizer, "__len__") else None, normalizer is None)  # adding tokens changes len
    cached = getattr(tokenizer, "_posttrain_control_vocabulary", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    specials = tuple(getattr(tokenizer, "all_special_tokens", ()) or ())
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    tokens: dict[str, int | None] = {}
    for token_id, token in decoder.items():
        content = getattr(token, "content", token)
        if isinstance(content, str) and content.strip():
            tokens[content] = token_id
    convert = getattr(tokenizer, "convert_tokens_to_ids", None)
    for content in specials:
        if isinstance(content, str) and content.strip() and content not in tokens:
            tokens[content] = convert(content) if convert is not None else None
    matches_normalised = normalizer is not None and any(getattr(t, "normalized", False) for t in decoder.values())
    vocabulary = _ControlVocabulary(tokens, normalizer.normalize_str if matches_normalised else None)
    try:
        tokenizer._posttrain_control_vocabulary = (key, vocabulary)
    except AttributeError:
        pass
    return vocabulary


def control_tokens(tokenizer) -> dict[str, int | None]:
    """Every string that ``tokenizer`` encodes to one of its added or special tokens, with its
    id: the contents of ``added_tokens_decoder`` (special or not: ``<|im_end|>``,
    ``<file_sep>``, ``<|start_header_id|>``, ``<think>``...) and ``all_special_tokens``. The
    tokenizer cuts these strings out of any text before its model sees it, so text holding one
    reaches the model as a control token. A string of whitespace alone is left out: it marks
    no structure, and the tokenizer encodes such runs this way in any text, at inference too.

    >>> class Tok: all_special_tokens = ["<|im_end|>", "  "]
    >>> control_tokens(Tok())
    {'<|im_end|>': None}
    """
    return _control_vocabulary(tokenizer).tokens


def control_token_pattern(tokenizer, ignore: frozenset[str] = frozenset()) -> "re.Pattern[str] | None":
    """A regex matching every ``control_tokens`` string but those in ``ignore``, longest first
    (leftmost-longest, as the tokenizer matches them); None when there is none."""
    return _control_vocabulary(tokenizer).pattern(ignore)


def normalised_control_matching(tokenizer) -> Callable[[str], str] | None:
    """The tokenizer's normaliser when it matches some added token after normalising the text
    (``AddedToken.normalized`` with a normaliser), else None: then what a string search finds is
    exactly what the tokenizer cuts out."""
    return _control_vocabulary(tokenizer).normalise


def find_control_text(value: Any, tokenizer, *, path: str = "", ignore: frozenset[str] = frozenset(),
                      skip_tool_results: bool = True) -> tuple[str, str] | None:
    """``(token, where)`` of the first control-token string (``control_tokens`` but ``ignore``)
    in any text of ``value``: a string, or messages / tool schemas / arguments at any depth,
    keys included; ``where`` names it (``messages[1].content``). With ``skip_tool_results``
    the content of ``tool`` messages is not searched: it is defused (``defuse_tool_results``).

    >>> class Tok: all_special_tokens = ["<|im_end|>"]
    >>> find_control_text([{"role": "assistant", "content": "ok<|im_end|>"}], Tok(), path="messages")
    ('<|im_end|>', 'messages[0].content')
    """
    vocabulary = _control_vocabulary(tokenizer)
    pattern, normalise = vocabulary.pattern(ignore), vocabulary.normalise
    if pattern is None:
        return None
    if normalise is None and vocabulary.json_safe:
        # the whole value as one JSON string (C speed) holds every text of it unescaped: no hit, no walk
        if not pattern.search(json.dumps(value, ensure_ascii=False, default=str)):
            return None

    def search(node: Any, where: str) -> tuple[str, str] | None:
        if isinstance(node, str):
            match = pattern.search(node) or (pattern.search(normalise(node)) if normalise is not None else None)
            return (match.group(0), where) if match else None
        if isinstance(node, dict):
            tool_result = skip_tool_results and node.get("role") == "tool"
            for key, item in node.items():
                if tool_result and key == "content":
                    continue
                found = search(key, where) if isinstance(key, str) else None
                found = found or search(item, f"{where}.{key}" if where else str(key))
                if found:
                    return found
        elif isinstance(node, (list, tuple)):
            for index, item in enumerate(node):
                found = search(item, f"{where}[{index}]")
                if found:
                    return found
        return None

    return search(value, path)


def check_control_text(value: Any, tokenizer, allow: AllowControlText, where: str, *, path: str = "") -> str:
    """Refuse or note control-token strings in a row's text (``find_control_text``).

    ``allow`` (``data.allow_special_tokens_in_text``): False refuses every such string, True
    keeps them all as control tokens, a list keeps those strings only. Returns what was kept
    (``"'<think>' in messages[2].content"``) or ``""``; raises ControlTextError, one line
    naming ``where``, the place in the row and the token, for a string not allowed.
    """
    if allow is True:
        found = find_control_text(value, tokenizer, path=path)
        return f"{found[0]!r} in {found[1]}" if found else ""
    allowed = frozenset(allow or ())
    unknown = sorted(allowed - set(control_tokens(tokenizer))) if allowed else []
    if unknown:
        raise ConfigError(f"{config_key('data.allow_special_tokens_in_text')}: {unknown[0]!r} is not a special or added token of the "
                          f"tokenizer (it has {len(control_tokens(tokenizer))}, e.g. "
                          f"{', '.join(list(control_tokens(tokenizer))[:4])})")
    refused = find_control_text(value, tokenizer, path=path, ignore=allowed)
    if refused:
        token, place = refused
        raise ControlTextError(
            f"{where}: {place} holds {token!r}, the text of a special token of the tokenizer: it would be encoded as "
            f"that control token, not as text; remove it, or set {config_key('data.allow_special_tokens_in_text')}=true (or a list "
            f"of the tokens you mean) to keep it as the token")
    kept = find_control_text(value, tokenizer, path=path) if allowed else None
    return f"{kept[0]!r} in {kept[1]}" if kept else ""


def defuse_special_tokens(text: str, tokenizer) -> str:
    """Untrusted text (tool output) that tokenises to none of ``tokenizer``'s added or special
    tokens (``data.render.control_tokens``: ``<|im_end|>``, ``<file_sep>``,
    ``<|start_header_id|>``, ...), so it can neither end a turn nor open a fake one in the
    context. Each such string is broken by a word joiner (U+2060) after its first character
    (a one-character token becomes U+FFFD); the text still reads the same. Where a string could
    survive that (a tokenizer that matches added tokens after a normaliser, which may drop the
    joiner; a vocabulary where a broken token holds another), what still tokenises to a
    control token is cut out, so the property holds for any tokenizer.

    >>> class Tok: all_special_tokens = ["<|im_end|>", "<file_sep>"]
    >>> defuse_special_tokens("x<|im_end|>y<file_sep>", Tok()) == "x<\u2060|im_end|>y<\u2060file_sep>"
    True
    """
    pattern = control_token_pattern(tokenizer)
    if pattern is None or not text:
        return text
    for _ in range(BREAK_PASSES):
        broken = pattern.sub(_break_token, text)
        if broken == text:
            break
        text = broken
    while True:
        spans = _control_spans(text, tokenizer, pattern)
        if not spans:
            return text
        if any(end <= start for start, end in spans):  # a control id no text offset locates: keep nothing
            return ""
        for start, end in reversed(spans):
            text = text[:start] + text[end:]


BREAK_PASSES = 3
WORD_JOINER = "\u2060"


def _break_token(match: re.Match) -> str:
    token = match.group(0)
    return token[0] + WORD_JOINER + token[1:] if len(token) > 1 else "\ufffd"


def _control_spans(text: str, tokenizer, pattern: re.Pattern) -> list[tuple[int, int]]:
    """Character spans of ``text`` that the tokenizer would encode to a control token, in order:
    a string search, or, for a tokenizer matching added tokens after normalising, its own
    encoding's offsets."""
    if normalised_control_matching(tokenizer) is None:
        return [match.span() for match in pattern.finditer(text)]
    ids = set(control_tokens(tokenizer).values())
    encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    spans = [offset for token_id, offset in zip(encoding.ids, encoding.offsets) if token_id in ids]
    return sorted(set(spans))


def defuse_tool_results(messages: list[dict[str, Any]], tokenizer) -> list[dict[str, Any]]:
    """``messages`` with the content of every ``tool`` message defused
    (``defuse_special_tokens``), as the RL turn loop defuses every tool output
    before it joins the context: training data then hold tool output exactly as RL does."""
    out = []
    for message in messages:
        if message.get("role") == "tool" and isinstance(message.get("content"), str):
            defused = defuse_special_tokens(message["content"], tokenizer)
            if defused != message["content"]:
                message = {**message, "content": defused}
        out.append(message)
    return out


def encode_texts(tokenizer, texts: Sequence[str], *, fast: bool = True) -> list[list[int]]:
    """Tokenise rendered template texts (the template writes BOS itself: no extra special tokens).

    ``fast``: when the tokenizer is chunk-separable (``ChunkEncoder``), pieces shared between
    texts (the prefixes of one conversation, a common system prompt) are tokenised once; the
    result is identical to the tokenizer's own (tested against ``fast=False``).
    """
    if not texts:
        return []
    encoder = ChunkEncoder.for_tokenizer(tokenizer) if fast else None
    if encoder is not None:
        return encoder.encode(texts)
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]]


class ChunkEncoder:
    """Exact tokenisation of many texts that share pieces, for chunk-separable fast tokenizers.

    A Hugging Face ``tokenizers`` pipeline first cuts the text at added tokens (``<|im_end|>``,
    ...), then normalises, pre-tokenises and runs the model on each chunk between them on its
    own. So ``encode(text)`` is the concatenation of the chunks' encodings - unless a component
    looks beyond its chunk: added tokens that strip neighbouring whitespace (``lstrip``/
    ``rstrip``/``single_word``), added tokens matched after normalisation, or a position-aware
    pre-tokenizer/normaliser (``Metaspace`` prepends only to the first chunk, ``Prepend``...).
    ``for_tokenizer`` returns None for those (and for slow tokenizers): the caller then uses
    the tokenizer itself. The prefixes of one conversation share all chunks but the last few,
    so a batch costs about one tokenisation of each conversation instead of one per prefix.
    """

    PRE_TOKENIZERS = {"ByteLevel", "Split", "Digits", "Punctuation", "Whitespace", "WhitespaceSplit", "BertPreTokenizer",
                      "UnicodeScripts", "CharDelimiterSplit", "Sequence"}
    NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Sequence", "Replace", "StripAccents", "Nmt"}

    def __init__(self, backend, added: dict[str, int]):
        self.backend = backend
        self.added = added
        contents = sorted(added, key=len, reverse=True)  # leftmost-longest, as the tokenizer matches them
        self.pattern = re.compile("(" + "|".join(re.escape(content) for content in contents) + ")") if contents else None

    @classmethod
    def for_tokenizer(cls, tokenizer) -> "ChunkEncoder | None":
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        key = (len(tokenizer), str(backend.normalizer), str(backend.pre_tokenizer), len(backend.get_added_tokens_decoder()))
        cached = getattr(tokenizer, "_posttrain_chunk_encoder", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        encoder = cls._build(backend)
        try:
            tokenizer._posttrain_chunk_encoder = (key, encoder)
        except AttributeError:
            pass
        return encoder

    @classmethod
    def _build(cls, backend) -> "ChunkEncoder | None":
        def types(component) -> set[str]:
            if component is None:
                return set()
            found: set[str] = set()

            def walk(node):
                if isinstance(node, dict):
                    if "type" in node:
                        found.add(node["type"])
                    for value in node.values():
                        walk(value)
                elif isinstance(node, list):
                    for value in node:
                        walk(value)

            walk(json.loads(component.__getstate__()))
            return found

        try:
            normalizer_types, pre_tokenizer_types = types(backend.normalizer), types(backend.pre_tokenizer)
        except Exception:  # an unfamiliar component that does not serialise: be safe
            return None
        if not pre_tokenizer_types <= cls.PRE_TOKENIZERS or not normalizer_types <= cls.NORMALIZERS:
            return None
        added: dict[str, int] = {}
        for token_id, token in backend.get_added_tokens_decoder().items():
            if token.lstrip or token.rstrip or token.single_word or (token.normalized and normalizer_types):
                return None
            added[token.content] = token_id
        return cls(backend, added)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        split = self.pattern.split if self.pattern is not None else (lambda text: [text])
        pieces_per_text = [split(text) for text in texts]
        chunk_ids: dict[str, list[int]] = {}
        for pieces in pieces_per_text:
            for chunk in pieces[0::2]:
                if chunk:
                    chunk_ids[chunk] = []
        chunks = list(chunk_ids)
        for chunk, encoding in zip(chunks, self.backend.encode_batch(chunks, add_special_tokens=False)):
            chunk_ids[chunk] = encoding.ids
        encoded = []
        for pieces in pieces_per_text:
            ids: list[int] = []
            for k, piece in enumerate(pieces):
                if k % 2:
                    ids.append(self.added[piece])
                elif piece:
                    ids.extend(chunk_ids[piece])
            encoded.append(ids)
        return encoded


def truncate_sample(sample: RenderedSample, max_length: int) -> RenderedSample:
    """The first ``max_length`` tokens of ``sample`` (spans clipped, ``truncated`` set)."""
    if len(sample.input_ids) <= max_length:
        return sample
    spans = [replace(span, end=min(span.end, max_length)) for span in sample.spans if span.start < max_length]
    # a trained reply that starts before the cut and whose last trained token (its end-of-turn
    # token, unless the template writes none) lies beyond it: the model will not learn to stop there
    cut = [span.message_index for span in sample.spans
           if span.trained and span.start < max_length and span.message_index not in sample.untrained_end_of_turn
           and _last_trained(sample.loss_mask, span) >= max_length]
    return replace(
        sample,
        input_ids=sample.input_ids[:max_length],
        loss_mask=sample.loss_mask[:max_length],
        weights=sample.weights[:max_length] if sample.weights is not None else None,
        spans=spans,
        truncated=True,
        # a reply cut before its end-of-turn token is the truncation's doing, not the template's
        untrained_end_of_turn=[i for i in sample.untrained_end_of_turn if _span_end(sample, i) <= max_length],
        cut_end_of_turn=cut,
    )


def _last_trained(loss_mask: list[int], span: Span) -> int:
    """Position of the last trained token in ``span`` (-1 if none)."""
    return next((k for k in range(span.end - 1, span.start - 1, -1) if loss_mask[k]), -1)


def first_difference(tokenizer, expected: Sequence[int], actual: Sequence[int]) -> str:
    """Describe the first position where two token sequences differ, tokens decoded."""
    position = common_prefix_length(expected, actual)

    def show(seq: Sequence[int]) -> str:
        if position >= len(seq):
            return "<end>"
        return f"{tokenizer.decode([seq[position]])!r} ({seq[position]})"

    return f"token {position}: {show(expected)} vs {show(actual)}"


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    limit = min(len(a), len(b))
    if list(a[:limit]) == list(b[:limit]):
        return limit
    low, high = 0, limit  # binary search on the first difference: list slices compare in C
    while low < high:
        mid = (low + high) // 2
        if list(a[: mid + 1]) == list(b[: mid + 1]):
            low = mid + 1
        else:
            high = mid
    return low


def is_token_prefix(prefix: Sequence[int], sequence: Sequence[int]) -> bool:
    return len(prefix) <= len(sequence) and list(sequence[: len(prefix)]) == list(prefix)


# ----------------------------------------------------------------------------- internals
def _apply(tokenizer, messages, tools, add_generation_prompt: bool, kwargs: dict, where: str) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
        )
    except Exception as exc:  # jinja raises TemplateError, TypeError, UndefinedError...
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise DataError(f"{where}: the chat template failed on messages 1-{len(messages)}: {detail}") from None
    if not isinstance(text, str):
        raise DataError(f"{where}: the chat template did not return text")
    return text


def _trained_turns(messages, assistant_indices: list[int], train_on: str, train_tool_calls: bool) -> set[int]:
    if train_on not in ("all_assistant", "last_assistant"):
        raise ValueError(f"train_on must be all_assistant or last_assistant, got {train_on!r}")
    trained = set()
    for i in assistant_indices:
        message = messages[i]
        default = (train_on == "all_assistant" or i == assistant_indices[-1]) and (
            train_tool_calls or not message.get("tool_calls")
        )
        if message.get("train", default):
            trained.add(i)
    return trained


def _group_turns(turns: list[_Turn], tokenizer, history_rewrite: str, where: str):
    """Split turns where the history stops being a token prefix of the next prompt."""
    groups: list[list[_Turn]] = [[turns[0]]]
    boundary_errors: dict[int, list[str]] = {}
    rewritten = False
    for previous, turn in zip(turns, turns[1:]):
        if is_token_prefix(previous.full_ids, turn.prompt_ids):
            groups[-1].append(turn)
            continue
        if turn.prompt_text.startswith(previous.full_text):
            problem = (
                f"messages[{turn.index}]: encode(conversation through messages[{previous.index}]) is not a prefix of "
                f"encode(next prompt): tokens merge across the turn boundary at "
                f"{first_difference(tokenizer, previous.full_ids, turn.prompt_ids)}"
            )
            boundary_errors[id(turn)] = [problem]
        else:
            rewritten = True
            if history_rewrite == "error":
                raise DataError(
                    f"{where}: the chat template rewrites history (messages[{previous.index}] renders differently once "
                    f"later messages follow, e.g. dropped reasoning); set {config_key('data.history_rewrite')}=split to train one sample per turn"
                )
        groups.append([turn])
    return groups, boundary_errors, rewritten


def _special_ids(tokenizer) -> frozenset[int]:
    key = (len(tokenizer), tuple(tokenizer.all_special_ids))
    cached = getattr(tokenizer, "_posttrain_special_ids", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    ids = set(tokenizer.all_special_ids)
    for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(token, "special", False):
            ids.add(token_id)
    result = frozenset(ids)
    try:
        tokenizer._posttrain_special_ids = (key, result)
    except AttributeError:
        pass
    return result


def _reply_span(turn: _Turn, tokenizer, special_ids) -> tuple[int, int, int, str | None, bool]:
    """(start, trained_end, end, consistency problem, has end-of-turn) of one reply in ``full_ids``."""
    problem = None
    if is_token_prefix(turn.prompt_ids, turn.full_ids):
        start = len(turn.prompt_ids)
    else:
        start = common_prefix_length(turn.prompt_ids, turn.full_ids)
        problem = (
            f"messages[{turn.index}]: encode(prompt) is not a prefix of encode(prompt + reply) at "
            f"{first_difference(tokenizer, turn.prompt_ids, turn.full_ids)}"
        )
    end = len(turn.full_ids)
    last_special = next((k for k in range(end - 1, start - 1, -1) if turn.full_ids[k] in special_ids), None)
    if last_special is None:
        return start, end, end, problem, False
    tail = tokenizer.decode(turn.full_ids[last_special + 1 : end]) if last_special + 1 < end else ""
    trained_end = last_special + 1 if not tail.strip() else end
    return start, trained_end, end, problem, True


def _assemble(group: list[_Turn], messages, tokenizer, special_ids, use_weights: bool, line: int, source: str) -> RenderedSample:
    last = group[-1]
    input_ids = list(last.full_ids)
    loss_mask = [0] * len(input_ids)
    weights = [0.0] * len(input_ids) if use_weights else None
    spans: list[Span] = []
    problems: list[str] = []
    untrained_eot: list[int] = []
    position = 0
    previous_message = 0
    for turn in group:
        start, trained_end, end, problem, has_eot = _reply_span(turn, tokenizer, special_ids)
        if problem:
            problems.append(problem)
        if start > position:
            spans.append(Span(position, start, _roles(messages, previous_message, turn.index), previous_message))
        spans.append(Span(start, end, "assistant", turn.index, turn.trained))
        if turn.trained:
            for k in range(start, trained_end):
                loss_mask[k] = 1
            if weights is not None:
                weight = 1.0 if turn.weight is None else turn.weight
                for k in range(start, trained_end):
                    weights[k] = weight
            if not has_eot:
                untrained_eot.append(turn.index)
        position, previous_message = end, turn.index + 1
    return RenderedSample(
        input_ids=input_ids,
        loss_mask=loss_mask,
        weights=weights,
        line=line,
        source=source,
        spans=spans,
        consistency_errors=problems,
        untrained_end_of_turn=untrained_eot,
    )


def _roles(messages, start: int, stop: int) -> str:
    roles: list[str] = []
    for message in messages[start:stop]:
        if not roles or roles[-1] != message["role"]:
            roles.append(message["role"])
    return "+".join(roles) or "template"


def _message_spans(group: list[_Turn], messages, tokenizer, tools, kwargs, where, spans: list[Span]) -> list[Span]:
    """Refine each run of non-assistant messages into one span per message plus the generation
    prompt (best effort: a boundary whose prefix render is not a token prefix of the sample is
    left out, and its message stays merged with the next)."""
    sample_ids = group[-1].full_ids
    refined: list[Span] = []
    for k, span in enumerate(spans):
        if span.role == "assistant":
            refined.append(span)
            continue
        stop = spans[k + 1].message_index  # a prompt span always leads to the reply that follows it
        prefixes = [_apply(tokenizer, messages[: j + 1], tools, False, kwargs, where) for j in range(span.message_index, stop)]
        position, first = span.start, span.message_index
        for j, ids in zip(range(span.message_index, stop), encode_texts(tokenizer, prefixes)):
            if position < len(ids) <= span.end and is_token_prefix(ids, sample_ids):
                refined.append(Span(position, len(ids), _roles(messages, first, j + 1), first))
                position, first = len(ids), j + 1
        if position < span.end:
            if first < stop:
                refined.append(Span(position, span.end, _roles(messages, first, stop), first))
            else:
                refined.append(Span(position, span.end, "generation prompt", None))
    return refined


def _span_end(sample: RenderedSample, message_index: int) -> int:
    for span in sample.spans:
        if span.role == "assistant" and span.message_index == message_index:
            return span.end
    return 0


def _check_tool_rendering(messages, turns: list[_Turn], tokenizer, tools, kwargs, where: str) -> list[str]:
    """Raise DataError when the template drops tool calls, the text beside them, or tool results;
    warn when it ignores ``tools``."""
    for turn in turns:
        calls = messages[turn.index].get("tool_calls")
        if not calls:
            continue
        reply_text = turn.full_text[len(turn.prompt_text):] if turn.full_text.startswith(turn.prompt_text) else turn.full_text
        without_calls = {key: value for key, value in messages[turn.index].items() if key != "tool_calls"}
        bare = _apply(tokenizer, messages[: turn.index] + [without_calls], tools, False, kwargs, where)
        names = [call["function"]["name"] for call in calls]
        missing = [name for name in names if name not in reply_text]
        if bare == turn.full_text or missing:
            raise DataError(
                f"{where}: the chat template drops tool calls (messages[{turn.index}] calls {', '.join(missing or names)}, "
                f"which the rendered text does not contain); pass --chat-template FILE with a template that renders tool_calls"
                + (f", or set {config_key('data.tool_format')}=inline (python tool calls)" if "python" in names else "")
            )
        if messages[turn.index]["content"].strip():
            silent = {**messages[turn.index], "content": ""}
            if _apply(tokenizer, messages[: turn.index] + [silent], tools, False, kwargs, where) == turn.full_text:
                raise DataError(
                    f"{where}: the chat template drops the text beside tool calls (messages[{turn.index}] has content and "
                    f"calls {', '.join(names)}; the rendered text is the same without the content); pass --chat-template "
                    f"FILE with a template that renders both"
                )
    by_index = {turn.index: turn for turn in turns}
    previous_full = ""
    for j, message in enumerate(messages):
        if j in by_index:
            previous_full = by_index[j].full_text
            continue
        if message["role"] != "tool" or not message["content"].strip():
            continue
        next_turn = next((turn for turn in turns if turn.index > j), None)
        if next_turn is None:
            continue  # a trailing tool result is not part of any sample
        text = next_turn.prompt_text
        region = text[len(previous_full):] if text.startswith(previous_full) else text
        content = message["content"].strip()
        # templates print a tool result as is, or JSON-encode it (quotes and newlines escaped)
        if not any(form in region for form in (content, json.dumps(content)[1:-1], json.dumps(content, ensure_ascii=False)[1:-1])):
            raise DataError(
                f"{where}: the chat template drops tool results (messages[{j}], role tool, is not in the rendered text); "
                f"pass --chat-template FILE with a template that renders tool messages"
            )
    warnings = []
    if tools and turns:
        first_prompt = turns[0].prompt_text
        ignored = [tool["function"]["name"] for tool in tools if tool["function"]["name"] not in first_prompt]
        if ignored:
            warnings.append(f"chat template ignores the tools list ({', '.join(ignored)} not rendered)")
    return warnings


# ----------------------------------------------------------------------------- inline tool format
def _inline_run(messages: list[dict[str, Any]], where: str) -> _InlineRun | None:
    """The last turn of ``messages`` (everything after the last user message) as an inline
    python tool turn (``tool_format="inline"``), or None when it calls no tool (the template
    renders it as usual). DataError (one line, naming ``where``) for tool use before the last
    user message, a call to a tool other than ``python`` or without ``code``, tool results
    that do not answer the calls before them, or a turn that does not end with an answer."""
    last_user = max((i for i, message in enumerate(messages) if message["role"] not in ("assistant", "tool")), default=-1)
    for i, message in enumerate(messages[: last_user + 1]):
        if message.get("tool_calls") or message["role"] == "tool":
            raise DataError(f"{where}: tool_format inline supports tool use in the final assistant turn only (messages[{i}])")
    start = last_user + 1
    if not any(message.get("tool_calls") for message in messages[start:]):
        return None
    last = len(messages) - 1
    if messages[last]["role"] != "assistant" or messages[last].get("tool_calls"):
        raise DataError(f"{where}: tool_format inline: the final assistant turn must end with an assistant reply "
                        f"without tool calls (messages[{last}] is {_describe(messages[last])})")
    pieces: list[_InlinePiece] = []
    i = start
    while i < last:
        message = messages[i]
        if message["role"] != "assistant" or not message.get("tool_calls"):
            raise DataError(f"{where}: tool_format inline: messages[{i}] ({_describe(message)}) cannot follow a reply in "
                            f"the final assistant turn; expected an assistant message with tool calls")
        calls = message["tool_calls"]
        results = i + 1
        while results < last and messages[results]["role"] == "tool":
            results += 1
        outputs = _match_tool_results(calls, messages, i, results, where)
        for k, (call, output_index) in enumerate(zip(calls, outputs)):
            name, arguments = call["function"]["name"], call["function"]["arguments"]
            if name != "python":
                raise DataError(f"{where}: tool_format inline renders only the python tool (messages[{i}] calls '{name}')")
            if not isinstance(arguments.get("code"), str):
                raise DataError(f"{where}: tool_format inline: messages[{i}] calls python without a 'code' string argument")
            if not arguments["code"].strip():
                raise DataError(f"{where}: tool_format inline: messages[{i}] calls python with blank code")
            text = call_text(message["content"] if k == 0 else "", arguments["code"])
            if first_closed_block(text) != (arguments["code"], len(text)):  # RL would run other code, or cut it
                raise DataError(f"{where}: tool_format inline: messages[{i}]: the RL turn loop would not read this call "
                                f"as written (its text or code holds a ```python block or a closing ``` of its own)")
            pieces.append(_InlinePiece(text, "call", i))
            pieces.append(_InlinePiece(output_text(messages[output_index]["content"]), "output", output_index))
        i = results
    if first_closed_block(messages[last]["content"]) is not None:
        raise DataError(f"{where}: tool_format inline: the final reply (messages[{last}]) holds a ```python block, "
                        f"which the RL turn loop would run as a tool call")
    pieces.append(_InlinePiece(messages[last]["content"], "final", last))
    return _InlineRun(start, last, pieces)


def _describe(message: dict[str, Any]) -> str:
    return f"{message['role']}" + (" with tool calls" if message.get("tool_calls") else "")


def _match_tool_results(calls: list[dict[str, Any]], messages, caller: int, stop: int, where: str) -> list[int]:
    """Index of the tool message answering each call of ``messages[caller]`` (the tool messages
    ``caller+1..stop-1``): by ``tool_call_id`` when every call and result carries one, in order
    when none does; some ids but not all is refused (order could give a call another's output)."""
    results = list(range(caller + 1, stop))
    if len(results) != len(calls):
        raise DataError(f"{where}: tool_format inline: messages[{caller}] makes {len(calls)} tool call(s) but "
                        f"{len(results)} tool result(s) follow it")
    ids = [call.get("id") for call in calls]
    answered = [messages[j].get("tool_call_id") for j in results]
    if all(value is None for value in ids + answered):
        return results
    if None in ids or None in answered:
        raise DataError(f"{where}: tool_format inline: messages[{caller}]'s calls and their results carry ids only "
                        f"in part; give every call an id and every result its tool_call_id, or none at all")
    by_id = dict(zip(answered, results))
    missing = [call_id for call_id in ids if call_id not in by_id]
    if missing or len(by_id) != len(results):
        raise DataError(f"{where}: tool_format inline: the tool results after messages[{caller}] do not answer its calls "
                        f"one to one by tool_call_id (unanswered: {', '.join(map(str, missing)) or 'none'})")
    return [by_id[call_id] for call_id in ids]


def _end_of_turn_ids(turn: _Turn, special_ids) -> list[int]:
    """The special tokens that close the template's rendering of a reply (``turn.full_ids`` past
    its prompt): the last run of special tokens, which the normal renderer trains as the end of
    turn (``<|im_end|>`` for ChatML templates). Empty when the reply has none."""
    start = common_prefix_length(turn.prompt_ids, turn.full_ids)
    ids = turn.full_ids
    last = next((k for k in range(len(ids) - 1, start - 1, -1) if ids[k] in special_ids), None)
    if last is None:
        return []
    first = last
    while first - 1 >= start and ids[first - 1] in special_ids:
        first -= 1
    return list(ids[first : last + 1])


def _inline_pieces(run: _InlineRun, messages, tokenizer, eot: list[int], run_trained: bool,
                   train_tool_calls: bool) -> list[tuple[list[int], _InlinePiece, bool]]:
    """``(ids, piece, trained)`` of each piece of the inline turn: ``tokenizer.encode(piece)`` on
    its own (as the RL turn loop tokenises what it appends), the final reply followed by the
    template's end-of-turn token(s). Calls are trained with the turn (unless
    ``train_tool_calls`` is off or their message says ``train``), tool outputs never (their
    text is defused with the job's tool results, ``defuse_tool_results``, as RL defuses them)."""
    out = []
    for piece in run.pieces:
        ids = list(tokenizer.encode(piece.text, add_special_tokens=False))
        if piece.kind == "final":
            out.append((ids + eot, piece, run_trained))
        elif piece.kind == "call":
            out.append((ids, piece, bool(messages[piece.message_index].get("train", run_trained and train_tool_calls))))
        else:
            out.append((ids, piece, False))
    return out


def _lay_out_inline(sample: RenderedSample, pieces: list[tuple[list[int], _InlinePiece, bool]], messages,
                    run: _InlineRun, has_eot: bool) -> None:
    """Set the mask, weights, spans and end-of-turn finding of the inline turn at the end of
    ``sample`` piece by piece (``_assemble`` saw it as one reply)."""
    position = len(sample.input_ids) - sum(len(ids) for ids, _, _ in pieces)
    nested: list[Span] = []
    previous_kind = ""
    for ids, piece, trained in pieces:
        weight = messages[piece.message_index].get("weight")
        for k in range(position, position + len(ids)):
            sample.loss_mask[k] = int(trained)
            if sample.weights is not None:
                sample.weights[k] = (1.0 if weight is None else weight) if trained else 0.0
        if piece.kind == "output":
            nested.append(Span(position, position + len(ids), "tool", piece.message_index))
        elif previous_kind == "output":  # the assistant writes on after a tool output
            nested.append(Span(position, position + len(ids), "assistant", piece.message_index, trained))
        previous_kind = piece.kind
        position += len(ids)
    sample.spans.extend(nested)
    final_trained = pieces[-1][2]
    sample.untrained_end_of_turn = [i for i in sample.untrained_end_of_turn if i != run.start]
    if final_trained and not has_eot:
        sample.untrained_end_of_turn.append(run.start)
