"""Accuracy exists only for rewards that check correctness, and RL's held-out evaluation,
its training steps and ``posttrain eval`` judge a completion correct the same way
(``RewardOutput.correct``, ``eval.generate.evaluate_rows``)."""

import json

import pytest
import torch

from posttrain.config import RLConfig, validate_config
from posttrain.errors import ConfigError
from posttrain.eval.generate import evaluate_rows, trainer_metrics
from posttrain.eval.prompts import PromptRow
from posttrain.rewards import build_reward
from posttrain.rewards.registry import reward_fields
from posttrain.rollout.base import Completion, SamplingParams

GREEDY = SamplingParams(n=1, temperature=0.0, max_new_tokens=8, seed=0)
ROWS = [PromptRow([1], f"{a} + {a}?", {"answer": str(2 * a)}, line) for line, a in enumerate((1, 2, 3, 4), start=1)]
# right + in form, right + rambling, wrong + in form, wrong + rambling
TEXTS = ["The answer is 2.", "hmm, well, it is 4, I think, after a long while", "The answer is 7.", "no idea at all"]
IN_FORM = r"The answer is -?\d+\.?\s*$"


class FixedEngine:
    """Answers prompt i with ``texts[i]`` (one token per character), whatever the ids."""

    def __init__(self, texts):
        self.texts = texts

    def generate(self, prompt_ids, params):
        return [Completion(i, [7] * len(self.texts[i]), self.texts[i], "stop")
                for i in range(len(prompt_ids)) for _ in range(params.n)]


def evaluated(reward_spec, pass_k=(1,)):
    return evaluate_rows(FixedEngine(TEXTS), ROWS, build_reward(reward_spec), GREEDY, pass_k=pass_k)


@pytest.mark.parametrize("spec", [
    {"name": "length", "budget": 10, "penalty_per_unit": 0.01},
    {"name": "format", "pattern": IN_FORM},
    {"name": "composite", "terms": {"format": {"pattern": IN_FORM}, "length": {"budget": 10}}},
])
def test_a_reward_that_checks_no_correctness_gives_no_accuracy(spec):
    result = evaluated(spec)
    assert "accuracy" not in result.metrics and "pass@1" not in result.metrics and "mean_score" in result.metrics
    assert "eval/acc" not in trainer_metrics(result.metrics) and "eval/reward" in trainer_metrics(result.metrics)
    assert all(sample.correct is None for sample in result.samples)


def test_format_scoring_1_is_not_correct_and_math_beside_it_decides():
    """0/1 format scores once counted as accuracy; beside math, only the math verdict does."""
    result = evaluated({"name": "composite", "terms": {"math": {"weight": 1.0},
                                                       "format": {"weight": 0.2, "pattern": IN_FORM}}})
    assert [sample.correct for sample in result.samples] == [True, True, False, False]
    assert [round(sample.score, 6) for sample in result.samples] == [1.2, 1.0, 0.2, 0.0]
    assert result.metrics["accuracy"] == 0.5 and result.metrics["pass@1"] == 0.5
    assert trainer_metrics(result.metrics)["eval/acc"] == 0.5


def test_a_length_penalty_beside_math_does_not_make_a_right_answer_wrong():
    """Score 1.0 - penalty is below 1.0; correctness is math's verdict, not the score."""
    result = evaluated({"name": "composite", "terms": {"math": {}, "length": {"budget": 10, "penalty_per_unit": 0.01}}})
    assert result.samples[1].score < 1.0 and result.samples[1].correct is True
    assert result.metrics["accuracy"] == 0.5


def test_two_correctness_terms_must_both_pass():
    result = evaluated({"name": "composite", "terms": {"math": {}, "also_math": {"reward": "math", "weight": 0.0}}})
    assert [sample.correct for sample in result.samples] == [True, True, False, False]
    result = evaluated({"name": "composite", "terms": {"math": {}, "tagged": {"reward": "math", "extract": ["answer_tag"]}}})
    assert [sample.correct for sample in result.samples] == [False, False, False, False]  # no <answer> tags


