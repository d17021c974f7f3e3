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


def test_plain_progress_prints_a_start_line_then_throttles_to_the_interval(capsys):
    """Not a terminal: a line when the phase starts, at most one per interval while it advances,
    and the last; a thousand quick steps are three lines, not a thousand."""
    with Progress(total=1000, description="sft", keys=("loss", "lr"), interval_s=3600) as bar:
        for step in range(1000):
            bar.update(1, {"loss": 2.0 - step / 1000, "lr": 0.1, "ignored": 5})
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err
    assert err[0].startswith("[sft] 0/1000  elapsed 0s")
    assert err[1].startswith("[sft] 1000/1000  done in") and "loss=1.001" in err[1] and "ignored" not in err[1]

    with Progress(total=4, description="rm", interval_s=0.0) as bar:
        for step in range(4):
            bar.update(1, {"loss": 1.0})
    err = capsys.readouterr().err.splitlines()
    assert [line.split()[1] for line in err] == ["0/4", "1/4", "2/4", "3/4", "4/4"]
    assert "eta" in err[2] and "eta" not in err[-1]


def test_a_long_unit_of_work_still_prints_heartbeat_lines(capsys):
    """One step that takes longer than the interval (a long generation) is not silence: the
    engine's heartbeats print the line again, with the elapsed time."""
    import time

    from posttrain.log import heartbeat, sequences_generated

    with Progress(total=2, description="rl", interval_s=0.05) as bar:
        for _ in range(3):
            time.sleep(0.06)
            heartbeat()
        sequences_generated(8)  # a training phase takes the engine's sequences as heartbeats only
        assert bar.done == 0
        bar.update(1)
    err = capsys.readouterr().err.splitlines()
    assert sum(line.startswith("[rl] 0/2  elapsed") for line in err) >= 3, err
    assert err[-1].startswith("[rl] 1/2  done in")  # ended early: the last state is printed


def test_a_generation_phase_counts_sequences_and_nested_phases_restore_the_outer(capsys):
    from posttrain.log import current_phase, sequences_generated

    sequences_generated(3)  # outside every phase: nothing to report to, nothing happens
    with Progress(total=5, description="rl", interval_s=3600) as outer:
        with Progress(total=None, description="rl eval", generation=True, unit="generations",
                      interval_s=3600) as inner:
            assert current_phase() is inner
            sequences_generated(4)
            sequences_generated(2)
        assert current_phase() is outer and inner.done == 6 and outer.done == 0
    assert current_phase() is None
    err = capsys.readouterr().err.splitlines()
    assert any(line.startswith("[rl eval] 6 generations  done in") for line in err), err


def test_disabled_progress_prints_nothing_and_a_failed_phase_no_final_line(capsys):
    with Progress(total=3, description="sft", enabled=False, interval_s=0.0) as bar:
        bar.update(3)
        bar.heartbeat()
    assert capsys.readouterr().err == ""
    with pytest.raises(RuntimeError):
        with Progress(total=3, description="dpo reference log-probs", interval_s=3600) as bar:
            bar.update(1)
            raise RuntimeError("boom")
    assert capsys.readouterr().err.splitlines() == [line for line in ["[dpo reference log-probs] 0/3  elapsed 0s"]]


def test_progress_lines_go_through_the_posttrain_logger(caplog):
    """A program embedding posttrain silences or collects progress like any other message."""
    import logging

    with caplog.at_level(logging.INFO, logger="posttrain.progress"):
        with Progress(total=2, description="eval x: generate", interval_s=3600) as bar:
            bar.update(2)
    assert [r.name for r in caplog.records] == ["posttrain.progress"] * 2


def test_doctests_of_the_log_module():
    import doctest

    import posttrain.log

    assert doctest.testmod(posttrain.log).failed == 0


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


class FakeWandbRun:
    def __init__(self):
        self.logged = []

    def log(self, data, step, commit):
        self.logged.append((data, step, commit))

    def finish(self):
        self.logged.append("finish")


def fake_wandb(monkeypatch):
    """A stand-in ``wandb`` module (the package is optional): records what is logged."""
    import sys
    import types

    module = types.ModuleType("wandb")
    module.run = FakeWandbRun()
    module.init = lambda **kwargs: module.run
    module.Settings = lambda **kwargs: kwargs

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    module.Table = Table
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_samples_table_goes_to_tensorboard_text_and_a_wandb_table(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    wandb = fake_wandb(monkeypatch)
    config = SFTConfig.model_validate({"data": {"train": "x.jsonl"}})
    run = prepare_run_dir(tmp_path, "r", config, resuming=False)
    records = [{"prompt": "What is 1+1?", "completion": "2 | two\nsure", "reward": 1.0, "trajectory": {"turns": 1}},
               {"prompt": "What is 2+2?", "completion": "5", "reward": 0.0}]
    with MetricsLogger(run, wandb=True) as logger:
        logger.log({"eval/acc": 0.5}, step=3)
        logger.log_samples("eval/samples", records, step=3)
        logger.log_samples("eval/samples", [], step=4)  # nothing to show: nothing logged
    (data, step, commit), (table, table_step, _), finished = wandb.run.logged
    assert data == {"eval/acc": 0.5} and step == 3 and commit is False  # a later line at step 3 joins this row
    assert table_step == 3 and table["eval/samples"].columns == ["prompt", "completion", "reward"]
    assert table["eval/samples"].data[1] == ["What is 2+2?", "5", 0.0] and finished == "finish"
    events = EventAccumulator(str(run.tensorboard), size_guidance={"tensors": 0})
    events.Reload()
    (text,) = [tag for tag in events.Tags()["tensors"] if tag.startswith("eval/samples")]
    shown = events.Tensors(text)[0].tensor_proto.string_val[0].decode()
    assert "| prompt | completion | reward |" in shown and "2 \\| two<br>sure" in shown and "turns" not in shown


def test_samples_table_needs_no_wandb_and_skips_a_disabled_logger(tmp_path):
    config = SFTConfig.model_validate({"data": {"train": "x.jsonl"}})
    run = prepare_run_dir(tmp_path, "r", config, resuming=False)
    with MetricsLogger(run, tensorboard=False) as logger:  # neither TensorBoard nor W&B: nothing to write to
        logger.log_samples("eval/samples", [{"prompt": "p", "completion": "c"}], step=1)
    with MetricsLogger(run, enabled=False) as logger:  # another rank
        logger.log_samples("eval/samples", [{"prompt": "p", "completion": "c"}], step=1)
    assert not list(run.tensorboard.glob("*"))
