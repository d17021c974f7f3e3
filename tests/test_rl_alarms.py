"""RL alarms (train.rl_alarms): each alarm fires on a scripted metric history and stays quiet
on a healthy one; the per-step reward-length correlation by hand; warnings, state across
resume, settings from the config; and two tiny runs: a reward that pays for length fires the
hacking alarm, a reward that does not stays quiet."""

from __future__ import annotations

import json
import logging
import math

import pytest

from posttrain.config import RLConfig, validate_config
from posttrain.errors import ConfigError
from posttrain.rewards.output import RewardOutput
from posttrain.train.rl_alarms import (
    ALARMS,
    AlarmSettings,
    EvalPoint,
    RLAlarms,
    alarm_summary,
    check_alarms,
    check_clip_frac_blowup,
    check_entropy_collapse,
    check_format_saturated,
    check_kl_blowup,
    check_length_cap,
    check_nonfinite,
    check_reward_length_corr,
    check_reward_up_heldout_down,
    check_tool_calls_no_gain,
    fired_spans,
    reward_length_correlation,
)
from posttrain.train.rl_settings import alarm_settings

W3 = AlarmSettings(window=3)


def history(**series: list[float]) -> list[dict[str, float]]:
    """Per-step records from one list per metric (equal lengths)."""
    length = len(next(iter(series.values())))
    return [{key: values[i] for key, values in series.items()} for i in range(length)]


# The GRPO quickstart's measured metrics (configs/grpo_quickstart.yaml, 40 steps, ppo_clip): reward
# rises with accuracy, the format term saturates early, entropy falls to ~0.15 of its start,
# clipped replies go from 77% to ~0. A healthy run: no alarm may fire on it.
QUICKSTART = history(**{
    "reward/mean": [0.0312, 0.0586, 0.129, 0.215, 0.262, 0.324, 0.457, 0.566, 0.477, 0.453, 0.496, 0.465, 0.664,
                    0.73, 0.539, 0.547, 0.551, 0.762, 0.641, 0.773, 0.566, 0.512, 0.672, 0.531, 0.785, 0.793, 0.531,
                    0.859, 0.711, 0.809, 0.91, 0.801, 0.527, 0.637, 0.609, 0.766, 0.574, 0.75, 0.984, 0.949],
    "acc": [0, 0, 0.0312, 0.0625, 0.0781, 0.156, 0.266, 0.359, 0.266, 0.234, 0.266, 0.234, 0.438, 0.484, 0.297,
            0.312, 0.312, 0.516, 0.391, 0.531, 0.344, 0.266, 0.422, 0.281, 0.547, 0.547, 0.281, 0.609, 0.469, 0.562,
            0.672, 0.562, 0.281, 0.391, 0.359, 0.516, 0.359, 0.5, 0.734, 0.703],
    "reward/format": [0.125, 0.234, 0.391, 0.609, 0.734, 0.672, 0.766, 0.828, 0.844, 0.875, 0.922, 0.922, 0.906,
                      0.984, 0.969, 0.938, 0.953, 0.984, 1, 0.969, 0.891, 0.984, 1, 1, 0.953, 0.984, 1, 1, 0.969,
                      0.984, 0.953, 0.953, 0.984, 0.984, 1, 1, 0.859, 1, 1, 0.984],
    "entropy": [1.09, 1.06, 0.814, 0.683, 0.523, 0.518, 0.341, 0.284, 0.258, 0.251, 0.259, 0.267, 0.208, 0.155,
                0.154, 0.181, 0.153, 0.117, 0.149, 0.147, 0.141, 0.144, 0.108, 0.155, 0.143, 0.179, 0.144, 0.114,
                0.0985, 0.13, 0.0625, 0.101, 0.0787, 0.0607, 0.121, 0.113, 0.0936, 0.0998, 0.065, 0.073],
    "clip_frac": [0.0206, 0.00738, 0.0122, 0.00727, 0.00364, 0.00636, 0.00379, 0.00126, 0.00245, 0, 0.00127,
                  0.00127, 0.00506, 0, 0.00259, 0.00135, 0, 0, 0.00262, 0.00654, 0.00392, 0.00266, 0.00131, 0, 0, 0,
                  0.00253, 0.00376, 0, 0, 0, 0.00375, 0, 0, 0, 0, 0, 0, 0, 0.00124],
    "response_len/clipped_frac": [0.766, 0.703, 0.516, 0.25, 0.172, 0.203, 0.156, 0.125, 0.125, 0.0781, 0.0469,
                                  0.0469, 0.0938, 0, 0, 0.0156, 0.0156, 0, 0, 0.0156, 0.0625, 0, 0, 0, 0.0312, 0,
                                  0, 0, 0.0312, 0.0156, 0.0312, 0.0312, 0, 0, 0, 0, 0.125, 0, 0, 0.0156],
    "nonfinite_steps": [0] * 40,
})


