"""Multi-turn trajectories in the RL step: only sampled tokens are trained.

A trajectory's response interleaves sampled and env tokens (``RolloutSample.response_mask``).
Checked here: the trainer's log-probs at sampled positions equal a plain full-logits forward
(what an engine reports), in both RL layouts; env positions get exactly zero gradient;
returns run across env tokens as if they were not there; the loss normaliser counts sampled
tokens only; and a whole ``run_rl`` with the python tool writes trajectories to
samples.jsonl whose segments reproduce the trained mask."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.algorithms.policy import PolicyLossOptions
from posttrain.data.batching import collate_shared_prompt
from posttrain.models.attention import choose_attention
from posttrain.models.prepare import prepare_for_training, unwrap_causal_lm
from posttrain.rewards.output import RewardOutput
from posttrain.rollout.base import Completion
from posttrain.train.rl_advantages import compute_advantages
from posttrain.train.rl_layout import pack_micro_batches
from posttrain.train.rl_logprobs import compute_rollout_tensors
from posttrain.train.rl_samples import RolloutSample
from posttrain.train.rl_settings import LossSettings
from posttrain.train.rl_update import policy_micro_loss

from conftest import build_tiny_llama
from rl_fixtures import advantage_settings, layout, loss_settings, normalisers, objective, pass_settings, scoring

PROMPT = [1, 5, 7, 9]
SEGMENTS = [([300, 301, 302], 1), ([400, 401], 0), ([303, 304], 1), ([402], 0), ([305], 1)]  # (ids, sampled?)


def multi_turn_sample(prompt=PROMPT, segments=SEGMENTS, reward=1.0, group=0) -> RolloutSample:
    response = [t for ids, _ in segments for t in ids]
    mask = [sampled for ids, sampled in segments for _ in ids]
    return RolloutSample(row=group, group=group, prompt_ids=list(prompt), response_ids=response, response_mask=mask,
                         text="", finish_reason="stop", reward=reward)


def reference_logprobs(model, sample: RolloutSample) -> torch.Tensor:
    """log p(token) at every SAMPLED response position from one plain forward with full
    logits: what an engine reports for the ids it sampled."""
    ids = torch.tensor([sample.input_ids])
    with torch.no_grad():
        logits = unwrap_causal_lm(model)(input_ids=ids, use_cache=False).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    prompt = len(sample.prompt_ids)
    return torch.tensor([logp[prompt + j - 1, token].item() for j, token in enumerate(sample.response_ids)
                         if sample.response_mask[j]])


@pytest.mark.parametrize("share_prompt", [False, True])
def test_trainer_logprobs_at_sampled_positions_equal_a_full_forward(tokenizer, share_prompt):
    model = build_tiny_llama(tokenizer)
    prepare_for_training(model, attn_implementation=choose_attention(True, None), gradient_checkpointing=False)
    samples = [multi_turn_sample(), multi_turn_sample(segments=[([310], 1), ([410, 411, 412], 0), ([311, 312], 1)])]
    compute_rollout_tensors(samples, pass_settings(chunk_size=4, share_prompt=share_prompt), policy=model,
                            reference=None, critic=None)
    for sample in samples:
        assert sample.old_logp.shape == (sample.trained_length,)
        torch.testing.assert_close(sample.old_logp, reference_logprobs(model, sample), rtol=1e-5, atol=1e-5)


def test_shared_prompt_layout_lists_only_sampled_tokens():
    batch = collate_shared_prompt([([10, 11], [[20, 21, 22], [30]], [[1, 0, 1], None])])
    assert batch.loss_mask.tolist() == [[0, 0, 1, 0, 1, 1]]
    assert batch.predicted.targets.tolist() == [20, 22, 30]  # 21 is an env token
    assert batch.predicted.index.tolist() == [1, 3, 1]


def settings(**overrides) -> LossSettings:
    values = dict(policy_options=PolicyLossOptions(), entropy_coef=0.01, chunk_size=4)
    values.update(overrides)
    return loss_settings(**values)


def test_env_positions_get_exactly_zero_gradient(tokenizer):
    model = build_tiny_llama(tokenizer)
    prepare_for_training(model, attn_implementation=choose_attention(True, None), gradient_checkpointing=False)
    sample = multi_turn_sample()
    sample.advantages = torch.linspace(-1.0, 1.0, sample.trained_length)
    [(chunk, batch)] = pack_micro_batches([sample], layout())
    captured = []
    norm = unwrap_causal_lm(model).get_decoder().norm

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured.append(output)

    handle = norm.register_forward_hook(keep)
    try:
        result = policy_micro_loss(model, (chunk, batch), objective(settings()),
                                   normalisers(sample.trained_length, 1))
        result.loss.backward()
    finally:
        handle.remove()
    assert result.count == sample.trained_length == 6  # the normaliser counts sampled tokens only
    grad_rows = captured[-1].grad[0].abs().sum(-1)  # [T]: gradient reaching each position's final hidden state
    prompt = len(sample.prompt_ids)
    for j, trained in enumerate(sample.response_mask):
        predicting = prompt + j - 1  # the position whose hidden state predicts response token j
        if trained:
            assert grad_rows[predicting] > 0, j
        else:
            assert grad_rows[predicting] == 0, j
    assert grad_rows[prompt + len(sample.response_ids) - 1] == 0  # the last token predicts nothing


def test_returns_run_across_env_tokens_as_if_they_were_not_there():
    """REINFORCE++ with discounting: a trajectory's returns equal those of the single-turn
    sample made of its sampled tokens alone (env tokens neither reset nor discount them)."""
    multi = multi_turn_sample(reward=1.0)
    single = RolloutSample(row=1, group=1, prompt_ids=PROMPT, response_ids=[300, 301, 302, 303, 304, 305], text="",
                           finish_reason="stop", reward=1.0)
    other = RolloutSample(row=2, group=2, prompt_ids=PROMPT, response_ids=[7, 8], text="", finish_reason="stop",
                          reward=0.0)
    compute_advantages([[multi], [single], [other]], advantage_settings("reinforce_pp", gamma=0.9, whiten=True),
                       kl_coef=0.0)
    assert multi.advantages.shape == (6,)
    torch.testing.assert_close(multi.advantages, single.advantages)
    assert multi.advantages[0] < multi.advantages[-1]  # discounted over the 6 sampled tokens, not 9


# ----------------------------------------------------------------------------- a whole run


class ScriptedToolEngine:
    """Writes a python block on the first turn and the answer once it has seen an output.

    The ids are the tokenizer's own; ``generate`` records every input it was given."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_ids = {tokenizer.convert_tokens_to_ids("<|im_end|>")}
        self.inputs: list[list[int]] = []
        self.output_marker = tokenizer.encode("<output>", add_special_tokens=False)

    def _has_output(self, ids: list[int]) -> bool:
        n = len(self.output_marker)
        return any(ids[i:i + n] == self.output_marker for i in range(len(ids) - n + 1))

    def generate(self, prompt_ids, params):
        out = []
        for index, ids in enumerate(prompt_ids):
            for _ in range(params.n):
                self.inputs.append(list(ids))
                if self._has_output(ids):
                    text, tokens = "The answer is 42.", self.tokenizer.encode("The answer is 42.", add_special_tokens=False)
                    tokens = tokens + sorted(self.eos_ids)
                else:
                    text = "```python\nprint(6 * 7)\n```\n"
                    tokens = self.tokenizer.encode(text, add_special_tokens=False)
                out.append(Completion(index, tokens[: params.max_new_tokens], text, "stop"))
        return out

    def update_weights(self, model):
        pass


