"""What every trainer does to survive faults: one run per directory, a clean start or an
exact resume, a checkpoint on SIGTERM, and no update from a non-finite step.

The trainers (``train.sft``, ``train.rm``, ``train.rl``) call these the same way:

    with RunSession("sft", config) as session:          # lock + signal handlers
        run, resume_path = open_run("sft", config, info, total_steps)  # clean / resume / truncate logs
        ...
        for each step:
            result = optimizer_step(...)                  # never applies a NaN/inf step
            skipped = check_step_finite(...)              # skip (counted) or stop in one line
            session.step_boundary(step, total, due=..., save=...)  # saves and stops on a signal

- **Lock.** ``<run>/.lock`` is held with ``flock(2)`` (``LOCK_EX | LOCK_NB``) for the whole
  run, by rank 0; a second run in the same directory fails at once, naming the holder's
  pid. The kernel drops the lock when the holder exits, ``kill -9`` included (Linux
  ``flock(2)`` man page), so a crashed run never leaves a stale lock.
- **Opening the run directory** (``open_run``). Leftovers of an interrupted write
  (``.tmp-final-*``, ``.trash-*``) are removed; ``train.resume`` picks the newest intact
  checkpoint written under the same config (``train.checkpoint.resolve_resume``); with no
  checkpoint yet, resuming starts over from step 0; ``run.overwrite`` deletes the earlier
  run's checkpoints, final model, metrics and samples first; on resume, ``metrics.jsonl``,
  ``samples.jsonl`` and ``eval/step_*.json`` are cut back to the checkpoint's step.
- **Allowed changes on resume** (``train.resume_allow_changes``). A changed key takes effect as
  in a fresh run with the new config at the checkpoint's step: the learning rate follows the
  new schedule (``optim.lr``, warmup, schedule, ``min_lr_ratio``, the run's length) and AdamW
  takes the new ``weight_decay``/``betas``/``eps`` while keeping its moments
  (``train.loop.configured_hyperparameters_kept``). A change the checkpoint cannot carry (the
  model or adapter it holds, RL's optimizer steps per step, a run shorter than the
  checkpoint) is refused in one line (``check_resume_changes``).
- **Signals.** SIGTERM (what Slurm and Kubernetes send before killing a job) and SIGINT
  (Ctrl-C) set a flag; at the end of the current step the trainer saves a checkpoint and
  raises ``TrainingStopped`` (a ``KeyboardInterrupt``), so the command exits like an
  interrupted one and ``train.resume=latest`` continues exactly. A second signal stops at
  once. ``train.save_on_signal: false`` keeps Python's default behaviour.
- **Non-finite steps.** ``train.loop.optimizer_step`` never applies an update whose loss or
  gradient norm is NaN/inf; ``check_step_finite`` counts such steps and stops the run in
  one line once more than ``train.skip_nonfinite_steps`` were skipped.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

from posttrain.errors import ConfigError
from posttrain.log import say
from posttrain.train import checkpoint as ckpt
from posttrain.train.distributed import DistInfo, all_reduce_max, barrier
from posttrain.train.loop import optimizer_steps_per_rollout_batch
from posttrain.train.logging import RunDir, holds_run, prepare_run_dir, truncate_run_logs

LOCK_FILE = ".lock"
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(KeyboardInterrupt):
    """The run stopped on SIGTERM / Ctrl-C after saving a checkpoint (resume with train.resume=latest).

    ``exit_status`` is 128 + the signal number, the shell's convention (143 for SIGTERM)."""

    def __init__(self, message: str, signal_name: str = "SIGINT"):
        super().__init__(message)
        self.exit_status = 128 + int(signal.Signals[signal_name])


def run_path_of(config: Any) -> Path:
    return Path(config.run.output_dir) / config.run.name


# ----------------------------------------------------------------------------- lock


