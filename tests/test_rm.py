"""Reward-model trainer end to end on the tiny model: data rows -> pairs, the loss falls and
parameters change, the split-invariance of the step loss, export + reload gives identical
scores, resume is exact, and the config/data errors are one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from posttrain.config import RMConfig, load_config, validate_config
from posttrain.errors import ConfigError, DataError
from posttrain.models.scalar_head import load_scalar_head_model, score_layer, score_sequences
from posttrain.train.distributed import DistInfo
from posttrain.train.logging import read_metrics
from posttrain.data.preference import PairKeys, load_preference_data, preference_messages, render_pair
from posttrain.train.rm import PAIR_METRICS, pair_keys, pair_loss, pair_micro_batch, run_rm
from posttrain.train.steps import summarise_pairs

SINGLE = DistInfo(0, 1, 0, torch.device("cpu"), None)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def arithmetic_rows(count: int, seed: int = 0) -> list[dict]:
    """Chosen: the right sum, said in words the rejected side never uses (learnable fast)."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        rows.append({"prompt": f"What is {a} + {b}?", "chosen": f"{a} + {b} = {a + b}. Done.",
                     "rejected": f"I refuse to compute {a} + {b}!", "kind": rng.choice(["x", "y"])})
    return rows


def config_for(tmp_path, model_dir, train_path, val_path=None, **sections) -> RMConfig:
    raw = {
        "run": {"name": "rm", "output_dir": str(tmp_path / "runs"), "tensorboard": False, "progress": False},
        "model": {"name": model_dir},
        "data": {"train": train_path, "val": val_path, "max_length": 128},
        "optim": {"lr": 3e-3, "schedule": "constant"},
        "train": {"max_steps": 6, "global_batch_size": 8, "micro_batch_tokens": 512, "seed": 0},
        "rm": {"group_key": "kind"},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return validate_config(RMConfig, raw)


def rm_pairs(config, tokenizer):
    """The reward model's (train, val) pairs of ``config``, read as ``run_rm`` reads them."""
    return load_preference_data(config.data, tokenizer, seed=config.train.seed, keys=pair_keys(config))


def test_preference_row_shapes(tokenizer):
    prompt, chosen, rejected = preference_messages({"prompt": "q", "chosen": "a", "rejected": "b"}, "f:1")
    assert prompt == [{"role": "user", "content": "q"}]
    assert chosen == [{"role": "assistant", "content": "a"}] and rejected[0]["content"] == "b"
    conv = {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}
    prompt, chosen, rejected = preference_messages(conv, "f:2")
    assert prompt == [] and chosen[-1]["content"] == "a" and rejected[0]["role"] == "user"
    pair = render_pair({**conv, "margin": 0.5}, tokenizer, line=2, source="f", keys=PairKeys(margin="margin"))
    flat = render_pair({"prompt": "q", "chosen": "a", "rejected": "b"}, tokenizer, line=1, source="f", keys=PairKeys(margin="margin"))
    assert pair.chosen.input_ids == flat.chosen.input_ids and pair.rejected.input_ids == flat.rejected.input_ids
    assert pair.margin == 0.5 and flat.margin == 0.0
    assert pair.chosen.input_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "chosen": "a"}, "f:3: a preference row needs 'chosen' and 'rejected'.*missing rejected"),
    ({"prompt": "q", "chosen": "a", "rejected": [{"role": "user", "content": "b"}]},
     "f:3: rejected must end with an assistant message"),
    ({"chosen": "a", "rejected": "b"}, "f:3: no prompt"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "f:3: margin must be a number"),
])
def test_bad_rows_are_one_line_errors(tokenizer, row, message):
    with pytest.raises(DataError, match=message):
        render_pair(row, tokenizer, line=3, source="f", keys=PairKeys(margin="margin"))


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="data.train: a preference data file is required"):
        validate_config(RMConfig, {})
    with pytest.raises(ConfigError, match="unknown key 'rm.center_reward_coef'.*did you mean 'rm.center_rewards_coef'"):
        validate_config(RMConfig, {"data": {"train": "x"}, "rm": {"center_reward_coef": 0.1}})
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train: x.jsonl\nrm:\n  train_top_layers: -1\n")
    with pytest.raises(ConfigError, match="rm.train_top_layers"):
        load_config(RMConfig, path)


