"""Plug-ins like rewards: ``agent.tools`` and ``agent.environment`` accept ``file.py:name`` and
``module:name`` through the resolver ``reward:`` uses (posttrain/plugins.py), module paths
resolve from the working directory without PYTHONPATH, and a bad path is one line naming the
key. The example environment (examples/environments/calculator_env.py) runs through the turn
loop in both tool formats, with a scripted engine and with a tiny model built from a config."""

from __future__ import annotations

import copy
import sys
import textwrap
from pathlib import Path

import pytest

from posttrain.agent.build import build_agent
from posttrain.agent.loop import AgentLimits, run_agent
from posttrain.agent.tools import ToolBox
from posttrain.agent.trajectory import check_trajectory
from posttrain.config import AgentConfig
from posttrain.errors import ConfigError
from posttrain.rewards.registry import build_reward
from posttrain.rollout.base import Completion, SamplingParams

ROOT = Path(__file__).resolve().parents[1]
CALCULATOR = ROOT / "examples" / "environments" / "calculator_env.py"
TEMPLATE = ROOT / "configs" / "templates" / "smollm2_tools.jinja"
PLUGIN = '''
def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: the first factor
        b: the second factor
    """
    return a * b


def exact(prompts, completions, metadata):
    return [float(c.strip() == m["answer"]) for c, m in zip(completions, metadata)]


class Echo:
    tools = [{"type": "function", "function": {"name": "echo", "parameters": {"type": "object", "properties": {}}}}]

    def reset(self, row):
        return None

    def step(self, calls):
        return "echo", False, 0.0
'''


@pytest.fixture
def plugin_file(tmp_path):
    path = tmp_path / "my_plugins.py"
    path.write_text(PLUGIN)
    return str(path)


def build(**agent) -> object:
    return build_agent(AgentConfig(**agent), tokenizer=None, max_new_tokens=16)


def test_tools_environment_and_reward_accept_the_same_file_path(plugin_file):
    agent = build(tools=[f"{plugin_file}:multiply"], environment=f"{plugin_file}:Echo")
    assert agent.toolbox.tools["multiply"]({"a": 6, "b": 7}) == "42"
    assert [s["function"]["name"] for s in agent.toolbox.schemas()] == ["multiply", "echo"]  # the env's tools announced
    assert build_reward(f"{plugin_file}:exact")(["q", "q"], ["4", "5"], [{"answer": "4"}] * 2).scores == [1.0, 0.0]


