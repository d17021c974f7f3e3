"""Atomic checkpoints, keep-last-K, exact resume, and the HF-format export.

Seed 004 ("checkpoint and resume"): a resumed run must continue the SAME run. A checkpoint
``checkpoints/step_<N>/`` holds the trainable weights, the optimizer and scheduler state,
every rank's RNG state and the trainer state (step, token counters; the data position is a
pure function of the step, see ``data.batching.StepPlanner``), so N steps straight and
N/2 + resume + N/2 give bit-identical weights on CPU.

Atomic: files are written into a hidden temporary directory, fsync'ed, a ``COMPLETE`` marker
is written last, the directory is renamed to its final name and the parent is fsync'ed. A
crash mid-write leaves only a ``.tmp-*`` directory, which ``latest_checkpoint`` ignores and
the next save removes. With FSDP2 the full (unsharded) state is gathered to rank 0, which
alone writes; loading broadcasts it from rank 0.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from posttrain.errors import ConfigError
from posttrain.train.distributed import DistInfo, all_gather_objects, barrier

COMPLETE_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


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


def _write_file(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    with open(path, mode) as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


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
) -> Path | None:
    """Write ``checkpoints_dir/step_<step>`` atomically (rank 0) and keep the last K.

    Collective under FSDP (all ranks gather state and RNG); returns the path on rank 0.
    """
    model_state, optim_state = gather_training_state(model, optimizer, info)
    rng_states = all_gather_objects(rng_state(), info)
    path = None
    if info.is_main:
        def fill(tmp: Path) -> None:
            _write_file(tmp / "model.pt", lambda h: torch.save(model_state, h))
            _write_file(tmp / "optimizer.pt", lambda h: torch.save(optim_state, h))
            _write_file(tmp / "scheduler.pt", lambda h: torch.save(scheduler.state_dict(), h))
            _write_file(tmp / "rng.pt", lambda h: torch.save(rng_states, h))
            state = {**trainer_state, "step": step, "world_size": info.world_size}
            _write_file(tmp / "trainer_state.json", lambda h: h.write(json.dumps(state, indent=2)), mode="w")

        path = atomic_directory_write(Path(checkpoints_dir) / f"step_{step}", fill)
        prune_checkpoints(checkpoints_dir, keep_last)
    barrier()
    return path


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
    """Delete all but the newest ``keep_last`` complete checkpoints and any stale temp dirs."""
    for stale in Path(checkpoints_dir).glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in list_checkpoints(checkpoints_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    found = list_checkpoints(checkpoints_dir)
    return found[-1] if found else None


def resolve_resume(resume: str | None, checkpoints_dir: Path) -> Path | None:
    """``None`` -> None; ``latest`` -> newest complete checkpoint (None if there is none);
    a path -> that checkpoint, which must be complete (ConfigError otherwise)."""
    if resume is None:
        return None
    if resume == "latest":
        return latest_checkpoint(checkpoints_dir)
    path = Path(resume)
    if not (path / COMPLETE_MARKER).is_file():
        raise ConfigError(f"train.resume: {resume} is not a complete checkpoint directory (no {COMPLETE_MARKER} marker)")
    return path


# ----------------------------------------------------------------------------- load


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, info: DistInfo) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG from ``path``; returns the trainer state.

    Call on every rank after sharding and building the optimizer. The RNG of rank r is
    restored from rank r's saved state (same world size required).
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
    the result), else the adapter is saved (peft format). Collective; returns the path on
    rank 0.
    """
    state = full_model_state(model, info) if info.distributed else None
    path = None
    if info.is_main:
        target = model
        if info.distributed:
            if rebuild is None:
                raise ValueError("export_hf under FSDP needs rebuild()")
            target = rebuild()
            target.load_state_dict(state)
        is_peft = hasattr(target, "merge_and_unload")
        if is_peft and merge_lora:
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
            path = atomic_directory_write(Path(out_dir), fill)
        finally:
            config._attn_implementation = saved_attn
            config.use_cache = saved_cache
    barrier()
    return path