def test_too_long_pairs_are_dropped_or_refused(tmp_path, tokenizer, tiny_model_dir):
    rows = arithmetic_rows(3) + [{"prompt": "q", "chosen": "word " * 200, "rejected": "b"}]
    train = write_rows(tmp_path / "t.jsonl", rows)
    config = config_for(tmp_path, tiny_model_dir, train)
    pairs, _ = rm_pairs(config, tokenizer)
    assert len(pairs) == 3
    strict = config_for(tmp_path, tiny_model_dir, train, data={"truncation": "error"},
                        train={"micro_batch_tokens": 256})
    with pytest.raises(DataError, match=r"t.jsonl:4: sample has \d+ tokens, more than data.max_length=128"):
        rm_pairs(strict, tokenizer)


def test_preflight_audit_runs_on_both_sides(tmp_path, tokenizer, tiny_model_dir, capsys):
    """The SFT audit summary is printed, and a side with no end-of-turn token (a template
    that writes none) is a hard error that stops the run unless allowed."""
    rows = arithmetic_rows(2)
    train = write_rows(tmp_path / "t.jsonl", rows)
    pairs, _ = rm_pairs(config_for(tmp_path, tiny_model_dir, train), tokenizer)
    out = capsys.readouterr().out
    assert "data audit:" in out and "rows 2, samples 4" in out and "result: OK" in out
    template = tmp_path / "no_eot.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant:\n{% endif %}")
    config = config_for(tmp_path, tiny_model_dir, train, model={"chat_template": str(template)})
    from posttrain.models import load_tokenizer

    plain = load_tokenizer(tiny_model_dir, str(template))
    with pytest.raises(DataError, match=r"t.jsonl:1: .*no end-of-turn token.*pre-flight audit: 4 hard error"):
        rm_pairs(config, plain)
    allowed = config.model_copy(update={"data": config.data.model_copy(update={"allow_audit_errors": True})})
    pairs, _ = rm_pairs(allowed, plain)
    assert len(pairs) == 2


