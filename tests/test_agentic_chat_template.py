"""The chat-template agentic demo (configs/agentic_chat_template.yaml): the config loads as a
pipeline and mirrors the inline quickstart's same-form set and controls, its shipped template
(configs/templates/smollm2_tools.jinja) renders a Hermes tool call on SmolLM2's own special
tokens and is append-only for tool turns, the SFT rows pass the mask audit (`posttrain
inspect`'s checks) with the tool call trained and the tool response not, and a trained
prompt is token for token the prompt the agent renders at RL and eval time."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from posttrain.agent.build import build_agent
from posttrain.agent.loop import chat_env_text
from posttrain.agent.tools import PYTHON_SCHEMA
from posttrain.config import PipelineConfig, read_config_file, validate_config
from posttrain.data.audit import load_sft_data, preflight
from posttrain.inspect_data import inspect_config

ROOT = Path(__file__).resolve().parents[1]
CHAT = ROOT / "configs" / "agentic_chat_template.yaml"
INLINE = ROOT / "configs" / "agentic_quickstart.yaml"
TEMPLATE = ROOT / "configs" / "templates" / "smollm2_tools.jinja"


@pytest.fixture(scope="module")
def tools_tokenizer(tokenizer):
    clone = copy.deepcopy(tokenizer)
    clone.chat_template = TEMPLATE.read_text()
    return clone


def pipeline(path: Path) -> PipelineConfig:
    return validate_config(PipelineConfig, read_config_file(path), str(path))


def test_the_config_loads_and_mirrors_the_inline_demo(monkeypatch):
    monkeypatch.chdir(ROOT)
    chat, inline = pipeline(CHAT), pipeline(INLINE)
    assert chat.model.chat_template == "configs/templates/smollm2_tools.jinja" and inline.model.chat_template is None
    assert chat.rl.agent.tool_format == "chat_template" and chat.sft.data.tool_format == "chat_template"
    labels = lambda config: [(t.label, t.path) for t in config.eval.tasks]  # noqa: E731
    # the same-form set and the same controls; the other-form sets are the inline demo's to measure
    assert labels(chat) == [(label, path) for label, path in labels(inline) if not label.startswith("heldout_")]
    assert [label for label, _ in labels(chat)] == ["arith_tool", "arith_no_tool", "subtraction", "chat_ppl"]
    for task in chat.eval.tasks:
        assert (task.agent is not None and task.agent.enabled) == (task.label.startswith(("arith_tool", "heldout_")))
        if task.agent is not None and task.agent.enabled:
            assert task.agent.tool_format == "chat_template"
        assert (ROOT / task.path).is_file()
    assert chat.rl.data.train == inline.rl.data.train and chat.rl.rl.prompts_per_step == inline.rl.rl.prompts_per_step


def test_without_tools_the_template_renders_what_smollm2s_renders(tokenizer, tools_tokenizer):
    for messages in ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]):
        for generation_prompt in (False, True):
            assert (tools_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
                    == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt))


def test_the_template_renders_a_tool_call_and_is_append_only(tools_tokenizer):
    call = {"type": "function", "id": "call_0", "function": {"name": "python", "arguments": {"code": "print(-56 * 74)"}}}
    messages = [{"role": "user", "content": "What is -56 * 74?"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    text = tools_tokenizer.apply_chat_template(messages, tools=[PYTHON_SCHEMA], tokenize=False)
    assert '<tools>\n{"type": "function", "function": {"name": "python"' in text
    assert text.endswith('<|im_start|>assistant\n<tool_call>\n{"name": "python", "arguments": {"code": "print(-56 * 74)"}}'
                         '\n</tool_call><|im_end|>\n')
    tool = [{"role": "tool", "name": "python", "tool_call_id": "call_0", "content": "-4144"}]
    env = chat_env_text(tools_tokenizer, messages, tool, [PYTHON_SCHEMA], "<|im_end|>")
    assert env == "\n<|im_start|>user\n<tool_response>\n-4144\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    assert tools_tokenizer.convert_tokens_to_ids("<|im_end|>") == tools_tokenizer.eos_token_id  # SmolLM2's own token


def test_the_sft_rows_pass_the_mask_audit_with_calls_trained_and_responses_not(monkeypatch, tools_tokenizer):
    monkeypatch.chdir(ROOT)
    target = inspect_config(str(CHAT), ["data.limit=24"])
    assert target.kind == "sft" and target.config.data.tool_format == "chat_template"
    assert target.config.model.chat_template == "configs/templates/smollm2_tools.jinja"
    prepared = load_sft_data(target.config.data.train, tools_tokenizer, target.config.data)
    preflight(prepared, print_fn=None)  # raises on a hard error: consistency, untrained end of turn, empty mask
    assert prepared.audit.samples == 24 and not prepared.audit.truncated and not prepared.audit.hard_errors
    tool_rows = 0
    for sample in prepared.samples:
        trained = tools_tokenizer.decode([i for i, m in zip(sample.input_ids, sample.loss_mask) if m])
        untrained = tools_tokenizer.decode([i for i, m in zip(sample.input_ids, sample.loss_mask) if not m])
        assert "<|im_end|>" in trained and "# Tools" not in trained
        if "<tool_response>" in tools_tokenizer.decode(sample.input_ids):  # a tool row (the system turn names <tool_call>)
            tool_rows += 1
            assert '<tool_call>\n{"name": "python", "arguments": {"code": ' in trained
            assert "<tool_response>" in untrained and "<tool_response>" not in trained
            assert "The answer is " in trained
    assert tool_rows >= 12


def test_a_trained_prompt_is_the_prompt_the_agent_renders(monkeypatch, tools_tokenizer):
    monkeypatch.chdir(ROOT)
    chat = pipeline(CHAT)
    target = inspect_config(str(CHAT), ["data.limit=8"])
    prepared = load_sft_data(target.config.data.train, tools_tokenizer, target.config.data)
    agent = build_agent(chat.rl.agent, tools_tokenizer, max_new_tokens=64)
    rows = [json.loads(line) for line in (ROOT / target.config.data.train).read_text().splitlines()[:8]]
    checked = 0
    for sample, row in zip(prepared.samples, rows):
        if not row.get("tools"):
            continue
        prompt = agent.prompt(row["messages"][:1], None, {}, "row").prompt_ids
        assert sample.input_ids[: len(prompt)] == prompt, tools_tokenizer.decode(sample.input_ids[: len(prompt)])
        checked += 1
    assert checked >= 4
