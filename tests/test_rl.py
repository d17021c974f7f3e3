"""posttrain rl on a tiny random Llama: every algorithm runs and learns something finite,
the trainer trains on the exact sampled ids, exact resume, split invariance, and the pieces
of the step (advantages layout, dynamic sampling, overlong shaping, LoRA reference)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from posttrain.config import RLConfig, validate_config
from posttrain.errors import ConfigError
from posttrain.rewards.output import RewardOutput
from posttrain.rollout.base import Completion, SamplingParams
from posttrain.eval.prompts import PromptRow
from posttrain.train.rl_rollouts import (
    PromptSampler,
    collect_rollouts,
)
from posttrain.train.rl_advantages import compute_advantages
from posttrain.train.rl_layout import mini_batches, pack_micro_batches
from posttrain.train.rl_samples import RolloutSample
from posttrain.train.rl_scoring import overlong_length_penalty
from rl_fixtures import advantage_settings, layout, loss_settings, objective, rollout_settings, scoring, update_settings

from conftest import build_tiny_llama

TRAIN_FILE = "examples/data/rl_arithmetic_train.jsonl"
EVAL_FILE = "examples/data/rl_arithmetic_eval.jsonl"


def vowel_reward(prompts, completions, metadata):
    """A reward with variance even for a random model: share of vowels in the text."""
    scores = [sum(text.count(v) for v in "aeiou") / max(1, len(text)) for text in completions]
    return RewardOutput(scores, {"vowels": scores})


def make_config(model_dir: str, out: Path, **sections) -> RLConfig:
    raw = {
        "model": {"name": model_dir},
        "data": {"train": TRAIN_FILE, "limit": 64},
        "rollout": {"group_size": 4, "max_new_tokens": 6, "engine_logprobs": True},
        "rl": {"prompts_per_step": 2},
        "optim": {"lr": 1e-3},
        "train": {"max_steps": 2, "samples_every": 1},
        "run": {"output_dir": str(out), "progress": False, "tensorboard": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return validate_config(RLConfig, raw)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


def initial_weights(model_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


@pytest.mark.parametrize("algorithm,extra", [
    ("grpo", {}),
    ("dr_grpo", {"train": {"loss_agg_mode": "sum"}}),
    ("rloo", {"kl_coef": 0.05, "kl_estimator": "k1"}),
    ("reinforce_pp", {"kl_coef": 0.05, "kl_in": "reward"}),
    ("ppo", {"kl_coef": 0.05, "kl_in": "reward", "ppo_epochs": 2, "mini_batch_size": 4}),
    ("grpo", {"policy_loss": "gspo", "gspo_importance_level": "token", "ppo_epochs": 2, "clip_low": 3e-4,
              "clip_high": 4e-4}),
    ("grpo", {"policy_loss": "cispo", "ppo_epochs": 2, "clip_low": 1.0, "clip_high": 0.28}),
])
def test_every_algorithm_trains_finite_and_changes_weights(algorithm, extra, tiny_model_dir, tmp_path):
    from posttrain.train.rl import run_rl

    train = extra.pop("train", {})
    config = make_config(tiny_model_dir, tmp_path, rl={"algorithm": algorithm, **extra}, train=train,
                         run={"name": f"{algorithm}_{extra.get('policy_loss', 'ppo_clip')}"})
    result = run_rl(config, reward_fn=vowel_reward)
    assert len(result.history) == 2
    for record in result.history:
        for key in ("loss", "grad_norm", "reward/mean", "entropy", "clip_frac", "ratio/mean", "adv/std",
                    "response_len/mean", "time/generate", "time/update", "zero_variance_group_frac"):
            assert isinstance(record[key], (int, float)) and record[key] == record[key], (key, record.get(key))
        assert record["grad_norm"] > 0
    if algorithm == "ppo":
        assert result.history[0]["critic/grad_norm"] > 0
        assert result.history[0]["optimizer_steps"] == 4  # 2 epochs x (8 samples / 4)
    if extra.get("kl_coef"):
        assert "kl" in result.history[-1]
    before, after = initial_weights(tiny_model_dir), final_weights(result.run_dir)
    changed = [name for name in after if not torch.equal(before[name], after[name])]
    assert changed, "no weight changed"
    samples = [json.loads(line) for line in (result.run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and {"prompt", "completion", "reward", "response_ids"} <= set(samples[0])


@pytest.mark.slow
def test_exact_resume_ppo_with_adaptive_kl(tiny_model_dir, tmp_path):
    """4 steps straight == 2 steps + resume + 2 steps (policy, critic, KL controller, sampler)."""
    from posttrain.train.rl import run_rl

    rl = {"algorithm": "ppo", "kl_coef": 0.1, "target_kl": 0.01, "kl_horizon": 100.0, "kl_in": "reward",
          "mini_batch_size": 4}
    straight = run_rl(make_config(tiny_model_dir, tmp_path, rl=rl, run={"name": "straight"},
                                  train={"max_steps": 4, "save_every": 4}), reward_fn=vowel_reward)
    run_rl(make_config(tiny_model_dir, tmp_path, rl=rl, run={"name": "split"},
                       train={"max_steps": 2, "save_every": 2, "export": False}), reward_fn=vowel_reward)
    resumed = run_rl(make_config(tiny_model_dir, tmp_path, rl=rl, run={"name": "split"},
                                 train={"max_steps": 4, "save_every": 4, "resume": "latest",
                                        "resume_allow_changes": ["train.max_steps"]}), reward_fn=vowel_reward)
    assert resumed.history[0]["step"] == 3
    assert straight.history[2]["reward/mean"] == resumed.history[0]["reward/mean"]
    assert straight.history[3]["kl_coef"] == resumed.history[1]["kl_coef"] != 0.1  # the controller moved
    a, b = final_weights(straight.run_dir), final_weights(resumed.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    critic_a = torch.load(straight.run_dir / "checkpoints" / "step_4" / "critic_model.pt")
    critic_b = torch.load(resumed.run_dir / "checkpoints" / "step_4" / "critic_model.pt")
    assert all(torch.equal(critic_a[k], critic_b[k]) for k in critic_a)
    state = json.loads((resumed.run_dir / "checkpoints" / "step_4" / "trainer_state.json").read_text())
    assert state["sampler"]["position"] == 8 and state["kl_controller"]["value"] == pytest.approx(
        straight.history[3]["kl_coef"])


class ReplayEngine:
    """Returns fixed token ids that do NOT survive decode -> encode (``h`` + ``ello`` decodes to
    "hello", which re-encodes as one token), with log-probs computed by a plain full forward
    of the policy: if the trainer re-tokenised text or misplaced a position, the gap shows."""

    def __init__(self, model, ids: list[int]):
        self.model, self.ids, self.calls = model, ids, 0

    def generate(self, prompt_ids, params: SamplingParams):
        out = []
        for index, prompt in enumerate(prompt_ids):
            full = torch.tensor([prompt + self.ids])
            with torch.no_grad():
                logits = self.model(input_ids=full).logits[0].float() / params.temperature
            logp = torch.log_softmax(logits, -1)[len(prompt) - 1: -1].gather(
                -1, torch.tensor(self.ids)[:, None]).squeeze(-1).tolist()
            for _ in range(params.n):
                out.append(Completion(index, list(self.ids), "hello", "length",
                                      logp if params.return_logprobs else None))
        self.calls += 1
        return out

    def update_weights(self, model) -> None:
        self.model = model


def test_token_in_token_out(tiny_model_dir, tmp_path, tokenizer):
    from posttrain.train import rl as rl_module
    from posttrain.train import rl_logprobs

    ids = tokenizer.encode("h", add_special_tokens=False) + tokenizer.encode("ello", add_special_tokens=False)
    assert tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False) != ids
    config = make_config(tiny_model_dir, tmp_path, rl={"ppo_epochs": 2}, train={"max_steps": 1})
    seen: list[list[int]] = []
    original = rl_logprobs.compute_rollout_tensors

    def spy(samples, settings, **kwargs):
        seen.extend(s.input_ids[len(s.prompt_ids):] for s in samples)
        for chunk, batch in pack_micro_batches(samples, layout()):
            flat = batch.input_ids[0][batch.loss_mask[0] != 0].tolist()
            assert flat == [t for s in chunk for t in s.response_ids]
        return original(samples, settings, **kwargs)

    rl_logprobs.compute_rollout_tensors = spy
    try:
        policy_holder = {}
        original_build = rl_module.build_trainables

        def build(config, info):
            models = original_build(config, info)
            policy_holder["engine"] = ReplayEngine(models.policy, ids)
            return models

        rl_module.build_trainables = build
        result = rl_module.run_rl(config, engine=_LazyEngine(policy_holder), reward_fn=vowel_reward)
    finally:
        rl_logprobs.compute_rollout_tensors = original
        rl_module.build_trainables = original_build
    assert seen and all(response == ids for response in seen)
    assert result.history[0]["logprob_gap/max_abs"] < 1e-4


class _LazyEngine:
    """Forwards to the engine built once the policy exists."""

    def __init__(self, holder):
        self.holder = holder

    def generate(self, *args, **kwargs):
        return self.holder["engine"].generate(*args, **kwargs)

    def update_weights(self, model):
        self.holder["engine"].update_weights(model)


@pytest.mark.parametrize("policy_loss", ["ppo_clip", "gspo", "cispo"])
def test_split_invariance_of_the_policy_update(tiny_model_dir, tokenizer, policy_loss):
    """One optimizer step gives the same weights whatever the micro-batch token budget, for
    every policy loss, off-policy (old log-probs differ from the current ones, so ratios,
    GSPO's per-sequence means and the clips are all exercised)."""
    from posttrain.algorithms.policy import PolicyLossOptions
    from posttrain.train.rl_update import update_model
    from posttrain.models.attention import choose_attention
    from posttrain.models.prepare import prepare_for_training

    torch.manual_seed(0)
    groups = []
    for g in range(2):
        group = []
        for i in range(3):
            response = torch.randint(100, 2000, (3 + 2 * i + g,)).tolist()
            sample = RolloutSample(row=g, group=g, prompt_ids=[1, 5 + g, 7], response_ids=response, text="",
                                   finish_reason="stop", reward=float(i))
            sample.old_logp = -10.8 + 0.3 * torch.randn(len(response))  # the random tiny model: ~ -log(49152)
            group.append(sample)
        groups.append(group)
    compute_advantages(groups, advantage_settings("grpo"), kl_coef=0.0)
    settings = loss_settings(policy_loss=policy_loss, policy_options=PolicyLossOptions(clip_low=0.2, clip_high=0.28),
                             loss_agg_mode="seq-mean-token-mean", entropy_coef=0.01, temperature=0.7, chunk_size=4)
    results = []
    for budget in (4096, 12):
        model = build_tiny_llama(tokenizer)
        prepare_for_training(model, attn_implementation=choose_attention(True, None), gradient_checkpointing=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        batches = mini_batches(groups, 1, seed=0)
        metrics = update_model(model, optimizer, scheduler, batches, objective(settings),
                               update_settings(settings, micro_batch_tokens=budget), step=0)
        assert 0.05 < metrics["clip_frac"] < 0.95  # off-policy: some ratios (weights) clipped, not all
        results.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    assert len(pack_micro_batches([s for g in groups for s in g], layout(12))) > 1
    moved = max((results[0][k] - build_tiny_llama(tokenizer).state_dict()[k]).abs().max().item() for k in results[0])
    assert moved > 1e-4
    # SGD at lr 1 moves weights by up to ~0.25 here; summing the gradient in another order (12-token
    # micro-batches) differs by up to 1.2e-6 on an AVX2-only CPU (ppo_clip, one embedding entry of 3M).
    # A wrong normaliser or mask moves weights by ~1e-2 or more.
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=1e-5, atol=5e-6)


# ----------------------------------------------------------------------------- pieces


def _sample(group: int, reward: float, length: int = 2, finish: str = "stop") -> RolloutSample:
    return RolloutSample(row=group, group=group, prompt_ids=[1], response_ids=list(range(10, 10 + length)), text="x",
                         finish_reason=finish, reward=reward)


def test_grpo_advantages_are_broadcast_per_sample():
    groups = [[_sample(0, 1.0), _sample(0, 0.0, 3)], [_sample(1, 2.0), _sample(1, 2.0)]]
    compute_advantages(groups, advantage_settings("grpo"), kl_coef=0.0)
    # group 0: mean 0.5, unbiased std 0.7071 -> +-0.7071; group 1: all equal -> 0
    assert groups[0][0].advantages.tolist() == pytest.approx([0.70710, 0.70710], abs=1e-4)
    assert groups[0][1].advantages.tolist() == pytest.approx([-0.70710] * 3, abs=1e-4)
    assert groups[1][0].advantages.tolist() == [0.0, 0.0]
    compute_advantages(groups, advantage_settings("dr_grpo"), kl_coef=0.0)
    assert groups[0][0].advantages.tolist() == [0.5, 0.5]
    compute_advantages(groups, advantage_settings("rloo"), kl_coef=0.0)
    assert groups[0][1].advantages.tolist() == [-1.0] * 3


def test_grpo_kl_in_reward_lowers_the_reward_before_normalising():
    groups = [[_sample(0, 1.0), _sample(0, 1.0)]]
    groups[0][0].old_logp, groups[0][0].ref_logp = torch.tensor([0.0, 0.0]), torch.tensor([0.0, 0.0])
    groups[0][1].old_logp, groups[0][1].ref_logp = torch.tensor([-1.0, -1.0]), torch.tensor([-2.0, -2.0])
    compute_advantages(groups, advantage_settings("dr_grpo", kl_in_reward=True, kl_estimator="k1"), kl_coef=0.5)
    # k1 sums: 0 and 2 -> rewards 1 and 0 -> centred +-0.5
    assert groups[0][0].advantages.tolist() == [0.5, 0.5] and groups[0][1].advantages.tolist() == [-0.5, -0.5]


def test_mini_batches_keep_groups_whole_and_skip_untrained():
    groups = [[_sample(g, float(i)) for i in range(2)] for g in range(4)]
    groups[3][1].trained = False
    batches = mini_batches(groups, 2, seed=3)
    assert len(batches) == 2
    for batch in batches:
        assert len({s.group for s in batch}) == 2
    assert sum(len(b) for b in batches) == 7


def test_overlong_penalty_is_linear_in_the_buffer():
    assert overlong_length_penalty(10, 32, 8, 1.0) == 0.0
    assert overlong_length_penalty(24, 32, 8, 1.0) == 0.0
    assert overlong_length_penalty(28, 32, 8, 1.0) == pytest.approx(0.5)
    assert overlong_length_penalty(32, 32, 8, 2.0) == pytest.approx(2.0)


class ScriptedEngine:
    """Prompt row r always yields completions whose text is its row number (for a scripted reward)."""

    def __init__(self, lengths=None):
        self.calls = 0

    def generate(self, prompt_ids, params):
        self.calls += 1
        return [Completion(i, [5, 6], str(p[0]), "stop") for i, p in enumerate(prompt_ids) for _ in range(params.n)]

    def update_weights(self, model):
        pass


def _rows(n):
    return [PromptRow([r], f"p{r}", {}, r + 1) for r in range(n)]


def test_dynamic_sampling_drops_flat_groups_and_refills_bounded():
    rows = _rows(10)
    counter = {"i": 0}

    def reward(prompts, completions, metadata):
        # rows 0-4 give all-equal rewards, rows 5-9 give varied ones
        scores = []
        for text in completions:
            counter["i"] += 1
            scores.append(0.0 if int(text) < 5 else float(counter["i"] % 2))
        return RewardOutput(scores, {"r": scores})

    sampler = PromptSampler(10, seed=1)
    params = SamplingParams(n=2, max_new_tokens=4, seed=0)
    batch = collect_rollouts(ScriptedEngine(), rows, sampler, reward,
                             rollout_settings(params, prompts_per_step=4, dynamic_sampling=True, max_refill_rounds=5),
                             scoring(), step=0)
    assert len(batch.groups) == 4
    assert all(int(g[0].text) >= 5 for g in batch.groups)
    assert batch.dropped_groups == batch.generated_groups - 4

    engine = ScriptedEngine()
    flat = collect_rollouts(engine, rows, PromptSampler(10, seed=1), lambda p, c, m: RewardOutput([0.0] * len(c)),
                            rollout_settings(params, prompts_per_step=3, dynamic_sampling=True, max_refill_rounds=2),
                            scoring(), step=0)
    assert engine.calls == 3 and len(flat.groups) == 3 and flat.kept_zero_variance == 3


def test_overlong_filter_excludes_clipped_samples():
    class Clipping(ScriptedEngine):
        def generate(self, prompt_ids, params):
            return [Completion(i, [5, 6, 7, 8], "1", "length" if k == 0 else "stop")
                    for i, _ in enumerate(prompt_ids) for k in range(params.n)]

    batch = collect_rollouts(Clipping(), _rows(3), PromptSampler(3, seed=0),
                             lambda p, c, m: RewardOutput([1.0] * len(c)),
                             rollout_settings(SamplingParams(n=3, max_new_tokens=4), prompts_per_step=2,
                                              max_refill_rounds=0),
                             scoring(overlong="filter", length_cap=4, overlong_buffer=1, overlong_penalty=0.0), step=0)
    assert [s.trained for s in batch.groups[0]] == [False, True, True]


def test_prompt_sampler_resumes_mid_epoch():
    a = PromptSampler(5, seed=3)
    a.take(7)
    b = PromptSampler(5, seed=3)
    b.load_state_dict(a.state_dict())
    assert a.take(9) == b.take(9)
    c = PromptSampler(5, seed=3)
    first_epoch = c.take(5)
    assert sorted(first_epoch) == list(range(5))


def test_lora_reference_is_the_base_with_the_adapter_disabled(tiny_model_dir, tmp_path):
    from posttrain.train.rl_models import build_reference, build_policy
    from posttrain.train.distributed import init_distributed
    from posttrain.models.logprobs import response_token_logprobs
    from posttrain.data.batching import collate_packed

    config = make_config(tiny_model_dir, tmp_path, lora={"enabled": True, "r": 4}, rl={"kl_coef": 0.1})
    info = init_distributed()
    policy = build_policy(config, info)
    reference = build_reference(config, policy, info)
    sample = _sample(0, 1.0, length=5)
    batch = collate_packed([sample])
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.5)
        trained = response_token_logprobs(policy, batch, temperature=1.0, chunk_size=8, with_entropy=False).logp
        with reference() as ref_model:
            ref = response_token_logprobs(ref_model, batch, temperature=1.0, chunk_size=8, with_entropy=False).logp
        base = build_policy(make_config(tiny_model_dir, tmp_path), info)
        expected = response_token_logprobs(base, batch, temperature=1.0, chunk_size=8, with_entropy=False).logp
    assert not torch.allclose(trained, ref)
    torch.testing.assert_close(ref, expected)
    assert sum(p.numel() for p in policy.parameters()) < 2 * sum(p.numel() for p in base.parameters())


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="rollout.group_size"):
        validate_config(RLConfig, {"data": {"train": "x.jsonl"}, "rollout": {"group_size": 1}})
    with pytest.raises(ConfigError, match="rl.mini_batch_size"):
        validate_config(RLConfig, {"data": {"train": "x.jsonl"}, "rl": {"prompts_per_step": 3, "mini_batch_size": 5}})
    with pytest.raises(ConfigError, match="rl.target_kl"):
        validate_config(RLConfig, {"data": {"train": "x.jsonl"}, "rl": {"target_kl": 0.1}})
    with pytest.raises(ConfigError, match="data.train"):
        validate_config(RLConfig, {})
    with pytest.raises(ConfigError, match="rl.dual_clip_c: only policy_loss ppo_clip"):
        validate_config(RLConfig, {"data": {"train": "x.jsonl"}, "rl": {"policy_loss": "gspo", "dual_clip_c": 3}})
    with pytest.raises(ConfigError, match="rl.policy_loss"):
        validate_config(RLConfig, {"data": {"train": "x.jsonl"}, "rl": {"policy_loss": "sapo"}})
    with pytest.raises(ConfigError, match="rl.clip_hihg"):
        validate_config(RLConfig, {"data": {"train": "x.jsonl"}, "rl": {"clip_hihg": 0.3}})


