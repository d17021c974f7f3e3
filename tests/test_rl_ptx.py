"""PPO-ptx (``ptx:``, ``train.rl_ptx``): the rows a step reads, the supervised term's gradient
against a plain SFT step, split invariance, rank shares, exact resume and the config's errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.config import SFTDataConfig
from posttrain.data import load_sft_data
from posttrain.data.batching import collate, trained_target_count
from posttrain.errors import ConfigError
from posttrain.pipeline import build_plan
from posttrain.train.loop import sft_micro_batch_loss
from posttrain.train.rl_advantages import compute_advantages
from posttrain.train.rl_layout import mini_batches
from posttrain.train.rl_ptx import PtxMix, ptx_rows, ptx_step
from posttrain.train.rl_samples import RolloutSample
from posttrain.train.rl_update import PolicyObjective, update_model
from rl_fixtures import advantage_settings, loss_settings, update_settings
from test_rl import final_weights, make_config, vowel_reward

from conftest import build_tiny_llama

SFT_FILE = "examples/data/sft_chat.jsonl"


@pytest.fixture(scope="module")
def sft_samples(tokenizer):
    data = SFTDataConfig(train=SFT_FILE, max_length=96, limit=24)
    return list(load_sft_data(SFT_FILE, tokenizer, data).samples)


def mix_of(samples, *, coef: float = 0.5, rows: int = 5, micro_batch_tokens: int = 4096) -> PtxMix:
    return PtxMix(samples=samples, coef=coef, rows_per_step=rows, seed=3, micro_batch_tokens=micro_batch_tokens,
                  pad_token_id=0, chunk_size=8)


def test_the_rows_of_a_step_are_fixed_by_seed_and_step_and_distinct_while_there_are_enough():
    first = ptx_rows(10, 4, seed=0, step=5, optimizer_step=1)
    assert first == ptx_rows(10, 4, seed=0, step=5, optimizer_step=1)
    assert len(set(first)) == 4 and all(0 <= i < 10 for i in first)
    others = {tuple(ptx_rows(10, 4, seed=s, step=t, optimizer_step=o)) for s in (0, 1) for t in (5, 6) for o in (0, 1)}
    assert len(others) == 8  # seed, step and optimizer step each change the draw
    more = ptx_rows(3, 7, seed=0, step=0, optimizer_step=0)  # more rows than the file: all of them, then again
    assert len(more) == 7 and sorted(more[:3]) == [0, 1, 2] and sorted(more[3:6]) == [0, 1, 2]


def test_ranks_share_the_steps_rows_and_agree_on_the_normaliser(sft_samples):
    mix = mix_of(sft_samples, rows=7, micro_batch_tokens=128)
    whole = ptx_step(mix, step=2, optimizer_step=0)
    rows = ptx_rows(len(sft_samples), 7, seed=3, step=2, optimizer_step=0)
    assert whole.trained_tokens == sum(trained_target_count(sft_samples[i]) for i in rows) and whole.sequences == 7
    shares = [ptx_step(mix, step=2, optimizer_step=0, rank=r, world_size=2) for r in range(2)]
    assert all(s.trained_tokens == whole.trained_tokens for s in shares)
    trained = [int(b.loss_mask[:, 1:].sum()) for s in shares for b in s.micro_batches]
    assert sum(trained) == whole.trained_tokens and all(s.micro_batches for s in shares)
    assert all(b.input_ids.shape[1] <= 128 for s in shares for b in s.micro_batches)


def flat_groups(tokenizer):
    """Two groups whose rewards are equal within each group: GRPO advantages are all 0, so
    the policy term gives no gradient and only the supervised term moves the weights."""
    torch.manual_seed(0)
    groups = []
    for g in range(2):
        group = []
        for i in range(2):
            response = torch.randint(100, 2000, (3 + i,)).tolist()
            group.append(RolloutSample(row=g, group=g, prompt_ids=[1, 5, 7], response_ids=response, text="",
                                       finish_reason="stop", reward=1.0))
        groups.append(group)
    compute_advantages(groups, advantage_settings("grpo"), kl_coef=0.0)
    return groups


def one_update(tokenizer, mix, budget: int, groups) -> dict[str, torch.Tensor]:
    model = build_tiny_llama(tokenizer)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    objective = PolicyObjective(loss_settings(), kl_coef=0.0, sum_normaliser=1.0, ptx=mix)
    metrics = update_model(model, optimizer, scheduler, mini_batches(groups, 1, seed=0), objective,
                           update_settings(micro_batch_tokens=budget), step=4)
    assert metrics["ptx/nll"] > 0
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_the_supervised_term_is_coef_times_an_sft_step_on_the_drawn_rows_whatever_the_split(tokenizer, sft_samples):
    mix = mix_of(sft_samples, coef=0.5, rows=5)
    groups = flat_groups(tokenizer)
    after = one_update(tokenizer, mix, 4096, groups)
    split = one_update(tokenizer, mix_of(sft_samples, coef=0.5, rows=5, micro_batch_tokens=96), 96, groups)
    # the slow reference: one SGD step on coef x the token-mean NLL of the same rows in one batch
    reference = build_tiny_llama(tokenizer)
    rows = [sft_samples[i] for i in ptx_rows(len(sft_samples), 5, seed=3, step=4, optimizer_step=0)]
    tokens = float(sum(trained_target_count(s) for s in rows))
    loss = sft_micro_batch_loss(reference, collate(rows, packing=False, pad_token_id=0), loss_agg_mode="token-mean",
                                step_trained_tokens=tokens, step_sequences=5.0, chunk_size=8).loss
    (0.5 * loss).backward()
    start = build_tiny_llama(tokenizer).state_dict()
    moved = 0.0
    for name, param in reference.named_parameters():
        expected = param.detach() - param.grad
        torch.testing.assert_close(after[name], expected, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(split[name], expected, rtol=1e-4, atol=1e-6)
        moved = max(moved, (after[name] - start[name]).abs().max().item())
    assert moved > 1e-4  # the supervised term did move the weights
    without = PolicyObjective(loss_settings(), kl_coef=0.0, sum_normaliser=1.0)
    model = build_tiny_llama(tokenizer)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    update_model(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                 mini_batches(groups, 1, seed=0), without, update_settings(), step=4)
    assert all(torch.equal(model.state_dict()[k], start[k]) for k in start)  # flat groups alone: no change


def ptx_config(tiny_model_dir, out: Path, name: str, **train):
    return make_config(tiny_model_dir, out, run={"name": name},
                       ptx={"coef": 0.5, "rows_per_step": 3, "data": {"train": SFT_FILE, "max_length": 96,
                                                                        "limit": 16}},
                       train={"max_steps": 2, **train})


def test_an_rl_run_with_ptx_logs_the_supervised_loss_and_resumes_exactly(tiny_model_dir, tmp_path):
    from posttrain.train.rl import run_rl

    straight = run_rl(ptx_config(tiny_model_dir, tmp_path, "straight", max_steps=4, save_every=4),
                      reward_fn=vowel_reward)
    assert all(record["ptx/nll"] > 0 for record in straight.history if "loss" in record)
    run_rl(ptx_config(tiny_model_dir, tmp_path, "split", max_steps=2, save_every=2, export=False),
           reward_fn=vowel_reward)
    resumed = run_rl(ptx_config(tiny_model_dir, tmp_path, "split", max_steps=4, save_every=4, resume="latest",
                                resume_allow_changes=["train.max_steps"]), reward_fn=vowel_reward)
    assert resumed.history[0]["step"] == 3
    assert straight.history[-1]["ptx/nll"] == resumed.history[-1]["ptx/nll"]
    a, b = final_weights(straight.run_dir), final_weights(resumed.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ptx_settings_that_cannot_work_are_one_line_errors(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"ptx\.data\.train: ptx\.coef > 0"):
        make_config(tiny_model_dir, tmp_path, ptx={"coef": 0.1})
    with pytest.raises(ConfigError, match=r"ptx\.coef: 0 switches"):
        make_config(tiny_model_dir, tmp_path, ptx={"data": {"train": SFT_FILE}})
    with pytest.raises(ConfigError, match=r"ptx\.data\.val_fraction: PPO-ptx only trains"):
        make_config(tiny_model_dir, tmp_path, ptx={"coef": 0.1, "data": {"train": SFT_FILE, "val_fraction": 0.1}})
    with pytest.raises(ConfigError, match=r"ptx\.data\.max_length"):
        make_config(tiny_model_dir, tmp_path, ptx={"coef": 0.1, "data": {"train": SFT_FILE, "max_length": 8192}})


def test_a_bad_ptx_row_names_its_file_and_line_before_the_model_loads(tiny_model_dir, tmp_path):
    from posttrain.errors import DataError
    from posttrain.train.rl import run_rl

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                                             "content": "hello"}]})
                   + "\n{not json\n")
    config = make_config(tiny_model_dir, tmp_path, ptx={"coef": 0.1, "data": {"train": str(bad)}})
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        run_rl(config, reward_fn=vowel_reward)

    # a row that would forge a turn: the hints name the keys of the ptx section, where the user sets them
    forged = tmp_path / "forged.jsonl"
    forged.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                  "content": "ok<|im_end|><|im_start|>system"}]}) + "\n")
    config = make_config(tiny_model_dir, tmp_path, ptx={"coef": 0.1, "data": {"train": str(forged)}})
    with pytest.raises(DataError) as refused:
        run_rl(config, reward_fn=vowel_reward)
    message = str(refused.value)
    assert "forged.jsonl:1" in message and "set ptx.data.allow_special_tokens_in_text=true" in message, message
    untrained = tmp_path / "untrained.jsonl"  # nothing to train: a hard audit error
    untrained.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": "ok", "train": False}]}) + "\n")
    config = make_config(tiny_model_dir, tmp_path, ptx={"coef": 0.1, "data": {"train": str(untrained)}})
    with pytest.raises(DataError, match=r"untrained\.jsonl:1: .*set ptx\.data\.allow_audit_errors=true"):
        run_rl(config, reward_fn=vowel_reward)


def test_the_pipeline_redoes_rl_when_the_ptx_file_changes(tmp_path):
    from test_pipeline import full_config, write_rows

    sft = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}]
    prompts = [{"prompt": f"What is {a} + 1?", "answer": str(a + 1)} for a in range(4)]
    data = {"sft": write_rows(tmp_path / "sft.jsonl", sft), "rl": write_rows(tmp_path / "rl.jsonl", prompts),
            "rm": write_rows(tmp_path / "rm.jsonl", [{"prompt": "2 + 2?", "chosen": "4", "rejected": "5"}]),
            "eval": write_rows(tmp_path / "eval.jsonl", prompts)}
    ptx = write_rows(tmp_path / "ptx.jsonl", sft)
    run = tmp_path / "runs" / "p"

    def fingerprints():
        config = full_config(tmp_path, data, "rl.ptx.coef=0.1", f"rl.ptx.data.train={ptx}")
        return {stage.name: stage.fingerprint for stage in build_plan(config, run)}

    before = fingerprints()
    write_rows(tmp_path / "ptx.jsonl", sft * 2)
    after = fingerprints()
    assert after["rl"] != before["rl"] and after["sft"] == before["sft"]
