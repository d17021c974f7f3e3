"""posttrain rl is data-parallel: two CPU processes (torchrun, gloo, FSDP2) each sample and
train on half of a step's prompts, and give the same logged metrics, samples.jsonl and final
weights as one process on the same prompts (grpo: group-relative advantages computed per
rank; reinforce_pp and ppo (critic, whitened GAE): batch-normalised advantages over the
gathered batch; grpo with LoRA: the reference is the adapter-disabled policy; grpo with PPO-ptx:
each rank trains its share of the step's SFT rows). Completions come
from an engine that depends only on the prompt, so both runs sample the same tokens. The
prompts dealt to rank 0 are long and rank 1's short, so rank 1 runs filler micro-batches.
DAPO dynamic sampling with overlong filtering (ranks refilling different amounts, one rank
with nothing to train) and the hf engine (ranks generating in step) must run to the end."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from distributed_harness import run_worker, small_vocab_model_dir

WORKER = textwrap.dedent("""
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from posttrain.config import RLConfig, validate_config
    from posttrain.rewards.output import RewardOutput
    from posttrain.rollout.base import Completion
    from posttrain.train import distributed, rl
    from posttrain.train.rl import run_rl
    from posttrain.eval.prompts import PromptRow

    rl.shutdown_distributed = distributed.barrier  # one process group for all the runs below
    build_rl_agent = rl.build_rl_agent

    model_dir, out = sys.argv[1], sys.argv[2]
    LONG = {0, 4, 5, 7}  # PromptSampler(8, seed=0) deals rows 4, 5 then 0, 7 to rank 0 of 2

    def prompt_ids(row):
        if row in LONG:
            return [1] + [(row * 11 + j * 7) % 280 + 10 for j in range(29)]
        return [1, 10 + row, 20 + row]

    rows = [PromptRow(prompt_ids(r), f"row {r}", {}, r + 1) for r in range(8)]

    class PromptDeterminedEngine:
        \"\"\"Completions depend only on the prompt (never on the seed or the rank). ``dapo``: rows
        with sum % 3 == 0 give a group of identical completions (no signal) and short prompts
        give completions cut at max_new_tokens (filtered out of the loss).\"\"\"

        def __init__(self, dapo=False):
            self.dapo = dapo

        def generate(self, prompts, params):
            completions = []
            for index, prompt in enumerate(prompts):
                base = sum(prompt) + len(prompt)
                for k in range(params.n):
                    k = 0 if self.dapo and base % 3 == 0 else k
                    length = 1 + (base + 2 * k) % params.max_new_tokens
                    if self.dapo and len(prompt) < 5:
                        length = params.max_new_tokens
                    ids = [(base * 7 + k * 13 + j * 29) % 290 + 5 for j in range(length)]
                    text = "".join("aeioubcdfg"[t % 10] for t in ids)
                    finish = "length" if length == params.max_new_tokens else "stop"
                    completions.append(Completion(index, ids, text, finish))
            return completions

        def update_weights(self, model):
            pass

    from dataclasses import replace
    from posttrain.agent.loop import AgentPrompt
    from posttrain.data.render import RenderedSample
    from posttrain.train.rl_ptx import PtxMix
    from posttrain.agent.trajectory import Segment, Trajectory

    class PromptDeterminedAgent:
        \"\"\"Two-turn trajectories that depend only on the prompt: sampled ids, a 3-token env
        segment (a tool's answer), sampled ids again.\"\"\"

        config = type("Shaping", (), {"tool_call_bonus": 0.0, "tool_error_penalty": 0.0})()
        tokenizer = None  # the records keep ids only
        limits = type("Limits", (), {"max_total_tokens": 64})()  # the overlong cap of a trajectory

        def prompt(self, messages, prompt_ids, row, where):
            return AgentPrompt(list(prompt_ids), [], dict(row))

        def run(self, engine, prompts, params):
            trajectories = []
            for index, prompt in enumerate(prompts):
                for first in engine.generate([prompt.prompt_ids], params):
                    env = [(sum(first.token_ids) + 3 * j) % 290 + 5 for j in range(3)]
                    (second,) = engine.generate([prompt.prompt_ids + first.token_ids + env], replace(params, n=1))
                    segments = [Segment(list(prompt.prompt_ids), "prompt"), Segment(list(first.token_ids), "sampled"),
                                Segment(env, "env"), Segment(list(second.token_ids), "sampled")]
                    trajectories.append(Trajectory(index, segments, "stop", turns=2, tool_calls=1,
                                                   final_text=first.text + second.text, text=first.text + second.text))
            return trajectories

    def vowels(prompts, completions, metadata):
        scores = [sum(c in "aeiou" for c in text) / len(text) for text in completions]
        return RewardOutput(scores, {"vowels": scores})

    def config(name, algorithm, engine="hf", steps=2, train=(), ptx=None, **rl):
        return validate_config(RLConfig, {**({"ptx": ptx} if ptx else {}),
            "model": {"name": model_dir}, "data": {"train": "unused.jsonl"},
            "rollout": {"group_size": 3, "max_new_tokens": 5, "engine": engine},
            "rl": {"algorithm": algorithm, "prompts_per_step": 4, "kl_coef": 0.05, **rl},
            "optim": {"lr": 1e-2},
            "train": {"max_steps": steps, "micro_batch_tokens": 48, "samples_every": 1, "samples_per_log": 100, "save_every": steps, **dict(train)},
            "run": {"output_dir": out, "name": name, "progress": False, "tensorboard": False},
        })

    histories = {}
    runs = {
        "grpo": config("grpo", "grpo", entropy_coef=0.01),
        "reinforce_pp": config("reinforce_pp", "reinforce_pp", kl_in="reward", share_prompt=False,
                               train={"loss_agg_mode": "seq-mean-token-mean"}),
        "ppo": config("ppo", "ppo", kl_in="reward", ppo_epochs=2),
        "dapo": config("dapo", "grpo", dynamic_sampling=True, max_refill_rounds=2, overlong="filter",
                       mini_batch_size=6, clip_high=0.28),
    }
    runs["grpo_lora"] = config("grpo_lora", "grpo")
    runs["grpo_lora"].lora.enabled, runs["grpo_lora"].lora.r = True, 4
    runs["agentic"] = config("agentic", "ppo", kl_in="reward")  # multi-turn: env tokens inside every response
    # PPO-ptx: SFT rows of 4 to 12 tokens in the small vocabulary, 5 per optimizer step, shared by tokens over the ranks
    runs["grpo_ptx"] = config("grpo_ptx", "grpo", ptx={"coef": 0.5, "rows_per_step": 5, "data": {"train": "unused.jsonl", "max_length": 16}},
                              ppo_epochs=2)
    ptx_rows = [RenderedSample([(r * 17 + j * 5) % 290 + 5 for j in range(4 + r % 9)], [0, 0] + [1] * (2 + r % 9))
                for r in range(10)]
    rl.load_ptx = lambda config, tokenizer, info: PtxMix(
        ptx_rows, config.ptx.coef, config.ptx.rows_per_step, config.train.seed, config.train.micro_batch_tokens, 0,
        config.train.logits_chunk_size) if config.ptx.coef else None
    for name, cfg in runs.items():
        engine = PromptDeterminedEngine(dapo=name == "dapo")
        rl.build_rl_agent = (lambda config, tokenizer: PromptDeterminedAgent()) if name == "agentic" else build_rl_agent
        histories[name] = run_rl(cfg, engine=engine, prompts=(rows, []), reward_fn=vowels).history
    rl.build_rl_agent = build_rl_agent
    # exact resume: 2 steps == 1 step + resume + 1 step (sampler position, adaptive KL, weights)
    adaptive = dict(target_kl=0.001, kl_horizon=10.0)
    runs = {"straight": config("straight", "grpo", **adaptive),
            "split": config("split", "grpo", steps=1, train={"export": False}, **adaptive),
            "resumed": config("split", "grpo", train={"resume": "latest", "resume_allow_changes": ["train.max_steps"]},
                              **adaptive)}
    for name, cfg in runs.items():
        histories[name] = run_rl(cfg, engine=PromptDeterminedEngine(), prompts=(rows, []), reward_fn=vowels).history
    # the hf engine under FSDP: ranks generate different prompts in step (no fixed completions)
    histories["hf"] = run_rl(config("hf", "grpo", steps=1), prompts=(rows, []), reward_fn=vowels).history
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps(histories))
    distributed.shutdown_distributed()