def test_the_config_names_every_registered_policy_loss():
    from typing import get_args

    from posttrain.algorithms.policy import POLICY_LOSSES
    from posttrain.config import RLAlgorithmConfig

    assert set(get_args(RLAlgorithmConfig.model_fields["policy_loss"].annotation)) == set(POLICY_LOSSES)


def test_the_config_names_every_registered_estimator_and_rollout_source():
    from typing import get_args

    from posttrain.algorithms.advantages import ADVANTAGE_ESTIMATORS
    from posttrain.config import ADVANTAGE_PRESETS, RLAlgorithmConfig, RolloutConfig
    from posttrain.rollout.sources import ROLLOUT_SOURCES

    literal, none = get_args(RLAlgorithmConfig.model_fields["advantage"].annotation)  # Literal[...] | None
    named = set(get_args(literal))
    assert none is type(None)
    assert named == set(ADVANTAGE_ESTIMATORS) == set(ADVANTAGE_PRESETS.values())
    assert set(get_args(RLAlgorithmConfig.model_fields["algorithm"].annotation)) == set(ADVANTAGE_PRESETS)
    assert set(get_args(RolloutConfig.model_fields["engine"].annotation)) == set(ROLLOUT_SOURCES)


@pytest.mark.parametrize("algorithm,estimator", [("grpo", "grpo"), ("dr_grpo", "dr_grpo"), ("rloo", "rloo"),
                                                 ("reinforce_pp", "reinforce_pp"), ("ppo", "gae")])
