"""Faults during a training run: non-finite steps, a directory holding another run,
a changed config on resume, two runs at once, a kill before the first checkpoint, damaged
checkpoints, logs after a resume, an interrupted export, SIGTERM, a full or read-only disk.

Each test brings its own bad input on the tiny random model (``conftest.build_tiny_llama``)."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.train import checkpoint as ckpt
from posttrain.train import sft as sft_module
from posttrain.train.checkpoint import NonFiniteError, StorageError
from posttrain.train.distributed import DistInfo
from posttrain.train.logging import read_metrics
from posttrain.train.session import lock_run_dir, unlock_run_dir
from posttrain.train.sft import run_sft

from test_checkpoint import final_weights, sft_config, synthetic_samples

TRAIN, VAL = synthetic_samples(12, 0), synthetic_samples(2, 1)
ONE_PROCESS = DistInfo(0, 1, 0, torch.device("cpu"), None)
REPO = Path(__file__).resolve().parent.parent


def poisoned(value: float, index: int = 9) -> list:
    """TRAIN with one sample whose token weights are ``value``: with ``shuffle=False`` and 4
    samples per step, sample 9 is in step 3, whose loss is then NaN/inf."""
    samples = [SimpleNamespace(**vars(s)) for s in TRAIN]
    samples[index].weights = [value] * len(samples[index].input_ids)
    return samples


def logged_steps(run: Path) -> list[int]:
    return [record["step"] for record in read_metrics(run / "metrics.jsonl")]


def checkpoint_names(run: Path) -> list[str]:
    return [p.name for p in ckpt.list_checkpoints(run / "checkpoints")]


def all_finite(state: dict) -> bool:
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


# ----------------------------------------------------------------------------- non-finite training


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_step_stops_in_one_line_keeping_the_finite_checkpoints(tiny_model_dir, tmp_path, bad):
    config = sft_config(tiny_model_dir, tmp_path, max_steps=4, save_every=1, keep_last=2, shuffle=False,
                        eval_every=None)
    with pytest.raises(NonFiniteError) as info:
        run_sft(config, samples=(poisoned(bad), VAL))
    run = tmp_path / "run"
    message = str(info.value)
    assert "\n" not in message and message.startswith("sft: step 3: ")
    assert f"the last checkpoint, {run / 'checkpoints' / 'step_2'}, is finite" in message
    assert "train.skip_nonfinite_steps" in message
    assert checkpoint_names(run) == ["step_1", "step_2"]  # keep_last kept the finite ones: nothing NaN was written
    for name in checkpoint_names(run):
        assert all_finite(torch.load(run / "checkpoints" / name / "model.pt"))
    assert not (run / "final").exists()
    assert logged_steps(run) == [1, 2]


def test_non_finite_steps_within_the_allowance_are_skipped_and_counted(tiny_model_dir, tmp_path, capsys):
    config = sft_config(tiny_model_dir, tmp_path, max_steps=4, save_every=2, shuffle=False, eval_every=None,
                        skip_nonfinite_steps=1)
    result = run_sft(config, samples=(poisoned(float("nan")), VAL))
    err = capsys.readouterr().err
    assert "sft: warning: step 3: the loss is nan" in err and "its update was skipped (1 of at most 1" in err
    assert result.steps == 4 and all_finite(final_weights(result))
    assert {h["step"]: h["loss"] for h in result.history}[3] == "nan"
    state = json.loads((result.run_dir / "checkpoints" / "step_4" / "trainer_state.json").read_text())
    assert state["nonfinite_skipped"] == 1


def test_non_finite_weights_are_never_written(tmp_path, tiny_model, tokenizer):
    finite = {"w": torch.ones(3)}
    ckpt.write_checkpoint(tmp_path, 1, {"model.pt": finite}, {}, ONE_PROCESS, keep_last=1)
    with pytest.raises(NonFiniteError) as info:
        ckpt.write_checkpoint(tmp_path, 2, {"model.pt": {"w": torch.tensor([1.0, float("inf"), 0.0])}}, {},
                              ONE_PROCESS, keep_last=1)
    assert str(info.value) == (f"step 2: the weights hold NaN/inf (model.pt:w); nothing non-finite is saved "
                               f"(checkpoint step_2 not written); the previous checkpoint, {tmp_path / 'step_1'}, "
                               f"is intact")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_1"]  # keep_last=1 pruned nothing
    with torch.no_grad():
        next(tiny_model.parameters())[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="export to .*final: the weights hold NaN/inf"):
        ckpt.export_hf(tiny_model, tokenizer, tmp_path / "final", ONE_PROCESS, merge_lora=False)
    assert not (tmp_path / "final").exists() and not list(tmp_path.glob(".tmp-final-*"))


# ----------------------------------------------------------------------------- another run's directory


def crash_after_first_save(monkeypatch):
    real_save = ckpt.save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("killed after the first checkpoint")

    monkeypatch.setattr(sft_module.ckpt, "save_checkpoint", save_then_crash)
    return real_save


def test_overwrite_starts_clean_so_the_old_run_is_never_resumed(tiny_model_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run_sft(sft_config(tiny_model_dir, tmp_path, max_steps=8, save_every=2, eval_every=None), samples=(TRAIN, VAL))
    assert checkpoint_names(run) == ["step_6", "step_8"]
    new = sft_config(tiny_model_dir, tmp_path, max_steps=4, save_every=2, eval_every=None)
    new.run.overwrite, new.optim.lr = True, 1e-3
    real_save = crash_after_first_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_sft(new, samples=(TRAIN, VAL))
    monkeypatch.setattr(sft_module.ckpt, "save_checkpoint", real_save)
    assert checkpoint_names(run) == ["step_2"]  # the old run's step_6 / step_8 are gone, not the new step_2
    assert ckpt.saved_config(run / "checkpoints" / "step_2")["optim.lr"] == 1e-3
    assert logged_steps(run) == [1, 2] and not (run / "final").exists()
    resumed = sft_config(tiny_model_dir, tmp_path, max_steps=4, save_every=2, eval_every=None, resume="latest")
    resumed.run.overwrite, resumed.optim.lr = True, 1e-3
    result = run_sft(resumed, samples=(TRAIN, VAL))
    assert result.steps == 4 and [h["step"] for h in result.history] == [3, 4]


def test_resume_under_a_changed_config_is_refused_naming_the_keys(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    settings = dict(max_steps=4, save_every=2, eval_every=None)
    run_sft(sft_config(tiny_model_dir, tmp_path, **settings), samples=(TRAIN, VAL))
    before = (run / "config.yaml").read_text()
    changed = sft_config(tiny_model_dir, tmp_path, **settings, resume="latest")
    changed.optim.lr = 1e-3
    with pytest.raises(ConfigError) as info:  # a finished run rerun with a new setting: nothing silently skipped
        run_sft(changed, samples=(TRAIN, VAL))
    assert str(info.value) == (
        f"train.resume: {run / 'checkpoints' / 'step_4'} was written under another config (optim.lr 0.003 -> 0.001); "
        f"resume with its config, allow the change with train.resume_allow_changes=[optim.lr], or set "
        f"run.overwrite=true to start over")
    assert (run / "config.yaml").read_text() == before  # config.yaml still describes final/

    longer = sft_config(tiny_model_dir, tmp_path, **{**settings, "max_steps": 6}, resume="latest",
                        resume_allow_changes=["train.max_steps"])
    result = run_sft(longer, samples=(TRAIN, VAL))
    assert result.steps == 6 and [h["step"] for h in result.history] == [5, 6]
    assert logged_steps(run) == [1, 2, 3, 4, 5, 6]

    typo = sft_config(tiny_model_dir, tmp_path, **settings, resume="latest", resume_allow_changes=["train.max_step"])
    with pytest.raises(ConfigError, match=r"train.resume_allow_changes: 'train.max_step' is not a config key or "
                                          r"section \(did you mean 'train.max_steps'\?\)"):
        run_sft(typo, samples=(TRAIN, VAL))


# ----------------------------------------------------------------------------- two runs at once


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from posttrain.train.session import lock_run_dir
    lock_run_dir(sys.argv[1])
    print("locked", flush=True)
    time.sleep(120)
""")


