"""DPO trainer end to end on the tiny model: loss starts at log 2 and falls, held-out preference
accuracy rises, parameters change; the step loss and gradient do not depend on the split and
equal the hand formula on full-logits log-probs; the reference pass is cached and reused;
with LoRA the reference is the base; resume is exact; bad rows and settings are one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_rm import (  # the same rows as the reward model's tests
    arithmetic_rows,
    write_rows,
)

from posttrain.config import DPOConfig, validate_config
from posttrain.data.preference import load_preference_data, render_pair
from posttrain.errors import ConfigError, DataError
from posttrain.train.distributed import DistInfo
from posttrain.train.dpo import (
    REFERENCE_FILE,
    dpo_micro_batch,
    dpo_micro_loss,
    reference_logps,
    run_dpo,
    score_pairs,
)
from posttrain.train.logging import read_metrics

REPO = Path(__file__).resolve().parents[1]
SINGLE = DistInfo(0, 1, 0, torch.device("cpu"), None)


def config_for(tmp_path, model_dir, train_path, val_path=None, **sections) -> DPOConfig:
    raw = {
        "run": {"name": "dpo", "output_dir": str(tmp_path / "runs"), "tensorboard": False, "progress": False},
        "model": {"name": model_dir},
        "data": {"train": train_path, "val": val_path, "max_length": 128},
        "optim": {"lr": 3e-3, "schedule": "constant"},
        "train": {"max_steps": 6, "global_batch_size": 8, "micro_batch_tokens": 512, "seed": 0},
        "dpo": {"beta": 0.5, "group_key": "kind"},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return validate_config(DPOConfig, raw)


def test_train_end_to_end_with_a_cached_reference(tmp_path, tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    train = write_rows(tmp_path / "train.jsonl", arithmetic_rows(48, seed=0))
    val = write_rows(tmp_path / "val.jsonl", arithmetic_rows(16, seed=99))
    config = config_for(tmp_path, tiny_model_dir, train, val, train={"max_steps": 8, "eval_every": 4})
    result = run_dpo(config)
    history = read_metrics(result.run_dir / "metrics.jsonl")
    steps = [h for h in history if "loss" in h]
    assert [h["step"] for h in history if "val/loss" in h] == [0, 4, 8]
    assert history[0]["val/loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference
    assert history[0]["val/rewards/accuracies"] == 0.0  # every margin is 0: ties count as wrong
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in steps)
    assert sum(h["loss"] for h in steps[-3:]) / 3 < steps[0]["loss"] - 0.2
    last = history[-1]
    assert last["val/rewards/accuracies"] >= 0.9 and last["val/rewards/margins"] > 0
    assert last["val/rewards/chosen"] > last["val/rewards/rejected"]
    assert {"val/rewards/accuracies/x", "val/rewards/accuracies/y", "val/mean_logp_accuracy"} <= set(last)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "lr", "grad_norm", "masked_token_count", "tokens_per_sec", "pairs_per_step"):
        assert key in steps[0], key
    assert steps[0]["pairs_per_step"] == 8
    assert steps[0]["masked_token_count"] < steps[0]["masked_token_count"] + steps[0]["untrained_token_count"]
    documented = (REPO / "docs" / "METRICS.md").read_text()
    assert not [k for h in history for k in h if f"`{k}`" not in documented
                and not k.startswith("val/rewards/accuracies/")]
    saved = json.loads((result.run_dir / "eval" / "dpo_val.json").read_text())
    assert saved["val/rewards/accuracies"] == last["val/rewards/accuracies"] and saved["pairs"] == 16
    assert (result.run_dir / REFERENCE_FILE).is_file() and not result.reference_reused
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    final = AutoModelForCausalLM.from_pretrained(str(result.final_dir))
    assert not torch.equal(final.model.layers[0].mlp.up_proj.weight, initial.model.layers[0].mlp.up_proj.weight)
    # a rerun reuses the cached reference (same model, same pairs); other data recomputes it
    again = run_dpo(config.model_copy(update={"run": config.run.model_copy(update={"overwrite": True}),
                                              "train": config.train.model_copy(update={"max_steps": 1})}))
    assert again.reference_reused
    assert read_metrics(again.run_dir / "metrics.jsonl")[0]["val/loss"] == pytest.approx(math.log(2), abs=1e-4)
    other = write_rows(tmp_path / "other.jsonl", arithmetic_rows(48, seed=5))
    changed = run_dpo(config.model_copy(update={
        "run": config.run.model_copy(update={"overwrite": True}),
        "data": config.data.model_copy(update={"train": other}),
        "train": config.train.model_copy(update={"max_steps": 1})}))
    assert not changed.reference_reused


def _pairs(tokenizer, rows):
    return [render_pair(r, tokenizer, line=i + 1, source="m")
            for i, r in enumerate(rows)]


def _full_logits_logps(model, pairs):
    """Slow reference: plain forward, full logits, log_softmax, summed over each response."""
    out = []
    for pair in pairs:
        for side in (pair.chosen, pair.rejected):
            ids = torch.tensor([side.input_ids])
            logits = model(input_ids=ids).logits.float()
            logp = torch.log_softmax(logits[0, :-1], -1).gather(1, ids[0, 1:, None]).squeeze(1)
            out.append((logp * torch.tensor(side.loss_mask[1:], dtype=torch.float32)).sum())
    return torch.stack(out)


@pytest.mark.parametrize("options", [
    dict(loss_type="sigmoid", beta=0.5, label_smoothing=0.1),
    dict(loss_type="ipo", beta=0.5),
    dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5),
    dict(loss_type="sigmoid", beta=0.5, rpo_alpha=0.7),  # RPO: + chosen NLL, per token then per pair
])
def test_step_loss_does_not_depend_on_the_split(tiny_model_dir, tokenizer, options):
    """Sum of micro-batch shares == one micro-batch holding every pair == padded rows == each
    pair's prompt laid out once (loss and gradient), and equals the hand formula on full-logits
    log-probs."""
    from transformers import AutoModelForCausalLM

    from posttrain.algorithms.preference import preference_optimization_loss
    from posttrain.models.attention import choose_attention
    from posttrain.models.prepare import prepare_for_training

    pairs = _pairs(tokenizer, arithmetic_rows(6, seed=1))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prepare_for_training(model, attn_implementation=choose_attention(True, None), gradient_checkpointing=False)
    # any constants: the reference is data
    reference = None if options["loss_type"] == "simpo" else torch.linspace(-30.0, -20.0, 12).reshape(6, 2)

    def run(groups, packing, share_prompt=False):
        model.zero_grad()
        total = 0.0
        for group in groups:
            micro = dpo_micro_batch(pairs, group, reference, packing, tokenizer.pad_token_id, share_prompt)
            if share_prompt and group:  # the prompt is laid out once per pair
                assert micro.batch.num_tokens < sum(pairs[i].tokens for i in group)
            loss = dpo_micro_loss(model, micro, step_pairs=len(pairs), chunk_size=7, **options).loss
            loss.backward()
            total += float(loss.detach())
        return total, model.model.layers[0].self_attn.q_proj.weight.grad.clone(), model.lm_head.weight.grad.clone()

    whole = run([list(range(6))], packing=True)
    for other in (run([[0, 3], [1], [2, 4, 5], []], packing=True), run([[5, 0, 1], [2, 3, 4]], packing=False),
                  run([list(range(6))], packing=True, share_prompt=True),
                  run([[4], [0, 3], [2, 1, 5], []], packing=True, share_prompt=True)):
        assert other[0] == pytest.approx(whole[0], rel=1e-5)
        torch.testing.assert_close(other[1], whole[1], atol=1e-6, rtol=1e-4)
        # the tied output/embedding matrix (3M entries) sums many more terms per entry: 1e-5 absolute
        torch.testing.assert_close(other[2], whole[2], atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        logps = _full_logits_logps(model, pairs)
    lengths = torch.tensor([[sum(s.loss_mask[1:]) for s in (p.chosen, p.rejected)] for p in pairs], dtype=torch.float32)
    expected, _ = preference_optimization_loss(
        logps[0::2], logps[1::2], None if reference is None else reference[:, 0],
        None if reference is None else reference[:, 1], chosen_tokens_P=lengths[:, 0], rejected_tokens_P=lengths[:, 1],
        **options)
    assert whole[0] == pytest.approx(expected.item(), rel=1e-5)


def test_lora_reference_is_the_base_model(tmp_path, tiny_model_dir, tokenizer):
    """With LoRA the reference pass runs with the adapter off: it equals the plain base model's
    log-probs even when the adapter has moved the policy."""
    from transformers import AutoModelForCausalLM

    from posttrain.train.dpo import build_model

    pairs = _pairs(tokenizer, arithmetic_rows(4, seed=2))
    config = config_for(tmp_path, tiny_model_dir, "unused.jsonl", lora={"enabled": True, "r": 4},
                        dpo={"reference_cache": False})
    model, _ = build_model(config, SINGLE)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    moved = score_pairs(model, pairs, config, SINGLE, tokenizer.pad_token_id)
    reference = reference_logps(model, pairs, [], config, SINGLE, tmp_path, "id", tokenizer.pad_token_id)
    base = _full_logits_logps(AutoModelForCausalLM.from_pretrained(tiny_model_dir), pairs).reshape(-1, 2)
    torch.testing.assert_close(reference.train, base, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(moved, base, atol=1e-2)
    assert not (tmp_path / REFERENCE_FILE).exists()  # reference_cache: false


def test_resume_is_exact(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    train = write_rows(tmp_path / "train.jsonl", arithmetic_rows(32, seed=2))
    straight = config_for(tmp_path, tiny_model_dir, train, run={"name": "straight"}, train={"max_steps": 4})
    run_dpo(straight)
    halves = config_for(tmp_path, tiny_model_dir, train, run={"name": "halves"},
                        train={"max_steps": 4, "save_every": 2})
    run_dpo(halves.model_copy(update={"train": halves.train.model_copy(update={"max_steps": 2})}))
    resumed = run_dpo(halves.model_copy(update={"train": halves.train.model_copy(  # the first half ran 2 steps
        update={"resume": "latest", "resume_allow_changes": ["train.max_steps"]})}))
    assert resumed.reference_reused  # no second reference pass on resume
    a = AutoModelForCausalLM.from_pretrained(str(tmp_path / "runs" / "straight" / "final"))
    b = AutoModelForCausalLM.from_pretrained(str(tmp_path / "runs" / "halves" / "final"))
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), name


def test_simpo_runs_without_a_reference(tmp_path, tiny_model_dir):
    train = write_rows(tmp_path / "train.jsonl", arithmetic_rows(16, seed=4))
    result = run_dpo(config_for(tmp_path, tiny_model_dir, train, train={"max_steps": 2},
                                dpo={"loss_type": "simpo", "beta": 2.0}))
    history = read_metrics(result.run_dir / "metrics.jsonl")
    assert all(math.isfinite(h["loss"]) for h in history) and len(history) == 2
    assert not (result.run_dir / REFERENCE_FILE).exists()


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "chosen": "same", "rejected": " same "}, r"t.jsonl:2: chosen and rejected are the same"),
    ({"prompt": "q", "chosen": "a"}, r"t.jsonl:2: a preference row needs 'chosen' and 'rejected'"),
])
def test_bad_rows_name_file_and_line(tmp_path, tiny_model_dir, tokenizer, row, message):
    train = write_rows(tmp_path / "t.jsonl", arithmetic_rows(1) + [row])
    with pytest.raises(DataError, match=message):
        config = config_for(tmp_path, tiny_model_dir, train)
        load_preference_data(config.data, tokenizer, seed=config.train.seed)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="data.train: a preference data file is required"):
        validate_config(DPOConfig, {})
    with pytest.raises(ConfigError, match="dpo.label_smoothing: does not apply to loss_type ipo"):
        validate_config(DPOConfig, {"data": {"train": "x"}, "dpo": {"loss_type": "ipo", "label_smoothing": 0.1}})
    with pytest.raises(ConfigError, match="unknown key 'dpo.bta'.*did you mean 'dpo.beta'"):
        validate_config(DPOConfig, {"data": {"train": "x"}, "dpo": {"bta": 0.1}})
    with pytest.raises(ConfigError, match="dpo.loss_type"):
        validate_config(DPOConfig, {"data": {"train": "x"}, "dpo": {"loss_type": "kto"}})
    with pytest.raises(ConfigError, match="dpo.share_prompt: the shared-prompt layout needs train.packing"):
        validate_config(DPOConfig, {"data": {"train": "x"}, "train": {"packing": False}, "dpo": {"share_prompt": True}})
    from posttrain.train.dpo import shares_prompt

    assert shares_prompt(validate_config(DPOConfig, {"data": {"train": "x"}}))  # on by default with packing
    assert not shares_prompt(validate_config(DPOConfig, {"data": {"train": "x"}, "model": {"attn_implementation": "sdpa"}}))


def test_warmup_not_shorter_than_max_steps_fails_before_anything_loads(tmp_path, monkeypatch):
    """DPO's own pre-load check: the same one-line refusal as the reward model's, before the
    tokenizer, the data or the model is touched."""
    from posttrain.train import dpo as dpo_module

    def refuse(*_args, **_kwargs):
        raise AssertionError("loaded before the settings were checked")

    monkeypatch.setattr(dpo_module, "load_tokenizer", refuse)
    monkeypatch.setattr(dpo_module, "build_model", refuse)
    config = config_for(tmp_path, "/nonexistent/model", "unused.jsonl", optim={"warmup_steps": 6})
    with pytest.raises(ConfigError, match=r"^optim.warmup_steps \(6\) is not shorter than train.max_steps \(6\): "):
        run_dpo(config)


def test_cli_reports_user_errors_in_one_line(tmp_path, capsys):
    from posttrain.cli import main

    config = tmp_path / "dpo.yaml"
    config.write_text(f"data:\n  train: {tmp_path / 'missing.jsonl'}\nrun:\n  output_dir: {tmp_path}\n")
    assert main(["dpo", str(config), "run.tensorboard=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: data file {tmp_path / 'missing.jsonl'} does not exist"]


def test_rpo_alpha_is_trained_and_logged(tmp_path, tiny_model_dir):
    """dpo.rpo_alpha adds alpha x the chosen per-token NLL to the loss and logs loss/nll_chosen
    (step and held-out), documented in docs/METRICS.md."""
    train = write_rows(tmp_path / "train.jsonl", arithmetic_rows(16, seed=3))
    val = write_rows(tmp_path / "val.jsonl", arithmetic_rows(8, seed=4))
    config = config_for(tmp_path, tiny_model_dir, train, val, train={"max_steps": 2, "eval_every": 1},
                        dpo={"rpo_alpha": 0.5, "group_key": None})
    history = run_dpo(config).history
    first = history[0]
    assert first["step"] == 0 and first["val/loss/nll_chosen"] > 0
    # at step 0 the preference term is log 2: the rest is alpha x the chosen NLL
    assert first["val/loss"] == pytest.approx(math.log(2) + 0.5 * first["val/loss/nll_chosen"], abs=1e-4)
    steps = [h for h in history if h["step"] > 0 and "loss/nll_chosen" in h]
    assert steps and steps[0]["loss"] == pytest.approx(math.log(2) + 0.5 * steps[0]["loss/nll_chosen"], abs=1e-4)
    documented = (REPO / "docs" / "METRICS.md").read_text()
    assert not [k for h in history for k in h if f"`{k}`" not in documented]


def test_the_reference_pass_counts_its_pairs_when_output_is_not_a_terminal(tmp_path, tiny_model_dir, tokenizer,
                                                                           capsys, monkeypatch):
    """The reference pass (minutes on a real model) is a progress phase of its own: a line when
    it starts, lines as micro-batches of pairs finish, a last line; none with run.progress off."""
    import posttrain.log
    from posttrain.train.dpo import build_model

    monkeypatch.setattr(posttrain.log, "PLAIN_INTERVAL_S", 0.0)
    pairs = _pairs(tokenizer, arithmetic_rows(12, seed=3))
    config = config_for(tmp_path, tiny_model_dir, "unused.jsonl", run={"progress": True},
                        train={"micro_batch_tokens": 160}, dpo={"reference_cache": False})
    model, _ = build_model(config, SINGLE)
    reference_logps(model, pairs[:9], pairs[9:], config, SINGLE, tmp_path, "id", tokenizer.pad_token_id)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[dpo reference log-probs]")]
    counts = [line.split("] ")[1].split()[0] for line in lines]
    assert counts[0] == "0/12" and counts[-1] == "12/12" and len(counts) > 3, lines
    assert lines[-1].split("] ")[1].startswith("12/12 pairs  done in")
    quiet = config_for(tmp_path, tiny_model_dir, "unused.jsonl", run={"progress": False}, dpo={"reference_cache": False})
    reference_logps(model, pairs, [], quiet, SINGLE, tmp_path, "id", tokenizer.pad_token_id)
    assert "[dpo" not in capsys.readouterr().err