def test_rl_algorithm_is_a_preset_that_rl_advantage_overrides(algorithm, estimator):
    from posttrain.train.rl_settings import uses_critic

    preset = validate_config(RLConfig, {"data": {"train": "x.jsonl"}, "rl": {"algorithm": algorithm}})
    assert preset.rl.advantage == estimator and uses_critic(preset) == (estimator == "gae")
    chosen = validate_config(RLConfig, {"data": {"train": "x.jsonl"}, "rl": {"algorithm": algorithm, "advantage": "rloo"}})
    assert chosen.rl.advantage == "rloo" and not uses_critic(chosen)
    with pytest.raises(ConfigError, match="rl.advantage"):
        validate_config(RLConfig, {"data": {"train": "x.jsonl"}, "rl": {"advantage": "vtrace"}})


def test_a_preset_and_the_estimator_it_names_train_the_same_weights(tiny_model_dir, tmp_path):
    """rl.algorithm=rloo and rl.advantage=rloo (under the default algorithm) are one run."""
    from posttrain.train.rl import run_rl

    finals = []
    for name, rl in (("preset", {"algorithm": "rloo"}), ("named", {"advantage": "rloo"})):
        result = run_rl(make_config(tiny_model_dir, tmp_path, rl=rl, run={"name": name}), reward_fn=vowel_reward)
        finals.append(final_weights(result.run_dir))
    assert finals[0].keys() == finals[1].keys()
    assert all(torch.equal(finals[0][name], finals[1][name]) for name in finals[0])


