"""Resuming under a config change that ``train.resume_allow_changes`` allows.

An allowed change takes effect as in a fresh run with the new config: at every resumed step
the learning rate is the one a fresh run with that config logs at the same step (a longer run,
a new peak rate, a new warmup, schedule or minimum, a new batch size), AdamW takes the new
weight decay, betas and eps and keeps its moments, and the first resumed step moves the
weights. A change the checkpoint cannot carry is refused in one line naming the key, before
anything in the run directory changes. SFT, reward model, DPO and RL (with the PPO critic).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.train import checkpoint as ckpt
from posttrain.train.distributed import DistInfo
from posttrain.train.logging import read_metrics
from posttrain.train.loop import build_optimizer, build_scheduler, lr_multiplier

from test_checkpoint import sft_config, synthetic_samples

ONE_PROCESS = DistInfo(0, 1, 0, torch.device("cpu"), None)
TRAIN, VAL = synthetic_samples(12, 0), synthetic_samples(2, 1)


def logged_lrs(run_dir: Path, key: str = "lr") -> dict[int, float]:
    return {record["step"]: record[key] for record in read_metrics(Path(run_dir) / "metrics.jsonl") if key in record}


def checkpoint_weights(run_dir: Path, step: int, name: str = "model.pt") -> dict[str, torch.Tensor]:
    return torch.load(Path(run_dir) / "checkpoints" / f"step_{step}" / name)


def assert_resumed_like_fresh(resumed: Path, fresh: Path, from_step: int, to_step: int, key: str = "lr") -> None:
    """The resumed run logged, at each step after ``from_step``, the rate the fresh run logged
    there, and its first resumed step changed the weights of checkpoint ``from_step``."""
    got, want = logged_lrs(resumed, key), logged_lrs(fresh, key)
    steps = list(range(from_step + 1, to_step + 1))
    assert [got.get(step) for step in steps] == [want[step] for step in steps], key
    assert all(want[step] > 0 for step in steps)
    before, after = checkpoint_weights(resumed, from_step), checkpoint_weights(resumed, from_step + 1)
    assert any(not torch.equal(before[name], after[name]) for name in before), "the first resumed step did not move"


# ----------------------------------------------------------------------------- SFT


def sft_run(model_dir: str, out: Path, name: str, optim: dict | None = None, **train):
    from posttrain.train.sft import run_sft

    config = sft_config(model_dir, out, eval_every=None, **train)
    config.run.name = name
    for key, value in (optim or {}).items():
        setattr(config.optim, key, value)
    return run_sft(config, samples=(TRAIN, VAL))


# (settings of the first run, the settings that change on resume, the checkpoint resumed)
SFT_CHANGES = {
    "longer": ({"max_steps": 4}, {"max_steps": 8}, 4),
    "lower-lr-mid-run": ({"max_steps": 8}, {"optim": {"lr": 1e-3}}, 3),
    "new-shape": ({"max_steps": 4, "optim": {"schedule": "cosine"}},
                  {"max_steps": 7, "optim": {"schedule": "linear", "min_lr_ratio": 0.2, "warmup_steps": 6}}, 4),
    "warmup-ratio": ({"max_steps": 4, "optim": {"warmup_steps": None, "warmup_ratio": 0.25}},
                     {"max_steps": 6, "optim": {"warmup_steps": None, "warmup_ratio": 0.75, "schedule": "constant"}}, 2),
    "smaller-batches-by-epochs": ({"max_steps": None, "epochs": 1.0}, {"global_batch_size": 2}, 2),
}


@pytest.mark.parametrize("change", list(SFT_CHANGES))
def test_sft_resumed_under_an_allowed_change_follows_a_fresh_runs_schedule(tiny_model_dir, tmp_path, change):
    first, changed, from_step = SFT_CHANGES[change]
    first_optim, first_train = first.get("optim", {}), {k: v for k, v in first.items() if k != "optim"}
    new_optim = {**first_optim, **changed.get("optim", {})}
    new_train = {**first_train, **{k: v for k, v in changed.items() if k != "optim"}}
    allowed = [f"optim.{key}" for key in changed.get("optim", {})] + [f"train.{key}" for key in changed
                                                                      if key != "optim"]
    fresh = sft_run(tiny_model_dir, tmp_path, "fresh", new_optim, save_every=None, **new_train)
    sft_run(tiny_model_dir, tmp_path, "run", first_optim, save_every=1, keep_last=20, **first_train)
    checkpoint = tmp_path / "run" / "checkpoints" / f"step_{from_step}"
    resumed = sft_run(tiny_model_dir, tmp_path, "run", new_optim, save_every=1, keep_last=20,
                      resume=str(checkpoint), resume_allow_changes=allowed, **new_train)
    assert resumed.steps == fresh.steps > from_step
    assert_resumed_like_fresh(tmp_path / "run", tmp_path / "fresh", from_step, fresh.steps)


def test_a_checkpoint_copied_under_another_name_resumes_at_its_own_step(tiny_model_dir, tmp_path):
    """``train.resume`` may name any checkpoint directory: its step comes from its trainer state."""
    import shutil

    sft_run(tiny_model_dir, tmp_path, "run", max_steps=4, save_every=2)
    kept = tmp_path / "kept-for-later"
    shutil.copytree(tmp_path / "run" / "checkpoints" / "step_2", kept)
    resumed = sft_run(tiny_model_dir, tmp_path, "run", max_steps=5, save_every=5, resume=str(kept),
                      resume_allow_changes=["train.max_steps"])
    assert [h["step"] for h in resumed.history] == [3, 4, 5]
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_a_resumed_optimizer_takes_the_configs_hyperparameters_and_keeps_its_moments(tmp_path):
    """weight_decay, betas, eps and the peak rate come from the config that resumes; the
    moments, step counts and the schedule's position from the checkpoint."""
    torch.manual_seed(0)

    def build(lr, weight_decay, betas, eps, total):
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
        optimizer = build_optimizer(model, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
        scheduler = build_scheduler(optimizer, total_steps=total, warmup_steps=1, schedule="cosine", min_lr_ratio=0.0)
        return model, optimizer, scheduler

    model, optimizer, scheduler = build(1e-2, 0.0, (0.9, 0.95), 1e-8, total=3)
    for _ in range(3):
        model(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    assert optimizer.param_groups[0]["lr"] == 0.0  # the end of the first run's cosine
    ckpt.save_checkpoint(tmp_path, 3, model, optimizer, scheduler, {}, ONE_PROCESS, keep_last=1)
    saved_moments = [optimizer.state[p]["exp_avg"].clone() for p in model.parameters()]

    model2, optimizer2, scheduler2 = build(5e-3, 0.1, (0.8, 0.99), 1e-6, total=10)
    ckpt.load_checkpoint(tmp_path / "step_3", model2, optimizer2, scheduler2, ONE_PROCESS)
    decay, no_decay = optimizer2.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert all(g["betas"] == (0.8, 0.99) and g["eps"] == 1e-6 and g["initial_lr"] == 5e-3 for g in (decay, no_decay))
    expected = 5e-3 * lr_multiplier(3, total_steps=10, warmup_steps=1, schedule="cosine", min_lr_ratio=0.0)
    assert [g["lr"] for g in optimizer2.param_groups] == [expected, expected] == scheduler2.get_last_lr()
    assert scheduler2.base_lrs == [5e-3, 5e-3] and scheduler2.last_epoch == 3
    for moment, p in zip(saved_moments, model2.parameters()):
        assert torch.equal(optimizer2.state[p]["exp_avg"], moment) and float(optimizer2.state[p]["step"]) == 3
    scheduler2.step()  # the schedule goes on from there, on the new shape
    assert optimizer2.param_groups[0]["lr"] == 5e-3 * lr_multiplier(4, total_steps=10, warmup_steps=1,
                                                                     schedule="cosine", min_lr_ratio=0.0)


def test_sft_resumed_with_new_adamw_settings_trains_with_them(tiny_model_dir, tmp_path):
    """The resumed step differs from one under the checkpoint's settings (they are not ignored)."""
    sft_run(tiny_model_dir, tmp_path, "a", max_steps=2, save_every=2)
    sft_run(tiny_model_dir, tmp_path, "b", max_steps=2, save_every=2)
    same = sft_run(tiny_model_dir, tmp_path, "a", max_steps=3, save_every=3, resume="latest",
                   resume_allow_changes=["train.max_steps"])
    changed = sft_run(tiny_model_dir, tmp_path, "b", {"weight_decay": 0.5, "betas": (0.5, 0.9), "eps": 1e-3},
                      max_steps=3, save_every=3, resume="latest",
                      resume_allow_changes=["train.max_steps", "optim.weight_decay", "optim.betas", "optim.eps"])
    a, b = checkpoint_weights(same.run_dir, 3), checkpoint_weights(changed.run_dir, 3)
    assert any(not torch.equal(a[name], b[name]) for name in a)
    moments = torch.load(changed.run_dir / "checkpoints" / "step_3" / "optimizer.pt")
    assert {g["weight_decay"] for g in moments["param_groups"]} == {0.5, 0.0}
    assert all(tuple(g["betas"]) == (0.5, 0.9) and g["eps"] == 1e-3 for g in moments["param_groups"])


# ----------------------------------------------------------------------------- refusals


def test_a_change_the_checkpoint_cannot_carry_is_refused_in_one_line(tiny_model_dir, tmp_path, tokenizer):
    from conftest import build_tiny_llama

    other = tmp_path / "other-model"
    build_tiny_llama(tokenizer, seed=3).save_pretrained(other)
    tokenizer.save_pretrained(other)
    sft_run(tiny_model_dir, tmp_path, "run", max_steps=4, save_every=2)
    run = tmp_path / "run"
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}

    def refused(settings: dict, allowed: list[str], lora: dict | None = None, model: str = tiny_model_dir) -> str:
        from posttrain.train.sft import run_sft

        config = sft_config(model, tmp_path, eval_every=None, save_every=2, resume="latest",
                            resume_allow_changes=allowed, **settings)
        for key, value in (lora or {}).items():
            setattr(config.lora, key, value)
        with pytest.raises(ConfigError) as info:
            run_sft(config, samples=(TRAIN, VAL))
        message = str(info.value)
        assert "\n" not in message
        return message

    assert refused({"max_steps": 3}, ["train.max_steps"]) == (
        "train.max_steps: the run is 3 steps long but the checkpoint it resumes was written at step 4; resume with "
        "at least 4 steps or set run.overwrite=true to start over")
    assert refused({"max_steps": None, "epochs": 0.5}, ["train.max_steps", "train.epochs"]).startswith(
        "train.epochs: the run is 2 steps long but the checkpoint it resumes was written at step 4")
    assert refused({"max_steps": 4}, ["model.name"], model=str(other)).startswith(
        f"train.resume_allow_changes: model.name cannot change on resume ({tiny_model_dir} -> {other}): "
        f"the checkpoint's weights were trained from the model it names; resume without this change")
    assert refused({"max_steps": 4}, ["lora"], lora={"enabled": True, "r": 4}).startswith(
        "train.resume_allow_changes: lora.enabled cannot change on resume (false -> true)")
    after = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}
    assert after == before  # nothing in the run directory changed