def test_step_loss_does_not_depend_on_the_split(tiny_model_dir, tokenizer):
    """Sum of micro-batch shares == one micro-batch holding every pair (loss and gradient)."""
    from posttrain.models.attention import choose_attention
    from posttrain.models.prepare import prepare_for_training

    rows = arithmetic_rows(6, seed=1)
    for k, row in enumerate(rows):
        row["margin"] = 0.1 * k
    pairs = [render_pair(r, tokenizer, line=i + 1, source="m", keys=PairKeys(margin="margin"))
             for i, r in enumerate(rows)]
    model = load_scalar_head_model(tiny_model_dir, seed=0)
    prepare_for_training(model, attn_implementation=choose_attention(True, None), gradient_checkpointing=False)

    def run(groups, packing):
        model.zero_grad()
        total = 0.0
        for group in groups:
            micro = pair_micro_batch([pairs[i] for i in group], packing, tokenizer.pad_token_id)
            loss = pair_loss(model, micro, step_pairs=len(pairs), center_rewards_coef=0.01).loss
            loss.backward()
            total += float(loss.detach())
        return total, score_layer(model).weight.grad.clone(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    whole = run([list(range(6))], packing=True)
    split = run([[0, 3], [1], [2, 4, 5]], packing=True)
    padded = run([[5, 0, 1], [2, 3, 4]], packing=False)
    for other in (split, padded):
        assert other[0] == pytest.approx(whole[0], rel=1e-5)
        torch.testing.assert_close(other[1], whole[1], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(other[2], whole[2], atol=1e-6, rtol=1e-4)
    # the loss is the hand formula on the scores
    scores = score_sequences(model, [s for p in pairs for s in (p.chosen, p.rejected)],
                             pad_token_id=tokenizer.pad_token_id)
    expected = sum(-math.log(1 / (1 + math.exp(-(scores[2 * k] - scores[2 * k + 1] - 0.1 * k))))
                   + 0.01 * (scores[2 * k] + scores[2 * k + 1]) ** 2 for k in range(6)) / 6
    assert whole[0] == pytest.approx(expected, rel=1e-5)


def test_summarise_pairs_weights_by_pairs():
    from posttrain.train.loop import MicroResult

    zero = torch.zeros(())
    stats = [MicroResult(zero, 3.0, {"accuracy": 1.0, "margin": 2.0, "reward/chosen": 1.0, "reward/rejected": -1.0}),
             MicroResult(zero, 1.0, {"accuracy": 0.0, "margin": -1.0, "reward/chosen": 0.0, "reward/rejected": 1.0})]
    out = summarise_pairs(stats, SINGLE, PAIR_METRICS)
    assert out["accuracy"] == 0.75 and out["margin"] == pytest.approx(5 / 4) and out["pairs_per_step"] == 4


def test_step_metrics_count_real_tokens_not_padding():
    """Padded micro-batches cost two rows of the longer side per pair (the planner's
    ``plan.tokens`` = 2*5 + 2*4 = 18); the logged tokens are the pairs' own 5+3 + 4+4 = 16."""
    from types import SimpleNamespace

    from posttrain.data.batching import StepPlan
    from posttrain.data.scored_sequence import ScoredSequence
    from posttrain.data.preference import PreferencePair
    from posttrain.train.rm import step_metrics
    from posttrain.train.steps import TrainerState

    def side(n):
        return ScoredSequence(input_ids=list(range(3, 3 + n)), loss_mask=[0] + [1] * (n - 1))

    pairs = [PreferencePair(side(5), side(3)), PreferencePair(side(4), side(4)), PreferencePair(side(9), side(9))]
    plan = StepPlan(step=0, epoch=0, index_in_epoch=0, steps_in_epoch=2, sample_indices=(0, 1),
                    micro_batches=(((0, 1),),), tokens=18, trained_tokens=2, trained_sequences=2)
    line = step_metrics(plan, SimpleNamespace(loss=0.69, grad_norm=1.0, lr=1e-5, seconds=2.0), TrainerState(step=1),
                        {"accuracy": 0.5, "pairs_per_step": 2}, pairs)
    assert line["tokens_per_step"] == 16 and line["tokens_per_sec"] == pytest.approx(8.0)
    assert line["pairs_per_step"] == 2 and line["epoch"] == 0.5 and "masked_token_count" not in line


def test_train_end_to_end_export_and_reload(tmp_path, tiny_model_dir, tokenizer):
    train = write_rows(tmp_path / "train.jsonl", arithmetic_rows(48, seed=0))
    val = write_rows(tmp_path / "val.jsonl", arithmetic_rows(16, seed=99))
    config = config_for(tmp_path, tiny_model_dir, train, val, train={"max_steps": 8, "eval_every": 4})
    initial = load_scalar_head_model(tiny_model_dir, seed=0)
    result = run_rm(config)
    history = read_metrics(result.run_dir / "metrics.jsonl")
    losses = [h["loss"] for h in history]
    assert all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(2), abs=0.05)  # a fresh head scores both sides alike
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1, losses
    val_losses = [h["val/loss"] for h in history if "val/loss" in h]
    assert len(val_losses) == 2 and val_losses[-1] < 0.3, val_losses
    assert history[-1]["val/accuracy"] >= 0.9
    assert {"val/accuracy/x", "val/accuracy/y", "val/margin", "val/loss", "accuracy", "margin"} <= set(history[-1])
    documented = (Path(__file__).resolve().parents[1] / "docs" / "METRICS.md").read_text()
    assert not [k for h in history for k in h if f"`{k}`" not in documented and not k.startswith("val/accuracy/")]
    evaluated = json.loads((result.run_dir / "eval" / "rm_val.json").read_text())
    assert evaluated["val/accuracy"] == history[-1]["val/accuracy"] and evaluated["pairs"] == 16
    # parameters changed, head and backbone
    final = load_scalar_head_model(str(result.final_dir))
    assert not torch.equal(score_layer(final).weight, score_layer(initial).weight)
    assert not torch.equal(final.model.layers[0].mlp.up_proj.weight, initial.model.layers[0].mlp.up_proj.weight)
    # the exported model reloads to the very scores the trainer reported
    pairs, val_pairs = rm_pairs(config, tokenizer)
    sequences = [s for p in val_pairs for s in (p.chosen, p.rejected)]
    pad = final.config.pad_token_id
    assert pad != tokenizer.eos_token_id
    scores = score_sequences(final, sequences, pad_token_id=pad)
    again = score_sequences(load_scalar_head_model(str(result.final_dir)), sequences, pad_token_id=pad, packing=False)
    assert scores == again
    accuracy = sum(scores[2 * k] > scores[2 * k + 1] for k in range(16)) / 16
    assert accuracy == pytest.approx(history[-1]["val/accuracy"])


def test_resume_is_exact(tmp_path, tiny_model_dir):
    train = write_rows(tmp_path / "train.jsonl", arithmetic_rows(32, seed=2))
    straight = config_for(tmp_path, tiny_model_dir, train, run={"name": "straight"}, train={"max_steps": 4})
    run_rm(straight)
    halves = config_for(tmp_path, tiny_model_dir, train, run={"name": "halves"},
                        train={"max_steps": 4, "save_every": 2})
    run_rm(halves.model_copy(update={"train": halves.train.model_copy(update={"max_steps": 2})}))
    run_rm(halves.model_copy(update={"train": halves.train.model_copy(  # the first half ran with max_steps=2
        update={"resume": "latest", "resume_allow_changes": ["train.max_steps"]})}))
    a = load_scalar_head_model(str(tmp_path / "runs" / "straight" / "final"))
    b = load_scalar_head_model(str(tmp_path / "runs" / "halves" / "final"))
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), name