def replay(records, settings: AlarmSettings | None = None, evals: dict[int, float] | None = None,
           before: dict | None = None) -> list[dict[str, int]]:
    """Each step's alarm/* metrics when ``records`` are observed one by one (steps 1..N)."""
    alarms = RLAlarms(settings or AlarmSettings(), announce=False, before=before)
    lines = []
    for step, record in enumerate(records, start=1):
        metrics = {**record, **({"eval/acc": evals[step]} if evals and step in evals else {})}
        lines.append({"step": step, **alarms.observe(step, metrics)})
    return lines


def test_the_grpo_quickstart_keeps_every_alarm_quiet_at_every_step():
    lines = replay(QUICKSTART)
    assert all(not value for line in lines for key, value in line.items() if key.startswith("alarm/"))
    assert alarm_summary(lines) == (list(ALARMS), {})


# ----------------------------------------------------------------------------- the per-step metric


def test_reward_length_correlation_is_pooled_within_groups_by_hand():
    # group 1: rewards (0, 1, 2) centred (-1, 0, 1), lengths (2, 4, 9) centred (-3, -1, 4): products 3 + 0 + 4 = 7;
    # group 2: rewards (5, 5) centred 0, lengths (1, 3) centred (-1, 1): adds only to the length squares.
    # sum r^2 = 2, sum l^2 = 9 + 1 + 16 + 1 + 1 = 28 -> 7 / sqrt(56)
    assert reward_length_correlation([[0, 1, 2], [5, 5]], [[2, 4, 9], [1, 3]]) == pytest.approx(7 / math.sqrt(56))
    # the same lengths across prompts with different rewards: nothing within a group -> undefined
    assert reward_length_correlation([[0, 0], [1, 1]], [[3, 5], [3, 5]]) is None
    assert reward_length_correlation([[1.0, 2.0, 3.0]], [[3, 2, 1]]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="2 rewards and 3 lengths"):
        reward_length_correlation([[1.0, 2.0]], [[1, 2, 3]])


# ----------------------------------------------------------------------------- hacking


def test_reward_length_corr_fires_when_reward_follows_length_and_accuracy_does_not_rise():
    hacked = history(reward_length_corr=[0.9, 0.8, 0.95])
    assert "within-group correlation 0.88" in check_reward_length_corr(hacked, W3)
    assert "checks no correctness" in check_reward_length_corr(hacked, W3)
    flat = history(reward_length_corr=[0.7] * 6, acc=[0.2, 0.3, 0.2, 0.25, 0.2, 0.25])
    assert "accuracy +0.00" in check_reward_length_corr(flat, W3)
    # quiet: weak correlation; accuracy rising with length (longer reasoning that pays); too little history
    assert check_reward_length_corr(history(reward_length_corr=[0.2, 0.1, 0.4]), W3) is None
    assert check_reward_length_corr(history(reward_length_corr=[0.7] * 6, acc=[0.1] * 3 + [0.5] * 3), W3) is None
    assert check_reward_length_corr(history(reward_length_corr=[0.9, 0.9]), W3) is None
    assert check_reward_length_corr(hacked, AlarmSettings(window=3, reward_length_corr=None)) is None


def test_format_saturated_fires_when_a_term_saturates_and_accuracy_stays_flat():
    hacked = history(**{"reward/format": [0.1, 0.2, 0.3, 0.9, 1.0, 0.95], "reward/math": [0.2] * 6,
                        "acc": [0.2, 0.22, 0.2, 0.21, 0.2, 0.2]})
    reason = check_format_saturated(hacked, W3)
    assert reason.startswith("reward/format rose +0.75") and "accuracy" in reason
    healthy = history(**{"reward/format": [0.1, 0.2, 0.3, 0.9, 1.0, 0.95], "acc": [0.0, 0.1, 0.1, 0.4, 0.5, 0.5]})
    assert check_format_saturated(healthy, W3) is None
    # the GRPO quickstart's first 6 steps as measured: format is learned before accuracy moves (+0.03), but it
    # is still climbing (0.53 over the last 3 steps < 0.9)
    still_climbing = history(**{"reward/format": [0.125, 0.188, 0.312, 0.531, 0.562, 0.484],
                                "acc": [0.0, 0.031, 0.047, 0.047, 0.031, 0.094]})
    assert check_format_saturated(still_climbing, W3) is None
    no_acc = history(**{"reward/format": [0.1, 0.2, 0.3, 0.9, 1.0, 0.95]})  # the reward checks no correctness
    assert check_format_saturated(no_acc, W3) is None
    unverified = history(**{"reward/math/unverified": [0.0, 0.0, 0.0, 1.0, 1.0, 1.0], "acc": [0.2] * 6})
    assert check_format_saturated(unverified, W3) is None