def test_lora_shape_changes_are_refused_and_its_dropout_is_not(tiny_model_dir, tmp_path):
    from posttrain.train.sft import run_sft

    def config(**lora):
        built = sft_config(tiny_model_dir, tmp_path, eval_every=None, max_steps=2, save_every=2, resume="latest",
                           resume_allow_changes=["lora"])
        built.lora.enabled, built.lora.r, built.lora.target_modules = True, 4, ["q_proj", "v_proj"]
        for key, value in lora.items():
            setattr(built.lora, key, value)
        return built

    run_sft(config(), samples=(TRAIN, VAL))
    for change, shown in [({"r": 8}, "lora.r cannot change on resume (4 -> 8)"),
                          ({"alpha": 8.0}, "lora.alpha cannot change on resume (32.0 -> 8.0)"),
                          ({"target_modules": ["q_proj"]},
                           'lora.target_modules cannot change on resume (["q_proj", "v_proj"] -> ["q_proj"])')]:
        with pytest.raises(ConfigError, match=r"^train.resume_allow_changes: " + __import__("re").escape(shown)):
            run_sft(config(**change), samples=(TRAIN, VAL))
    longer = config(dropout=0.1)
    longer.train.max_steps = 3
    longer.train.resume_allow_changes = ["lora", "train.max_steps"]
    assert run_sft(longer, samples=(TRAIN, VAL)).steps == 3