def test_quickstart_configs_validate():
    from posttrain.config import load_config

    for name in ("configs/grpo_quickstart.yaml", "configs/ppo_quickstart.yaml", "configs/quickstart.yaml"):
        if name == "configs/quickstart.yaml":
            import yaml

            from posttrain.config import validate_config as validate

            validate(RLConfig, {**yaml.safe_load(Path(name).read_text())["rl"]})
            continue
        config = load_config(RLConfig, name)
        assert Path(config.data.train).is_file() and Path(config.data.eval).is_file()


def test_arithmetic_splits_never_overlap():
    def problems(path):
        out = set()
        for line in Path(path).read_text().splitlines():
            question = json.loads(line)["prompt"].split("?")[0]
            a, b = question.removeprefix("What is ").split(" + ")
            out.add(frozenset((int(a), int(b))) if a != b else frozenset((int(a),)))
        return out

    for train_file, eval_file in ((TRAIN_FILE, EVAL_FILE), ("examples/data/rl_arithmetic_form_train.jsonl",
                                                              "examples/data/rl_arithmetic_form_eval.jsonl")):
        train, held_out = problems(train_file), problems(eval_file)
        assert len(held_out) == 200 and len(train) == 2000 and not train & held_out


def test_doctests_of_the_rl_modules():
    import doctest

    from posttrain.train import rl_rollouts

    assert doctest.testmod(rl_rollouts).failed == 0


