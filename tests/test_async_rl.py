"""Asynchronous RL steps (``rl.max_staleness``, ``train.rl_async``): at 0 the rollout thread is
the synchronous loop bit for bit; at k it never trains on a sample more than k versions old;
the prompts of a resumed run are neither lost nor repeated; decoupled PPO's weights are on."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.train.rl_async import RolloutAhead, StalenessCounts, drop_stale
from posttrain.train.rl_samples import RolloutBatch, RolloutSample
from test_rl import final_weights, make_config, vowel_reward


def samples_of(run_dir):
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def test_the_rollout_thread_at_staleness_zero_is_the_synchronous_loop_bit_for_bit(tiny_model_dir, tmp_path,
                                                                                  monkeypatch):
    from posttrain.train import rl as rl_module

    def run(name):
        config = make_config(tiny_model_dir, tmp_path, run={"name": name}, train={"max_steps": 3})
        return rl_module.run_rl(config, reward_fn=vowel_reward)

    plain = run("sync")
    monkeypatch.setattr(rl_module, "ROLLOUT_THREAD_AT_ZERO", True)
    threaded = run("thread")
    a, b = final_weights(plain.run_dir), final_weights(threaded.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for x, y in zip(plain.history, threaded.history):
        assert (x["reward/mean"], x["loss"], x["grad_norm"]) == (y["reward/mean"], y["loss"], y["grad_norm"])
    assert [s["response_ids"] for s in samples_of(plain.run_dir)] == [s["response_ids"]
                                                                     for s in samples_of(threaded.run_dir)]


def test_staleness_one_trains_ahead_and_never_on_an_older_sample(tiny_model_dir, tmp_path):
    from posttrain.train.rl import run_rl

    config = make_config(tiny_model_dir, tmp_path, run={"name": "k1"}, rl={"max_staleness": 1},
                         train={"max_steps": 4, "samples_per_log": 100})
    result = run_rl(config, reward_fn=vowel_reward)
    samples = samples_of(result.run_dir)
    ages = [(s["step"] - 1) - s["policy_version"] for s in samples]  # step N's update starts from version N - 1
    assert len(samples) == 4 * 8 and min(ages) >= 0 and max(ages) <= 1
    assert 1 in ages  # the thread did sample ahead: a step trained on the previous version's samples
    record = result.history[-1]
    assert record["staleness/max"] <= 1 and record["staleness/dropped"] == 0
    assert record["staleness/hist/0"] + record["staleness/hist/1"] == pytest.approx(1.0)
    for key in ("mismatch/kl_k3", "mismatch/is_ratio/mean", "mismatch/truncated_frac", "time/weight_sync"):
        assert key in record  # decoupled PPO with truncated IS: on by default when the engine is not the trainer
    assert any(r["mismatch/kl_k3"] > 0 for r in result.history)  # stale samples: the policies differ


def test_a_resumed_asynchronous_run_trains_the_same_prompts_per_step(tiny_model_dir, tmp_path):
    """The checkpoint records the prompt sampler after the TRAINED step, not the thread's position
    ahead: the batch in flight when the run stopped is sampled again on resume, none lost or doubled."""
    from posttrain.train.rl import run_rl

    rl = {"max_staleness": 1}
    straight = run_rl(make_config(tiny_model_dir, tmp_path, rl=rl, run={"name": "straight"},
                                  train={"max_steps": 4, "samples_per_log": 100}), reward_fn=vowel_reward)
    run_rl(make_config(tiny_model_dir, tmp_path, rl=rl, run={"name": "split"},
                       train={"max_steps": 2, "save_every": 2, "export": False, "samples_per_log": 100}),
           reward_fn=vowel_reward)
    resumed = run_rl(make_config(tiny_model_dir, tmp_path, rl=rl, run={"name": "split"},
                                 train={"max_steps": 4, "save_every": 4, "resume": "latest", "samples_per_log": 100,
                                        "resume_allow_changes": ["train.max_steps", "train.save_every"]}),
                     reward_fn=vowel_reward)
    state = json.loads((resumed.run_dir / "checkpoints" / "step_4" / "trainer_state.json").read_text())
    assert state["sampler"]["position"] == 8  # 4 steps x 2 prompts, not 5 x 2

    def prompts_by_step(run_dir):
        by_step: dict[int, list[str]] = {}
        for sample in samples_of(run_dir):
            by_step.setdefault(sample["step"], []).append(sample["prompt"])
        return by_step

    assert prompts_by_step(straight.run_dir) == prompts_by_step(resumed.run_dir)
    assert {s["policy_version"] for s in samples_of(resumed.run_dir) if s["step"] == 3} == {2}  # resampled fresh


def test_rollout_ahead_keeps_the_bound_and_the_order():
    calls: list[tuple[int, int]] = []

    def collect(step, version):
        calls.append((step, version))
        return RolloutBatch(groups=[[RolloutSample(step, 0, [1], [2], "", "stop", policy_version=version)]])

    for k in (0, 2):
        calls.clear()
        with RolloutAhead(collect, start=0, stop=6, max_staleness=k, threaded=True) as ahead:
            for step in range(6):
                batch = ahead.next(step)
                assert batch.groups[0][0].row == step
                assert step - batch.groups[0][0].policy_version <= k
                ahead.push_weights(lambda: None)
        assert [s for s, _ in calls] == list(range(6))
        assert all(step - version <= k for step, version in calls)
        if k:
            assert any(step - version == k for step, version in calls)  # it did run ahead


def test_an_error_in_the_rollout_thread_reaches_the_trainer():
    def collect(step, version):
        if step == 1:
            raise RuntimeError("rollout: the vLLM server stopped answering")
        return RolloutBatch(groups=[])

    with RolloutAhead(collect, start=0, stop=3, max_staleness=1) as ahead:
        ahead.next(0)
        ahead.push_weights(lambda: None)
        with pytest.raises(RuntimeError, match="stopped answering"):
            ahead.next(1)
    assert not any(t.name == "posttrain-rollouts" for t in threading.enumerate())


def test_stale_groups_are_dropped_whole_and_counted_per_prompt():
    def group(row, version):
        return [RolloutSample(row, row, [1], [2], "", "stop", policy_version=version) for _ in range(2)]

    counts = StalenessCounts()
    batch = RolloutBatch(groups=[group(0, 5), group(1, 3), group(2, 4)])
    metrics = drop_stale(batch, step=5, max_staleness=1, counts=counts)
    assert [g[0].row for g in batch.groups] == [0, 2]
    assert metrics["staleness/dropped"] == 2 and metrics["staleness/dropped_rows"] == 1
    assert metrics["staleness/hist/0"] == pytest.approx(2 / 6) and metrics["staleness/hist/1"] == pytest.approx(2 / 6)
    assert metrics["staleness/starved_rows"] == 1  # row 1 lost 2 samples over the run
    assert counts.dropped_rows == {1: 2}


def test_settings_that_cannot_run_asynchronously_are_refused(tiny_model_dir, tmp_path):
    from posttrain.train.rl import check_settings

    with pytest.raises(ConfigError, match="rl.max_staleness.*top_p"):
        make_config(tiny_model_dir, tmp_path, rl={"max_staleness": 1}, rollout={"top_p": 0.9})
    with pytest.raises(ConfigError, match="rl.mismatch.correction.*top_k"):
        make_config(tiny_model_dir, tmp_path, rl={"mismatch": {"correction": "mis"}}, rollout={"top_k": 20})
    config = make_config(tiny_model_dir, tmp_path, rl={"max_staleness": 1})
    with pytest.raises(ConfigError, match="rl.max_staleness: with 2 ranks, rollout.engine hf"):
        check_settings(config, world_size=2)