def answer_42(prompts, completions, metadata):
    scores = [1.0 if c.strip().startswith("The answer is 42") else 0.0 for c in completions]
    return RewardOutput(scores, {"correct": scores})


def test_rl_with_the_python_tool_trains_only_sampled_tokens_and_logs_segments(tiny_model_dir, tokenizer, tmp_path):
    from posttrain.config import RLConfig, validate_config
    from posttrain.sandbox.runner import namespace_available
    from posttrain.train.rl import run_rl

    if not namespace_available():
        pytest.skip("the python tool runs in namespace isolation (needs root on Linux)")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is 6 * {7 + i % 1}?"}],
                                        "answer": "42"}) + "\n" for i in range(4)))
    config = validate_config(RLConfig, {
        "model": {"name": tiny_model_dir}, "data": {"train": str(data)},
        "rollout": {"group_size": 2, "max_new_tokens": 24},
        "agent": {"tools": ["python"], "max_turns": 3, "max_total_tokens": 96},
        "rl": {"prompts_per_step": 2}, "optim": {"lr": 1e-3},
        "train": {"max_steps": 1, "samples_every": 1, "export": False},
        "run": {"output_dir": str(tmp_path), "progress": False, "tensorboard": False},
    })
    engine = ScriptedToolEngine(tokenizer)
    result = run_rl(config, engine=engine, reward_fn=answer_42)
    record = result.history[-1]
    assert record["agent/tool_calls"] == 1.0 and record["agent/turns"] == 2.0 and record["agent/tool_errors"] == 0.0
    assert record["reward/mean"] == 1.0 and record["agent/env_tokens"] > 0
    lines = [json.loads(line) for line in (result.run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    for line in lines:
        segments = line["trajectory"]["segments"]
        assert [s["kind"] for s in segments] == ["prompt", "sampled", "env", "sampled"]
        response = [t for s in segments[1:] for t in s["token_ids"]]
        assert response == line["response_ids"]
        assert tokenizer.decode(segments[2]["token_ids"]) == segments[2]["text"] == "<output>\n42\n</output>\n"
        sampled = tokenizer.decode([t for s in segments if s["kind"] == "sampled" for t in s["token_ids"]])
        assert sampled == "```python\nprint(6 * 7)\n```\nThe answer is 42.<|im_end|>"
        assert line["completion"] == "The answer is 42.<|im_end|>" or line["completion"].startswith("The answer is 42")
    from posttrain.report import load_report, render_html

    page = render_html(load_report(result.run_dir))
    assert "turn by turn" in page and "&lt;output&gt;\n42\n&lt;/output&gt;" in page
    # the second turn's engine input is the first turn's input extended by its segments
    first, second = engine.inputs[0], engine.inputs[-1]
    assert second[: len(first)] == first and len(second) > len(first)


def test_eval_task_with_the_python_tool_scores_the_answer_after_the_tool(tokenizer, tmp_path):
    from posttrain.config import EvalConfig, validate_config
    from posttrain.eval.runner import build_tasks, evaluate_task
    from posttrain.sandbox.runner import namespace_available
    from posttrain.rollout.base import SamplingParams

    if not namespace_available():
        pytest.skip("the python tool runs in namespace isolation (needs root on Linux)")
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is 6 * 7? ({i})"}],
                                        "answer": "42"}) + "\n" for i in range(3)))
    task = {"name": "jsonl", "path": str(data), "reward": "math"}
    config = validate_config(EvalConfig, {"tasks": [{**task, "label": "tool", "agent": {"tools": ["python"]}},
                                                    {**task, "label": "no_tool"}]})
    with_tool, without_tool = build_tasks(config)
    engine = ScriptedToolEngine(tokenizer)
    result = evaluate_task(engine, tokenizer, with_tool, SamplingParams(n=1, temperature=0.0, max_new_tokens=32))
    assert result.metrics["accuracy"] == 1.0 and result.metrics["agent/tool_call_rate"] == 1.0
    assert result.metrics["agent/turns"] == 2.0 and result.metrics["agent/tool_errors"] == 0.0
    assert [s["kind"] for s in result.samples[0]["trajectory"]["segments"]] == ["prompt", "sampled", "env", "sampled"]
    plain = evaluate_task(engine, tokenizer, without_tool, SamplingParams(n=1, temperature=0.0, max_new_tokens=32))
    assert plain.metrics["accuracy"] == 0.0 and "agent/turns" not in plain.metrics  # the block is never run


