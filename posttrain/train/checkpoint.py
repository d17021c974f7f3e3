"""Atomic checkpoints, keep-last-K, exact resume, and the HF-format export.

A resumed run must continue the SAME run (docs/ARCHITECTURE.md, "Exact resume"). A checkpoint
``checkpoints/step_<N>/`` holds the trainable weights, the optimizer and scheduler state,
every rank's RNG state and the trainer state (step, token counters; the data position is a
pure function of the step, see ``data.batching.StepPlanner``), so N steps straight and
N/2 + resume + N/2 give bit-identical weights on CPU.

Atomic: files are written into a hidden temporary directory, fsync'ed, a ``COMPLETE`` marker
is written last, the directory is renamed to its final name and the parent is fsync'ed. A
crash mid-write leaves only a ``.tmp-*`` directory, which ``latest_checkpoint`` ignores and
the next save removes. With FSDP2 the full (unsharded) state is gathered to rank 0, which
alone writes; loading broadcasts it from rank 0.

Trustworthy: a checkpoint also holds ``checksums.json`` (SHA-256 and size of every file,
written before the marker) and ``config.json`` (the run's resolved config as flat dotted
keys). ``resolve_resume`` verifies the checksums, falls back from a damaged newest
checkpoint to the newest intact one with a one-line warning (refusing if none is intact),
and refuses a checkpoint written under another config in one line naming the changed keys,
unless ``train.resume_allow_changes`` lists them. Non-finite weights are never written
(``NonFiniteError``), and a failed write (disk full, read-only directory) is one line that
says what failed, where, and that the previous checkpoint is intact (``StorageError``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch

from posttrain.errors import ConfigError, UserError
from posttrain.train.distributed import DistInfo, all_gather_objects, all_reduce_max, barrier, broadcast_object
from posttrain.train.loop import configured_hyperparameters_kept

COMPLETE_MARKER = "COMPLETE"
CHECKSUMS = "checksums.json"
CONFIG_SNAPSHOT = "config.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")

# Keys that do not change the trained weights (where the run lives, display, checkpoint and
# export bookkeeping, fault policy, RL alarms): never a resume conflict. Everything else must match.
RESUME_IGNORED_KEYS = (
    "run.name", "run.output_dir", "run.progress", "run.tensorboard", "run.overwrite", "train.resume",
    "train.resume_allow_changes", "train.save_on_signal", "train.skip_nonfinite_steps", "train.save_every",
    "train.keep_last", "train.export", "train.log_every", "train.samples_every", "train.samples_per_log",
    "alarms",
)


class NonFiniteError(UserError):
    """Training produced NaN/inf (loss, gradient norm or weights); nothing non-finite was saved."""


class StorageError(UserError):
    """Writing the run's files failed (disk full, read-only or missing directory, no permission)."""


# ----------------------------------------------------------------------------- config fingerprint


def config_snapshot(config: Any) -> dict[str, Any]:
    """A config (pydantic model or nested mapping) as flat ``section.key`` -> JSON value.

    >>> config_snapshot({"optim": {"lr": 0.1, "betas": [0.9, 0.95]}, "reward": "math"})
    {'optim.lr': 0.1, 'optim.betas': [0.9, 0.95], 'reward': 'math'}
    """
    tree = config.model_dump(mode="json") if hasattr(config, "model_dump") else config
    flat: dict[str, Any] = {}

    def visit(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping) and node:
            for key, value in node.items():
                visit(value, f"{prefix}.{key}" if prefix else str(key))
        else:
            flat[prefix] = node

    visit(tree, "")
    return flat


def _allowed(key: str, allowed: Iterable[str]) -> bool:
    return any(key == a or key.startswith(a + ".") for a in (*RESUME_IGNORED_KEYS, *allowed))


def changed_config_keys(saved: Mapping[str, Any], current: Mapping[str, Any],
                        allowed: Sequence[str] = ()) -> list[str]:
    """Keys whose value differs between two ``config_snapshot``s (added or removed count),
    minus ``RESUME_IGNORED_KEYS`` and the keys (or sections) in ``allowed``.

    >>> changed_config_keys({"optim.lr": 1e-3, "train.max_steps": 8, "run.progress": True},
    ...                     {"optim.lr": 2e-3, "train.max_steps": 16, "run.progress": False}, ["train.max_steps"])
    ['optim.lr']
    >>> changed_config_keys({"optim.lr": 1e-3}, {"optim.lr": 2e-3}, ["optim"])
    []
    """
    keys = sorted(set(saved) | set(current))
    return [k for k in keys if saved.get(k, "<unset>") != current.get(k, "<unset>") and not _allowed(k, allowed)]