def test_train_top_layers_freezes_everything_below(tiny_model_dir, tmp_path):
    from posttrain.train.distributed import init_distributed
    from posttrain.train.rl_models import build_policy

    config = make_config(tiny_model_dir, tmp_path, rl={"train_top_layers": 1})
    policy = build_policy(config, init_distributed())
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(("model.layers.1.", "model.norm.")) for name in trainable)
    with pytest.raises(ConfigError, match="rl.train_top_layers"):
        build_policy(make_config(tiny_model_dir, tmp_path, rl={"train_top_layers": 3}), init_distributed())


def test_kl_in_reward_is_clamped_by_default_and_configurable():
    """k3 at log-ratio 3 is e^3 - 3 - 1 = 16.1 per token; the RL step clamps it at rl.kl_clamp (10)."""
    def run(**clamp):
        groups = [[_sample(0, 0.0), _sample(0, 0.0)]]
        groups[0][0].old_logp, groups[0][0].ref_logp = torch.tensor([0.0, 0.0]), torch.tensor([0.0, 0.0])
        groups[0][1].old_logp, groups[0][1].ref_logp = torch.tensor([-3.0, -3.0]), torch.tensor([0.0, 0.0])
        compute_advantages(groups, advantage_settings("dr_grpo", kl_in_reward=True, kl_estimator="k3", **clamp),
                           kl_coef=1.0)
        return groups[0][0].advantages[0].item()
    assert run() == pytest.approx(10.0)  # rewards 0 and -20 -> centred +10 / -10
    assert run(kl_clamp=None) == pytest.approx(math.exp(3) - 4)
    assert validate_config(RLConfig, {"data": {"train": "x.jsonl"}}).rl.kl_clamp == 10.0
    assert validate_config(RLConfig, {"data": {"train": "x.jsonl"}, "rl": {"kl_clamp": None}}).rl.kl_clamp is None