def test_chat_with_tools_shows_the_trajectory_turn_by_turn(tiny_model_dir, tokenizer, monkeypatch, capsys):
    from posttrain import chat as chat_module
    from posttrain.cli import main
    from posttrain.sandbox.runner import namespace_available

    if not namespace_available():
        pytest.skip("the python tool runs in namespace isolation (needs root on Linux)")
    monkeypatch.setattr(chat_module, "HFEngine", lambda model, tok: ScriptedToolEngine(tok))
    assert main(["chat", "--model", tiny_model_dir, "--tools", "python", "What is 6 * 7?"]) == 0
    printed = capsys.readouterr().out
    assert printed == ("```python\nprint(6 * 7)\n```\n  [tool] <output>\n  [tool] 42\n  [tool] </output>\n"
                       "The answer is 42.\n(2 turns, 1 tool calls, 0 tool errors, finish: stop)\n")


def test_the_tool_call_bonus_is_paid_only_when_the_answer_is_what_a_call_printed():
    from posttrain.eval.prompts import PromptRow
    from posttrain.train.rl_scoring import score_groups

    def sample(calls, errors, answer_from_tool):
        s = multi_turn_sample(reward=0.0)
        s.trajectory = {"tool_calls": calls, "tool_errors": errors, "env_reward": 0.0,
                        "answer_from_tool": answer_from_tool}
        return s

    failed, no_op, used = sample(1, 1, False), sample(3, 0, False), sample(2, 1, True)
    rows = [PromptRow([1], "q", {}, 1)]
    nothing = lambda prompts, completions, metadata: RewardOutput([0.0] * len(completions), {})  # noqa: E731
    score_groups([[failed, no_op, used]], rows, nothing, scoring(tool_call_bonus=0.5))
    assert (failed.reward, no_op.reward, used.reward) == (0.0, 0.0, 0.5)