def check_allowed_keys(allowed: Sequence[str], snapshot: Mapping[str, Any], key: str = "train.resume_allow_changes") -> None:
    """ConfigError naming ``key`` if an entry of ``allowed`` is neither a config key nor a section."""
    import difflib

    sections = {k.rsplit(".", i)[0] for k in snapshot for i in range(k.count(".") + 1)}
    for entry in allowed:
        if entry not in sections:
            hint = difflib.get_close_matches(entry, sorted(sections), n=1, cutoff=0.6)
            raise ConfigError(f"{key}: '{entry}' is not a config key or section"
                              + (f" (did you mean '{hint[0]}'?)" if hint else ""))


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[:limit - 3] + "..."


def describe_changes(saved: Mapping[str, Any], current: Mapping[str, Any], keys: Sequence[str]) -> str:
    """``optim.lr 0.001 -> 0.002, ...`` for the first few changed keys."""
    shown = [f"{k} {_short(saved.get(k, '<unset>'))} -> {_short(current.get(k, '<unset>'))}" for k in keys[:6]]
    return ", ".join(shown) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")


def saved_config(path: Path) -> dict[str, Any] | None:
    """The ``config_snapshot`` stored in checkpoint ``path`` (None if it has none)."""
    try:
        return json.loads((Path(path) / CONFIG_SNAPSHOT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def check_resume_config(path: Path, snapshot: Mapping[str, Any], allowed: Sequence[str] = ()) -> None:
    """Refuse (ConfigError, one line naming the changed keys) to resume checkpoint ``path``
    under a config that differs in keys not ``allowed``."""
    saved = saved_config(path)
    if saved is None:
        raise ConfigError(f"train.resume: {path} records no config ({CONFIG_SNAPSHOT} is missing), so it cannot be "
                          f"matched to this run; set run.overwrite=true to start over")
    changed = changed_config_keys(saved, snapshot, allowed)
    if changed:
        raise ConfigError(
            f"train.resume: {path} was written under another config ({describe_changes(saved, snapshot, changed)}); "
            f"resume with its config, allow the change with train.resume_allow_changes=[{','.join(changed)}], "
            f"or set run.overwrite=true to start over")


# ----------------------------------------------------------------------------- checksums


def file_digest(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(directory: Path, known: Mapping[str, str] | None = None) -> None:
    """``checksums.json``: SHA-256 and size of every file of ``directory`` (relative paths).

    ``known``: relative path -> SHA-256 of files hashed as they were written
    (``_write_file``), so they are not read back; every other file is read and hashed."""
    directory = Path(directory)
    known = known or {}

    def digest(file: Path) -> str:
        return known.get(str(file.relative_to(directory))) or file_digest(file)

    sums = {str(f.relative_to(directory)): {"sha256": digest(f), "bytes": f.stat().st_size}
            for f in sorted(directory.rglob("*")) if f.is_file() and f.name not in (CHECKSUMS, COMPLETE_MARKER)}
    _write_file(directory / CHECKSUMS, lambda h: h.write(json.dumps(sums, indent=1)), mode="w")


def verify_checkpoint(path: Path) -> str | None:
    """What is wrong with checkpoint ``path`` (a short phrase), or None if every file matches
    its checksum. Catches truncated, emptied, edited, missing and bit-flipped files."""
    path = Path(path)
    if not (path / COMPLETE_MARKER).is_file():
        return f"no {COMPLETE_MARKER} marker"
    try:
        sums = json.loads((path / CHECKSUMS).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{CHECKSUMS} is missing"
    except (OSError, ValueError):
        return f"{CHECKSUMS} is unreadable"
    if not isinstance(sums, dict) or not sums:
        return f"{CHECKSUMS} is unreadable"
    for name, expected in sums.items():
        file = path / name
        try:
            size = file.stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != expected.get("bytes"):
            return f"{name} has {size} bytes, {expected.get('bytes')} were written"
        try:
            if file_digest(file) != expected.get("sha256"):
                return f"{name} does not match its checksum"
        except OSError as exc:
            return f"{name} cannot be read ({exc.strerror or exc})"
    return None


# ----------------------------------------------------------------------------- storage errors


_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust's std::io::Error prints an errno


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: torch wraps a failed write in a RuntimeError; safetensors
    (``save_pretrained``'s writer, in Rust) raises ``SafetensorError`` whose message carries the
    errno (``I/O error: No space left on device (os error 28)``), rebuilt here as an OSError."""
    from safetensors import SafetensorError

    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError):
            return exc
        found = _RUST_OS_ERROR.search(str(exc)) if isinstance(exc, SafetensorError) else None
        if found is not None:
            code = int(found.group(1))
            return OSError(code, os.strerror(code))
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


@contextlib.contextmanager
def storage_errors(what: str, where: Path | str, intact: str = "") -> Iterator[None]:
    """Turn a failed write (disk full, read-only or vanished directory, permissions) into one
    ``StorageError`` line: ``{what} in {where} failed: {reason}{intact}``, whichever library
    wrote (Python's ``open``, ``torch.save``, safetensors)."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as exc:
        cause = _os_error(exc)
        if cause is None:
            raise
        reason = cause.strerror or str(cause)
        code = errno.errorcode.get(cause.errno or 0)
        raise StorageError(f"{what} in {where} failed: {reason}" + (f" ({code})" if code else "") + intact) from None


def nonfinite_tensors(named: Iterable[tuple[str, Any]]) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf (DTensors: their local shard)."""
    bad = []
    for name, tensor in named:
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            continue
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if not bool(torch.isfinite(local.detach()).all()):
            bad.append(name)
    return bad


def check_finite_weights(named: Iterable[tuple[str, Any]], info: DistInfo, what: str) -> None:
    """NonFiniteError (on every rank) if any rank holds a non-finite tensor in ``named``."""
    bad = nonfinite_tensors(named)
    if all_reduce_max([1.0 if bad else 0.0], info)[0] > 0:
        where = f" ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''})" if bad else ""
        raise NonFiniteError(f"{what}: the weights hold NaN/inf{where}; nothing non-finite is saved")


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """This process's random states: Python, torch CPU, CUDA (if any), numpy (if any)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


# ----------------------------------------------------------------------------- state dicts


def _options(info: DistInfo, *, loading: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    if not info.distributed:
        return StateDictOptions(full_state_dict=True, ignore_frozen_params=True)
    if loading:
        return StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, ignore_frozen_params=True)
    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def gather_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                          info: DistInfo) -> tuple[dict[str, Any], dict[str, Any]]:
    """Full (unsharded) trainable-weight and optimizer state dicts, valid on rank 0.

    Frozen parameters (the base model under LoRA) are left out: they are rebuilt from the
    model spec on resume. Collective under FSDP: call on every rank.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer, options=_options(info, loading=False))


def full_model_state(model: torch.nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """All weights (frozen ones too), unsharded on rank 0 (collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=info.distributed)
    return get_model_state_dict(model, options=options)


# ----------------------------------------------------------------------------- save


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _DigestingFile:
    """A binary file that hashes (SHA-256) what is written through it; text is written as UTF-8."""

    def __init__(self, handle: Any):
        self.handle, self.digest = handle, hashlib.sha256()

    def write(self, data: Any) -> int:
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.handle.write(data)
        self.digest.update(data)
        return len(memoryview(data).cast("B"))

    def flush(self) -> None:
        self.handle.flush()


def _write_file(path: Path, write: Callable[[Any], None], mode: str = "wb") -> str:
    """Write ``path`` through ``write(handle)`` (``mode`` "w": text, UTF-8), flushed and
    fsynced; returns the SHA-256 of the bytes written, computed as they went out."""
    if mode not in ("w", "wb"):
        raise ValueError(f"unsupported mode {mode!r}")
    with open(path, "wb") as handle:
        digesting = _DigestingFile(handle)
        write(digesting)
        handle.flush()
        os.fsync(handle.fileno())
    return digesting.digest.hexdigest()


def atomic_directory_write(final_dir: Path, fill: Callable[[Path], None]) -> Path:
    """Create ``final_dir`` atomically: ``fill(tmp)`` writes the files, then a marker, fsync,
    rename. An existing ``final_dir`` is replaced."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final_dir.name}-", dir=final_dir.parent))
    try:
        fill(tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        _write_file(tmp / COMPLETE_MARKER, lambda h: h.write(b"ok\n"))
        _fsync_dir(tmp)
        if final_dir.exists():
            trash = final_dir.parent / f".trash-{final_dir.name}"
            shutil.rmtree(trash, ignore_errors=True)
            os.rename(final_dir, trash)
            os.rename(tmp, final_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final_dir)
        _fsync_dir(final_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final_dir


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    info: DistInfo,
    *,
    keep_last: int,
    config: Any = None,
    extra: Mapping[str, Any] | None = None,
) -> Path | None:
    """Write ``checkpoints_dir/step_<step>`` atomically (rank 0) and keep the last K.

    ``config``: the run's config, stored as ``config.json`` so a resume under another config
    is refused. ``extra``: more ``{file name: object}`` to save (gathered by the caller, e.g.
    the PPO critic). Collective under FSDP (all ranks gather state and RNG); returns the
    path on rank 0.
    """
    model_state, optim_state = gather_training_state(model, optimizer, info)
    rng_states = all_gather_objects(rng_state(), info)
    files = {"model.pt": model_state, "optimizer.pt": optim_state, "scheduler.pt": scheduler.state_dict(),
             "rng.pt": rng_states, **(extra or {})}
    return write_checkpoint(checkpoints_dir, step, files, trainer_state, info, keep_last=keep_last, config=config)


def write_checkpoint(checkpoints_dir: Path, step: int, files: Mapping[str, Any], trainer_state: dict[str, Any],
                     info: DistInfo, *, keep_last: int, config: Any = None) -> Path | None:
    """Rank 0 writes ``files`` (``torch.save``), ``trainer_state.json``, ``config.json`` and
    ``checksums.json`` into ``checkpoints_dir/step_<step>`` atomically, then prunes to the
    last ``keep_last``. Refuses (``NonFiniteError``, before writing anything) if a tensor of a
    ``*model.pt`` file is NaN/inf, so every checkpoint kept is finite; a failed write is a
    ``StorageError`` and leaves the earlier checkpoints as they were. Collective."""
    checkpoints_dir = Path(checkpoints_dir)
    previous = previous_checkpoint_note(checkpoints_dir)
    weights = [(f"{name}:{key}", value) for name, state in files.items() if name.endswith("model.pt")
               and isinstance(state, Mapping) for key, value in state.items()] if info.is_main else []
    try:
        check_finite_weights(weights, info, f"step {step}")
    except NonFiniteError as exc:
        raise NonFiniteError(f"{exc} (checkpoint step_{step} not written){previous}") from None

    def write() -> Path:
        def fill(tmp: Path) -> None:  # each file hashed as it is written, not read back for checksums.json
            known = {name: _write_file(tmp / name, lambda h, value=value: torch.save(value, h))
                     for name, value in files.items()}
            state = {**trainer_state, "step": step, "world_size": info.world_size}
            known["trainer_state.json"] = _write_file(tmp / "trainer_state.json",
                                                      lambda h: h.write(json.dumps(state, indent=2)), mode="w")
            if config is not None:
                snapshot = json.dumps(config_snapshot(config), indent=1)
                known[CONFIG_SNAPSHOT] = _write_file(tmp / CONFIG_SNAPSHOT, lambda h: h.write(snapshot), mode="w")
            write_checksums(tmp, known)

        with storage_errors(f"writing checkpoint step_{step}", checkpoints_dir, previous):
            path = atomic_directory_write(checkpoints_dir / f"step_{step}", fill)
            prune_checkpoints(checkpoints_dir, keep_last)
        return path

    return on_main(write, info)


def on_main(work: Callable[[], Any], info: DistInfo) -> Any:
    """``work()`` on rank 0 (None elsewhere); a ``UserError`` it raises is raised on every
    rank (so no rank waits at a barrier for a rank that stopped). Collective."""
    result, error = None, None
    if info.is_main:
        try:
            result = work()
        except UserError as exc:
            error = (type(exc), str(exc))
    if info.distributed:
        error = broadcast_object(error, info)
    barrier()
    if error is not None:
        raise error[0](error[1])
    return result


def previous_checkpoint_note(checkpoints_dir: Path) -> str:
    """``; the previous checkpoint, step_N, is intact`` (or that none was written yet)."""
    latest = latest_checkpoint(checkpoints_dir)
    if latest is None:
        return "; no checkpoint was written before"
    return f"; the previous checkpoint, {latest}, is intact"


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints (marker present), oldest first."""
    directory = Path(checkpoints_dir)
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def prune_checkpoints(checkpoints_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints and any stale temp dirs.

    Only finite checkpoints are ever written (``write_checkpoint``), so pruning never
    leaves a run with non-finite checkpoints only."""
    for pattern in (".tmp-*", ".trash-*"):
        for stale in Path(checkpoints_dir).glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
    for old in list_checkpoints(checkpoints_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    found = list_checkpoints(checkpoints_dir)
    return found[-1] if found else None


def resolve_resume(resume: str | None, checkpoints_dir: Path, *, config: Any = None,
                   allow_changes: Sequence[str] = (), info: DistInfo | None = None,
                   warn: Callable[[str], None] | None = None) -> Path | None:
    """The checkpoint to resume, verified against its checksums.

    ``None`` -> None; ``latest`` -> the newest intact checkpoint (None if there is none at
    all; a damaged newer one is skipped with a one-line ``warn``; ConfigError if every one
    is damaged); a path -> that checkpoint, which must be complete and intact. With
    ``config``, a checkpoint written under a config that differs in keys other than
    ``allow_changes`` is refused (ConfigError naming the keys). Rank 0 reads and hashes;
    the verdict is broadcast (collective when ``info`` is distributed).
    """
    if resume is None:
        return None
    distributed = info is not None and info.distributed
    verdict: tuple[str, Any] = ("ok", None)
    if info is None or info.is_main:
        try:
            path, damaged = _choose_checkpoint(resume, Path(checkpoints_dir))
            if path is not None and config is not None:
                check_resume_config(path, config_snapshot(config), allow_changes)
            verdict = ("ok", (str(path) if path is not None else None, damaged))
        except ConfigError as exc:
            verdict = ("error", str(exc))
    if distributed:
        verdict = broadcast_object(verdict, info)
    if verdict[0] == "error":
        raise ConfigError(verdict[1])
    chosen, damaged = verdict[1]
    if damaged and chosen is not None and warn is not None and (info is None or info.is_main):
        warn(f"warning: damaged checkpoint skipped ({'; '.join(damaged)}); resuming from {chosen}, the newest intact one")
    return Path(chosen) if chosen is not None else None


def _choose_checkpoint(resume: str, checkpoints_dir: Path) -> tuple[Path | None, list[str]]:
    if resume != "latest":
        path = Path(resume)
        if not (path / COMPLETE_MARKER).is_file():
            raise ConfigError(f"train.resume: {resume} is not a complete checkpoint directory (no {COMPLETE_MARKER} marker)")
        problem = verify_checkpoint(path)
        if problem:
            raise ConfigError(f"train.resume: {resume} is damaged ({problem}); resume from another checkpoint "
                              f"or set run.overwrite=true to start over")
        return path, []
    damaged: list[str] = []
    for path in reversed(list_checkpoints(checkpoints_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path, damaged
        damaged.append(f"{path.name}: {problem}")
    if damaged:
        raise ConfigError(f"train.resume=latest: no intact checkpoint in {checkpoints_dir} ({'; '.join(damaged)}); "
                          f"set run.overwrite=true to start over")
    return None, []


# ----------------------------------------------------------------------------- load


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, info: DistInfo) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG from ``path``; returns the trainer state.

    Call on every rank after sharding and building the optimizer and scheduler from this run's
    config: AdamW's moments and the schedule's position come from the checkpoint, the
    hyperparameters and the schedule's shape from the config
    (``train.loop.configured_hyperparameters_kept``). The RNG of rank r is restored from rank
    r's saved state (same world size required).
    """
    path = Path(path)
    state = json.loads((path / "trainer_state.json").read_text())
    if state.get("world_size", 1) != info.world_size:
        raise ConfigError(
            f"train.resume: {path} was saved with {state.get('world_size')} processes, this run has "
            f"{info.world_size}; resume with the same number of processes"
        )
    read_here = info.is_main or not info.distributed
    model_state = torch.load(path / "model.pt", map_location="cpu", weights_only=False) if read_here else {}
    optim_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False) if read_here else {}
    with configured_hyperparameters_kept(optimizer, scheduler):
        load_full_state(model, optimizer, model_state, optim_state, info)
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng_states = torch.load(path / "rng.pt", weights_only=False)
    set_rng_state(rng_states[info.rank])
    return state


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
                    optim_state: dict[str, Any], info: DistInfo) -> None:
    """Load full (unsharded) weight and optimizer state dicts, read on rank 0 only under FSDP
    (other ranks pass ``{}`` and receive a broadcast). Model and optimizer are loaded by two
    calls: torch's combined ``set_state_dict`` treats an empty model dict as "optimizer only",
    so ranks other than 0 would skip the model's broadcasts and the ranks would hang."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    options = _options(info, loading=True)
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)
    set_model_state_dict(model, model_state, options=options)


# ----------------------------------------------------------------------------- export


def export_hf(
    model: torch.nn.Module,
    tokenizer: Any,
    out_dir: Path,
    info: DistInfo,
    *,
    merge_lora: bool,
    rebuild: Callable[[], torch.nn.Module] | None = None,
) -> Path | None:
    """Write ``out_dir`` in Hugging Face format (save_pretrained + tokenizer), atomically.

    Under FSDP the full state is gathered to rank 0, loaded into an unsharded copy built by
    ``rebuild()`` (same architecture, LoRA applied if used) and saved from there. LoRA
    adapters are merged into the base weights if ``merge_lora`` (plain transformers loads
    the result), else the adapter is saved (peft format). Non-finite weights are refused
    (``NonFiniteError``) and a failed write is one ``StorageError`` line. Collective;
    returns the path on rank 0.
    """
    check_finite_weights(list(model.named_parameters()), info, f"export to {out_dir}")
    state = full_model_state(model, info) if info.distributed else None
    return on_main(lambda: _export_on_main(model, tokenizer, Path(out_dir), info, state, merge_lora, rebuild), info)


def _export_on_main(model: torch.nn.Module, tokenizer: Any, out_dir: Path, info: DistInfo, state: Any,
                    merge_lora: bool, rebuild: Callable[[], torch.nn.Module] | None) -> Path:
    target = model
    if info.distributed:
        if rebuild is None:
            raise ValueError("export_hf under FSDP needs rebuild()")
        target = rebuild()
        target.load_state_dict(state)
    is_peft = hasattr(target, "merge_and_unload")
    started_from = getattr(target.get_base_model() if is_peft else target, "posttrain_merged_adapter", None)
    if is_peft and not merge_lora and started_from:  # the new adapter is relative to base + that adapter
        logging.getLogger(__name__).warning(
            "lora.merge_on_export=false, but training started from the adapter %s (merged into its base at load): "
            "exporting the merged model, since an adapter alone would lose it", started_from)
    if is_peft and (merge_lora or started_from):
        target = target.merge_and_unload()
    base = target.get_base_model() if hasattr(target, "get_base_model") else target
    config = base.config
    saved_attn = getattr(config, "_attn_implementation", None)
    if saved_attn not in (None, "eager", "sdpa"):
        config._attn_implementation = "sdpa"  # our training-only backend means nothing elsewhere
    saved_cache = getattr(config, "use_cache", None)
    config.use_cache = True

    def fill(tmp: Path) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Writing model shards" bar in the trainer's output
        try:
            target.save_pretrained(tmp, safe_serialization=True)
        finally:
            hf_logging.enable_progress_bar()
        tokenizer.save_pretrained(tmp)

    try:
        with storage_errors("writing the final model", out_dir.parent, "; the checkpoints are intact"):
            path = atomic_directory_write(out_dir, fill)
    finally:
        config._attn_implementation = saved_attn
        config.use_cache = saved_cache
    return path
