"""The RL pre-flight (rewards/preflight.py): every reward called on sample rows with the
reference answer and perturbed ones before any model loads; the three calling conventions;
the agent's budget; train/held-out overlap; the shipped configs pass."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.config import AgentConfig, PipelineConfig, RLConfig, read_config_file, validate_config
from posttrain.errors import ConfigError
from posttrain.inspect_data import training_section
from posttrain.rewards.output import PromptText
from posttrain.rewards.preflight import (
    RewardRow,
    agent_budget_lines,
    candidates,
    check_rewards,
    read_reward_rows,
    rl_preflight,
)
from posttrain.rewards.registry import VerlReward, build_reward

ROOT = Path(__file__).resolve().parent.parent
HINT = "(reward pre-flight, before the model loads; preflight: false on the reward skips it)"
ROWS = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in ((57, 73), (41, 35), (12, 30))]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def reward_file(tmp_path: Path, source: str, name: str = "rewards_under_test.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def rows_of(path: Path) -> list[RewardRow]:
    return read_reward_rows(str(path))


# ----------------------------------------------------------------------------- what is tried
def test_candidates_are_the_reference_in_five_forms_then_wrong_hedged_empty_and_echoed():
    found = candidates("What is 12 + 0?", "12")
    assert [c.text for c in found if c.reference] == ["12", "The answer is 12.", "\\boxed{12}", "<answer>12</answer>",
                                                     "#### 12"]
    wrong = [c.text for c in found if not c.reference]
    assert wrong[:5] == ["13", "The answer is 13.", "\\boxed{13}", "<answer>13</answer>", "#### 13"]
    assert wrong[5] == "12 or 13" and wrong[-2:] == ["", "What is 12 + 0?"]
    assert len(found) == 17


# ----------------------------------------------------------------------------- calling conventions
def test_verl_compute_score_is_called_per_completion_with_the_ground_truth(tmp_path):
    path = reward_file(tmp_path, """
        calls = []

        def compute_score(data_source, solution_str, ground_truth, extra_info=None):
            calls.append((data_source, ground_truth, extra_info))
            return {"score": 1.0 if solution_str.strip().split()[-1:] == [ground_truth] else 0.0, "tag": data_source}
    """, "verl_rewards.py")
    reward = build_reward(f"{path}:compute_score")
    assert isinstance(reward, VerlReward)
    rows = [{"data_source": "toy", "reward_model": {"ground_truth": "4"}, "extra_info": {"index": 7}}] * 2
    out = reward(["2+2?"] * 2, ["it is 4", "5"], rows)
    assert out.scores == [1.0, 0.0] and out.details == [{"tag": "toy"}, {"tag": "toy"}]
    import sys

    module = next(m for n, m in sys.modules.items() if n.startswith("posttrain_user_verl_rewards"))
    assert module.calls == [("toy", "4", {"index": 7})] * 2


def test_batched_verl_form_is_called_once_per_batch(tmp_path):
    path = reward_file(tmp_path, """
        def compute_score(data_sources, solution_strs, ground_truths, extra_infos=None):
            return [float(s == g) for s, g in zip(solution_strs, ground_truths)]
    """, "verl_batch_rewards.py")
    assert build_reward(f"{path}:compute_score")(["q"] * 2, ["4", "5"], [{"answer": "4"}] * 2).scores == [1.0, 0.0]


def test_an_unknown_signature_is_refused_in_one_line_showing_it_and_the_accepted_forms(tmp_path):
    path = reward_file(tmp_path, "def score(text, reference):\n    return 1.0\n", "odd_rewards.py")
    with pytest.raises(ConfigError) as caught:
        build_reward(f"{path}:score")
    assert str(caught.value) == (
        f"reward.name: {path}:score takes (text, reference), which is no reward calling convention posttrain knows; "
        "accepted: posttrain fn(prompts, completions, metadata) -> RewardOutput | list[float]; "
        "TRL fn(prompts, completions, **kwargs) -> list[float | None]; "
        "veRL compute_score(data_source, solution_str, ground_truth, extra_info) -> float | dict with 'score'")


def test_verl_and_trl_rewards_pass_the_check(tmp_path):
    data = write_rows(tmp_path / "p.jsonl", [{"prompt": [{"role": "user", "content": r["prompt"]}],
                                              "solution": r["answer"], "data_source": "arith"} for r in ROWS])
    verl = reward_file(tmp_path, """
        import re

        def compute_score(data_source, solution_str, ground_truth, extra_info=None):
            numbers = re.findall(r"-?\\d+", solution_str)
            return float(bool(numbers) and numbers[-1] == str(ground_truth))
    """, "verl_ok.py")
    spec = {"name": "composite", "terms": {
        "trl": {"reward": str(ROOT / "examples/rewards/trl_style.py") + ":accuracy_reward"},
        "verl": {"reward": f"{verl}:compute_score"}}}
    rows = [RewardRow(r.prompt, {**r.metadata, "answer": r.metadata["solution"]}, r.where) for r in rows_of(data)]
    assert isinstance(rows[0].prompt, PromptText) and rows[0].prompt.messages  # conversational: TRL gets messages
    lines = check_rewards(spec, rows).summary_lines()
    assert lines[0].startswith("reward pre-flight: 3 sampled training rows, ")
    assert lines[1].startswith("  reward.terms.trl (") and "full marks for the reference (plain, The answer is, " in lines[1]
    assert lines[2].startswith(f"  reward.terms.verl ({verl}:compute_score): full marks for the reference")
    assert "(3 rows, 51 completions, " in lines[2]


# ----------------------------------------------------------------------------- refusals, one line each
BAD_REWARDS = {
    "raises": ("""
        def score(prompts, completions, metadata):
            return [1.0 / (len(c) - len(c)) for c in completions]
     """, {}, "reward 'score' raised ZeroDivisionError: float division by zero on {data}:1"),
    "wrong count": ("""
        def score(prompts, completions, metadata):
            return [1.0, 0.0, 0.0]
     """, {}, "reward 'score' returned 3 scores for a batch of 17 on {data}:1"),
    "nan": ("""
        def score(prompts, completions, **kwargs):
            return [float("nan") if c == "" else 0.0 for c in completions]
     """, {}, "reward 'score' returned nan for empty ('') on {data}:1"),
    "pays nothing for the reference": ("""
        def compute_score(data_source, solution_str, ground_truth, extra_info=None):
            return 0.0
     """, {}, "reward 'compute_score' pays 0, 0, 0, 0, 0 for the reference answer of {data}:1 (plain ('130') and its "
              "other forms: The answer is, \\boxed{{}}, <answer>, ####); full marks (a score of 1.0 or more) expected "
              "for at least one"),
    "pays full marks for a wrong answer": ("""
        def score(completions, answer, **kwargs):
            return [1.0 if c else 0.0 for c in completions]
     """, {}, "reward 'score' pays 1 (full marks) for a wrong value, plain ('131') on {data}:1, where the reference "
              "answer gets 1: a wrong answer must score less"),
    "pays a hedge": ("""
        def score(prompts, completions, metadata):
            return [float(m["answer"] in c) for c, m in zip(completions, metadata)]
     """, {"correctness": True}, "reward 'score' pays 1 (full marks) for a hedge, plain ('130 or 131') on {data}:1, "
                                 "where the reference answer gets 1: a wrong answer must score less"),
    "pays the echoed prompt": ("""
        def score(prompts, completions, metadata):
            return [1.0 if c.strip().endswith(m["answer"]) or c == p else 0.0
                    for p, c, m in zip(prompts, completions, metadata)]
     """, {"correctness": True}, "reward 'score' pays 1 (full marks) for the prompt echoed ('What is 57 + 73?') on "
                                 "{data}:1, where the reference answer gets 1: a wrong answer must score less"),
}


@pytest.mark.parametrize("case", list(BAD_REWARDS))
def test_a_bad_reward_is_refused_in_one_line_naming_reward_row_and_value(case, tmp_path):
    source, extra, message = BAD_REWARDS[case]
    data = write_rows(tmp_path / "p.jsonl", ROWS)
    path = reward_file(tmp_path, source, f"bad_{case.replace(' ', '_')}.py")
    function = "compute_score" if "compute_score" in source else "score"
    with pytest.raises(ConfigError) as caught:
        check_rewards({"name": f"{path}:{function}", **extra}, rows_of(data))
    assert str(caught.value) == f"reward: {message.format(data=data)} {HINT}"


def test_built_in_math_is_refused_when_echoing_the_prompt_pays(tmp_path):
    """Think like the policy: a prompt that ends with its own answer pays a model that repeats it."""
    data = write_rows(tmp_path / "p.jsonl", [ROWS[0], {"prompt": "What is 1 * 5?", "answer": "5"}])
    with pytest.raises(ConfigError) as caught:
        check_rewards("math", rows_of(data))
    assert str(caught.value) == (f"reward: reward 'math' pays 1 (full marks) for the prompt echoed ('What is 1 * 5?') "
                                 f"on {data}:2, where the reference answer gets 1: a wrong answer must score less {HINT}")


def test_a_composite_term_is_named_and_preflight_false_skips_it(tmp_path):
    data = write_rows(tmp_path / "p.jsonl", ROWS)
    path = reward_file(tmp_path, "def always(prompts, completions, metadata):\n    return [1.0] * len(completions)\n",
                       "always_rewards.py")
    spec = {"name": "composite", "terms": {"math": {}, "always": {"reward": f"{path}:always", "correctness": True}}}
    with pytest.raises(ConfigError, match=r"^reward\.terms\.always: reward 'always' pays 1 \(full marks\) for a wrong"):
        check_rewards(spec, rows_of(data))
    spec["terms"]["always"]["preflight"] = False
    lines = check_rewards(spec, rows_of(data)).summary_lines()
    assert lines[2] == f"  reward.terms.always ({path}:always): skipped (preflight: false)"
    config = validate_config(RLConfig, {"data": {"train": str(data)}, "reward": spec})  # the key is in the schema
    assert rl_preflight(config, rows_of(data), [])[2].endswith("skipped (preflight: false)")
    with pytest.raises(ConfigError, match=r"reward\.preflight"):
        validate_config(RLConfig, {"data": {"train": str(data)}, "reward": {"name": "math", "preflight": "no"}})


def test_a_learned_reward_model_is_skipped_and_form_rewards_are_only_called(tmp_path):
    data = write_rows(tmp_path / "p.jsonl", ROWS)
    spec = {"name": "composite", "terms": {"model": {"path": str(tmp_path / "no_such_rm")},
                                           "format": {"pattern": r"^\d+$"}, "length": {"budget": 5}}}
    lines = check_rewards(spec, rows_of(data)).summary_lines()
    assert lines[1] == "  reward.terms.model (model): skipped (a learned reward model: not loaded before training)"
    assert lines[2].startswith("  reward.terms.format (format): a form reward, not judged on answers: one finite "
                               "score each (3 rows, 51 completions, ")
    assert lines[3].startswith("  reward.terms.length (length): a form reward")


def test_a_user_reward_returning_correct_is_judged_and_rows_without_a_reference_are_skipped(tmp_path):
    data = write_rows(tmp_path / "p.jsonl", ROWS + [{"prompt": "Say hi."}])
    path = reward_file(tmp_path, """
        from posttrain.rewards.output import RewardOutput

        def exact(prompts, completions, metadata):
            right = [m.get("answer") is not None and c.strip().split()[-1:] == [m["answer"]] for c, m in zip(completions, metadata)]
            return RewardOutput([float(r) for r in right], correct=right)
    """, "exact_rewards.py")
    lines = check_rewards(f"{path}:exact", rows_of(data)).summary_lines()
    assert lines[1].startswith(f"  reward ({path}:exact): full marks for the reference (plain, ####)")
    assert lines[1].endswith(f"; 1 row(s) without a reference answer skipped ({data}:4)")


# ----------------------------------------------------------------------------- budgets and overlap
def test_agent_budget_says_when_turns_are_cut_short_and_refuses_tools_that_never_run():
    fits = AgentConfig(tools=["python"], max_turns=2, max_tool_calls=1, max_total_tokens=512, max_tool_output_tokens=64)
    assert agent_budget_lines(fits, 100) == [
        "agent budget: 2 turns x 100 tokens + 1 tool outputs x <= 64 tokens = 264 <= agent.max_total_tokens 512: "
        "every turn gets its full rollout.max_new_tokens"]
    tight = AgentConfig(tools=["python"], max_turns=4, max_tool_calls=4, max_total_tokens=300, max_tool_output_tokens=64)
    assert agent_budget_lines(tight, 100) == [
        "agent budget: 4 turns x 100 tokens + 3 tool outputs x <= 64 tokens = 592 > agent.max_total_tokens 300: "
        "a trajectory is cut short (finish \"length\") once it has used 300"]
    assert agent_budget_lines(AgentConfig(), 100) == []
    with pytest.raises(ConfigError) as caught:
        agent_budget_lines(AgentConfig(tools=["python"], max_turns=1), 100)
    assert str(caught.value) == ("agent.max_turns: 1 with agent.tools: a tool call is never run (calls on the last turn "
                                 "end the trajectory); set agent.max_turns >= 2 or agent.max_tool_calls=0")


def test_held_out_prompts_in_the_training_data_are_counted_and_named(tmp_path):
    train = write_rows(tmp_path / "train.jsonl", ROWS)
    held_out = write_rows(tmp_path / "eval.jsonl", [{"prompt": "what is  57 + 73?", "answer": "130"},
                                                    {"prompt": "What is 2 + 2?", "answer": "4"},
                                                    {"prompt": "WHAT IS 12 +\n30?", "answer": "42"}])
    config = validate_config(RLConfig, {"data": {"train": str(train), "eval": str(held_out)}})
    lines = rl_preflight(config, rows_of(train), rows_of(held_out))
    assert lines[-1] == (f"held-out overlap: 2 of 3 prompts of {held_out} also in the training data (lines 1, 3): "
                         "held-out accuracy overstates what generalises")


# ----------------------------------------------------------------------------- through the commands
def refuse_models(monkeypatch):
    from posttrain.train import rl as rl_module

    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the reward pre-flight")

    monkeypatch.setattr(rl_module, "build_trainables", refuse)


@pytest.mark.parametrize("case", ["raises", "nan", "pays full marks for a wrong answer"])
def test_posttrain_rl_refuses_a_bad_reward_before_loading_a_model(case, tiny_model_dir, tmp_path, capsys, monkeypatch):
    refuse_models(monkeypatch)
    source, _, message = BAD_REWARDS[case]
    data = write_rows(tmp_path / "p.jsonl", ROWS)
    path = reward_file(tmp_path, source, f"cli_{case.replace(' ', '_')}.py")
    config = tmp_path / "rl.yaml"
    config.write_text(f"model:\n  name: {tiny_model_dir}\ndata:\n  train: {data}\nreward: {path}:score\n"
                      f"run:\n  output_dir: {tmp_path / 'runs'}\n  progress: false\n")
    assert main(["rl", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: reward: {message.format(data=data)} {HINT}"]


def test_inspect_config_runs_the_reward_preflight(tiny_model_dir, tmp_path, capsys):
    data = write_rows(tmp_path / "p.jsonl", ROWS)
    bad = reward_file(tmp_path, BAD_REWARDS["wrong count"][0], "inspect_bad.py")
    config = tmp_path / "rl.yaml"
    config.write_text(f"model:\n  name: {tiny_model_dir}\ndata:\n  train: {data}\n  eval: {data}\nreward: math\n")
    assert main(["inspect", "--config", str(config), "-n", "0"]) == 0
    out = capsys.readouterr().out
    assert "  reward (math): full marks for the reference (plain, The answer is, \\boxed{}, <answer>, ####)" in out
    assert f"held-out overlap: 3 of 3 prompts of {data} also in the training data (lines 1, 2, 3)" in out
    assert main(["inspect", "--config", str(config), "-n", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rl_preflight"]["ok"] is True
    config.write_text(f"model:\n  name: {tiny_model_dir}\ndata:\n  train: {data}\nreward: {bad}:score\n")
    assert main(["inspect", "--config", str(config), "-n", "0"]) == 1
    assert capsys.readouterr().err.strip() == (f"error: reward: reward 'score' returned 3 scores for a batch of 17 on "
                                               f"{data}:1 {HINT}")


def test_verl_reward_trains_end_to_end(tiny_model_dir, tmp_path):
    from posttrain.train.rl import run_rl

    data = write_rows(tmp_path / "p.jsonl", [{"prompt": r["prompt"], "reward_model": {"ground_truth": r["answer"]},
                                              "data_source": "arith"} for r in ROWS])
    path = reward_file(tmp_path, """
        import re

        def compute_score(data_source, solution_str, ground_truth, extra_info=None):
            numbers = re.findall(r"-?\\d+", solution_str)
            return {"score": float(bool(numbers) and numbers[-1] == ground_truth), "source": data_source}
    """, "verl_e2e.py")
    config = validate_config(RLConfig, {
        "model": {"name": tiny_model_dir}, "data": {"train": str(data)}, "reward": f"{path}:compute_score",
        "rollout": {"group_size": 2, "max_new_tokens": 4}, "rl": {"prompts_per_step": 1},
        "train": {"max_steps": 1, "export": False},
        "run": {"output_dir": str(tmp_path / "runs"), "progress": False, "tensorboard": False}})
    result = run_rl(config)
    assert result.steps == 1 and "reward/compute_score" in result.history[-1]


def test_pipeline_refuses_a_bad_rl_reward_before_its_first_stage(tmp_path):
    from posttrain.pipeline import dry_run

    data = write_rows(tmp_path / "p.jsonl", ROWS)
    bad = reward_file(tmp_path, BAD_REWARDS["raises"][0], "pipeline_bad.py")
    raw = {"run": {"name": "p", "output_dir": str(tmp_path / "runs")},
           "sft": {"data": {"train": str(ROOT / "examples/data/sft_arithmetic.jsonl")}},
           "rl": {"data": {"train": str(data)}, "reward": f"{bad}:score"}}
    report = dry_run(validate_config(PipelineConfig, raw))
    assert report.errors == [f"rl.reward: reward 'score' raised ZeroDivisionError: float division by zero on {data}:1 "
                             f"{HINT}"]
    raw["rl"]["reward"] = "math"
    report = dry_run(validate_config(PipelineConfig, raw))
    assert not report.errors and report.preflight[1].startswith("  rl.reward (math): full marks for the reference")


# ----------------------------------------------------------------------------- the shipped configs pass
def rl_section(path: Path) -> tuple[dict, str] | None:
    """The RL config in ``path`` (a plain RL config, or a pipeline's ``rl`` stage), or None."""
    raw = read_config_file(str(path))
    stage = "rl" if isinstance(raw.get("rl"), dict) and "data" in raw["rl"] else None
    section, kind, source = training_section(raw, str(path), stage)
    return (section, source) if kind == "rl" else None


SHIPPED = sorted(p for p in (ROOT / "configs").glob("*.yaml") if rl_section(p) is not None)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_rl_config_passes_the_reward_preflight(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert len(SHIPPED) >= 6
    config = validate_config(RLConfig, *rl_section(path))
    data = config.data
    train = read_reward_rows(data.train, columns=data.columns, system=data.system, limit=data.limit)
    held_out = read_reward_rows(data.eval, columns=data.columns, system=data.system) if data.eval else []
    lines = rl_preflight(config, train, held_out)
    assert lines[0].startswith("reward pre-flight: 8 sampled training rows")
    assert not any("skipped" in line for line in lines), lines


def test_inspect_probe_forecasts_zero_variance_and_unsolved_prompts(tiny_model_dir, tmp_path, capsys):
    data = write_rows(tmp_path / "p.jsonl", ROWS)
    config = tmp_path / "rl.yaml"
    config.write_text(f"model:\n  name: {tiny_model_dir}\ndata:\n  train: {data}\nreward: math\n"
                      f"rollout:\n  group_size: 2\n  max_new_tokens: 3\n")
    assert main(["inspect", "--config", str(config), "-n", "0", "--probe", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    probe = lines.index(next(line for line in lines if line.startswith("probe: ")))
    assert lines[probe].startswith(f"probe: 2 groups x 2 completions from {tiny_model_dir} in ")
    # a random tiny model writes no sum: every completion scores 0, every group is flat, nothing is solved
    assert lines[probe + 1] == "  zero-variance groups (every completion the same reward; no GRPO signal): 100%"
    assert lines[probe + 2] == "  prompts never solved: 2 of 2 (100%); always solved: 0 of 2"
    assert main(["inspect", str(data), "--probe"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: inspect --probe: samples from the starting model of an RL config")
