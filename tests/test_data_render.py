"""Rendering and loss masks across chat-template families (issue 3 "done when").

For the bundled SmolLM2 template and templates written in the style of other families
(tests/templates: Llama-3 headers, Qwen-style tools, reasoning-stripping), the trained tokens
must decode to exactly each assistant message's content plus its end-of-turn token, and no
system, user or tool token may be trained. Masks are also checked against an independent
character-offset reference.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from posttrain.data.formats import normalise_messages
from posttrain.data.render import render_conversation, render_prompt, truncate_sample
from posttrain.errors import DataError

TEMPLATES = Path(__file__).parent / "templates"
# the pre-tokenizer split of Llama-3 tokenizers (newline runs are one piece wherever they occur)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
EOT = {"bundled": "<|im_end|>", "qwen_tools": "<|im_end|>", "think_strip": "<|im_end|>", "llama3": "<|eot_id|>"}


def with_template(tokenizer, name_or_text: str):
    clone = copy.deepcopy(tokenizer)
    path = TEMPLATES / f"{name_or_text}.jinja"
    clone.chat_template = name_or_text if "{" in name_or_text else path.read_text()
    return clone


def llama3_tokenizer(tokenizer, llama3_pretokenizer: bool = True):
    from tokenizers import Regex, pre_tokenizers

    clone = with_template(tokenizer, "llama3_style")
    if llama3_pretokenizer:
        clone.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    clone.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIALS})
    return clone


@pytest.fixture(scope="module")
def templated(tokenizer):
    return {
        "bundled": tokenizer,
        "qwen_tools": with_template(tokenizer, "qwen_tools"),
        "think_strip": with_template(tokenizer, "think_strip"),
        "llama3": llama3_tokenizer(tokenizer),
    }


CHAT = normalise_messages(
    [
        {"role": "system", "content": "You are a terse math tutor."},
        {"role": "user", "content": "What is 12 * 12?"},
        {"role": "assistant", "content": "12 * 12 = 144."},
        {"role": "user", "content": "And its square root, twice?"},
        {"role": "assistant", "content": "<think>sqrt(144) = 12, doubled is 24.</think>\nTwice the square root is 24."},
    ],
    "chat",
)

WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather now.", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}
TOOL_CHAT = normalise_messages(
    [
        {"role": "system", "content": "Use tools when needed."},
        {"role": "user", "content": "Weather in Oslo and Rome?"},
        {
            "role": "assistant",
            "content": "Checking both.",
            "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
                {"id": "2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
            ],
        },
        {"role": "tool", "tool_call_id": "1", "content": "OSLO: -3C snow"},
        {"role": "tool", "tool_call_id": "2", "content": "ROME: 19C sun"},
        {"role": "assistant", "content": "Oslo is -3C with snow; Rome is 19C and sunny."},
    ],
    "tool_chat",
)


def trained_runs(tokenizer, sample) -> list[str]:
    """Decode each maximal run of trained tokens."""
    runs, current = [], []
    for token, trained in zip(sample.input_ids, sample.loss_mask):
        if trained:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def untrained_text(tokenizer, sample) -> str:
    return tokenizer.decode([t for t, m in zip(sample.input_ids, sample.loss_mask) if not m])


def reference_mask(tokenizer, messages, tools, eot: str) -> list[int]:
    """Independent slow reference: character ranges of (content + end-of-turn) located by rendering
    text prefixes, mapped to tokens through the tokenizer's offset mapping."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    full_text = tokenizer.apply_chat_template(messages[: last + 1], tools=tools, tokenize=False)
    ranges = []
    for i, message in enumerate(messages[: last + 1]):
        if message["role"] != "assistant":
            continue
        prompt_text = tokenizer.apply_chat_template(messages[:i], tools=tools, tokenize=False, add_generation_prompt=True)
        reply_text = tokenizer.apply_chat_template(messages[: i + 1], tools=tools, tokenize=False)
        assert full_text.startswith(reply_text) and reply_text.startswith(prompt_text)
        end = reply_text.rindex(eot) + len(eot)
        ranges.append((len(prompt_text), end))
    encoding = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
    return [int(any(lo <= start < hi for lo, hi in ranges)) for start, _ in encoding["offset_mapping"]]