def test_lora_and_top_layers_train_only_what_they_say(tmp_path, tiny_model_dir):
    train = write_rows(tmp_path / "train.jsonl", arithmetic_rows(16, seed=3))
    initial = load_scalar_head_model(tiny_model_dir, seed=0)
    top = run_rm(config_for(tmp_path, tiny_model_dir, train, run={"name": "top"}, train={"max_steps": 2},
                            rm={"train_top_layers": 1}))
    model = load_scalar_head_model(str(top.final_dir))
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, initial.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(model.model.embed_tokens.weight, initial.model.embed_tokens.weight)
    assert not torch.equal(model.model.layers[1].mlp.up_proj.weight, initial.model.layers[1].mlp.up_proj.weight)
    assert not torch.equal(score_layer(model).weight, score_layer(initial).weight)
    lora = run_rm(config_for(tmp_path, tiny_model_dir, train, run={"name": "lora"}, train={"max_steps": 2},
                             lora={"enabled": True, "r": 4}))
    merged = load_scalar_head_model(str(lora.final_dir))  # merged on export: plain HF weights
    assert not torch.equal(score_layer(merged).weight, score_layer(initial).weight)
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight,
                           initial.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(merged.model.embed_tokens.weight, initial.model.embed_tokens.weight)


def test_cli_reports_user_errors_in_one_line(tmp_path, capsys):
    from posttrain.cli import main

    config = tmp_path / "rm.yaml"
    config.write_text(f"data:\n  train: {tmp_path / 'missing.jsonl'}\nrun:\n  output_dir: {tmp_path}\n")
    assert main(["rm", str(config), "run.tensorboard=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: data file {tmp_path / 'missing.jsonl'} does not exist"]
    assert main(["rm", str(config), "rm.margin=1"]) == 2
    assert "unknown key 'rm.margin'" in capsys.readouterr().err


def test_identical_chosen_and_rejected_are_refused_or_skipped_and_counted(tmp_path, tokenizer, capsys):
    """A pair whose sides are the same carries no preference: refused in the shared preference-row
    reader (``data.preference``), so every trainer of comparisons refuses it; data.skip_bad counts it."""
    from posttrain.data.formats import BadRowError

    rows = arithmetic_rows(3, seed=4)
    rows.insert(1, {"prompt": "Name a prime above 10.", "chosen": "11", "rejected": "11\n"})
    rows.insert(3, {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}],
                    "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " Hello!"}]})
    rows.append({"prompt": "q", "chosen": "fine", "rejected": ""})  # an empty side is an empty assistant reply
    train = write_rows(tmp_path / "same.jsonl", rows)
    with pytest.raises(BadRowError) as info:
        rm_pairs(config_for(tmp_path, "unused", train), tokenizer)
    assert str(info.value) == f"{train}:2: chosen and rejected are the same response (the pair expresses no preference)"
    pairs, _ = rm_pairs(config_for(tmp_path, "unused", train, data={"skip_bad": True}), tokenizer)
    assert [pair.line for pair in pairs] == [1, 3, 5]
    out = capsys.readouterr().out
    assert "bad rows skipped: 3  (lines 2, 4, 6)" in out
    assert f"{train}:6: rejected[0]: empty assistant reply (blank content and no tool calls)" in out
    # the prompt differs but the responses do not: still no preference
    with pytest.raises(DataError, match="f:9: chosen and rejected are the same response"):
        preference_messages({"prompt": "2+2?", "chosen": [{"role": "assistant", "content": "4"}], "rejected": "4"}, "f:9")


def test_preference_reader_doctests():
    import doctest

    from posttrain.data import preference

    assert doctest.testmod(preference).failed == 0