def lock_run_dir(path: Path) -> int | None:
    """Create ``path`` and hold an exclusive ``flock`` on ``path/.lock``; returns the file
    descriptor (None where ``fcntl`` does not exist). ConfigError naming the holder's pid if
    another process holds it; StorageError if the directory cannot be written."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        return None
    path = Path(path)
    with ckpt.storage_errors("creating the run directory", path):
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise ConfigError(f"run.name: {path} is in use by another run (pid {holder}); wait for it to finish, "
                          f"or choose another run.name") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def unlock_run_dir(fd: int | None) -> None:
    if fd is None:
        return
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- session


class RunSession:
    """The lock on the run directory and the SIGTERM/SIGINT handlers, for one run.

    ``config`` needs ``run.output_dir``, ``run.name`` and ``train.save_on_signal``. Only
    rank 0 (torchrun's ``RANK``) takes the lock; every rank installs the handlers (torchrun
    forwards signals to all workers) and ``stop_signal`` agrees over ranks.
    """

    def __init__(self, trainer: str, config: Any):
        self.trainer = trainer
        self.path = run_path_of(config)
        self.save_on_signal = bool(config.train.save_on_signal)
        self.is_main = int(os.environ.get("RANK", "0")) == 0
        self.signal: str | None = None
        self._fd: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "RunSession":
        if self.is_main:
            self._fd = lock_run_dir(self.path)
        if self.save_on_signal and threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        unlock_run_dir(self._fd)
        self._fd = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # the second one: stop at once
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        if self.is_main:
            say(f"{self.trainer}: {self.signal} received: saving a checkpoint at the end of this step, then "
                  f"stopping (send it again to stop at once)")

    def stop_signal(self, info: DistInfo) -> str | None:
        """The signal that asked this run to stop (any rank's), or None. Collective when distributed."""
        if not self.save_on_signal:
            return None
        if info.distributed:
            index = SIGNALS.index(signal.Signals[self.signal]) + 1 if self.signal else 0
            agreed = int(all_reduce_max([float(index)], info)[0])
            return SIGNALS[agreed - 1].name if agreed else None
        return self.signal

    def step_boundary(self, step: int, total_steps: int, *, due: bool, save: Callable[[], Any],
                      info: DistInfo, checkpoints: Path) -> None:
        """End of optimizer step ``step``: ``save()`` if a checkpoint is due or a signal asked
        the run to stop (not after the last step: the run then finishes normally), then stop."""
        stop = self.stop_signal(info) if step < total_steps else None
        if due or stop:
            save()
        if stop:
            message = (f"{self.trainer}: stopped by {stop} after step {step} of {total_steps}; checkpoint saved in "
                       f"{Path(checkpoints) / f'step_{step}'}; rerun with train.resume=latest to continue")
            if info.is_main:
                say(message)
            raise TrainingStopped(message, stop)


# ----------------------------------------------------------------------------- opening the run directory


def remove_interrupted_writes(run_path: Path) -> list[Path]:
    """Delete what an interrupted export or checkpoint left behind (``.tmp-*`` and
    ``.trash-*`` in the run directory and in ``checkpoints/``); returns what was removed.
    Call only while holding the run directory's lock."""
    import shutil

    removed = []
    for folder in (Path(run_path), Path(run_path) / "checkpoints"):
        for pattern in (".tmp-*", ".trash-*"):
            for stale in folder.glob(pattern):
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)
                removed.append(stale)
    return removed


def open_run(trainer: str, config: Any, info: DistInfo, total_steps: int | None = None) -> tuple[RunDir, Path | None]:
    """Prepare the run directory for this attempt; returns it and the checkpoint to resume.

    Refuses (one line) a ``train.resume_allow_changes`` entry that is not a config key, a
    checkpoint written under another config, an allowed change a resumed run cannot make as a
    fresh run would (``check_resume_changes``), and a directory holding every damaged
    checkpoint. ``total_steps``: the run's length in trainer steps (default
    ``train.max_steps``). Call on every rank inside ``RunSession`` (rank 0 writes)."""
    train = config.train
    run_path = run_path_of(config)
    ckpt.check_allowed_keys(train.resume_allow_changes, ckpt.config_snapshot(config))
    if info.is_main:
        remove_interrupted_writes(run_path)
    warn = say if info.is_main else None
    resume_path = ckpt.resolve_resume(train.resume, run_path / "checkpoints", config=config,
                                      allow_changes=train.resume_allow_changes, info=info, warn=warn)
    if resume_path is not None:
        check_resume_changes(ckpt.saved_config(resume_path) or {}, ckpt.config_snapshot(config),
                             checkpoint_step(resume_path),
                             total_steps if total_steps is not None else getattr(train, "max_steps", None))
    start_over = config.run.overwrite
    if train.resume is not None and resume_path is None:
        start_over = True  # nothing to resume (killed before the first checkpoint): step 0
        if warn is not None and holds_run(run_path):
            say(f"{trainer}: no checkpoint to resume in {run_path / 'checkpoints'} yet: starting from step 0")
    with ckpt.storage_errors("preparing the run directory", run_path):
        run = prepare_run_dir(config.run.output_dir, config.run.name, config, resuming=resume_path is not None,
                              overwrite=start_over, write=info.is_main)
        if resume_path is not None and info.is_main:
            truncate_run_logs(run, checkpoint_step(resume_path))
    barrier()
    return run, resume_path