USER_REWARDS = '''
def exact(prompts, completions, metadata):
    return [float(c.rstrip(".").split()[-1] == m["answer"]) for c, m in zip(completions, metadata)]


def exact_trl(completions, answer, **kwargs):
    return [float(c.rstrip(".").split()[-1] == a) for c, a in zip(completions, answer)]
'''


@pytest.fixture
def user_rewards(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_REWARDS)
    return str(path)


@pytest.mark.parametrize("function", ["exact", "exact_trl"])
def test_a_user_reward_declared_a_correctness_check_gives_accuracy(user_rewards, function):
    declared = evaluated({"name": f"{user_rewards}:{function}", "correctness": True})
    assert [sample.correct for sample in declared.samples] == [True, False, False, False]
    assert declared.metrics["accuracy"] == 0.25
    undeclared = evaluated(f"{user_rewards}:{function}")
    assert "accuracy" not in undeclared.metrics and undeclared.metrics["mean_score"] == 0.25
    in_a_term = evaluated({"name": "composite", "terms": {
        "exact": {"reward": f"{user_rewards}:{function}", "correctness": True},
        "format": {"weight": 0.2, "pattern": IN_FORM}}})
    assert in_a_term.metrics["accuracy"] == 0.25


def test_the_correctness_key_is_checked_and_read_by_the_audit(user_rewards):
    with pytest.raises(ConfigError, match=r"^reward\.correctness: reward 'math' declares its own"):
        build_reward({"name": "math", "correctness": True})
    with pytest.raises(ConfigError, match=r"^reward\.correctness: true or false"):
        build_reward({"name": f"{user_rewards}:exact", "correctness": "yes"})
    assert reward_fields({"name": f"{user_rewards}:exact_trl", "correctness": True}) == {"answer": "exact_trl"}
    config = validate_config(RLConfig, {"data": {"train": "p.jsonl"}, "reward": {
        "name": "composite", "terms": {"exact": {"reward": f"{user_rewards}:exact", "correctness": True}}}})
    assert build_reward(config.reward)(["q"], ["The answer is 2."], [{"answer": "2"}]).correct == [True]


def test_rl_held_out_eval_and_posttrain_eval_judge_the_same_completions_alike(tokenizer, tmp_path):
    """Both paths on the same prompt file, reward and completions: the same correct samples,
    accuracy and mean reward (RL under its own metric names)."""
    from posttrain.data.audit import load_prompt_data
    from posttrain.eval.prompts import prompt_rows
    from posttrain.eval.runner import evaluate_task
    from posttrain.eval.tasks import load_jsonl
    from posttrain.train.distributed import DistInfo
    from posttrain.train.logging import RunDir
    from posttrain.train.rl import run_eval

    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps({"prompt": row.text, "answer": row.metadata["answer"]}) + "\n" for row in ROWS))
    spec = {"name": "composite", "terms": {"math": {}, "length": {"budget": 10, "penalty_per_unit": 0.01},
                                           "format": {"weight": 0.2, "pattern": IN_FORM}}}
    engine = FixedEngine(TEXTS)

    task = load_jsonl(str(data), reward=spec)
    posttrain_eval = evaluate_task(engine, tokenizer, task, GREEDY)

    config = validate_config(RLConfig, {"data": {"train": str(data)}, "reward": spec,
                                        "rollout": {"max_new_tokens": 8, "eval_temperature": 0.0},
                                        "run": {"progress": False}})
    rows = prompt_rows(load_prompt_data(str(data), tokenizer))
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    rl_metrics = run_eval(engine, rows, build_reward(config.reward), config, RunDir(tmp_path / "rl"), step=0, info=info)

    assert [sample["correct"] for sample in posttrain_eval.samples] == [True, True, False, False]
    assert rl_metrics["eval/acc"] == posttrain_eval.metrics["accuracy"] == 0.5
    assert rl_metrics["eval/reward"] == pytest.approx(posttrain_eval.metrics["mean_score"])
    assert rl_metrics["eval/count"] == posttrain_eval.metrics["num_prompts"] == 4
    written = json.loads((tmp_path / "rl" / "eval" / "step_0.json").read_text())
    assert written["metrics"] == rl_metrics
    assert [record["completion"] for record in written["samples"]] == [s["completion"] for s in posttrain_eval.samples]
    assert [record["reward"] for record in written["samples"]] == [s["score"] for s in posttrain_eval.samples]