def test_tool_calls_no_gain_fires_when_calls_rise_and_accuracy_does_not():
    hacked = history(**{"agent/tool_calls": [0.5, 0.6, 0.5, 1.5, 2.0, 2.5], "acc": [0.3] * 6})
    assert check_tool_calls_no_gain(hacked, W3).startswith("tool calls per trajectory rose +1.47")
    healthy = history(**{"agent/tool_calls": [0.5, 0.6, 0.5, 1.5, 2.0, 2.5], "acc": [0.0, 0.0, 0.1, 0.6, 0.8, 0.8]})
    assert check_tool_calls_no_gain(healthy, W3) is None
    assert check_tool_calls_no_gain(history(**{"agent/tool_calls": [1.0] * 6, "acc": [0.3] * 6}), W3) is None


def test_reward_up_heldout_down_fires_between_two_evaluations_and_holds_until_the_next():
    rewards = history(**{"reward/mean": [0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.7, 0.7, 0.7]})
    settings = AlarmSettings(window=3)
    lines = replay(rewards, settings, evals={3: 0.6, 6: 0.4, 9: 0.5})
    fired = [line["alarm/reward_up_heldout_down"] for line in lines]
    # eval at 3 (reward level 0.2) -> eval at 6 (level 0.6): held-out -0.2, reward +0.4: fires, holds
    # until the eval at 9 (held-out up again)
    assert fired == [0, 0, 0, 0, 0, 1, 1, 1, 0]
    # the evaluation before the first step counts, its reward level is the first window's
    lines = replay(rewards[:6], settings, evals={6: 0.3}, before={"eval/acc": 0.5})
    assert [line["alarm/reward_up_heldout_down"] for line in lines] == [0, 0, 0, 0, 0, 1]
    # healthy: held-out rises with the reward
    assert not any(line["alarm/reward_up_heldout_down"] for line in replay(rewards, settings, evals={3: 0.4, 6: 0.6}))
    # held-out falls while the training reward does not rise: not hacking (it may be noise or forgetting)
    flat = [EvalPoint(3, 0.6, 0.5), EvalPoint(6, 0.4, 0.52)]
    assert check_reward_up_heldout_down(rewards, flat, settings) is None
    assert check_reward_up_heldout_down(rewards, [EvalPoint(3, 0.6, 0.2), EvalPoint(6, 0.4, 0.6)],
                                        settings).startswith("held-out 0.600 at step 3 -> 0.400 at step 6")


# ----------------------------------------------------------------------------- collapse


def test_entropy_collapse_fires_below_the_share_of_its_start():
    collapsed = history(entropy=[1.0, 0.9, 0.8, 0.03, 0.02, 0.01])
    assert "0.022 x its first 3 steps" in check_entropy_collapse(collapsed, W3)
    assert check_entropy_collapse(history(entropy=[1.0, 0.9, 0.8, 0.2, 0.1, 0.15]), W3) is None
    assert check_entropy_collapse(history(entropy=[1.0, 0.0, 0.0]), W3) is None  # not two windows yet


def test_kl_blowup_fires_on_kl_to_the_reference_or_to_the_sampling_policy():
    assert check_kl_blowup(history(kl=[0.01, 0.02, 0.05, 1.5, 2.0, 3.0]), W3).startswith("kl 2.17")
    assert check_kl_blowup(history(approx_kl=[0.001, 0.001, 0.002, 0.2, 0.3, 0.2]), W3).startswith("approx_kl 0.233")
    assert check_kl_blowup(history(kl=[0.01, 0.02, 0.05, 0.1, 0.2, 0.3], approx_kl=[0.001] * 6), W3) is None
    assert check_kl_blowup(history(kl=[0.01, 0.02, 0.05, 1.5, 2.0, 3.0]),
                           AlarmSettings(window=3, kl_max=None)) is None


def test_clip_frac_blowup_needs_a_rise_not_only_a_level():
    assert check_clip_frac_blowup(history(clip_frac=[0.01, 0.02, 0.01, 0.3, 0.4, 0.5]), W3).startswith("clip_frac 0.4")
    gspo = history(clip_frac=[0.41, 0.3, 0.38, 0.34, 0.28, 0.36])  # GSPO clips a third of its sequences from step 1
    assert check_clip_frac_blowup(gspo, W3) is None