def test_doctests_of_the_session_and_loop_modules():
    import doctest

    from posttrain.train import loop, session

    assert doctest.testmod(session).failed == 0 and doctest.testmod(loop).failed == 0


# ----------------------------------------------------------------------------- reward model and DPO


PREFERENCE_FIRST = {"optim": {"lr": 3e-3, "schedule": "cosine", "warmup_steps": 1}, "train": {"max_steps": 3}}
PREFERENCE_RESUMED = {"optim": {"lr": 1e-3, "schedule": "linear", "warmup_steps": 2, "min_lr_ratio": 0.1},
                      "train": {"max_steps": 6}}
PREFERENCE_ALLOWED = ["optim.lr", "optim.schedule", "optim.warmup_steps", "optim.min_lr_ratio", "train.max_steps"]


def preference_runs(trainer: str, tmp_path: Path, model_dir: str) -> tuple[Path, Path]:
    """A fresh run under the resumed settings, and a run of 3 steps resumed under them to 6."""
    from test_rm import arithmetic_rows, write_rows

    if trainer == "rm":
        from test_rm import config_for

        from posttrain.train.rm import run_rm as run
    else:
        from test_dpo import config_for

        from posttrain.train.dpo import run_dpo as run
    train = write_rows(tmp_path / "train.jsonl", arithmetic_rows(48, seed=5))

    def config(name: str, settings: dict, **train_extra):
        return config_for(tmp_path, model_dir, train, run={"name": name}, optim=settings["optim"],
                          train={**settings["train"], **train_extra})

    fresh = run(config("fresh", PREFERENCE_RESUMED))
    run(config("run", PREFERENCE_FIRST, save_every=3))
    resumed = run(config("run", PREFERENCE_RESUMED, save_every=1, keep_last=10, resume="latest",
                         resume_allow_changes=PREFERENCE_ALLOWED))
    return resumed.run_dir, fresh.run_dir