@pytest.mark.parametrize("attention", ["flash_attention_2", "sdpa", "eager"])
def test_share_prompt_with_an_attention_that_ignores_its_mask_is_refused_in_one_line(tmp_path, capsys, attention):
    """Only posttrain's varlen attention applies the shared-prompt block masks: any other
    backend would let completions attend to their siblings. Refused before any file is read."""
    from posttrain.cli import main
    from posttrain.config import SHARED_PROMPT_ATTENTION
    from posttrain.models.attention import VARLEN_ATTENTION

    assert VARLEN_ATTENTION in SHARED_PROMPT_ATTENTION
    config = tmp_path / "rl.yaml"
    config.write_text(f"model:\n  attn_implementation: {attention}\ndata:\n  train: {tmp_path / 'absent.jsonl'}\n")
    assert main(["rl", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "rl.share_prompt" in err and attention in err, err
    assert validate_config(RLConfig, {"data": {"train": "x.jsonl"}, "model": {"attn_implementation": attention},
                                      "rl": {"share_prompt": False}}).rl.share_prompt is False


def test_grpo_raises_a_reward_the_policy_can_reach(tiny_model_dir, tmp_path):
    """The smoke tests above check that weights move; this one checks they move the right
    way: the vowel share of a random tiny model's text is 0.30 and GRPO must push it up.
    The take-off step depends on the sampled stream: over 16 steps, train seeds 0 and 3 gave
    0.31 -> 0.40 and 0.31 -> 0.58 (last three steps); the bar, +0.05, is five times the
    step-to-step noise of the mean reward."""
    from posttrain.train.rl import run_rl

    config = make_config(tiny_model_dir, tmp_path, rl={"algorithm": "grpo", "prompts_per_step": 4},
                         rollout={"group_size": 8, "max_new_tokens": 8, "temperature": 1.0},
                         optim={"lr": 3e-2}, train={"max_steps": 16, "samples_every": 100})
    rewards = [record["reward/mean"] for record in run_rl(config, reward_fn=vowel_reward).history]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.05, rewards


def test_a_non_finite_update_stops_rl_before_it_is_saved_and_resume_continues(tiny_model_dir, tmp_path, monkeypatch):
    """Step 2's policy loss is NaN: its update is not applied, nothing of step 2 is saved
    (no checkpoint, no samples line, no final/), and a rerun resumes from step 1."""
    from posttrain.train import rl_update
    from posttrain.train.checkpoint import NonFiniteError, list_checkpoints
    from posttrain.train.rl import run_rl

    rewards_scored = {"steps": 0}

    def counting_reward(prompts, completions, metadata):
        rewards_scored["steps"] += 1
        return vowel_reward(prompts, completions, metadata)

    real_loss = rl_update.policy_micro_loss

    def nan_on_step_2(*args, **kwargs):
        result = real_loss(*args, **kwargs)
        if rewards_scored["steps"] == 2:
            result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(rl_update, "policy_micro_loss", nan_on_step_2)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError) as info:
        run_rl(make_config(tiny_model_dir, tmp_path, train={"max_steps": 3, "save_every": 1}), reward_fn=counting_reward)
    assert str(info.value) == (
        f"rl: step 2: 1 of its 1 optimizer steps had a NaN/inf loss or gradient norm, so its update was not applied "
        f"and the run stopped (none may be skipped, train.skip_nonfinite_steps); the last checkpoint, "
        f"{run / 'checkpoints' / 'step_1'}, is finite: lower optim.lr or fix the data and resume it with "
        f"train.resume=latest")
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_1"] and not (run / "final").exists()
    assert {json.loads(line)["step"] for line in (run / "samples.jsonl").read_text().splitlines()} == {1}

    monkeypatch.setattr(rl_update, "policy_micro_loss", real_loss)
    resumed = run_rl(make_config(tiny_model_dir, tmp_path, train={"max_steps": 3, "save_every": 1, "resume": "latest"}),
                     reward_fn=vowel_reward)
    assert [h["step"] for h in resumed.history] == [2, 3]
    assert all(torch.isfinite(t).all() for t in final_weights(run).values())
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_an_rl_run_shows_its_held_out_evals_and_warns_of_nothing_deprecated(tiny_model_dir, tmp_path, capsys,
                                                                           monkeypatch):
    """Output not a terminal: the step-0 held-out evaluation and the later ones count their
    completions in plain lines, so does the step bar; and a run with gradient checkpointing,
    shared prefills and held-out evals uses no API transformers has deprecated."""
    import posttrain.log
    from posttrain.train.rl import run_rl
    from test_rollout_hf import _Collect

    monkeypatch.setattr(posttrain.log, "PLAIN_INTERVAL_S", 0.0)
    config = make_config(tiny_model_dir, tmp_path, run={"name": "shown", "progress": True},
                         model={"gradient_checkpointing": True}, data={"eval": EVAL_FILE, "eval_limit": 3},
                         train={"max_steps": 2, "eval_every": 2})
    with _Collect() as collected:
        run_rl(config, reward_fn=vowel_reward)
    assert collected.deprecations() == []
    err = capsys.readouterr().err.splitlines()
    for step in (0, 2):
        counts = [line.split("] ")[1].split()[0] for line in err if line.startswith(f"[rl eval at step {step}]")]
        assert counts[0] == "0/3" and counts[-1] == "3/3", err
    assert [line.split()[1] for line in err if line.startswith("[rl] ")][-1] == "2/2"


STAGE_MODULES = ("rl_rollouts", "rl_scoring", "rl_logprobs", "rl_advantages", "rl_update", "rl_layout", "rl_samples")


@pytest.mark.parametrize("stage", STAGE_MODULES)
def test_a_stage_of_the_rl_step_reads_its_typed_settings_never_the_config(stage):
    """Only train.rl_settings interprets the config for a step; a stage module neither imports
    posttrain.config nor touches a ``config.`` attribute."""
    import ast
    import importlib

    path = importlib.import_module(f"posttrain.train.{stage}").__file__
    tree = ast.parse(open(path, encoding="utf-8").read())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "posttrain.config" not in imported
    assert not [node.lineno for node in ast.walk(tree)
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "config"]