def test_length_cap_fires_when_responses_pile_up_at_the_cap():
    assert "90% of responses cut" in check_length_cap(
        history(**{"response_len/clipped_frac": [0.1, 0.2, 0.1, 0.8, 0.9, 1.0]}), W3)
    falling = history(**{"response_len/clipped_frac": [0.8, 0.7, 0.5, 0.2, 0.1, 0.0]})  # the quickstart's first steps
    assert check_length_cap(falling, W3) is None
    always = history(**{"response_len/clipped_frac": [0.9] * 6})  # a cap too short from the start: no rise
    assert check_length_cap(always, W3) is None


def test_nonfinite_fires_while_a_skipped_step_is_in_the_window():
    records = history(nonfinite_steps=[0, 1, 0, 0, 0, 0])
    assert [line["alarm/nonfinite"] for line in replay(records, W3)] == [0, 1, 1, 1, 0, 0]
    assert check_nonfinite(history(**{"nonfinite_steps": [0, 0], "critic/nonfinite_steps": [0, 2]}), W3) is not None
    assert check_nonfinite(history(nonfinite_steps=[0, 0, 0]), W3) is None
    assert check_nonfinite(history(nonfinite_steps=[0, 1, 0]), AlarmSettings(window=3, nonfinite_steps=2)) is None


# ----------------------------------------------------------------------------- the run's state


def test_warns_once_when_an_alarm_fires_and_once_when_it_clears(caplog):
    alarms = RLAlarms(AlarmSettings(window=1, watched=("reward_length_corr",)))
    with caplog.at_level(logging.INFO, logger="posttrain"):
        fired = [alarms.observe(step, {"reward_length_corr": corr})["alarm/reward_length_corr"]
                 for step, corr in enumerate([0.1, 0.9, 0.95, 0.2, 0.1], start=1)]
    assert fired == [0, 1, 1, 0, 0]
    assert [r.getMessage() for r in caplog.records] == [
        ("rl: warning: alarm reward_length_corr at step 2: reward follows response length: within-group "
         "correlation 0.90 over the last 1 steps (>= alarms.reward_length_corr 0.5); the reward checks no correctness"),
        "rl: alarm reward_length_corr cleared at step 4"]


def test_the_state_round_trips_so_a_resumed_run_fires_as_the_straight_one():
    straight = replay(QUICKSTART[:12] + history(entropy=[0.001] * 12), W3)
    first = RLAlarms(W3, announce=False)
    lines = [{"step": s, **first.observe(s, r)} for s, r in enumerate(QUICKSTART[:12], start=1)]
    state = json.loads(json.dumps(first.state_dict()))  # as trainer_state.json holds it
    second = RLAlarms(W3, announce=False, state=state)
    lines += [{"step": s, **second.observe(s, r)} for s, r in enumerate(history(entropy=[0.001] * 12), start=13)]
    assert lines == straight and any(line["alarm/entropy_collapse"] for line in lines)
    assert len(first.history) == 2 * 3  # the first window and the last one: all a check reads


def test_disabled_or_unset_thresholds_watch_nothing():
    assert replay(QUICKSTART[:3], AlarmSettings(watched=())) == [{"step": 1}, {"step": 2}, {"step": 3}]
    assert check_alarms(QUICKSTART, [], AlarmSettings(watched=("entropy_collapse",))) == {"entropy_collapse": None}


def test_fired_spans_group_consecutive_logged_steps():
    records = [{"step": 2, "alarm/kl_blowup": 1}, {"step": 4, "alarm/kl_blowup": 1}, {"step": 6},
               {"step": 8, "alarm/kl_blowup": 0}, {"step": 10, "alarm/kl_blowup": 1}]
    assert fired_spans(records, "kl_blowup") == [(2, 4), (10, 10)]
    assert alarm_summary(records) == (["kl_blowup"], {"kl_blowup": "steps 2–4, 10"})


# ----------------------------------------------------------------------------- config


def _config(**sections) -> RLConfig:
    return validate_config(RLConfig, {"data": {"train": "p.jsonl", "eval": "e.jsonl"}, **sections})


def test_settings_from_the_config_watch_what_the_run_can_measure():
    assert alarm_settings(_config()).watched == tuple(name for name in ALARMS if name not in (
        "reward_up_heldout_down", "tool_calls_no_gain"))
    evaluated = alarm_settings(_config(train={"eval_every": 5}, alarms={"window": 4, "entropy_ratio": None}))
    assert "reward_up_heldout_down" in evaluated.watched and "entropy_collapse" not in evaluated.watched
    assert evaluated.window == 4 and evaluated.entropy_ratio is None
    agent = alarm_settings(_config(agent={"tools": ["python"]}))
    assert "tool_calls_no_gain" in agent.watched
    assert alarm_settings(_config(alarms={"enabled": False})).watched == ()
    kl_off = alarm_settings(_config(alarms={"kl_max": None, "approx_kl_max": None}))
    assert "kl_blowup" not in kl_off.watched


