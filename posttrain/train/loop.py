"""What every trainer (SFT, reward model, RL, DPO) shares, as plain functions: seeding,
AdamW, the learning-rate schedule, one optimizer step over many micro-batches, and
validation. Preparing and running the model (LoRA, packed attention, the forward pass that
stops before the output projection) lives in ``models/prepare.py``.

What goes wrong in hand-written loops (docs/PREFLIGHT.md) and what this module guarantees:

- the scheduler is stepped once per OPTIMIZER step, never per micro-batch ("scheduler
  stepped per micro-step" is the classic bug);
- a micro-batch returns its SHARE of the step loss (normalisers span the whole step, see
  ``algorithms.aggregate``), so gradient accumulation is a plain sum and the result does
  not depend on how the step was split; under data parallelism each rank's share is
  multiplied by ``world_size`` because FSDP/DDP average gradients over ranks;
- logits only where they are trained: the model runs to its final hidden states
  (``models.prepare.forward_hidden``), the trained positions are gathered and the
  cross-entropy is computed in chunks (``algorithms.sft``).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from posttrain.algorithms.aggregate import aggregate_token_losses
from posttrain.algorithms.sft import sft_token_losses
from posttrain.data.batching import MicroBatch
from posttrain.models.prepare import forward_hidden


# ----------------------------------------------------------------------------- CPU allocator


def tune_cpu_allocator(top_pad_bytes: int = 1 << 30) -> bool:
    """Keep freed memory in the glibc heap instead of returning it to the OS at once.

    Training on CPU allocates and frees the same large activation buffers every micro-batch;
    by default glibc hands big blocks back to the kernel (mmap/trim) and the next allocation
    page-faults every page again, which in a VM can cost more than the arithmetic (measured
    here: forward+backward of 1000 tokens on SmolLM2-135M, 81 s -> 40 s on a loaded 2-core
    VM). Raises the mmap threshold to its maximum (32 MiB) and the trim threshold/top pad.
    Returns False where glibc's ``mallopt`` is unavailable (then nothing changes).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        ok = libc.mallopt(m_mmap_threshold, 32 << 20)
        ok &= libc.mallopt(m_trim_threshold, 1 << 34 if ctypes.sizeof(ctypes.c_long) == 8 else 1 << 30)
        ok &= libc.mallopt(m_top_pad, top_pad_bytes)
        return bool(ok)
    except (OSError, AttributeError):
        return False


