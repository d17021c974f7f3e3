"""Data-parallel training with torch.distributed: process group, FSDP2 sharding, rank-0
helpers and small collectives. One process (no ``torchrun``) is the degenerate case and
every helper works there too, so trainers call the same functions everywhere.

FSDP2 (PyTorch's ``fully_shard`` docs; veRL's FSDP trainers do the same): parameters, gradients and optimizer
state are sharded per decoder layer with ``torch.distributed.fsdp.fully_shard``, then the
root module is sharded so the embeddings, final norm and output projection are too. Backend
``gloo`` on CPU, ``nccl`` on CUDA. Launch with ``torchrun --nproc_per_node=K -m posttrain
...``; never a home-made launcher.

Gradients: FSDP averages over ranks; trainers multiply each rank's loss share by
``world_size`` so that the step's gradient is the SUM of the shares (see
``algorithms.aggregate``), which makes K ranks equal one process on the same global batch.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: a single process without a process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def init_distributed(device: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group ``torchrun`` describes (env RANK/WORLD_SIZE), or run alone.

    ``device``: "cpu", "cuda" or None (CUDA when available). Sets the CUDA device of this
    rank to ``LOCAL_RANK``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    # Under torchrun even one process joins a process group and shards with FSDP2 (the path
    # a multi-GPU run takes); a plain ``python`` / ``posttrain`` process runs alone.
    launched_by_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    if world_size <= 1 and not launched_by_torchrun:
        return DistInfo(0, 1, 0, torch_device, None)
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, torch_device, backend)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a (possibly peft-wrapped) transformers CausalLM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(base.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(base).__name__}")
    return list(layers)


def shard_model(model: torch.nn.Module, info: DistInfo, *, reshard_after_forward: bool = True) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` each decoder layer, then the root (in place; returns model).

    A no-op in a single process.
    """
    if not info.distributed:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    # The root stays unsharded between forward and backward: the loss reads the output
    # projection's weight after the forward (``models.prepare.forward_hidden``).
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    return model


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum a list of floats over ranks (float64 so counts stay exact); identity alone."""
    if not info.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_reduce_max(values: list[float], info: DistInfo) -> list[float]:
    """Element-wise maximum of a list of floats over ranks (float64); identity alone.
    (A minimum is ``-max(-x)``.)"""
    if not info.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def all_gather_objects(value: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order; ``[value]`` alone."""
    if not info.distributed:
        return [value]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: Any, info: DistInfo, src: int = 0) -> Any:
    """Rank ``src``'s ``value`` on every rank."""
    if not info.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]
