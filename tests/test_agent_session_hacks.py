"""A python session (``agent.python_session: true``) against a policy that poisons it.

One cell that ends the interpreter without raising (``os._exit``, an ``atexit`` exit, an exit
only when it is replayed, a self-kill) or that patches what a naive harness would call
(``exec``, ``compile``) must not make later calls report success with their cells never run:
every later error is counted (``tool_errors``, ``agent/tool_errors``) and penalised
(``tool_error_penalty``). The engine is scripted and the sandbox real (tests/test_agent_loop.py
has the helpers).
"""

from __future__ import annotations

import pytest

from posttrain.agent.loop import AgentLimits, run_agent
from posttrain.agent.tools import PythonTool, ToolBox
from posttrain.agent.trajectory import trajectory_metrics, trajectory_record
from posttrain.data import inline
from posttrain.rewards.output import RewardOutput
from posttrain.rollout.base import SamplingParams
from posttrain.eval.prompts import PromptRow
from posttrain.train.rl_samples import RolloutSample
from posttrain.train.rl_scoring import score_groups
from rl_fixtures import scoring
from tests.test_agent_loop import ScriptedEngine, box, chat_prompt, enc  # noqa: F401 (box: a fixture)

REAL_ERRORS = ["1 / 0", "print(undefined_name)", "raise ValueError('wrong')"]
POISONS = {
    "os-exit": "import os\nos._exit(0)",
    "atexit-exit": "import atexit, os\natexit.register(os._exit, 0)\nprint('armed')",
    "exit-only-when-replayed": (  # replayed output goes elsewhere than the caller's pipe
        "import io, os, stat, sys\n"
        "if isinstance(sys.stdout, io.StringIO) or not stat.S_ISFIFO(os.fstat(1).st_mode):\n    os._exit(0)\n"
        "print('armed')"),
    "exit-when-the-harness-says-replay": (
        "import os, sys\nframe = sys._getframe(1)\n"
        "if frame.f_locals.get('index', 0) < frame.f_locals.get('last', 0):\n    os._exit(0)\nprint('armed')"),
    "patched-exec-and-compile": (
        "import builtins\nbuiltins.exec = lambda *a, **k: None\nbuiltins.compile = lambda *a, **k: None\nprint('armed')"),
    "self-kill": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
}



def _run_session(tokenizer, box, cells: list[str]):  # noqa: F811 (box: the fixture imported above)
    cell = lambda code: enc(tokenizer, inline.call_text("", code))  # noqa: E731
    script = [[cell(code)] for code in cells] + [[enc(tokenizer, "42") + [tokenizer.eos_token_id]]]
    (trajectory,) = run_agent(ScriptedEngine(tokenizer, script), [chat_prompt(tokenizer, "6 * 7?")], SamplingParams(),
                              tokenizer=tokenizer, tool_format="inline", toolbox=ToolBox([PythonTool(box, session=True)]),
                              limits=AgentLimits(max_turns=len(cells) + 1, max_tool_calls=len(cells)))
    return trajectory


@pytest.mark.parametrize("poison", list(POISONS), ids=list(POISONS))
def test_a_poisoning_cell_cannot_hide_the_errors_after_it(tokenizer, box, poison):  # noqa: F811
    trajectory = _run_session(tokenizer, box, [POISONS[poison], *REAL_ERRORS, "print(6 * 7)"])
    outputs = [m["content"] for m in trajectory.messages if m["role"] == "tool"]
    poison_failed = not outputs[0].startswith("armed")
    assert poison_failed == (poison in ("os-exit", "self-kill"))  # those end the interpreter at once
    for output in outputs[1:4]:  # each real error is reported as one, from the cell or from its replay
        assert "Error" in output or "error" in output, (poison, output)
    assert trajectory.tool_errors >= len(REAL_ERRORS) + poison_failed
    assert trajectory_metrics([trajectory_record(trajectory)])["agent/tool_errors"] == trajectory.tool_errors
    if poison in ("os-exit", "atexit-exit", "patched-exec-and-compile", "self-kill"):
        assert outputs[4] == "42"  # the session goes on: the last cell really ran
    sample = RolloutSample(row=0, group=0, prompt_ids=[1], response_ids=[2], text="42", finish_reason="stop",
                           trajectory=trajectory_record(trajectory))
    score_groups([[sample]], [PromptRow([1], "6 * 7?", {}, 1)], lambda p, c, m: RewardOutput([1.0] * len(c)),
                 scoring(length_cap=8, overlong_buffer=0, overlong_penalty=0.0, tool_call_bonus=0.1,
                         tool_error_penalty=0.2))
    assert sample.components["tool_error_penalty"] == pytest.approx(-0.2 * trajectory.tool_errors)
    assert sample.reward <= 1.1 - 0.2 * len(REAL_ERRORS) + 1e-9


def test_each_cell_counts_only_when_the_harness_saw_it_return(box):  # noqa: F811
    """The sandbox's own count: printing the harness's line, or exiting 0, is not completing."""
    forged = "print('0 ' + 'f' * 32)\nimport os\nos.write(1, b'1 ' + b'0' * 32 + b'\\n')\nos._exit(0)"
    result = box.run_cells(["x = 1", forged, "print(x)"])
    assert (result.status, result.cells_completed) == ("error", 1)
    result = box.run_cells(["x = 1", "y = x + 1", "print(y)"])
    assert (result.status, result.cells_completed, result.stdout) == ("ok", 3, "2\n")