@pytest.mark.parametrize("max_steps,window", [(4, 3), (12, 3), (20, 5), (40, 10), (500, 10)])
def test_the_window_is_a_quarter_of_the_run_between_3_and_10_steps_unless_set(max_steps, window):
    assert alarm_settings(_config(train={"max_steps": max_steps})).window == window
    assert alarm_settings(_config(train={"max_steps": max_steps}, alarms={"window": 7})).window == 7


def test_the_alarms_section_refuses_unknown_keys_and_bad_values_in_one_line():
    with pytest.raises(ConfigError, match="alarms.windw"):
        _config(alarms={"windw": 3})
    with pytest.raises(ConfigError, match="alarms.entropy_ratio"):
        _config(alarms={"entropy_ratio": 1.5})


# ----------------------------------------------------------------------------- tiny runs


ALARM_LINES = ("rl: warning: alarm ", "rl: alarm ")


def length_reward(prompts, completions, metadata):
    """Pays for length: what a reward hacker wants."""
    return RewardOutput([len(text) / 40 for text in completions])


def tiny_run(model_dir, out, name: str, reward, **train):
    from posttrain.train.rl import run_rl
    from test_rl import make_config

    # "e" ends a completion (stop string): random tokens often contain one, so lengths vary within a group
    config = make_config(model_dir, out, run={"name": name}, rollout={"stop": ["e"], "max_new_tokens": 8},
                         train={"max_steps": 4, **train}, alarms={"window": 2})
    return run_rl(config, reward_fn=reward)


def test_a_reward_that_pays_for_length_fires_the_hacking_alarm_and_the_report_says_so(tiny_model_dir, tmp_path,
                                                                                      caplog):
    from posttrain.report import write_report

    with caplog.at_level(logging.INFO, logger="posttrain"):
        result = tiny_run(tiny_model_dir, tmp_path, "hacked", length_reward)
    corr = [line["reward_length_corr"] for line in result.history]
    assert min(corr) > 0.5
    fired = [line["alarm/reward_length_corr"] for line in result.history]
    assert fired == [0, 1, 1, 1]  # from the first whole window on
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith(ALARM_LINES)]
    assert len(warnings) == 1 and warnings[0].startswith("rl: warning: alarm reward_length_corr at step 2: ")
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["alarm/reward_length_corr"] for line in lines] == fired
    page = write_report(result.run_dir, quiet=True).read_text()
    assert "<h2>Alarms</h2>" in page and "<td>reward_length_corr</td><td>steps 2–4</td>" in page


def test_a_reward_that_does_not_pay_for_length_stays_quiet(tiny_model_dir, tmp_path):
    from posttrain.report import write_report
    from test_rl import vowel_reward

    result = tiny_run(tiny_model_dir, tmp_path, "healthy", vowel_reward)
    assert any("reward_length_corr" in line for line in result.history)  # measured, not missing
    alarms = [(key, line["step"]) for line in result.history for key, value in line.items()
              if key.startswith("alarm/") and value]
    assert alarms == []
    assert sum(key.startswith("alarm/") for key in result.history[-1]) == 7  # every alarm this run can measure
    assert "none fired" in write_report(result.run_dir, quiet=True).read_text()


def test_alarms_resume_exactly_from_the_checkpoint(tiny_model_dir, tmp_path, caplog):
    straight = tiny_run(tiny_model_dir, tmp_path, "straight", length_reward)
    tiny_run(tiny_model_dir, tmp_path, "split", length_reward, max_steps=2, save_every=2)
    state = json.loads((tmp_path / "split" / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    assert state["alarms"]["firing"] == {name: name == "reward_length_corr" for name in state["alarms"]["firing"]}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="posttrain"):
        resumed = tiny_run(tiny_model_dir, tmp_path, "split", length_reward, resume="latest",
                           resume_allow_changes=["train.max_steps"])
    keys = [key for key in straight.history[-1] if key.startswith("alarm/")]
    assert [[line[k] for k in keys] for line in resumed.history] == [[line[k] for k in keys]
                                                                      for line in straight.history[2:]]
    assert not [r for r in caplog.records if r.getMessage().startswith(ALARM_LINES)]  # fired before: no repeat