def test_module_paths_resolve_from_the_working_directory_without_pythonpath(tmp_path, monkeypatch):
    """As under the ``posttrain`` console script: sys.path[0] is the script's bin/, neither ''
    nor the working directory, and PYTHONPATH is unset."""
    (tmp_path / "cwd_plugins_for_test.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "cwd_plugins_for_test", raising=False)
    agent = build(tools=["cwd_plugins_for_test:multiply"], environment="cwd_plugins_for_test:Echo")
    assert agent.toolbox.tools["multiply"]({"a": 2, "b": 3}) == "6"
    monkeypatch.delitem(sys.modules, "cwd_plugins_for_test")


@pytest.mark.parametrize("agent, key, message", [
    ({"tools": ["missing_dir/nope.py:multiply"]}, "agent.tools.0", "cannot import module 'missing_dir/nope.py'"),
    ({"tools": ["python", "{file}:nope"]}, "agent.tools.1", "has no attribute 'nope'"),
    ({"tools": ["{file}:Echo"]}, "agent.tools.0", "is not a function"),
    ({"tools": ["calculator"]}, "agent.tools.0", "unknown tool 'calculator'"),
    ({"environment": "no_such_module_xyz:Env"}, "agent.environment", "cannot import module 'no_such_module_xyz'"),
    ({"environment": "{file}:multiply"}, "agent.environment", "must be a class with reset(row) and step(calls)"),
    ({"environment": "{file}"}, "agent.environment", "must be 'module:name' or 'file.py:name'"),
    ({"environment": "{broken}:Env"}, "agent.environment", "SyntaxError"),
])
def test_a_bad_plugin_path_is_one_line_naming_the_key(plugin_file, tmp_path, agent, key, message):
    broken = tmp_path / "broken_plugin.py"
    broken.write_text("def oops(:\n")
    agent = {k: [s.format(file=plugin_file) for s in v] if isinstance(v, list) else v.format(file=plugin_file,
                                                                                              broken=broken)
             for k, v in agent.items()}
    with pytest.raises(ConfigError) as error:
        build(**agent)
    text = str(error.value)
    assert text.startswith(f"{key}: ") and message in text and "\n" not in text


def test_a_bad_reward_path_fails_the_same_way(plugin_file):
    with pytest.raises(ConfigError, match=r"^reward\.name: module '.*my_plugins\.py' has no attribute 'nope'"):
        build_reward(f"{plugin_file}:nope")
    with pytest.raises(ConfigError, match=r"^reward\.name: cannot import module 'absent_dir/x\.py'"):
        build_reward("absent_dir/x.py:f")


# ----------------------------------------------------------------- the example environment


class ScriptedEngine:
    """Answers generate call k with ``replies[k]`` (one text per prompt), each ended by EOS."""

    def __init__(self, tokenizer, replies: list[list[str]]):
        self.tokenizer, self.replies, self.inputs = tokenizer, list(replies), []

    def generate(self, prompt_ids, params: SamplingParams) -> list[Completion]:
        self.inputs.append([list(p) for p in prompt_ids])
        out = []
        for index, text in enumerate(self.replies.pop(0)):
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            stopped = next((s for s in params.stop if s in text), None)
            if stopped is None:
                ids.append(self.tokenizer.eos_token_id)
            out.append(Completion(index, ids, text, "stop", [-0.5] * len(ids)))
        return out


def test_calculator_environment_inline_through_the_turn_loop(tokenizer):
    agent = build(environment=f"{CALCULATOR}:CalculatorEnv")
    agent.tokenizer = tokenizer
    row = {"messages": [{"role": "user", "content": "What is 56 * (12 - 86)?"}], "answer": "-4144"}
    prompt = agent.prompt(row["messages"], None, row, "row 1")
    engine = ScriptedEngine(tokenizer, [["```python\nx = 56 * (12 - 86)\nprint(x)\n```"], ["The answer is -4144."]])
    (trajectory,) = agent.run(engine, [prompt], SamplingParams(max_new_tokens=48))
    check_trajectory(trajectory)
    assert [s.kind for s in trajectory.segments] == ["prompt", "sampled", "env", "sampled"]
    assert tokenizer.decode(trajectory.segments[2].token_ids) == "<output>\n-4144\n</output>\n"
    assert trajectory.final_text == "The answer is -4144." and trajectory.answer_from_tool
    assert (trajectory.tool_calls, trajectory.tool_errors, trajectory.env_reward) == (1, 0, 0.0)


def test_calculator_environment_chat_template_announces_its_tool_and_penalises_errors(tokenizer):
    qwen = copy.deepcopy(tokenizer)
    qwen.chat_template = TEMPLATE.read_text()
    agent = build(environment=f"{CALCULATOR}:CalculatorEnv", tool_format="chat_template")
    agent.tokenizer = qwen
    messages = [{"role": "user", "content": "Round 17 / 6 to two decimals."}]
    prompt = agent.prompt(messages, None, {"answer": "2.83"}, "row 1")
    assert '"name": "calculate"' in qwen.decode(prompt.prompt_ids)  # the environment's tools, in the system turn
    call = '<tool_call>\n{{"name": "calculate", "arguments": {{"expression": "{e}"}}}}\n</tool_call>'
    engine = ScriptedEngine(qwen, [[call.format(e="import os")], [call.format(e="round(17 / 6, 2)")], ["It is 2.83."]])
    (trajectory,) = run_agent(engine, [prompt], SamplingParams(max_new_tokens=48), tokenizer=qwen,
                              tool_format="chat_template", toolbox=agent.toolbox, limits=AgentLimits(max_turns=3),
                              environment=f"{CALCULATOR}:CalculatorEnv")
    check_trajectory(trajectory)
    tool_outputs = [m["content"] for m in trajectory.messages if m["role"] == "tool"]
    assert tool_outputs == ["error: invalid syntax (<unknown>, line 1)", "2.83"]
    # an error the environment reports in its observation is its own business: only malformed
    # calls and exceptions raised by step count as tool errors (docs/AGENTIC.md)
    assert trajectory.turn_rewards == [-0.1, 0.0] and trajectory.env_reward == -0.1 and trajectory.tool_errors == 0
    assert trajectory.final_text == "It is 2.83." and trajectory.finish_reason == "stop"


def test_calculator_environment_with_a_tiny_model_from_a_config(tiny_model, tokenizer):
    """End to end with a real (random) model: the config's file path, one instance per
    trajectory, the segment invariant on whatever the model wrote."""
    from posttrain.rollout.hf import HFEngine

    agent = build_agent(AgentConfig(environment=f"{CALCULATOR}:CalculatorEnv", max_turns=2, max_total_tokens=64),
                        tokenizer, max_new_tokens=16)
    rows = [{"messages": [{"role": "user", "content": f"What is {a} - 900?"}], "answer": str(a - 900)} for a in (12, 34)]
    prompts = [agent.prompt(r["messages"], None, r, f"row {i}") for i, r in enumerate(rows)]
    trajectories = agent.run(HFEngine(tiny_model.eval(), tokenizer), prompts,
                             SamplingParams(n=2, temperature=1.0, max_new_tokens=16, seed=0))
    assert len(trajectories) == 4 and sorted(t.prompt_index for t in trajectories) == [0, 0, 1, 1]
    for trajectory in trajectories:
        check_trajectory(trajectory)
        assert trajectory.finish_reason in ("stop", "length", "max_turns", "max_tool_calls")
        assert sum(trajectory.response_mask) == sum(len(s.token_ids) for s in trajectory.segments if s.kind == "sampled")


def test_environment_schemas_must_be_function_schemas(tmp_path):
    bad = tmp_path / "bad_env.py"
    bad.write_text(textwrap.dedent("""
        class Env:
            tools = ["calculate"]
            def reset(self, row): return None
            def step(self, calls): return "", False, 0.0
    """))
    with pytest.raises(ConfigError, match=r"^agent\.environment: Env\.tools must be a list of OpenAI function schemas"):
        build(environment=f"{bad}:Env")
    assert ToolBox([], [{"type": "function", "function": {"name": "f"}}]).schemas()[0]["function"]["name"] == "f"



def test_docstring_examples_of_the_resolver_the_tools_and_the_example_environment():
    import doctest

    from posttrain import plugins
    from posttrain.agent import tools

    calculator = plugins.import_module_path(str(CALCULATOR))
    for module in (plugins, tools, calculator):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__