""")

NOT_COMPARED = ("time/", "tokens_per_sec", "step_time_s")


def samples_of(run_dir):
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, tokenizer):
    from safetensors.torch import load_file

    model_dir = small_vocab_model_dir(tmp_path, tokenizer)
    one, out_one = run_worker(WORKER, tmp_path, model_dir, 1, timeout=900)
    two, out_two = run_worker(WORKER, tmp_path, model_dir, 2, timeout=900)
    out_one, out_two = out_one.parent, out_two.parent
    for name in ("grpo", "reinforce_pp", "ppo", "grpo_lora", "agentic", "grpo_ptx"):
        assert [h["step"] for h in one[name]] == [h["step"] for h in two[name]] == [1, 2]
        for a, b in zip(one[name], two[name]):
            assert a.keys() == b.keys()
            for key in a:
                if not key.startswith(NOT_COMPARED):
                    assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (name, a["step"], key)
            assert a["grad_norm"] > 0 and (a["kl"] > 0 or a["step"] == 1)  # step 1: policy == reference
            assert a["trained_sequences"] == 12 and a["adv/std"] > 0.5
        assert samples_of(out_two / name) == samples_of(out_one / name)
        assert len(samples_of(out_one / name)) == 24  # every rank's samples, both steps
        before = load_file(str(model_dir / "model.safetensors"))
        w1 = load_file(str(out_one / name / "final" / "model.safetensors"))
        w2 = load_file(str(out_two / name / "final" / "model.safetensors"))
        assert w1.keys() == w2.keys()
        assert max((w1[k] - before[k]).abs().max().item() for k in w1) > 1e-3  # training moved the weights
        # Adam divides each gradient entry by its own running scale, so entries whose gradient
        # is near zero move by up to lr whatever their size, and the order in which 2 ranks sum
        # them shows in the weights: up to 1.4e-5 (reinforce_pp) and ~2e-5 (agentic: PPO with
        # whitened GAE, a step loss of ~1e-8) on a 2-core AVX2 CPU, against 2e-2 to 4e-2 of
        # movement. Adam is blind to the gradient's scale, so a mask or normaliser error shows
        # in the metrics compared above (rel 1e-4), not here; 1e-4 still catches a wrong
        # direction, which moves weights by ~lr.
        for key in w1:
            torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-4, msg=f"{name}: {key}")
        state_one = json.loads((out_one / name / "checkpoints" / "step_2" / "trainer_state.json").read_text())
        state_two = json.loads((out_two / name / "checkpoints" / "step_2" / "trainer_state.json").read_text())
        assert state_one["sampler"] == state_two["sampler"] and state_two["world_size"] == 2
    for history in (two["dapo"], one["dapo"]):
        assert [h["step"] for h in history] == [1, 2]
        assert history[0]["groups/dropped"] > 0 and history[0]["groups/generated"] > 4  # refilled
        assert all(h["trained_sequences"] < 12 and h["grad_norm"] > 0 for h in history)  # clipped ones filtered
    for history, out in ((one, out_one), (two, out_two)):
        straight, resumed = history["straight"], history["resumed"]
        assert resumed[0]["step"] == 2 and straight[1]["kl_coef"] != 0.05  # the KL controller moved
        for key in ("reward/mean", "loss", "grad_norm", "kl", "kl_coef"):
            assert resumed[0][key] == pytest.approx(straight[1][key], rel=1e-5, abs=1e-8), key
        a = load_file(str(out / "straight" / "final" / "model.safetensors"))
        b = load_file(str(out / "split" / "final" / "model.safetensors"))
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7, msg=key)
    assert two["agentic"][0]["agent/env_tokens"] == 3.0 and two["agentic"][0]["agent/turns"] == 2.0
    assert all(s["trajectory"]["segments"][2]["kind"] == "env" for s in samples_of(out_two / "agentic"))
    assert two["ppo"][0]["optimizer_steps"] == 2 and two["ppo"][0]["critic/grad_norm"] > 0
    assert two["grpo_ptx"][0]["optimizer_steps"] == 2 and two["grpo_ptx"][0]["ptx/nll"] > 0
    assert two["hf"][0]["tokens_per_step"] > 0 and two["hf"][0]["grad_norm"] > 0


def test_prompts_per_step_must_split_evenly_over_ranks():
    from posttrain.config import RLConfig, validate_config
    from posttrain.errors import ConfigError
    from posttrain.train.rl import check_settings

    config = validate_config(RLConfig, {"data": {"train": "x.jsonl"}, "rl": {"prompts_per_step": 6}})
    check_settings(config, world_size=3)
    with pytest.raises(ConfigError, match=r"rl\.prompts_per_step \(6\).*4 ranks"):
        check_settings(config, world_size=4)
