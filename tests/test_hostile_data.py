"""Rows written to slip past the data refusals: invisible characters, near-identical pairs,
tool results that answer no call, inline trajectories RL would read differently, and reward
weights that poison every score. Each is refused in one line."""

import pytest

from posttrain.data.formats import check_turns, is_blank
from posttrain.data.preference import preference_messages
from posttrain.errors import ConfigError, DataError

CALL = {"id": "a", "type": "function", "function": {"name": "f", "arguments": {}}}


@pytest.mark.parametrize("content", ["\u200b", "\ufeff \u2060", "\u3164", " \u034f\n"])
def test_invisible_replies_are_empty(content):
    assert is_blank(content)
    with pytest.raises(DataError, match=r"messages\[1\]: empty assistant reply"):
        check_turns([{"role": "user", "content": "hi"}, {"role": "assistant", "content": content}], "f.jsonl:1")


@pytest.mark.parametrize("chosen,rejected", [("4", "4\u200b"), ("4 + 4", "4  +  4"), ("caf\u00e9", "cafe\u0301"),
                                             ("a\r\nb", "a\nb")])
def test_pairs_that_read_the_same_are_refused(chosen, rejected):
    with pytest.raises(DataError, match="chosen and rejected are the same response"):
        preference_messages({"prompt": "q", "chosen": chosen, "rejected": rejected}, "p.jsonl:2")


@pytest.mark.parametrize("messages,message", [
    ([{"role": "assistant", "content": "", "tool_calls": [CALL]}, {"role": "tool", "tool_call_id": "zzz", "content": "1"}],
     r"tool_call_id 'zzz' answers no pending call"),
    ([{"role": "assistant", "content": "", "tool_calls": [CALL]}, {"role": "tool", "content": "1"},
      {"role": "tool", "content": "2"}], r"more tool results than messages\[1\] made calls"),
    ([{"role": "assistant", "content": "", "tool_calls": [CALL]}, {"role": "assistant", "content": "ok"}],
     r"messages\[1\]: 1 tool call\(s\) never answered before messages\[2\]"),
])
def test_tool_results_must_answer_the_calls(messages, message):
    with pytest.raises(DataError, match=message):
        check_turns([{"role": "user", "content": "hi"}, *messages, {"role": "assistant", "content": "done"}], "t:1")


def python_call(code, call_id=None):
    call = {"type": "function", "function": {"name": "python", "arguments": {"code": code}}}
    return call | ({"id": call_id} if call_id else {})


@pytest.mark.parametrize("assistant,tools,final,message", [
    ({"content": "", "tool_calls": [python_call("print('```')\n```\nevil")]}, [{"content": "x"}], "ok",
     "the RL turn loop would not read this call as written"),
    ({"content": "see ```python\nprint(9)\n```\n", "tool_calls": [python_call("print(1)")]}, [{"content": "1"}], "ok",
     "the RL turn loop would not read this call as written"),
    ({"content": "", "tool_calls": [python_call(" ")]}, [{"content": ""}], "ok", "calls python with blank code"),
    ({"content": "", "tool_calls": [python_call("print(1)")]}, [{"content": "1"}], "```python\nprint(2)\n```\n",
     "holds a ```python block"),
    ({"content": "", "tool_calls": [python_call("print(1)", "a"), python_call("print(2)")]},
     [{"content": "2", "tool_call_id": "a"}, {"content": "1"}], "ok", "carry ids only in part"),
])
def test_inline_rows_rl_would_read_differently_are_refused(tokenizer, assistant, tools, final, message):
    from posttrain.data.render import render_conversation

    messages = [{"role": "user", "content": "q"}, {"role": "assistant", **assistant},
                *({"role": "tool", **tool} for tool in tools), {"role": "assistant", "content": final}]
    with pytest.raises(DataError, match=message):
        render_conversation(messages, tokenizer, tool_format="inline")


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), True])
def test_composite_weights_must_be_finite_numbers(weight):
    from posttrain.config import RLConfig, validate_config
    from posttrain.rewards.registry import build_reward

    reward = {"name": "composite", "terms": {"math": {"weight": weight}}}
    with pytest.raises(ConfigError, match=r"reward\.terms\.math\.weight"):
        validate_config(RLConfig, {"data": {"train": "p.jsonl"}, "reward": reward})
    with pytest.raises(ConfigError, match=r"reward\.terms\.math\.weight"):
        build_reward(reward)