# ----------------------------------------------------------------------------- plain chat
@pytest.mark.parametrize("family", ["bundled", "llama3", "qwen_tools", "think_strip"])
def test_trained_tokens_are_assistant_contents_plus_end_of_turn(templated, family):
    tokenizer = templated[family]
    (sample,) = render_conversation(CHAT, tokenizer, line=3, source="chat.jsonl")
    assert len(sample.loss_mask) == len(sample.input_ids)
    assert trained_runs(tokenizer, sample) == [CHAT[2]["content"] + EOT[family], CHAT[4]["content"] + EOT[family]]
    rest = untrained_text(tokenizer, sample)
    for message in CHAT[:2] + CHAT[3:4]:  # system and user text is all there, untrained
        assert message["content"] in rest
    assert sample.loss_mask[0] == 0 and sample.consistency_errors == [] and sample.untrained_end_of_turn == []
    assert (sample.line, sample.source, sample.split) == (3, "chat.jsonl", False)


@pytest.mark.parametrize("family", ["bundled", "llama3", "qwen_tools", "think_strip"])
def test_mask_matches_character_offset_reference(templated, family):
    tokenizer = templated[family]
    (sample,) = render_conversation(CHAT, tokenizer)
    assert sample.loss_mask == reference_mask(tokenizer, CHAT, None, EOT[family])


def test_generation_prompt_starts_the_trained_span(templated):
    """RL/eval prompts (render_prompt) are exactly the tokens before the first trained token."""
    for family in ("bundled", "llama3", "qwen_tools"):
        tokenizer = templated[family]
        (sample,) = render_conversation(CHAT, tokenizer)
        first = sample.loss_mask.index(1)
        assert render_prompt(CHAT[:2], tokenizer) == sample.input_ids[:first]
    assert render_prompt("hi", templated["bundled"]) == render_prompt([{"role": "user", "content": "hi"}], templated["bundled"])
    assert render_prompt([{"from": "human", "value": "hi"}], templated["bundled"])[-4:] == templated["bundled"].encode(
        "<|im_start|>assistant\n", add_special_tokens=False
    )


# ----------------------------------------------------------------------------- tools
def expected_qwen_call(name: str, arguments: dict) -> str:
    return '<tool_call>\n{"name": "' + name + '", "arguments": ' + json.dumps(arguments) + "}\n</tool_call>"


def test_qwen_style_tool_conversation(templated):
    tokenizer = templated["qwen_tools"]
    (sample,) = render_conversation(TOOL_CHAT, tokenizer, tools=[WEATHER_TOOL], message_spans=True)
    calls = expected_qwen_call("get_weather", {"city": "Oslo"}) + "\n" + expected_qwen_call("get_weather", {"city": "Rome"})
    assert trained_runs(tokenizer, sample) == [
        "Checking both.\n" + calls + "<|im_end|>",
        TOOL_CHAT[5]["content"] + "<|im_end|>",
    ]
    rest = untrained_text(tokenizer, sample)
    assert "OSLO: -3C snow" in rest and "ROME: 19C sun" in rest and '"description": "Weather now."' in rest
    roles = [span.role for span in sample.spans]
    assert "tool" in roles and all(not span.trained for span in sample.spans if span.role != "assistant")
    assert sample.loss_mask == reference_mask(tokenizer, TOOL_CHAT, [WEATHER_TOOL], "<|im_end|>")


def test_llama3_style_tool_conversation(templated):
    tokenizer = templated["llama3"]
    (sample,) = render_conversation(TOOL_CHAT, tokenizer, tools=[WEATHER_TOOL])
    assert trained_runs(tokenizer, sample) == [
        'Checking both.\n{"name": "get_weather", "parameters": {"city": "Oslo"}}\n{"name": "get_weather", "parameters": {"city": "Rome"}}<|eot_id|>',
        TOOL_CHAT[5]["content"] + "<|eot_id|>",
    ]
    assert "<|start_header_id|>ipython<|end_header_id|>\n\nOSLO: -3C snow<|eot_id|>" in untrained_text(tokenizer, sample)


def test_options_tool_calls_last_turn_train_override_and_weights(templated):
    tokenizer = templated["qwen_tools"]
    (sample,) = render_conversation(TOOL_CHAT, tokenizer, tools=[WEATHER_TOOL], train_tool_calls=False)
    assert trained_runs(tokenizer, sample) == [TOOL_CHAT[5]["content"] + "<|im_end|>"]
    (sample,) = render_conversation(CHAT, tokenizer, train_on="last_assistant")
    assert trained_runs(tokenizer, sample) == [CHAT[4]["content"] + "<|im_end|>"]
    assert sample.weights is None

    messages = copy.deepcopy(CHAT)
    messages[2]["weight"] = 2.5
    messages[4]["train"] = False
    (sample,) = render_conversation(messages, tokenizer)
    assert trained_runs(tokenizer, sample) == [CHAT[2]["content"] + "<|im_end|>"]
    assert sorted(set(sample.weights)) == [0.0, 2.5]
    assert [w > 0 for w in sample.weights] == [bool(m) for m in sample.loss_mask]

    messages = copy.deepcopy(CHAT)
    messages[2]["train"] = True
    messages[4]["weight"] = 0.5
    (sample,) = render_conversation(messages, tokenizer, train_on="last_assistant")
    assert len(trained_runs(tokenizer, sample)) == 2
    trained_weights = [w for w, m in zip(sample.weights, sample.loss_mask) if m]
    assert set(trained_weights) == {1.0, 0.5}


