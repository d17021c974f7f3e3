"""Atomic checkpoints, keep-last-K, exact resume (N straight == N/2 + resume + N/2, bitwise
on CPU), HF-format export (plain transformers loads final/), LoRA merge on export."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from posttrain.config import SFTConfig, validate_config
from posttrain.errors import ConfigError
from posttrain.train import checkpoint as ckpt
from posttrain.train import sft as sft_module
from posttrain.train.sft import run_sft


def synthetic_samples(n, seed, vocab=300):
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        length = int(torch.randint(6, 30, (1,), generator=g))
        samples.append(SimpleNamespace(input_ids=torch.randint(1, vocab, (length,), generator=g).tolist(),
                                       loss_mask=[0] * 3 + [1] * (length - 3), weights=None))
    return samples


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory, tokenizer):
    """Tiny model with attention dropout, so resuming must restore the RNG to match."""
    from conftest import build_tiny_llama

    path = tmp_path_factory.mktemp("tiny-dropout")
    build_tiny_llama(tokenizer, vocab_size=320, attention_dropout=0.2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def sft_config(model_dir, out, **train):
    settings = dict(global_batch_size=4, micro_batch_tokens=64, max_steps=4, save_every=2, keep_last=2, seed=1,
                    eval_every=2)
    settings.update(train)
    return validate_config(SFTConfig, {
        "model": {"name": model_dir}, "data": {"train": "unused.jsonl", "max_length": 64},
        "run": {"output_dir": str(out), "name": "run", "progress": False, "tensorboard": False},
        "optim": {"lr": 3e-3, "warmup_steps": 1, "weight_decay": 0.01},
        "train": settings,
    })


def final_weights(result):
    from safetensors.torch import load_file

    return load_file(str(Path(result.final_dir) / "model.safetensors"))


def with_lora(config, lora: bool):
    if lora:  # adapters with dropout: the checkpoint must hold the adapter, its optimizer state and the RNG
        config.lora.enabled, config.lora.r, config.lora.dropout = True, 4, 0.1
        config.lora.target_modules = ["q_proj", "v_proj", "down_proj"]
        config.lora.merge_on_export = True
    return config


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_is_bit_identical_to_straight_run(dropout_model_dir, tmp_path, monkeypatch, lora):
    train, val = synthetic_samples(12, 0), synthetic_samples(2, 1)
    straight = run_sft(with_lora(sft_config(dropout_model_dir, tmp_path / "a"), lora), samples=(train, val))

    real_save = ckpt.save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("simulated crash after the first checkpoint")

    monkeypatch.setattr(sft_module.ckpt, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_sft(with_lora(sft_config(dropout_model_dir, tmp_path / "b"), lora), samples=(train, val))
    monkeypatch.setattr(sft_module.ckpt, "save_checkpoint", real_save)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "b" / "run" / "checkpoints")] == ["step_2"]
    resumed = run_sft(with_lora(sft_config(dropout_model_dir, tmp_path / "b", resume="latest"), lora),
                      samples=(train, val))

    a, b = final_weights(straight), final_weights(resumed)
    assert a.keys() == b.keys()
    if lora:  # the merged export moved the adapted projections away from the base
        from safetensors.torch import load_file

        base = load_file(str(Path(dropout_model_dir) / "model.safetensors"))
        assert any(not torch.equal(a[n], base[n]) for n in a if "q_proj" in n)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    straight_lines = {h["step"]: h for h in straight.history}
    for line in resumed.history:
        assert line["loss"] == straight_lines[line["step"]]["loss"]
        assert line["lr"] == straight_lines[line["step"]]["lr"]
        assert line.get("val/loss") == straight_lines[line["step"]].get("val/loss")
    assert [h["step"] for h in resumed.history] == [3, 4]
    # the resumed run appended to the same metrics file
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4]  # step 0: the validation baseline before training


@pytest.mark.slow
def test_resume_without_rng_restore_differs(dropout_model_dir, tmp_path, monkeypatch):
    """Guard that the exactness test can fail: dropping the RNG restore changes the weights."""
    train, val = synthetic_samples(12, 0), synthetic_samples(2, 1)
    straight = run_sft(sft_config(dropout_model_dir, tmp_path / "a", max_steps=2, save_every=1, eval_every=None),
                       samples=(train, val))
    real_save = ckpt.save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(sft_module.ckpt, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_sft(sft_config(dropout_model_dir, tmp_path / "b", max_steps=2, save_every=1, eval_every=None),
                samples=(train, val))
    monkeypatch.setattr(sft_module.ckpt, "save_checkpoint", real_save)
    monkeypatch.setattr(ckpt, "set_rng_state", lambda state: torch.manual_seed(12345))
    resumed = run_sft(sft_config(dropout_model_dir, tmp_path / "b", max_steps=2, save_every=1, eval_every=None,
                                 resume="latest"), samples=(train, val))
    a, b = final_weights(straight), final_weights(resumed)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_atomic_write_leaves_no_complete_checkpoint_on_crash(tmp_path):
    def crash(tmp):
        (tmp / "model.pt").write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ckpt.atomic_directory_write(tmp_path / "step_5", crash)
    assert not (tmp_path / "step_5").exists()
    assert list(tmp_path.iterdir()) == []
    # a directory without the marker (e.g. copied by hand, half-done) is not a checkpoint
    (tmp_path / "step_7").mkdir()
    assert ckpt.latest_checkpoint(tmp_path) is None
    with pytest.raises(ConfigError, match="COMPLETE"):
        ckpt.resolve_resume(str(tmp_path / "step_7"), tmp_path)
    assert ckpt.resolve_resume("latest", tmp_path) is None and ckpt.resolve_resume(None, tmp_path) is None


def test_keep_last_prunes_oldest_and_stale_temps(tmp_path):
    for step in (1, 2, 3, 10):
        ckpt.atomic_directory_write(tmp_path / f"step_{step}", lambda tmp: (tmp / "x").write_text("1"))
    (tmp_path / ".tmp-step_11-abc").mkdir()
    ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_3", "step_10"]
    assert not (tmp_path / ".tmp-step_11-abc").exists() and not (tmp_path / "step_1").exists()
    assert ckpt.latest_checkpoint(tmp_path).name == "step_10"


def test_final_dir_loads_in_plain_transformers_with_same_outputs(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train = synthetic_samples(8, 3)
    result = run_sft(sft_config(tiny_model_dir, tmp_path, max_steps=2, save_every=None, eval_every=None),
                     samples=(train, []))
    model = AutoModelForCausalLM.from_pretrained(result.final_dir)
    tokenizer = AutoTokenizer.from_pretrained(result.final_dir)
    assert tokenizer.chat_template
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([train[0].input_ids])
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, original(ids).logits)  # it trained
    config = json.loads((Path(result.final_dir) / "config.json").read_text())
    assert "posttrain" not in json.dumps(config)


def test_lora_merged_export_loads_without_peft_and_matches(tiny_model_dir, tmp_path):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    train = synthetic_samples(8, 4)
    config = sft_config(tiny_model_dir, tmp_path, max_steps=2, save_every=None, eval_every=None)
    config.lora.enabled = True
    config.lora.r = 4
    config.lora.target_modules = ["q_proj", "v_proj"]
    config.optim.lr = 5e-2
    result = run_sft(config, samples=(train, []))
    merged = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = {n for n, p in merged.state_dict().items() if not torch.equal(p, original.state_dict()[n])}
    assert changed and all(("q_proj" in n or "v_proj" in n) for n in changed)
    assert LoraConfig  # peft was used to train, not needed to load


def test_doctests_of_the_checkpoint_module():
    import doctest

    assert doctest.testmod(ckpt).failed == 0


def test_checksums_catch_every_kind_of_damage(tmp_path):
    from posttrain.train.distributed import DistInfo

    info = DistInfo(0, 1, 0, torch.device("cpu"), None)
    config = sft_config("m", tmp_path)
    path = ckpt.write_checkpoint(tmp_path, 3, {"model.pt": {"w": torch.arange(64.0)}}, {"step": 3}, info,
                                 keep_last=2, config=config)
    assert ckpt.verify_checkpoint(path) is None
    assert ckpt.saved_config(path)["optim.lr"] == 3e-3 and ckpt.saved_config(path)["train.max_steps"] == 4
    assert sorted(json.loads((path / ckpt.CHECKSUMS).read_text())) == ["config.json", "model.pt", "trainer_state.json"]
    (path / ckpt.CHECKSUMS).write_text("{not json")
    assert ckpt.verify_checkpoint(path) == "checksums.json is unreadable"
    (path / ckpt.CHECKSUMS).unlink()
    assert ckpt.verify_checkpoint(path) == "checksums.json is missing"


def test_checksums_are_hashed_as_the_files_are_written_not_read_back(tmp_path, monkeypatch):
    """write_checkpoint hashes each file on its way to disk: no file is read again for
    checksums.json, and the sums equal a fresh read of what is on disk."""
    from posttrain.train.distributed import DistInfo

    info = DistInfo(0, 1, 0, torch.device("cpu"), None)
    state = {"w": torch.randn(1000), "b": torch.arange(7)}

    def no_read_back(path, chunk_bytes=1 << 22):
        raise AssertionError(f"{path} was read back")

    with monkeypatch.context() as patch:
        patch.setattr(ckpt, "file_digest", no_read_back)
        path = ckpt.write_checkpoint(tmp_path, 1, {"model.pt": state, "optimizer.pt": {"lr": 0.1}}, {"step": 1},
                                     info, keep_last=1, config=sft_config("m", tmp_path))
    sums = json.loads((path / ckpt.CHECKSUMS).read_text())
    for name, entry in sums.items():
        assert entry["sha256"] == ckpt.file_digest(path / name) and entry["bytes"] == (path / name).stat().st_size
    assert ckpt.verify_checkpoint(path) is None
    loaded = torch.load(path / "model.pt")
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["b"], state["b"])