def test_a_second_run_fails_at_once_naming_the_holder_and_a_killed_holder_frees_it(tmp_path, capsys):
    from posttrain.cli import main

    run = tmp_path / "runs" / "shared"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        config = tmp_path / "sft.yaml"
        config.write_text(f"data: {{train: {tmp_path / 'rows.jsonl'}}}\n"
                          f"run: {{output_dir: {tmp_path / 'runs'}, name: shared}}\n")
        started = time.monotonic()
        assert main(["sft", str(config)]) == 2
        assert time.monotonic() - started < 10  # refused before any data or model is read
        err = capsys.readouterr().err.strip()
        assert err == (f"error: run.name: {run} is in use by another run (pid {holder.pid}); wait for it to finish, "
                       f"or choose another run.name")
    finally:
        holder.kill()  # kill -9: the kernel drops the flock with the process
        holder.wait()
    unlock_run_dir(lock_run_dir(run))


# ----------------------------------------------------------------------------- killed before the first checkpoint


def test_killed_before_the_first_checkpoint_starts_over_on_resume(tiny_model_dir, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real = sft_module.step_metrics

    def killed_at_step_3(config, plan, result, state):
        if state.step == 3:
            raise KeyboardInterrupt
        return real(config, plan, result, state)

    monkeypatch.setattr(sft_module, "step_metrics", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run_sft(sft_config(tiny_model_dir, tmp_path, max_steps=4, save_every=4, eval_every=None), samples=(TRAIN, VAL))
    monkeypatch.setattr(sft_module, "step_metrics", real)
    assert logged_steps(run) == [1, 2] and checkpoint_names(run) == []
    with pytest.raises(ConfigError, match="already holds a run; set train.resume=latest to continue it"):
        run_sft(sft_config(tiny_model_dir, tmp_path, max_steps=4, save_every=4, eval_every=None), samples=(TRAIN, VAL))
    capsys.readouterr()
    result = run_sft(sft_config(tiny_model_dir, tmp_path, max_steps=4, save_every=4, eval_every=None,
                                resume="latest"), samples=(TRAIN, VAL))
    assert f"sft: no checkpoint to resume in {run / 'checkpoints'} yet: starting from step 0" in capsys.readouterr().err
    assert result.steps == 4 and logged_steps(run) == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- damaged checkpoints


DAMAGE = {
    "truncated": ("model.pt", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "model.pt has"),
    "emptied": ("optimizer.pt", lambda p: p.write_bytes(b""), "optimizer.pt has 0 bytes"),
    "bad-json": ("trainer_state.json", lambda p: p.write_text("{" + p.read_text()[1:-1]), "trainer_state.json"),
    "missing": ("scheduler.pt", lambda p: p.unlink(), "scheduler.pt is missing"),
    "flipped": ("model.pt", lambda p: flip_bytes(p), "model.pt does not match its checksum"),
}


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for offset in (len(data) // 2, len(data) // 2 + 7, len(data) // 3):
        data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def damaged_settings():
    return dict(max_steps=4, save_every=1, keep_last=3, eval_every=None)


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    result = run_sft(sft_config(tiny_model_dir, out, **damaged_settings()), samples=(TRAIN, VAL))
    return out, final_weights(result)


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(finished_run, tmp_path, kind):
    source, _ = finished_run
    shutil.copytree(source / "run", tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    name, damage, phrase = DAMAGE[kind]
    damage(checkpoints / "step_4" / name)
    assert phrase in ckpt.verify_checkpoint(checkpoints / "step_4")
    warnings: list[str] = []
    chosen = ckpt.resolve_resume("latest", checkpoints, warn=warnings.append)
    assert chosen == checkpoints / "step_3"
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: damaged checkpoint skipped (step_4: {phrase}")
    assert warnings[0].endswith(f"resuming from {checkpoints / 'step_3'}, the newest intact one")
    with pytest.raises(ConfigError, match=f"train.resume: .*step_4 is damaged \\({phrase}"):
        ckpt.resolve_resume(str(checkpoints / "step_4"), checkpoints)


def test_resume_from_a_damaged_run_continues_exactly_or_refuses_if_nothing_is_intact(finished_run, tiny_model_dir,
                                                                                     tmp_path, capsys):
    source, straight_final = finished_run
    shutil.copytree(source / "run", tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    flip_bytes(checkpoints / "step_4" / "model.pt")  # loads silently without checksums
    shutil.rmtree(tmp_path / "run" / "final")
    result = run_sft(sft_config(tiny_model_dir, tmp_path, **damaged_settings(), resume="latest"), samples=(TRAIN, VAL))
    assert "warning: damaged checkpoint skipped (step_4: model.pt does not match its checksum)" in capsys.readouterr().err
    assert [h["step"] for h in result.history] == [4]
    resumed = final_weights(result)
    assert all(torch.equal(straight_final[k], resumed[k]) for k in straight_final)

    for step in (2, 3, 4):
        (checkpoints / f"step_{step}" / "rng.pt").write_bytes(b"")
    with pytest.raises(ConfigError) as info:
        run_sft(sft_config(tiny_model_dir, tmp_path, **damaged_settings(), resume="latest"), samples=(TRAIN, VAL))
    message = str(info.value)
    assert message.startswith(f"train.resume=latest: no intact checkpoint in {checkpoints} (step_4: rng.pt has 0 bytes")
    assert "; step_3: rng.pt has 0 bytes" in message and "; step_2: rng.pt has 0 bytes" in message
    assert message.endswith("); set run.overwrite=true to start over") and "\n" not in message


# ----------------------------------------------------------------------------- logs and exports after a crash


def test_resume_logs_each_step_once_and_removes_an_interrupted_export(tiny_model_dir, tmp_path):
    """As after kill -9 while step 4's checkpoint and final/ were being written: step 4 is
    logged, its checkpoint and the export are temporary directories, the log ends torn."""
    run = tmp_path / "run"
    settings = dict(max_steps=4, save_every=2, eval_every=2)
    run_sft(sft_config(tiny_model_dir, tmp_path, **settings), samples=(TRAIN, VAL))
    (run / "checkpoints" / "step_4" / ckpt.COMPLETE_MARKER).unlink()
    (run / "checkpoints" / "step_4").rename(run / "checkpoints" / ".tmp-step_4-x1")
    (run / "final").rename(run / ".tmp-final-y2")
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "lo')
    result = run_sft(sft_config(tiny_model_dir, tmp_path, **settings, resume="latest"), samples=(TRAIN, VAL))
    assert [h["step"] for h in result.history] == [3, 4]
    assert logged_steps(run) == [0, 1, 2, 3, 4]  # step 0: the validation baseline
    assert all(line.startswith('{"step"') for line in (run / "metrics.jsonl").read_text().splitlines())
    assert not list(run.glob(".tmp-*")) and not list((run / "checkpoints").glob(".tmp-*"))
    assert (run / "final" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- SIGTERM


SIGTERM_RUNNER = textwrap.dedent("""
    import sys, time
    import torch
    torch.set_num_threads(1)
    import posttrain.train.sft as sft
    real = sft.optimizer_step
    def slow_step(*args, **kwargs):  # give the test time to signal mid-run
        time.sleep(float(sys.argv[1]))
        return real(*args, **kwargs)
    sft.optimizer_step = slow_step
    from posttrain.cli import main
    sys.exit(main(["sft", *sys.argv[2:]]))
""")


def test_sigterm_saves_at_the_step_boundary_exits_cleanly_and_resumes_exactly(tiny_model_dir, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Count to {n}."},
                          {"role": "assistant", "content": " ".join(str(i) for i in range(1, n + 1))}]}
            for n in range(2, 14)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = tmp_path / "sft.yaml"
    config.write_text(textwrap.dedent(f"""
        model: {{name: {tiny_model_dir}}}
        data: {{train: {data}, max_length: 128}}
        optim: {{lr: 0.003, warmup_steps: 1}}
        train: {{global_batch_size: 2, micro_batch_tokens: 256, max_steps: 8, seed: 3}}
        run: {{output_dir: {tmp_path}, progress: false, tensorboard: false}}
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start(name: str, delay: float, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", SIGTERM_RUNNER, str(delay), str(config), f"run.name={name}",
                                 *extra], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)

    straight = start("straight", 0.0)
    child = start("stopped", 0.5)
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert child.poll() is None and time.monotonic() < deadline, "the run ended before it could be signalled"
        time.sleep(0.1)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=240)
    assert child.returncode == 128 + signal.SIGTERM, err  # 143, the shell convention
    stopped_at = checkpoint_names(tmp_path / "stopped")
    assert len(stopped_at) == 1, err
    step = int(stopped_at[0].split("_")[1])
    assert 2 <= step < 8
    assert "sft: SIGTERM received: saving a checkpoint at the end of this step, then stopping" in err
    assert (f"sft: stopped by SIGTERM after step {step} of 8; checkpoint saved in "
            f"{tmp_path / 'stopped' / 'checkpoints' / f'step_{step}'}; rerun with train.resume=latest to continue") in err
    assert "Traceback" not in err and not (tmp_path / "stopped" / "final").exists()

    resumed = start("stopped", 0.0, "train.resume=latest")
    _, resumed_err = resumed.communicate(timeout=240)
    _, straight_err = straight.communicate(timeout=240)
    assert resumed.returncode == 0 and straight.returncode == 0, resumed_err + straight_err
    assert logged_steps(tmp_path / "stopped") == list(range(1, 9))
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- disk full / read-only


class FullDisk(io.RawIOBase):
    """A file that takes ``room`` bytes, then fails like a full disk."""

    def __init__(self, inner, room: int):
        self.inner, self.room = inner, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.inner.write(data)

    def flush(self) -> None:
        self.inner.flush()


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous(tiny_model_dir, tmp_path, monkeypatch):
    checkpoints = tmp_path / "run" / "checkpoints"
    real_save = torch.save

    def save(obj, target, *args, **kwargs):
        if (checkpoints / "step_2").is_dir() and not isinstance(target, (str, Path)):
            target = FullDisk(target, room=4096)  # torch raises its own error, the ENOSPC is its context
        return real_save(obj, target, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(StorageError) as info:
        run_sft(sft_config(tiny_model_dir, tmp_path, max_steps=4, save_every=2, eval_every=None), samples=(TRAIN, VAL))
    assert str(info.value) == (f"writing checkpoint step_4 in {checkpoints} failed: No space left on device (ENOSPC); "
                               f"the previous checkpoint, {checkpoints / 'step_2'}, is intact")
    assert checkpoint_names(tmp_path / "run") == ["step_2"] and not list(checkpoints.glob(".tmp-*"))
    assert ckpt.verify_checkpoint(checkpoints / "step_2") is None


def test_a_read_only_output_directory_is_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from posttrain.cli import main
    from posttrain.train import session

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(session.os, "open", read_only)
    config = tmp_path / "sft.yaml"
    config.write_text(f"data: {{train: rows.jsonl}}\nrun: {{output_dir: {tmp_path / 'ro'}, name: r}}\n")
    assert main(["sft", str(config)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: creating the run directory in {tmp_path / 'ro' / 'r'} failed: Read-only file system (EROFS)")


def test_a_full_disk_while_final_is_written_is_one_line_and_keeps_the_checkpoints(tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    """safetensors (the writer of final/) raises its own error type, not an OSError: the disk-full
    errno in its message is read, as for a checkpoint; no half-written final/ is left."""
    import transformers.modeling_utils as modeling_utils
    from safetensors import SafetensorError

    real_save_file = modeling_utils.safe_save_file

    def full_disk(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\0" * 4096)  # what fitted before the disk filled up
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(modeling_utils, "safe_save_file", full_disk)
    run = tmp_path / "run"
    with pytest.raises(StorageError) as info:
        run_sft(sft_config(tiny_model_dir, tmp_path, max_steps=2, save_every=2, eval_every=None), samples=(TRAIN, VAL))
    assert str(info.value) == (f"writing the final model in {run} failed: No space left on device (ENOSPC); "
                               f"the checkpoints are intact")
    assert not (run / "final").exists() and not list(run.glob(".tmp-final-*"))
    assert checkpoint_names(run) == ["step_2"] and ckpt.verify_checkpoint(run / "checkpoints" / "step_2") is None
    monkeypatch.setattr(modeling_utils, "safe_save_file", real_save_file)


FILE_SIZE_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from posttrain.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_posttrain_sft_with_no_room_for_final_fails_in_one_line_from_the_real_writer(tiny_model_dir, tmp_path):
    """A real OS failure inside safetensors' own (Rust) writer: files may grow to 1 MB, the final
    model needs more. The command prints one ``error:`` line, no traceback."""
    from safetensors.torch import load_file

    size = sum(t.numel() * t.element_size() for t in load_file(str(Path(tiny_model_dir) / "model.safetensors")).values())
    assert size > 1 << 20
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{n} + 1?"},
                                                     {"role": "assistant", "content": f"{n + 1}"}]}) + "\n"
                            for n in range(8)))
    config = tmp_path / "sft.yaml"
    config.write_text(f"model: {{name: {tiny_model_dir}}}\ndata: {{train: {rows}, max_length: 64}}\n"
                      f"train: {{max_steps: 1, global_batch_size: 4}}\n"
                      f"run: {{output_dir: {tmp_path / 'runs'}, name: r, progress: false, tensorboard: false}}\n")
    result = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMITED, str(1 << 20), "sft", str(config)],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: writing the final model in {tmp_path / 'runs' / 'r'} failed: File too large (EFBIG); "
        f"the checkpoints are intact"), result.stderr
    assert not (tmp_path / "runs" / "r" / "final").exists()
