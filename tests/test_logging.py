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


def test_resume_truncates_metrics_samples_and_evals_and_a_torn_tail_never_glues(tmp_path):
    from posttrain.train.logging import truncate_run_logs

    config = SFTConfig.model_validate({"data": {"train": "x.jsonl"}})
    run = prepare_run_dir(tmp_path, "r", config, resuming=False)
    run.metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(5)) + '{"step": 5, "lo')
    run.samples.write_text("".join(json.dumps({"step": s, "completion": "x"}) + "\n" for s in (1, 1, 3, 4, 4)))
    run.eval.mkdir()
    for step in (0, 2, 4):
        (run.eval / f"step_{step}.json").write_text("{}")
    truncate_run_logs(run, 3)
    assert [r["step"] for r in read_metrics(run.metrics)] == [0, 1, 2, 3]
    assert [json.loads(line)["step"] for line in run.samples.read_text().splitlines()] == [1, 1, 3]
    assert sorted(p.name for p in run.eval.iterdir()) == ["step_0.json", "step_2.json"]

    with open(run.metrics, "a") as handle:
        handle.write('{"step": 4, "lo')  # a crash mid-line, then a run that appends without resuming
    with MetricsLogger(run, tensorboard=False) as logger:
        logger.log({"loss": 0.5}, step=4)
    assert run.metrics.read_text().splitlines()[-1] == '{"step": 4, "loss": 0.5}'
    assert [r["step"] for r in read_metrics(run.metrics)] == [0, 1, 2, 3, 4]


def test_overwrite_deletes_the_earlier_runs_files_but_not_the_users(tmp_path):
    config = SFTConfig.model_validate({"data": {"train": "x.jsonl"}})
    run = prepare_run_dir(tmp_path, "r", config, resuming=False)
    for path in (run.checkpoints / "step_8", run.final, run.eval, run.tensorboard):
        path.mkdir(parents=True, exist_ok=True)
    for path in (run.samples, run.path / "notes.txt"):
        path.write_text("x")
    with pytest.raises(ConfigError, match="already holds a run"):  # a checkpoint alone is a run
        prepare_run_dir(tmp_path, "r", config, resuming=False)
    prepare_run_dir(tmp_path, "r", config, resuming=False, overwrite=True)
    assert not any(p.exists() for p in (run.checkpoints / "step_8", run.final, run.eval, run.tensorboard, run.samples))
    assert (run.path / "notes.txt").read_text() == "x" and run.checkpoints.is_dir()
