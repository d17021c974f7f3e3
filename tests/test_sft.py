"""The SFT trainer end to end on the shipped data with a tiny model, and impossible settings
refused in one line before any model loads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from posttrain.cli import main as cli_main
from posttrain.config import SFTConfig, validate_config
from posttrain.errors import ConfigError
from posttrain.train import sft as sft_module
from posttrain.train.sft import run_sft

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "sft_chat.jsonl"
VAL = REPO / "examples" / "data" / "sft_chat_val.jsonl"


def config_for(model_dir, out, **train):
    settings = dict(global_batch_size=4, micro_batch_tokens=512, max_steps=8, eval_every=4, seed=0)
    settings.update(train)
    return validate_config(SFTConfig, {
        "model": {"name": model_dir},
        "data": {"train": str(DATA), "val": str(VAL), "max_length": 512, "limit": 12},
        "run": {"output_dir": str(out), "name": "run", "progress": False, "tensorboard": True},
        "optim": {"lr": 3e-3, "warmup_steps": 1},
        "train": settings,
    })


def test_sft_on_shipped_data_loss_falls_and_exports(tiny_model_dir, tmp_path, capsys):
    result = run_sft(config_for(tiny_model_dir, tmp_path))
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "loss" in x]
    val_lines = [x for x in lines if "val/loss" in x]
    assert [x["step"] for x in train_lines] == list(range(1, 9))
    assert [x["step"] for x in val_lines] == [0, 4, 8]
    assert all(math.isfinite(x["loss"]) and math.isfinite(x["grad_norm"]) for x in train_lines)
    assert train_lines[-1]["loss"] < train_lines[0]["loss"] - 0.5
    assert val_lines[-1]["val/loss"] < val_lines[0]["val/loss"] - 0.5
    assert val_lines[-1]["val/ppl"] == pytest.approx(math.exp(val_lines[-1]["val/loss"]), rel=1e-6)
    for key in ("epoch", "lr", "tokens_per_step", "masked_token_count", "untrained_token_count", "total_tokens",
                "tokens_per_sec", "loss_agg_mode"):
        assert key in train_lines[0], key
    first = train_lines[0]
    # masked_token_count = sum(m_t), the trained targets (docs/METRICS.md); prompts are not trained
    assert first["masked_token_count"] == first["tokens_per_step"] > 0 and first["untrained_token_count"] > 0
    assert first["masked_token_count"] + first["untrained_token_count"] == first["total_tokens"]
    documented = (REPO / "docs" / "METRICS.md").read_text()
    assert not [key for line in lines for key in line if f"`{key}`" not in documented]
    assert first["loss_agg_mode"] == "token-mean" and first["epoch"] == pytest.approx(1 / 3, abs=1e-3)
    assert list((result.run_dir / "tb").iterdir())  # TensorBoard events
    assert (result.final_dir / "model.safetensors").is_file() and (result.final_dir / "tokenizer.json").is_file()
    assert "audit" in capsys.readouterr().out.lower()  # the pre-flight summary was printed


def _no_model_load(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(sft_module, "build_model", refuse)


def test_micro_batch_smaller_than_max_length_fails_before_anything_loads(tmp_path, monkeypatch):
    _no_model_load(monkeypatch)
    config = config_for("/nonexistent/model", tmp_path, micro_batch_tokens=256)
    with pytest.raises(ConfigError, match=r"train.micro_batch_tokens \(256\) is smaller than data.max_length \(512\)"):
        run_sft(config)


def test_warmup_longer_than_training_fails_before_model_load(tiny_model_dir, tmp_path, monkeypatch):
    _no_model_load(monkeypatch)
    config = config_for(tiny_model_dir, tmp_path, max_steps=None, epochs=1.0)
    config.optim.warmup_steps = 5  # 12 rows / batch 4 = 3 steps
    with pytest.raises(ConfigError, match=r"optim.warmup_steps \(5\) is not shorter than the run \(3 optimizer"):
        run_sft(config)
    config = config_for(tiny_model_dir, tmp_path, max_steps=4)
    config.optim.warmup_steps = 4
    with pytest.raises(ConfigError, match="warmup_steps"):
        run_sft(config)


def test_eval_every_without_validation_data_fails(tiny_model_dir, tmp_path, monkeypatch):
    _no_model_load(monkeypatch)
    config = config_for(tiny_model_dir, tmp_path)
    config.data.val = None
    with pytest.raises(ConfigError, match="train.eval_every is set but there is no validation data"):
        run_sft(config)


def test_cli_prints_one_line_error(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  train: {DATA}\n  max_length: 512\ntrain:\n  micro_batch_tokens: 100\n")
    assert cli_main(["sft", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: train.micro_batch_tokens (100)") and "\n" not in err


def test_val_fraction_holds_out_training_rows(tiny_model_dir, tmp_path):
    from posttrain.models import load_tokenizer
    from posttrain.train.distributed import init_distributed

    config = config_for(tiny_model_dir, tmp_path)
    config.data.val = None
    config.data.val_fraction = 0.25
    train, val = sft_module.load_sft_samples(config, load_tokenizer(tiny_model_dir), init_distributed("cpu"))
    assert len(val) == 3 and len(train) == 9
    assert not {tuple(s.input_ids) for s in val} & {tuple(s.input_ids) for s in train}


def test_masked_token_count_is_the_loss_normaliser_by_hand(tiny_model_dir, tmp_path):
    """One step over two hand-made samples: 7 + 4 trained targets of 16 tokens.

    A sample's trained targets are its loss_mask shifted by one (the first token is never a
    target): [0,0,0,1,1,1,1,1,1,1] trains 7 targets, [0,0,1,1,1,1] trains 4. The logged
    loss (before the update) must be the NLL summed over exactly those 11 positions / 11.
    """
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM

    samples = [SimpleNamespace(input_ids=[5, 17, 42, 99, 7, 8, 230, 11, 64, 3], loss_mask=[0] * 3 + [1] * 7,
                               weights=None),
               SimpleNamespace(input_ids=[9, 250, 31, 77, 120, 4], loss_mask=[0] * 2 + [1] * 4, weights=None)]
    config = config_for(tiny_model_dir, tmp_path, global_batch_size=2, max_steps=1, eval_every=None,
                        precision="fp32")
    config.optim.warmup_steps = 0
    line = run_sft(config, samples=(samples, [])).history[-1]
    assert (line["masked_token_count"], line["tokens_per_step"], line["untrained_token_count"]) == (11, 11, 5)
    assert line["total_tokens"] == 16 and line["sequences_per_step"] == 2

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    nll_sum = 0.0
    with torch.no_grad():
        for sample in samples:
            ids = torch.tensor([sample.input_ids])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            for t in range(len(sample.input_ids) - 1):
                if sample.loss_mask[t + 1]:
                    nll_sum -= float(logp[t, sample.input_ids[t + 1]])
    assert line["loss"] == pytest.approx(nll_sum / 11, rel=1e-4)


def test_train_top_layers_trains_only_the_top_blocks(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    config = validate_config(SFTConfig, {**config_for(tiny_model_dir, tmp_path, max_steps=3, eval_every=None)
                                         .model_dump(), "train_top_layers": 1})
    result = run_sft(config)
    before = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    after = load_file(str(result.final_dir / "model.safetensors"))
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith(("model.layers.1.", "model.norm.")) for name in changed), changed
    assert any(name.startswith("model.layers.1.") for name in changed)


def test_train_top_layers_refuses_lora_and_too_many_blocks(tiny_model_dir, tmp_path):
    base = config_for(tiny_model_dir, tmp_path).model_dump()
    with pytest.raises(ConfigError, match="train_top_layers: LoRA"):
        run_sft(validate_config(SFTConfig, {**base, "train_top_layers": 1, "lora": {"enabled": True}}))
    with pytest.raises(ConfigError, match="train_top_layers: the model has 2 decoder blocks, got 3"):
        run_sft(validate_config(SFTConfig, {**base, "train_top_layers": 3}))
