"""The wrong-copy rate: among trajectories whose last tool output printed the right answer, the
share whose final answer is not that value (agent.trajectory.wrong_copy, trajectory_metrics).
Computed by hand on four scripted trajectories and read back from `posttrain eval`'s task
metrics and from RL's eval metric names (eval.generate.trainer_metrics)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.agent.trajectory import trajectory_metrics, wrong_copy
from posttrain.rollout.base import Completion, SamplingParams

ROOT = Path(__file__).resolve().parents[1]
CALCULATOR = ROOT / "examples" / "environments" / "calculator_env.py"

# question -> (the python block the model writes, its final answer); the calculator environment
# prints what the block prints
SCRIPT = {
    "What is 56 * (12 - 86)?": ("print(56 * (12 - 86))", "The answer is 4144."),  # printed -4144, sign dropped: wrong copy
    "What is 783 - 47 * 28?": ("print(783 - 47 * 28)", "The answer is -533."),  # printed -533, copied
    "What is 19 * 35 + 681?": ("print(19 * 35 - 681)", "The answer is -16."),  # printed the wrong value: not counted
    "What is 75 - 30?": (None, "The answer is 45."),  # no tool call: not counted
}
ANSWERS = {"What is 56 * (12 - 86)?": "-4144", "What is 783 - 47 * 28?": "-533", "What is 19 * 35 + 681?": "1346",
           "What is 75 - 30?": "45"}


class ScriptedEngine:
    """First turn: the question's python block (or its direct answer); after an output: its answer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_ids = {tokenizer.eos_token_id}

    def generate(self, prompt_ids, params):
        out = []
        for index, ids in enumerate(prompt_ids):
            text = self.tokenizer.decode(ids)
            question = next(q for q in SCRIPT if q in text)
            code, answer = SCRIPT[question]
            if code is None or "<output>" in text:
                tokens = self.tokenizer.encode(answer, add_special_tokens=False) + [self.tokenizer.eos_token_id]
            else:
                reply = f"```python\n{code}\n```\n"
                tokens = self.tokenizer.encode(reply, add_special_tokens=False)
            for _ in range(params.n):
                out.append(Completion(index, tokens, self.tokenizer.decode(tokens, skip_special_tokens=True), "stop"))
        return out


def test_wrong_copy_by_hand():
    assert wrong_copy("The answer is 4144.", "-4144", "-4144") is True  # the sign dropped
    assert wrong_copy("The answer is -4,144.", "-4144", "-4144") is False  # the same value, written with a comma
    assert wrong_copy("\\boxed{2.83}", "2.83", "2.83") is False
    assert wrong_copy("I am not sure.", "-4144", "-4144") is True  # the right value printed, no answer given
    assert wrong_copy("The answer is 13.", "13", "12") is None  # the tool printed a wrong value
    assert wrong_copy("The answer is 12.", None, "12") is None  # no tool output read
    assert wrong_copy("The answer is 12.", "error: NameError: x", "12") is None


def test_the_rate_is_over_trajectories_whose_tool_printed_the_answer_only():
    base = {"turns": 2, "tool_calls": 1, "tool_errors": 0, "tool_seconds": 0.0, "env_tokens": 3, "finish_reason": "stop"}
    records = [{**base, "final_text": final, "last_tool_output": output} for final, output in
               [("4144", "-4144"), ("-4144", "-4144"), ("-4144", "-4144"), ("7", "8"), ("7", None)]]
    metrics = trajectory_metrics(records, answers=["-4144", "-4144", "-4144", "7", "7"])
    # 3 of 5 printed the answer; 1 of those 3 did not copy it
    assert metrics["agent/tool_printed_right_rate"] == pytest.approx(3 / 5)
    assert metrics["agent/wrong_copy_rate"] == pytest.approx(1 / 3)
    assert "agent/wrong_copy_rate" not in trajectory_metrics(records)  # no reference answers: not computed
    assert trajectory_metrics(records[3:], answers=["7", "7"])["agent/wrong_copy_rate"] == 0.0  # none qualifies
    with pytest.raises(ValueError, match="2 answers for 5 trajectories"):
        trajectory_metrics(records, answers=["1", "2"])


def test_posttrain_eval_and_rl_eval_report_the_wrong_copy_rate(tokenizer, tmp_path):
    from posttrain.config import EvalConfig, validate_config
    from posttrain.eval.generate import trainer_metrics
    from posttrain.eval.runner import build_tasks, evaluate_task

    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}], "answer": a}) + "\n"
                            for q, a in ANSWERS.items()))
    config = validate_config(EvalConfig, {"tasks": [{"name": "jsonl", "path": str(data), "reward": "math", "label": "calc",
                                                     "agent": {"environment": f"{CALCULATOR}:CalculatorEnv"}}]})
    (task,) = build_tasks(config)
    result = evaluate_task(ScriptedEngine(tokenizer), tokenizer, task,
                           SamplingParams(n=1, temperature=0.0, max_new_tokens=32))
    metrics = result.metrics
    assert metrics["accuracy"] == pytest.approx(2 / 4)  # -533 and the direct 45
    assert metrics["agent/tool_call_rate"] == pytest.approx(3 / 4)
    assert metrics["agent/tool_printed_right_rate"] == pytest.approx(2 / 4)  # -4144 and -533 were printed
    assert metrics["agent/wrong_copy_rate"] == pytest.approx(1 / 2)  # 4144 for -4144
    outputs = {s["trajectory"]["last_tool_output"] for s in result.samples}
    assert outputs == {"-4144", "-533", "-16", None}
    rl_names = trainer_metrics(metrics)
    assert rl_names["eval/agent/wrong_copy_rate"] == pytest.approx(1 / 2)
    assert rl_names["eval/agent/tool_printed_right_rate"] == pytest.approx(2 / 4)
    from posttrain.eval.runner import format_table

    table = format_table([result])
    assert "wrong copy" in table.splitlines()[0] and "0.500 of 2" in table  # the printed table of `posttrain eval`
