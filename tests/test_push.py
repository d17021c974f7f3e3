"""Pushing a run to the hub: the model card generated from a finished tiny run, and the
one-line refusals without a reachable hub (``run.push_to_hub`` before any model loads;
``posttrain push``). No upload is faked: the upload itself is huggingface_hub's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import posttrain as pt
from posttrain.cli import main
from posttrain.errors import ConfigError, UserError
from posttrain.model_card import card_for_run
from posttrain.pipeline import file_stamp

REPO = Path(__file__).resolve().parents[1]
SFT_DATA = str(REPO / "examples/data/sft_arithmetic.jsonl")


def sft_config(model_dir: str, out: Path, **run) -> dict:
    return {"model": {"name": model_dir}, "data": {"train": SFT_DATA, "limit": 16, "val_fraction": 0.25},
            "train": {"max_steps": 2, "eval_every": 2},
            "run": {"name": "tiny", "output_dir": str(out), "progress": False, "tensorboard": False, **run}}


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    """A 2-step SFT run plus a held-out evaluation file shaped like ``posttrain eval``'s."""
    out = tmp_path_factory.mktemp("push")
    result = pt.sft(sft_config(tiny_model_dir, out))
    (result.run_dir / "eval").mkdir()
    (result.run_dir / "eval" / "results.json").write_text(json.dumps({"model": "x", "tasks": {"add": {
        "accuracy": 0.5, "accuracy/ci_low": 0.25, "accuracy/ci_high": 0.75, "num_prompts": 8}}}))
    return result


def test_the_card_names_base_model_data_stamps_config_metrics_and_intervals(finished_run, tiny_model_dir):
    card = card_for_run(finished_run.run_dir, "me/tiny")
    lines = card.splitlines()
    assert lines[:2] == ["---", "library_name: transformers"]  # a local base model is named in the text only
    assert f"`{tiny_model_dir}` post-trained with posttrain (sft)." in lines and "# me/tiny" in lines
    assert f"- data.train: `{SFT_DATA}` (stamp {file_stamp(Path(SFT_DATA))})" in lines
    assert "| tiny | add | accuracy | 0.5 | [0.25, 0.75] | 8 |" in lines
    assert "| step | 2 |" in lines
    assert f"| val/loss | {finished_run.metrics['val/loss']:.4g} |" in lines
    config = card.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert "max_steps: 2" in config and "push_to_hub: null" in config


def test_push_without_a_hub_fails_in_one_line_and_writes_nothing(finished_run, monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("posttrain.model_card.hub_status", lambda: (False, "hub.test"))
    with pytest.raises(UserError, match=r"^push: cannot push to me/tiny: hub.test cannot be reached from this machine$"):
        pt.push(finished_run.run_dir, "me/tiny")
    assert not (finished_run.final_model / "README.md").exists()
    assert main(["push", str(finished_run.run_dir), "me/tiny"]) == 2
    assert capsys.readouterr().err == "error: push: cannot push to me/tiny: hub.test cannot be reached from this machine\n"


def test_push_of_a_directory_without_a_final_model_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("posttrain.model_card.hub_status", lambda: (True, "hub.test"))
    with pytest.raises(UserError, match=f"^{tmp_path}: no final/ model here"):
        pt.push(tmp_path, "me/tiny")


def _refuse_models(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError(f"a model was built before the refusal: {type(self).__name__}")

    monkeypatch.setattr(torch.nn.Module, "__init__", refuse)


@pytest.mark.parametrize("offline", [True, False])
def test_push_to_hub_without_a_hub_is_refused_before_training(offline, tiny_model_dir, tmp_path, monkeypatch):
    if offline:  # huggingface_hub's own setting, through the real hub_status
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        why = "HF_HUB_OFFLINE is set"
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr("posttrain.hub.hub_status", lambda: (False, "hub.test"))
        why = "hub.test cannot be reached from this machine"
    _refuse_models(monkeypatch)
    with pytest.raises(ConfigError) as refused:
        pt.sft(sft_config(tiny_model_dir, tmp_path, push_to_hub="me/tiny"))
    assert str(refused.value) == (f"run.push_to_hub: cannot push to me/tiny: {why}; unset run.push_to_hub (push later "
                                  f"with `posttrain push RUN_DIR me/tiny`) or run where the hub is reachable")
    assert not (tmp_path / "tiny").exists()


@pytest.mark.parametrize("command, data", [("rm", "preference_arithmetic_train.jsonl"),
                                           ("dpo", "preference_arithmetic_train.jsonl"),
                                           ("rl", "rl_arithmetic_train.jsonl")])
def test_every_trainer_refuses_the_push_before_loading(command, data, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _refuse_models(monkeypatch)
    config = {"model": {"name": tiny_model_dir}, "data": {"train": str(REPO / "examples/data" / data), "limit": 8},
              "run": {"output_dir": str(tmp_path), "progress": False, "push_to_hub": "me/tiny"}}
    with pytest.raises(ConfigError, match=r"^run.push_to_hub: cannot push to me/tiny: HF_HUB_OFFLINE is set;"):
        getattr(pt, command)(config)


def test_push_to_hub_takes_a_repo_id():
    with pytest.raises(ConfigError, match="^config: run.push_to_hub: not a Hugging Face repo id: write org/name \\(got 'no-slash'\\)$"):
        pt.make_config("sft", {"run": {"push_to_hub": "no-slash"}})


def test_model_card_doctests():
    import doctest

    from posttrain import model_card

    assert doctest.testmod(model_card).failed == 0


def test_a_pipeline_stage_pushing_without_a_hub_is_refused_before_the_first_stage(tiny_model_dir, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _refuse_models(monkeypatch)
    config = {"model": {"name": tiny_model_dir}, "run": {"output_dir": str(tmp_path)},
              "sft": {"data": {"train": SFT_DATA}, "run": {"push_to_hub": "me/tiny"}}}
    with pytest.raises(ConfigError, match=r"^sft.run.push_to_hub: cannot push to me/tiny: HF_HUB_OFFLINE is set;"):
        pt.pipeline(config)
    assert not (tmp_path / "pipeline").exists()