def checkpoint_step(path: Path) -> int:
    """The trainer step a checkpoint was written at: its ``trainer_state.json``, else its name
    (``step_<N>``)."""
    try:
        return int(json.loads((Path(path) / "trainer_state.json").read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return int(Path(path).name.rsplit("_", 1)[-1])


# ----------------------------------------------------------------------------- allowed changes on resume


def _lora_on(snapshot: Mapping[str, Any]) -> bool:
    return bool(snapshot.get("lora.enabled"))


def _has_critic(snapshot: Mapping[str, Any]) -> bool:
    estimator = snapshot.get("rl.advantage") or ("gae" if snapshot.get("rl.algorithm") == "ppo" else None)
    return estimator == "gae"


def _always(snapshot: Mapping[str, Any]) -> bool:
    return True


# Keys whose change a checkpoint cannot carry: (key, why, whether it matters for a config).
# Every other key allowed by train.resume_allow_changes takes effect as in a fresh run with the
# new config (the learning rate, schedule and AdamW hyperparameters through
# train.loop.configured_hyperparameters_kept; the rest is read from the config every step).
RESUME_FIXED_KEYS: tuple[tuple[str, str, Callable[[Mapping[str, Any]], bool]], ...] = (
    ("model.name", "the checkpoint's weights were trained from the model it names", _always),
    ("lora.enabled", "it decides which weights the checkpoint holds", _always),
    ("lora.r", "the checkpoint's adapters have the rank it sets", _lora_on),
    ("lora.alpha", "the checkpoint's adapters were trained under the scale alpha / r it sets", _lora_on),
    ("lora.target_modules", "the checkpoint holds adapters on the modules it names", _lora_on),
    ("train_top_layers", "it decides which weights the checkpoint holds", _always),
    ("rm.train_top_layers", "it decides which weights the checkpoint holds", _always),
    ("rl.train_top_layers", "it decides which weights the checkpoint holds", _always),
    ("rl.critic.model", "the checkpoint's critic was trained from the model it names", _has_critic),
    ("rl.critic.train_top_layers", "it decides which critic weights the checkpoint holds", _has_critic),
    ("rl.critic.warmup_steps", "the policy's schedule position and AdamW step counts count only the steps after "
                               "the critic's warmup", _has_critic),
)

# What sets the optimizer steps of one RL step (train.loop.optimizer_steps_per_rollout_batch).
RL_STEP_SHAPE_KEYS = ("rl.prompts_per_step", "rollout.group_size", "rl.mini_batch_size", "rl.ppo_epochs")


def rl_optimizer_steps(snapshot: Mapping[str, Any]) -> int | None:
    """Optimizer steps per RL step under a ``config_snapshot`` (None: not an RL config)."""
    if any(key not in snapshot for key in RL_STEP_SHAPE_KEYS):
        return None
    return optimizer_steps_per_rollout_batch(snapshot["rl.prompts_per_step"] * snapshot["rollout.group_size"],
                                             snapshot["rl.mini_batch_size"], snapshot["rl.ppo_epochs"])


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def check_resume_changes(saved: Mapping[str, Any], current: Mapping[str, Any], step: int,
                         total_steps: int | None) -> None:
    """Refuse (ConfigError, one line naming the key and why) an allowed change that a run
    resumed from a checkpoint of trainer step ``step`` cannot make as a fresh run with the new
    config would: a key of ``RESUME_FIXED_KEYS``, a change of RL's optimizer steps per step
    (the schedule and AdamW count optimizer steps), or a run shorter than ``step``.

    >>> check_resume_changes({"lora.enabled": True, "lora.r": 16}, {"lora.enabled": True, "lora.r": 8},
    ...                      2, 4)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    posttrain.errors.ConfigError: train.resume_allow_changes: lora.r cannot change on resume (16 -> 8): the ...
    """
    advice = "resume without this change or set run.overwrite=true to start over"
    for key, why, applies in RESUME_FIXED_KEYS:
        if saved.get(key) != current.get(key) and applies(saved) and applies(current):
            raise ConfigError(f"train.resume_allow_changes: {key} cannot change on resume "
                              f"({_shown(saved.get(key))} -> {_shown(current.get(key))}): {why}; {advice}")
    before, after = rl_optimizer_steps(saved), rl_optimizer_steps(current)
    if before is not None and after is not None and before != after:
        changed = [key for key in RL_STEP_SHAPE_KEYS if saved.get(key) != current.get(key)]
        raise ConfigError(f"train.resume_allow_changes: {ckpt.describe_changes(saved, current, changed)} cannot "
                          f"change on resume: an RL step would take {after} optimizer steps instead of {before}, and "
                          f"the checkpoint's learning-rate schedule and AdamW step counts count optimizer steps; "
                          f"{advice}")
    if total_steps is not None and step > total_steps:
        key = "train.max_steps" if current.get("train.max_steps") is not None else "train.epochs"
        raise ConfigError(f"{key}: the run is {total_steps} steps long but the checkpoint it resumes was written at "
                          f"step {step}; resume with at least {step} steps or set run.overwrite=true to start over")


# ----------------------------------------------------------------------------- non-finite steps


def check_step_finite(trainer: str, step: int, *, nonfinite_steps: int, skipped_before: int, limit: int,
                      checkpoints: Path, detail: str, is_main: bool = True) -> int:
    """Count ``nonfinite_steps`` skipped updates of step ``step``; returns the run's new total.

    Over ``limit`` in all: ``NonFiniteError`` (one line naming the step and the last
    checkpoint, which is finite because non-finite weights are never saved). Within it: a
    one-line warning per step.
    """
    if not nonfinite_steps:
        return skipped_before
    total = skipped_before + nonfinite_steps
    if total > limit:
        where = last_checkpoint_note(checkpoints)
        allowance = f"{limit} skipped steps allowed" if limit else "none may be skipped"
        raise ckpt.NonFiniteError(
            f"{trainer}: step {step}: {detail}, so its update was not applied and the run stopped ({allowance}, "
            f"train.skip_nonfinite_steps); {where}")
    if is_main:
        say(f"{trainer}: warning: step {step}: {detail}; its update was skipped ({total} of at most {limit} "
              f"skipped steps)")
    return total


def last_checkpoint_note(checkpoints: Path) -> str:
    """Where a run stopped for NaN/inf can go on from (checkpoints are finite by construction)."""
    last = ckpt.latest_checkpoint(checkpoints)
    if last is None:
        return "no checkpoint was written yet"
    return (f"the last checkpoint, {last}, is finite: lower optim.lr or fix the data and resume it with "
            f"train.resume=latest")


def guard_step(trainer: str, step: int, result: Any, skipped_before: int, train: Any, checkpoints: Path,
               info: DistInfo) -> int:
    """``check_step_finite`` for one ``train.loop.StepResult`` (SFT, reward model): returns
    the run's count of skipped steps (``train.skip_nonfinite_steps`` is the limit)."""
    if result.finite:
        return skipped_before
    return check_step_finite(trainer, step, nonfinite_steps=1, skipped_before=skipped_before,
                             limit=train.skip_nonfinite_steps, checkpoints=checkpoints,
                             detail=describe_nonfinite(result.loss, result.grad_norm), is_main=info.is_main)


def describe_nonfinite(loss: float, grad_norm: float) -> str:
    """``the loss is nan`` / ``the gradient norm is inf`` / both."""
    import math

    parts = [f"the loss is {loss}" if not math.isfinite(loss) else "",
             f"the gradient norm is {grad_norm}" if not math.isfinite(grad_norm) else ""]
    return " and ".join(p for p in parts if p) or "a loss or gradient norm is not finite"