def test_bundled_template_drops_tool_calls(templated):
    with pytest.raises(DataError, match=r"^tools\.jsonl:4: the chat template drops tool calls \(messages\[2\] calls get_weather"):
        render_conversation(TOOL_CHAT, templated["bundled"], tools=[WEATHER_TOOL], line=4, source="tools.jsonl")


def test_template_dropping_tool_results_is_refused(templated):
    only_chat = (
        "{% for m in messages %}{% if m.role != 'tool' %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "{% for c in m.tool_calls or [] %}<call>{{ c.function.name }}{{ c.function.arguments | tojson }}</call>{% endfor %}"
        "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(DataError, match=r"^t\.jsonl:9: the chat template drops tool results \(messages\[3\]"):
        render_conversation(TOOL_CHAT, with_template(templated["bundled"], only_chat), line=9, source="t.jsonl")


def test_template_ignoring_tools_list_warns(templated):
    (sample,) = render_conversation(CHAT, templated["bundled"], tools=[WEATHER_TOOL])
    assert any("ignores the tools list (get_weather" in warning for warning in sample.warnings)
    (sample,) = render_conversation(CHAT, templated["qwen_tools"], tools=[WEATHER_TOOL])
    assert sample.warnings == []


# ----------------------------------------------------------------------------- history rewriting
def test_history_rewriting_template_is_split_per_turn(templated):
    tokenizer = templated["think_strip"]
    messages = copy.deepcopy(CHAT)
    messages[2]["content"] = "<think>12 times 12.</think>\n12 * 12 = 144."
    first, second = render_conversation(messages, tokenizer, line=7, source="r.jsonl")
    assert first.split and second.split
    assert trained_runs(tokenizer, first) == [messages[2]["content"] + "<|im_end|>"]
    assert trained_runs(tokenizer, second) == [messages[4]["content"] + "<|im_end|>"]
    context = untrained_text(tokenizer, second)
    assert "<|im_start|>assistant\n12 * 12 = 144.<|im_end|>" in context and "12 times 12" not in context
    assert any("rewrites history" in warning for warning in first.warnings)
    with pytest.raises(DataError, match=r"^r\.jsonl:7: the chat template rewrites history \(messages\[2\]"):
        render_conversation(messages, tokenizer, line=7, source="r.jsonl", history_rewrite="error")
    (only_last,) = render_conversation(messages, tokenizer, train_on="last_assistant")
    assert only_last.input_ids == second.input_ids and only_last.loss_mask == second.loss_mask


# ----------------------------------------------------------------------------- consistency checks
def test_prompt_and_reply_tokens_that_merge_are_a_consistency_failure(templated):
    """Llama-3 headers with a GPT-2-style pre-tokenizer: the generation prompt's trailing "\\n\\n" is one
    token alone but two tokens before the reply - encode(messages) != prompt_ids + reply_ids."""
    tokenizer = llama3_tokenizer(templated["bundled"], llama3_pretokenizer=False)
    (sample,) = render_conversation(CHAT, tokenizer)
    assert len(sample.consistency_errors) == 2
    assert "messages[2]: encode(prompt) is not a prefix of encode(prompt + reply)" in sample.consistency_errors[0]
    assert "'\\n\\n'" in sample.consistency_errors[0] and "'\\n'" in sample.consistency_errors[0]


def test_trailing_space_generation_prompt_is_a_consistency_failure(templated):
    template = (
        "{% for m in messages %}{{ m.role }}: {{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    (sample,) = render_conversation(CHAT, with_template(templated["bundled"], template))
    assert sample.consistency_errors and "' '" in sample.consistency_errors[0]


def test_reply_without_end_of_turn_token_is_reported(templated):
    template = "{% for m in messages %}### {{ m.role }}\n{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}### assistant\n{% endif %}"
    (sample,) = render_conversation(CHAT, with_template(templated["bundled"], template))
    assert sample.untrained_end_of_turn == [2, 4]


def test_boundary_merge_between_turns_splits_and_reports(templated):
    """A reply ending in "\n\n" is one token at the end of its own render but two once the next
    message follows: the history is a text prefix of the next prompt, not a token prefix."""
    template = "{% for m in messages %}{{ m.content }}{% if m.role == 'user' %}<|im_end|>{% endif %}{% endfor %}"
    messages = normalise_messages(
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x\n\n"}, {"role": "user", "content": "b"},
         {"role": "assistant", "content": "y"}],
        "m",
    )
    tokenizer = with_template(templated["bundled"], template)
    first, second = render_conversation(messages, tokenizer)
    assert first.consistency_errors == [] and first.split
    assert len(second.consistency_errors) == 1
    assert "messages[3]: encode(conversation through messages[1]) is not a prefix of encode(next prompt)" in second.consistency_errors[0]
    assert "tokens merge across the turn boundary at token 3: '\\n\\n'" in second.consistency_errors[0]


# ----------------------------------------------------------------------------- misc
def test_truncation_clips_and_keeps_alignment(templated):
    (sample,) = render_conversation(CHAT, templated["bundled"])
    cut = truncate_sample(sample, 30)
    assert cut.truncated and len(cut.input_ids) == len(cut.loss_mask) == 30
    assert cut.input_ids == sample.input_ids[:30] and cut.loss_mask == sample.loss_mask[:30]
    assert all(span.end <= 30 for span in cut.spans)
    assert truncate_sample(sample, 10_000) is sample


def test_rows_that_cannot_be_rendered(templated):
    with pytest.raises(DataError, match="no assistant turn"):
        render_conversation(CHAT[:2], templated["bundled"])
    with pytest.raises(DataError, match="starts with an assistant message"):
        render_conversation(CHAT[2:3], templated["bundled"])
    broken = with_template(templated["bundled"], "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(DataError, match=r"^x:2: the chat template failed on messages 1-2: .*roles must alternate"):
        render_conversation(CHAT, broken, line=2, source="x")
    messages = copy.deepcopy(CHAT)
    messages[2]["train"] = messages[4]["train"] = False
    (sample,) = render_conversation(messages, templated["bundled"])
    assert sum(sample.loss_mask) == 0  # kept, so that the audit reports the empty mask


# ----------------------------------------------------------------------------- fast tokenisation path
TRICKY_TEXTS = [
    "",
    "<|im_end|><|im_end|>",
    " <|im_start|> x ",
    "\n\n<|im_end|>\n\n",
    "héllo 世界 🙂<|im_end|>é",
    "<|im_start",
    "<|im_end|>abc<|eot_id|>def<|start_header_id|>",
    "  leading and trailing  ",
    "12345678 9.75",
    "<|endoftext|><|im_start|>assistant\n",
    "a<|im_end|>\n\nb<|eot_id|>\n\n",
]


def test_chunk_encoder_is_identical_to_the_tokenizer(templated):
    """The fast path (pieces shared between prefixes tokenised once) against the tokenizer itself."""
    from posttrain.data.render import ChunkEncoder, encode_texts

    families = dict(templated, llama3_gpt2_split=llama3_tokenizer(templated["bundled"], llama3_pretokenizer=False))
    for name, tokenizer in families.items():
        assert ChunkEncoder.for_tokenizer(tokenizer) is not None, name
        texts = list(TRICKY_TEXTS)
        for messages, tools in ((CHAT, None), (TOOL_CHAT, [WEATHER_TOOL])):
            if name in ("bundled", "think_strip") and tools:
                continue
            for i in range(1, len(messages) + 1):
                texts.append(tokenizer.apply_chat_template(messages[:i], tools=tools, tokenize=False))
                texts.append(tokenizer.apply_chat_template(messages[:i], tools=tools, tokenize=False, add_generation_prompt=True))
        assert encode_texts(tokenizer, texts) == encode_texts(tokenizer, texts, fast=False), name


def test_chunk_encoder_refuses_tokenizers_that_look_across_chunks(tokenizer):
    from tokenizers import AddedToken, pre_tokenizers

    from posttrain.data.render import ChunkEncoder, encode_texts

    metaspace = copy.deepcopy(tokenizer)
    metaspace.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    stripping = copy.deepcopy(tokenizer)
    stripping.add_tokens([AddedToken("<sep>", lstrip=True, rstrip=True)])
    for clone in (metaspace, stripping):
        assert ChunkEncoder.for_tokenizer(clone) is None
        assert encode_texts(clone, TRICKY_TEXTS + ["a <sep> b"]) == encode_texts(clone, TRICKY_TEXTS + ["a <sep> b"], fast=False)
    assert ChunkEncoder.for_tokenizer(tokenizer) is not None


def test_json_encoded_tool_results_are_not_mistaken_for_dropped(templated):
    """A template that writes tool results with tojson (quotes escaped) still renders them."""
    template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'tool' %}{{ m.content | tojson }}{% else %}{{ m.content }}"
        "{% for c in m.tool_calls or [] %}<call>{{ c.function.name }}</call>{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    messages = copy.deepcopy(TOOL_CHAT)
    messages[3]["content"] = '{"city": "Oslo", "note": "line one\nline two"}'
    (sample,) = render_conversation(messages, with_template(templated["bundled"], template))
    assert trained_runs(templated["bundled"], sample)[-1] == messages[5]["content"] + "<|im_end|>"


# ----------------------------------------------------------------------------- templates that drop content, turn splits, cut end-of-turn
SEARCH_TOOL = {"type": "function", "function": {"name": "search_flights", "parameters": {"type": "object"}}}


def flight_chat(text_beside_call: str):
    return normalise_messages(
        [
            {"role": "user", "content": "Any flights from Lima to Cusco tomorrow morning?"},
            {"role": "assistant", "content": text_beside_call,
             "tool_calls": [{"type": "function", "function": {"name": "search_flights",
                                                              "arguments": {"from": "LIM", "to": "CUZ"}}}]},
            {"role": "tool", "content": "LA2021 06:10, LA2035 08:45"},
            {"role": "assistant", "content": "Two: 06:10 and 08:45."},
        ],
        "flights",
    )


def test_template_dropping_text_beside_tool_calls_is_refused(templated):
    """A Llama-3.1-style template renders an assistant turn that calls a tool as the call alone:
    the words beside the call would silently vanish from training."""
    tokenizer = llama3_tokenizer(templated["bundled"])
    tokenizer.chat_template = (TEMPLATES / "llama3_tool_call_only.jinja").read_text()
    messages = flight_chat("I'll look up the morning departures for you.")
    with pytest.raises(DataError) as info:
        render_conversation(messages, tokenizer, tools=[SEARCH_TOOL], line=12, source="fl.jsonl")
    assert str(info.value) == (
        "fl.jsonl:12: the chat template drops the text beside tool calls (messages[1] has content and calls "
        "search_flights; the rendered text is the same without the content); pass --chat-template FILE with a "
        "template that renders both")
    (sample,) = render_conversation(flight_chat(""), tokenizer, tools=[SEARCH_TOOL])  # nothing beside the call: fine
    assert trained_runs(tokenizer, sample)[0] == '{"name": "search_flights", "parameters": {"from": "LIM", "to": "CUZ"}}<|eot_id|>'
    (sample,) = render_conversation(messages, llama3_tokenizer(templated["bundled"]), tools=[SEARCH_TOOL])
    assert trained_runs(tokenizer, sample)[0].startswith("I'll look up the morning departures for you.\n{")


def test_truncation_that_cuts_the_end_of_turn_is_recorded(templated):
    tokenizer = templated["bundled"]
    (sample,) = render_conversation(CHAT, tokenizer)
    replies = {span.message_index: span for span in sample.spans if span.role == "assistant"}
    first_eot = max(k for k in range(replies[2].start, replies[2].end) if sample.loss_mask[k])
    assert truncate_sample(sample, first_eot).cut_end_of_turn == [2]  # cut inside the first reply
    assert truncate_sample(sample, first_eot + 1).cut_end_of_turn == []  # its end-of-turn kept, the next reply cut off whole
    assert truncate_sample(sample, replies[4].start + 2).cut_end_of_turn == [4]
    assert truncate_sample(sample, replies[4].end - 1).cut_end_of_turn == []  # only the untrained "\n" after <|im_end|> lost


def test_split_reason_tells_a_token_merge_from_a_history_rewrite(templated):
    merging = with_template(templated["bundled"],
                            "{% for m in messages %}{{ m.content }}{% if m.role == 'user' %}<|im_end|>{% endif %}{% endfor %}")
    messages = normalise_messages(
        [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "first line\n\n"},
         {"role": "user", "content": "q2"}, {"role": "assistant", "content": "second"}], "m")
    samples = render_conversation(messages, merging)
    assert [s.split_reason for s in samples] == ["token merge", "token merge"]
    assert not any("rewrites history" in w for s in samples for w in s.warnings)
    thinking = copy.deepcopy(CHAT)
    thinking[2]["content"] = "<think>square it</think>\n144."
    assert {s.split_reason for s in render_conversation(thinking, templated["think_strip"])} == {"history rewrite"}
    (whole,) = render_conversation(CHAT, templated["bundled"])
    assert whole.split_reason == "" and not whole.split
