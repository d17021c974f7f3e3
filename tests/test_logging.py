"""Run directory, metrics.jsonl, TensorBoard, progress."""

import json

import pytest
import torch

from posttrain.config import SFTConfig
from posttrain.errors import ConfigError
from posttrain.train.logging import MetricsLogger, Progress, prepare_run_dir, read_metrics


def test_run_dir_metrics_and_tensorboard(tmp_path):
    config = SFTConfig.model_validate({"data": {"train": "x.jsonl"}})
    run = prepare_run_dir(tmp_path, "r1", config, resuming=False)
    assert "train: x.jsonl" in run.config.read_text()
    with MetricsLogger(run) as logger:
        logger.log({"loss": torch.tensor(1.25), "lr": 1e-5, "loss_agg_mode": "token-mean"}, step=1)
        logger.log({"loss": float("nan")}, step=2)
    lines = run.metrics.read_text().splitlines()
    assert json.loads(lines[0]) == {"step": 1, "loss": 1.25, "lr": 1e-5, "loss_agg_mode": "token-mean"}
    assert json.loads(lines[1]) == {"step": 2, "loss": "nan"}
    assert list(run.tensorboard.glob("events.out.tfevents.*"))
    assert run.checkpoints.is_dir()


def test_fresh_run_refuses_existing_metrics_unless_resuming_or_overwrite(tmp_path):
    config = SFTConfig.model_validate({"data": {"train": "x.jsonl"}})
    run = prepare_run_dir(tmp_path, "r", config, resuming=False)
    with MetricsLogger(run, tensorboard=False) as logger:
        logger.log({"loss": 1.0}, step=1)
    with pytest.raises(ConfigError, match="already holds a run"):
        prepare_run_dir(tmp_path, "r", config, resuming=False)
    prepare_run_dir(tmp_path, "r", config, resuming=True)
    assert len(read_metrics(run.metrics)) == 1
    prepare_run_dir(tmp_path, "r", config, resuming=False, overwrite=True)
    assert not run.metrics.exists()


def test_read_metrics_ignores_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}]


def test_disabled_logger_writes_nothing(tmp_path):
    config = SFTConfig.model_validate({"data": {"train": "x.jsonl"}})
    run = prepare_run_dir(tmp_path, "r", config, resuming=False)
    MetricsLogger(run, enabled=False).log({"loss": 1.0}, step=1)
    assert not run.metrics.exists()


def test_plain_progress_prints_eta_and_metrics(capsys):
    with Progress(total=4, description="sft", plain_every=2) as bar:
        for step in range(4):
            bar.update(1, {"loss": 2.0 - step, "lr": 0.1})
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("[sft] 2/4 eta") and "loss=1" in err[0] and err[1].startswith("[sft] 4/4")