# ------------------------------------------------------------------ what a policy might try


class StubPython:
    """The ``python`` tool answered from a table (code -> (output, is_error)): the loop's
    bookkeeping without a sandbox."""

    name, stateful = "python", False
    schema = {"type": "function", "function": {"name": "python", "parameters": {"required": ["code"]}}}

    def __init__(self, answers: dict[str, tuple[str, bool]]):
        self.answers = answers

    def run(self, arguments, state, timeout):
        return self.answers[arguments["code"]]


def scripted_run(tokenizer, turns: list[str], answers=None, tool_format="inline", **limits):
    """One trajectory whose turns are ``turns`` (a turn ending in ``<eos>`` gets the EOS id)."""
    from posttrain.agent.loop import AgentLimits, run_agent
    from posttrain.agent.tools import ToolBox
    from posttrain.rollout.base import SamplingParams
    from test_agent_loop import ScriptedEngine, chat_prompt, enc

    eos = tokenizer.eos_token_id
    script = [[enc(tokenizer, t.removesuffix("<eos>")) + ([eos] if t.endswith("<eos>") else [])] for t in turns]
    (trajectory,) = run_agent(ScriptedEngine(tokenizer, script), [chat_prompt(tokenizer, "What is 6 * 7?")],
                              SamplingParams(), tokenizer=tokenizer, tool_format=tool_format,
                              toolbox=ToolBox([StubPython(answers or {})]), limits=AgentLimits(**limits))
    return trajectory


def math_score(trajectory, reference="42") -> float:
    from posttrain.rewards.math import MathReward

    return MathReward()(["q"], [trajectory.as_completion().text], [{"answer": reference}]).scores[0]


CODE_ANSWERS = [
    "```python\nanswer = 6 * 7  # \\boxed{42}",  # a block left open when the turn ended
    "Let me think.\n```python\n# The answer is \\boxed{42}\nx = 6 * 7",
    "```python\n```python\nprint('#### 42')\n",  # nested fences, never closed
    "Sure.\n```python\n'''\n<answer>42</answer>\n'''",
    "6 * 7 = ?\n```python\nprint(42)",  # the last number is in code
]


@pytest.mark.parametrize("turn", CODE_ANSWERS, ids=range(len(CODE_ANSWERS)))
def test_an_answer_is_never_read_from_an_unclosed_block_at_eos_or_at_the_budget(tokenizer, turn):
    at_eos = scripted_run(tokenizer, [turn + "<eos>"])
    assert at_eos.finish_reason == "stop" and at_eos.tool_errors == 1 and "```python" not in at_eos.final_text
    assert math_score(at_eos) == 0.0
    budget = len(tokenizer.encode(turn, add_special_tokens=False)) + 2
    cut = scripted_run(tokenizer, [turn + "\nmore = 1\nmore = 2"], max_new_tokens=budget, max_total_tokens=budget)
    assert cut.finish_reason == "length" and math_score(cut) == 0.0


def test_an_answer_is_never_read_from_a_call_whose_output_did_not_fit(tokenizer):
    code = "x = 6 * 7  # \\boxed{42}\nprint(x)"
    turn = f"Compute.\n```python\n{code}\n```\n"
    budget = len(tokenizer.encode(turn, add_special_tokens=False)) + 20
    trajectory = scripted_run(tokenizer, [turn], {code: ("42 " * 200, False)}, max_total_tokens=budget)
    assert trajectory.finish_reason == "length" and trajectory.tool_calls == 1
    assert [s.kind for s in trajectory.segments] == ["prompt", "sampled"]  # the output never entered the context
    assert trajectory.final_text == "" and math_score(trajectory) == 0.0 and not trajectory.answer_from_tool


def test_an_answer_is_never_read_from_a_chat_tool_call_unanswered_or_left_open(tokenizer):
    code = "x = 42  # \\boxed{42}"
    call = '<tool_call>\n{"name": "python", "arguments": {"code": "x = 42  # \\\\boxed{42}"}}\n</tool_call>'
    unanswered = "The answer: " + call + " \\boxed{42}<eos>"  # its output does not fit the budget
    budget = len(tokenizer.encode(unanswered.removesuffix("<eos>"), add_special_tokens=False)) + 3
    trajectory = scripted_run(tokenizer, [unanswered], {code: ("42", False)}, tool_format="chat_template",
                              max_total_tokens=budget)
    assert trajectory.finish_reason == "length" and trajectory.final_text == "" and math_score(trajectory) == 0.0

    left_open = 'Then <tool_call>\n{"name": "python", "arguments": {"code": "# \\boxed{42}'  # cut by the budget
    budget = len(tokenizer.encode(left_open, add_special_tokens=False))
    trajectory = scripted_run(tokenizer, [left_open + ' more words"}}'], tool_format="chat_template",
                              max_total_tokens=budget, max_new_tokens=budget)
    assert trajectory.finish_reason == "length" and trajectory.final_text == "Then "
    assert math_score(trajectory) == 0.0