def seed_everything(seed: int) -> None:
    """Seed Python's, torch's and (if installed) numpy's global generators."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:
        pass


def sft_micro_batch_loss(
    model: torch.nn.Module,
    batch: MicroBatch,
    *,
    loss_agg_mode: str,
    step_trained_tokens: float,
    step_sequences: float,
    chunk_size: int,
) -> MicroResult:
    """This micro-batch's share of the SFT step loss (sum the shares over the step), its
    trained-token count and the summed NLL of its trained targets."""
    hidden_BTH, lm_head_weight = forward_hidden(model, batch)
    nll_N, positions = sft_token_losses(
        hidden_BTH, lm_head_weight, batch.input_ids, batch.loss_mask,
        token_weights_BT=batch.weights,
        position_ids_BT=batch.position_ids if batch.packed else None,
        chunk_size=chunk_size,
    )
    ones_N = torch.ones_like(nll_N)
    loss = aggregate_token_losses(
        nll_N, ones_N, positions.sequence_index, loss_agg_mode,
        step_trained_tokens=step_trained_tokens, step_sequences=step_sequences,
        token_weight_N=positions.weight,
    )
    if nll_N.numel() == 0:  # keep the graph connected (filler micro-batch under FSDP)
        loss = loss + 0.0 * hidden_BTH.sum()
    return MicroResult(loss, float(nll_N.numel()), nll_sum=nll_N.detach().float().sum())


# ----------------------------------------------------------------------------- optimiser


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float,
                    betas: tuple[float, float], eps: float) -> torch.optim.AdamW:
    """AdamW over trainable parameters; matrices decay, biases and norm weights do not.

    The fused kernel (one pass over each parameter for all of Adam's arithmetic) is used
    where torch has it for the parameters' device: on CPU it is about 7x faster than the
    default per-parameter loop over SmolLM2-135M's 135M parameters (67 ms against 464 ms per
    step, measured on this repository's 2-core VM), on CUDA the usual choice.
    """
    decay, no_decay, seen = [], [], set()
    for _, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    devices = {p.device.type for group in groups for p in group["params"]}
    fused = bool(devices) and devices <= {"cpu", "cuda"} and all(
        p.dtype in (torch.float32, torch.bfloat16, torch.float16) for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def resolve_warmup_steps(total_steps: int, warmup_ratio: float, warmup_steps: int | None) -> int:
    """Warmup in optimizer steps: explicit steps, else ceil(ratio * total)."""
    if warmup_steps is not None:
        return warmup_steps
    return int(math.ceil(warmup_ratio * total_steps))


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, schedule: str,
                  min_lr_ratio: float) -> float:
    """Learning-rate factor for optimizer step ``step`` (0-based: the lr USED by that step).

    Linear warmup from 1/(warmup+1) to 1 over ``warmup_steps`` steps, then ``schedule``
    decays from 1 towards ``min_lr_ratio``: cosine ``m + (1 - m)(1 + cos(pi p)) / 2``,
    linear ``1 - (1 - m) p``, or constant 1, where ``p = (step - warmup) / (total - warmup)``
    is the decay progress (the last step still learns; the rate reaches ``m`` just after it).
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    if schedule == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int,
                    schedule: str, min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over ``lr_multiplier``; call ``scheduler.step()`` once per optimizer step."""
    def factor(step: int) -> float:
        return lr_multiplier(step, total_steps=total_steps, warmup_steps=warmup_steps,
                             schedule=schedule, min_lr_ratio=min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_steps_per_rollout_batch(samples_per_step: int, mini_batch_size: int | None, ppo_epochs: int) -> int:
    """Optimizer steps one RL step takes: ``ppo_epochs`` passes over its ``samples_per_step``
    completions in mini-batches of ``mini_batch_size`` (None: the whole batch at once).

    >>> optimizer_steps_per_rollout_batch(8, 4, 2)
    4
    >>> optimizer_steps_per_rollout_batch(8, None, 1)
    1
    """
    return ppo_epochs * (samples_per_step // (mini_batch_size or samples_per_step))


@contextlib.contextmanager
def configured_hyperparameters_kept(optimizer: torch.optim.Optimizer, scheduler: Any):
    """Load an optimizer's and its LambdaLR's saved state inside this block: on leaving it the
    run's own hyperparameters are put back and the learning rate is recomputed.

    What a checkpoint decides: AdamW's moments and step counts, and the schedule's position
    (``scheduler.last_epoch``, optimizer steps taken). What the run's config decides, as in a
    fresh run with that config (``train.resume_allow_changes``): every param group's
    hyperparameters (``weight_decay``, ``betas``, ``eps``), the peak rates (the scheduler's
    ``base_lrs`` and each group's ``initial_lr``) and the schedule's shape (the multiplier
    closures ``build_scheduler`` made: warmup, total steps, decay, minimum). ``lr`` becomes
    ``base_lr * multiplier(last_epoch)``, LambdaLR's own formula, so a resume under an
    unchanged config restores the saved rate bit for bit. The saved state must come from an
    optimizer with the same param groups (the same model and trained parameters).
    """
    configured = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    base_lrs = list(scheduler.base_lrs)
    yield
    scheduler.base_lrs = base_lrs
    for group, settings, base_lr, multiplier in zip(optimizer.param_groups, configured, base_lrs,
                                                    scheduler.lr_lambdas, strict=True):
        group.update(settings)
        group["initial_lr"] = base_lr
        group["lr"] = base_lr * multiplier(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast (fp32 master weights) or nothing."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- one step


@dataclass
class MicroResult:
    """What a micro-batch's loss function returns, in every trainer.

    ``loss``: this micro-batch's share of the step loss (carries the graph); ``count``: what it
    trains (tokens for SFT and RL, pairs for RM and DPO), the weight of its metrics;
    ``metrics``: detached 0-d tensors (means over its ``count``), read once per step, never
    per micro-batch; ``nll_sum``: SFT's summed NLL of its trained targets; ``token_gap``: RL's
    engine-minus-trainer log-probs of its sampled tokens, when the engine reported them.
    """

    loss: torch.Tensor
    count: float
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    nll_sum: torch.Tensor | float = 0.0
    token_gap: torch.Tensor | None = None

    def detached(self) -> "MicroResult":
        return MicroResult(self.loss.detach(), self.count, self.metrics, self.nll_sum, self.token_gap)


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    nll_sum: float
    trained_tokens: int
    seconds: float
    finite: bool = True  # False: the loss or gradient norm was NaN/inf and the update was NOT applied
    micro: list[MicroResult] = field(default_factory=list)  # this rank's micro-batches, detached, in order


LossFn = Callable[[torch.nn.Module, Any], MicroResult]


def optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    micro_batches: Iterable[Any],
    loss_fn: LossFn,
    *,
    precision: str,
    device: torch.device,
    max_grad_norm: float | None,
    world_size: int = 1,
    reduce_sum: Callable[[list[float]], list[float]] | None = None,
) -> StepResult:
    """Forward/backward every micro-batch, clip, step the optimizer and the scheduler once.

    ``loss_fn(model, micro_batch)`` returns a ``MicroResult``: this micro-batch's share of
    the step loss (normalised by step-wide counts) and its metrics as tensors. Each share is
    multiplied by ``world_size`` before backward because data-parallel gradients are averaged
    over ranks. ``reduce_sum`` sums [loss, nll_sum, trained count] over ranks (None: one
    process). The step's values are read from the device once, after the last backward.

    A step whose (summed) loss or global gradient norm is NaN/inf is not applied: the
    gradients are dropped, the optimizer does not step (its moments stay finite), the
    scheduler still does (the schedule follows the step counter) and the result says
    ``finite=False``; the trainer decides whether to go on (``train.session.check_step_finite``).
    Every rank reaches the same verdict (the norm and the loss are global).
    """
    started = time.perf_counter()
    lr = optimizer.param_groups[0]["lr"]
    micro: list[MicroResult] = []
    for micro_batch in micro_batches:
        with autocast_context(precision, device):
            result = loss_fn(model, micro_batch)
        (result.loss * world_size).backward()
        micro.append(result.detached())
    loss_total, nll_sum = torch.stack([  # one device read for the whole step
        torch.stack([m.loss.float().reshape(()),
                     torch.as_tensor(m.nll_sum, dtype=torch.float32, device=m.loss.device).reshape(())])
        for m in micro]).sum(0).tolist() if micro else (0.0, 0.0)
    trained = float(sum(m.count for m in micro))
    grad_norm = clip_gradients(model, max_grad_norm)
    if reduce_sum is not None:
        loss_total, nll_sum, trained = reduce_sum([loss_total, nll_sum, trained])
    finite = math.isfinite(loss_total) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
        scheduler.step()
    else:
        with warnings.catch_warnings():  # torch warns when the schedule moves before any optimizer step
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss_total, grad_norm=grad_norm, lr=lr, nll_sum=nll_sum,
                      trained_tokens=int(round(trained)), seconds=time.perf_counter() - started, finite=finite,
                      micro=micro)


def clip_gradients(model: torch.nn.Module, max_grad_norm: float | None) -> float:
    """Global gradient norm before clipping (clipped in place to ``max_grad_norm`` if set).

    Works for plain and FSDP2 (DTensor) parameters.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    limit = max_grad_norm if max_grad_norm is not None else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, limit)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


# ----------------------------------------------------------------------------- validation


@torch.no_grad()
def evaluate_nll(
    model: torch.nn.Module,
    micro_batches: Iterable[MicroBatch],
    *,
    precision: str,
    device: torch.device,
    chunk_size: int,
    reduce_sum: Callable[[list[float]], list[float]] | None = None,
) -> dict[str, float]:
    """Token-mean NLL over held-out micro-batches (every trained target counts once).

    Returns ``{"val/loss", "val/ppl", "val/tokens"}``; ``val/ppl`` = exp(val/loss).
    """
    was_training = model.training
    model.eval()
    nll_sum = count = 0.0
    try:
        for batch in micro_batches:
            batch = batch.to(device)
            with autocast_context(precision, device):
                hidden_BTH, weight = forward_hidden(model, batch)
                nll_N, _ = sft_token_losses(
                    hidden_BTH, weight, batch.input_ids, batch.loss_mask,
                    position_ids_BT=batch.position_ids if batch.packed else None,
                    chunk_size=chunk_size,
                )
            nll_sum += float(nll_N.sum())
            count += nll_N.numel()
    finally:
        model.train(was_training)
    if reduce_sum is not None:
        nll_sum, count = reduce_sum([nll_sum, count])
    loss = nll_sum / max(count, 1.0)
    return {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0)), "val/tokens": int(count)}


def is_due(step: int, every: int | None, total_steps: int) -> bool:
    """True every ``every`` optimizer steps and at the last step; never when ``every`` is None."""
    return every is not None and (step % every == 0 or step == total_steps)