@pytest.mark.parametrize("reward, has_acc", [
    ({"name": "composite", "terms": {"math": {}, "format": {"weight": 0.2, "pattern": IN_FORM}}}, True),
    ({"name": "format", "pattern": IN_FORM}, False),
])
def test_rl_training_acc_is_the_correctness_share_and_absent_without_a_check(tiny_model_dir, tmp_path, reward, has_acc):
    from posttrain.train.rl import run_rl

    config = validate_config(RLConfig, {
        "model": {"name": tiny_model_dir}, "reward": reward,
        "data": {"train": "examples/data/rl_arithmetic_train.jsonl", "limit": 8,
                 "eval": "examples/data/rl_arithmetic_eval.jsonl", "eval_limit": 2},
        "rollout": {"group_size": 2, "max_new_tokens": 4}, "rl": {"prompts_per_step": 2},
        "train": {"max_steps": 1, "samples_every": 1, "samples_per_log": 4, "export": False},
        "run": {"output_dir": str(tmp_path), "name": "acc", "progress": False, "tensorboard": False}})
    result = run_rl(config)
    line = result.history[-1]
    samples = [json.loads(text) for text in (result.run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4
    if has_acc:
        assert line["acc"] == sum(s["components"]["math"] for s in samples) / len(samples)
        assert "eval/acc" in result.eval_before and "eval/acc" in result.eval_after
    else:
        assert "acc" not in line and "eval/acc" not in result.eval_before and "eval/acc" not in result.eval_after
        assert "eval/reward" in result.eval_after


def test_rl_held_out_evals_before_and_after_are_metric_lines_with_a_samples_table(tiny_model_dir, tmp_path):
    """Without train.eval_every, the evaluations before the first step and after the last reach
    metrics.jsonl (lines at step 0 and at the last step, with the accuracy's 95% interval) and
    TensorBoard (scalars, and the completions as a text table beside the training samples)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from posttrain.train.logging import read_metrics
    from posttrain.train.rl import run_rl

    config = validate_config(RLConfig, {
        "model": {"name": tiny_model_dir}, "reward": "math",
        "data": {"train": "examples/data/rl_arithmetic_train.jsonl", "limit": 8,
                 "eval": "examples/data/rl_arithmetic_eval.jsonl", "eval_limit": 3},
        "rollout": {"group_size": 2, "max_new_tokens": 4}, "rl": {"prompts_per_step": 2},
        "train": {"max_steps": 2, "samples_every": 2, "samples_per_log": 2, "export": False},
        "run": {"output_dir": str(tmp_path), "name": "evals", "progress": False}})
    result = run_rl(config)
    lines = read_metrics(result.run_dir / "metrics.jsonl")
    evals = [line for line in lines if "eval/acc" in line]
    assert [line["step"] for line in evals] == [0, 2]
    assert evals[0] == {"step": 0, **result.eval_before} and evals[1] == {"step": 2, **result.eval_after}
    for line in evals:
        assert line["eval/count"] == 3 and line["eval/acc/ci_low"] <= line["eval/acc"] <= line["eval/acc/ci_high"]
    assert [line["step"] for line in result.history] == [1, 2] and all("loss" in line for line in result.history)
    events = EventAccumulator(str(result.run_dir / "tb"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    assert [event.step for event in events.Scalars("eval/acc")] == [0, 2]
    tables = {tag.split("/text_summary")[0]: [e.step for e in events.Tensors(tag)] for tag in events.Tags()["tensors"]}
    assert tables == {"eval/samples": [0, 2], "train/samples": [2]}
    shown = events.Tensors(next(t for t in events.Tags()["tensors"] if t.startswith("eval/samples")))[0]
    assert "| prompt | completion | reward |" in shown.tensor_proto.string_val[0].decode()