@pytest.mark.parametrize("trainer", ["rm", "dpo"])
def test_preference_trainers_resumed_under_a_new_schedule_follow_a_fresh_run(tiny_model_dir, tmp_path, trainer):
    resumed, fresh = preference_runs(trainer, tmp_path, tiny_model_dir)
    assert_resumed_like_fresh(resumed, fresh, 3, 6)


# ----------------------------------------------------------------------------- RL


def test_rl_resumed_under_a_new_schedule_follows_a_fresh_run_policy_and_critic(tiny_model_dir, tmp_path):
    """PPO: two optimizer steps per RL step, a critic with its own rate; the policy's and the
    critic's logged rates at every resumed step are a fresh run's."""
    from test_rl import make_config, vowel_reward

    from posttrain.train.rl import run_rl

    rl = {"algorithm": "ppo", "mini_batch_size": 4, "kl_coef": 0.0}
    first = {"optim": {"lr": 1e-3, "schedule": "cosine", "warmup_steps": 1}, "train": {"max_steps": 2}}
    resumed = {"optim": {"lr": 3e-3, "schedule": "cosine", "warmup_steps": 3, "min_lr_ratio": 0.1},
               "train": {"max_steps": 4}, "critic_lr": 5e-4}

    def config(name: str, settings: dict, **train):
        critic = {"lr": settings["critic_lr"]} if "critic_lr" in settings else {}
        return make_config(tiny_model_dir, tmp_path, rl={**rl, "critic": critic}, optim=settings["optim"],
                           train={**settings["train"], "samples_every": None, "export": False, **train},
                           run={"name": name})

    fresh = run_rl(config("fresh", resumed), reward_fn=vowel_reward)
    run_rl(config("run", first, save_every=2), reward_fn=vowel_reward)
    again = run_rl(config("run", resumed, save_every=1, keep_last=10, resume="latest",
                          resume_allow_changes=["optim", "train.max_steps", "rl.critic.lr"]), reward_fn=vowel_reward)
    assert [h["step"] for h in again.history] == [3, 4]
    assert_resumed_like_fresh(again.run_dir, fresh.run_dir, 2, 4)
    assert_resumed_like_fresh(again.run_dir, fresh.run_dir, 2, 4, key="critic/lr")
    critic_before = checkpoint_weights(again.run_dir, 2, "critic_model.pt")
    critic_after = checkpoint_weights(again.run_dir, 3, "critic_model.pt")
    assert any(not torch.equal(critic_before[k], critic_after[k]) for k in critic_before)