@pytest.mark.parametrize("text, tool_format, kept", [
    ("A ```python\nprint(1)\n```\nB \\boxed{7}", "inline", "A B \\boxed{7}"),
    ("\\boxed{1} ```python\n# \\boxed{42}\n", "inline", "\\boxed{1} "),
    ("x ```python\n```\n```python\n#### 42", "inline", "x "),
    ('<tool_call>{"a": "\\boxed{42}"}</tool_call>ok <tool_call><tool_call>42</tool_call>!', "chat_template", "ok !"),
    ("done <tool_call>" + "{" * 1000 + "42", "chat_template", "done "),
])
def test_answer_text_cuts_every_call(text, tool_format, kept):
    from posttrain.agent.loop import TOOL_FORMATS

    assert TOOL_FORMATS[tool_format].answer_text(text) == kept


BONUS_CASES = [  # (code, its output, is_error, final answer, bonus paid)
    ("print(6 * 7)", "42", False, "The answer is \\boxed{42}.", True),
    ("pass", "", False, "The answer is \\boxed{42}.", False),  # a no-op
    ("print()", "", False, "42", False),
    ("print(42)", "42", False, "So 42.", False),  # the code spells the value out
    ("x = 6 * 7\nprint(x - 1)", "41", False, "The answer is 42.", False),  # not what it printed
    ("print(*range(40, 45))", "40 41 42 43 44", False, "42", False),  # many candidates: only the last counts
    ("raise ValueError(6 * 7)", "ValueError: 42", True, "42", False),  # a failed call
    ("print(6 * 7)", "42", False, "I do not know.", False),  # no answer at all
]


@pytest.mark.parametrize("code, output, is_error, answer, paid", BONUS_CASES, ids=range(len(BONUS_CASES)))
def test_the_bonus_is_paid_only_for_an_answer_a_successful_call_printed(tokenizer, code, output, is_error, answer, paid):
    from posttrain.agent.trajectory import trajectory_metrics, trajectory_record
    from posttrain.data.inline import call_text
    from posttrain.eval.prompts import PromptRow
    from posttrain.train.rl_scoring import score_groups

    trajectory = scripted_run(tokenizer, [call_text("", code), answer + "<eos>"], {code: (output, is_error)})
    assert trajectory.tool_calls == 1 and trajectory.tool_errors == int(is_error)
    assert trajectory.answer_from_tool is paid
    sample = RolloutSample(row=0, group=0, prompt_ids=trajectory.prompt_ids, response_ids=trajectory.response_ids,
                           text=trajectory.final_text, finish_reason="stop",
                           trajectory=trajectory_record(trajectory, tokenizer))
    nothing = lambda prompts, completions, metadata: RewardOutput([0.0] * len(completions), {})  # noqa: E731
    score_groups([[sample]], [PromptRow([1], "q", {}, 1)], nothing, scoring(tool_call_bonus=0.5))
    assert sample.reward == (0.5 if paid else 0.0)
    assert trajectory_metrics([sample.trajectory])["agent/answer_from_tool_rate"] == float(paid)


def test_rl_held_out_evaluation_counts_answers_the_math_reward_refused():
    from posttrain.rewards.math import MathReward
    from posttrain.eval.generate import evaluate_rows, trainer_metrics
    from posttrain.eval.prompts import PromptRow
    from posttrain.rollout.base import SamplingParams

    class Fixed:
        def generate(self, prompt_ids, params):
            texts = [r"\boxed{9^{9^{9^{9}}}}", r"\boxed{42}", r"\boxed{(10^{8})!}"]
            return [Completion(i, [1], texts[i], "stop") for i in range(len(prompt_ids))]

    rows = [PromptRow([1], "q", {"answer": "42"}, line) for line in (1, 2, 3)]
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=8, seed=0)
    metrics = trainer_metrics(evaluate_rows(Fixed(), rows, MathReward(), params).metrics)
    assert metrics["eval/reward"] == pytest.approx(1 / 3) and metrics["eval/math/unverified"] == 2.0
    assert metrics["eval/acc"] == pytest.approx(1 / 3)
