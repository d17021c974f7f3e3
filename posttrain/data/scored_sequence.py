"""A response rendered for a scalar-head model (reward model, critic): the tokens of ``prompt +
response`` through the chat template, the same path as SFT rendering (``data.render``), cut
after the score token.

The score token of a rendered conversation is its last trained token (``score_index``):
``data.render`` trains a reply through its end-of-turn special token and never the
whitespace the template writes after it, so this is the end-of-turn token whenever the
template has one (InstructGPT, Ouyang et al. 2022 §3.5, reads the reward there). Tokens after
it are dropped (``render_for_scoring``): they cannot influence the score under causal
attention and only cost compute. Running the model over these sequences is
``models.scalar_head``'s part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from posttrain.data.render import location, render_conversation
from posttrain.errors import DataError


def score_index(loss_mask: Sequence[int]) -> int:
    """Index of the score token: the last trained token of a rendered response.

    >>> score_index([0, 0, 1, 1, 1, 0])
    4
    """
    for index in range(len(loss_mask) - 1, -1, -1):
        if loss_mask[index]:
            return index
    raise ValueError("the rendered sample trains no token: there is no response to score")


@dataclass
class ScoredSequence:
    """A conversation rendered for a scalar-head model: its tokens end at the score token.

    ``loss_mask`` marks the response (the batching code counts it); ``weights`` is None.
    """

    input_ids: list[int]
    loss_mask: list[int]
    line: int = 0
    source: str = ""
    weights: None = None

    @property
    def score_index(self) -> int:
        return len(self.input_ids) - 1


def render_response(
    prompt_messages: list[dict[str, Any]],
    response_messages: list[dict[str, Any]],
    tokenizer: Any,
    *,
    tools: list[dict[str, Any]] | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    line: int = 0,
    source: str = "",
    allow_special_tokens_in_text: bool | Sequence[str] = False,
):
    """``prompt + response`` rendered by the SFT path (``data.render.render_conversation``, the
    last assistant turn trained): a ``RenderedSample`` the data audit can check as it is.

    Raises DataError (naming ``source:line``) when the response does not end with an
    assistant message, the template fails, or text holds a control-token string that
    ``allow_special_tokens_in_text`` does not allow.
    """
    if not response_messages or response_messages[-1]["role"] != "assistant":
        raise DataError(f"{location(source, line)}: a scored response must end with an assistant message")
    messages = list(prompt_messages) + list(response_messages)
    samples = render_conversation(messages, tokenizer, tools=tools, train_on="last_assistant",
                                  line=line, source=source, chat_template_kwargs=chat_template_kwargs,
                                  allow_special_tokens_in_text=allow_special_tokens_in_text)
    return samples[-1]  # the one holding the last assistant turn when the template splits history


def to_scored_sequence(sample: Any) -> ScoredSequence:
    """Cut a rendered sample after its score token (its last trained token)."""
    try:
        end = score_index(sample.loss_mask) + 1
    except ValueError:
        raise DataError(f"{location(sample.source, sample.line)}: the response renders to no trained token, "
                        "so there is nothing to score") from None
    return ScoredSequence(input_ids=list(sample.input_ids[:end]), loss_mask=list(sample.loss_mask[:end]),
                          line=sample.line, source=sample.source)


def render_for_scoring(
    prompt_messages: list[dict[str, Any]],
    response_messages: list[dict[str, Any]],
    tokenizer: Any,
    *,
    tools: list[dict[str, Any]] | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    line: int = 0,
    source: str = "",
    strict: bool = True,
    allow_special_tokens_in_text: bool | Sequence[str] = False,
) -> ScoredSequence:
    """Render ``prompt + response`` with the chat template and cut it after the score token.

    The same path as SFT rendering, so the reward model sees exactly the tokens a policy
    produced and was trained on. ``strict`` raises DataError (naming ``source:line``) when
    the template's rendering is inconsistent (encode(prompt) not a prefix of
    encode(prompt + reply)) or when the reply has no end-of-turn token to read the score
    at; ``strict=False`` (scoring, not training) scores the tokens the template produces,
    at the reply's last token. (The trainer audits whole files with ``data.audit`` instead.)
    """
    sample = render_response(prompt_messages, response_messages, tokenizer, tools=tools,
                             chat_template_kwargs=chat_template_kwargs, line=line, source=source,
                             allow_special_tokens_in_text=allow_special_tokens_in_text)
    where = location(source, line)
    if strict and sample.consistency_errors:
        raise DataError(f"{where}: {sample.consistency_errors[0]}")
    if strict and sample.untrained_end_of_turn:
        raise DataError(f"{where}: the reply has no end-of-turn token in its rendering, so there is no token to "
                        f"read its score at")
    return to_scored_sequence(sample)