@pytest.mark.parametrize("change, allowed, message", [
    ({"rl": {"ppo_epochs": 2}}, ["rl.ppo_epochs"],
     "train.resume_allow_changes: rl.ppo_epochs 1 -> 2 cannot change on resume: an RL step would take 2 optimizer "
     "steps instead of 1"),
    ({"rl": {"mini_batch_size": 4}}, ["rl"],
     "train.resume_allow_changes: rl.mini_batch_size null -> 4 cannot change on resume: an RL step would take 2 "
     "optimizer steps instead of 1"),
    ({"rl": {"prompts_per_step": 4, "mini_batch_size": 4}, "rollout": {"group_size": 2}}, ["rl", "rollout"],
     "train.resume_allow_changes: rl.prompts_per_step 2 -> 4, rollout.group_size 4 -> 2, rl.mini_batch_size null -> 4 "
     "cannot change on resume: an RL step would take 2 optimizer steps instead of 1"),
    ({"train": {"max_steps": 1}}, ["train.max_steps"],
     "train.max_steps: the run is 1 steps long but the checkpoint it resumes was written at step 2"),
])
def test_rl_changes_a_checkpoint_cannot_carry_are_refused(tiny_model_dir, tmp_path, change, allowed, message):
    from test_rl import make_config, vowel_reward

    from posttrain.train.rl import run_rl

    base = dict(train={"max_steps": 2, "save_every": 2, "samples_every": None, "export": False})
    run_rl(make_config(tiny_model_dir, tmp_path, run={"name": "run"}, **base), reward_fn=vowel_reward)
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    sections = {"train": {**base["train"], "resume": "latest", "resume_allow_changes": allowed}}
    for section, values in change.items():
        sections[section] = {**sections.get(section, {}), **values}
    with pytest.raises(ConfigError) as info:
        run_rl(make_config(tiny_model_dir, tmp_path, run={"name": "run"}, **sections), reward_fn=vowel_reward)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics


def test_rl_group_size_may_change_when_an_rl_step_keeps_its_optimizer_steps(tiny_model_dir, tmp_path):
    """Without mini-batches an RL step is one optimizer step whatever its size: allowed."""
    from test_rl import make_config, vowel_reward

    from posttrain.train.rl import run_rl

    train = {"samples_every": None, "export": False}
    run_rl(make_config(tiny_model_dir, tmp_path, run={"name": "run"}, train={**train, "max_steps": 1, "save_every": 1}),
           reward_fn=vowel_reward)
    result = run_rl(make_config(tiny_model_dir, tmp_path, run={"name": "run"}, rollout={"group_size": 2},
                                train={**train, "max_steps": 2, "resume": "latest",
                                       "resume_allow_changes": ["rollout.group_size", "train.max_steps"]}),
                    reward_fn=vowel_reward)
    assert [h["step"] for h in result.history] == [2] and result.history[0]["optimizer_steps"] == 1
