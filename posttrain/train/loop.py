"""What every trainer (SFT, reward model, RL) shares, as plain functions: model preparation
(LoRA, gradient checkpointing, packed attention), the forward pass that stops before the
output projection, AdamW, the learning-rate schedule, one optimizer step over many
micro-batches, and validation.

What goes wrong in hand-written loops (docs/PREFLIGHT.md) and what this module guarantees:

- the scheduler is stepped once per OPTIMIZER step, never per micro-batch ("scheduler
  stepped per micro-step" is the classic bug);
- a micro-batch returns its SHARE of the step loss (normalisers span the whole step, see
  ``algorithms.aggregate``), so gradient accumulation is a plain sum and the result does
  not depend on how the step was split; under data parallelism each rank's share is
  multiplied by ``world_size`` because FSDP/DDP average gradients over ranks;
- logits only where they are trained: the model runs to its final hidden states
  (``logits_to_keep`` = nothing), the trained positions are gathered and the cross-entropy
  is computed in chunks (``algorithms.sft``).

Packed micro-batches (``data.batching.collate_packed``) run with the ``posttrain_varlen``
attention registered here: causal scaled-dot-product attention computed sequence by
sequence from ``cu_seq_lens``, so no sequence attends to another and no [T, T] mask is
ever built. With ``flash_attention_2`` the same ``cu_seq_lens`` go to the varlen kernel.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from posttrain.algorithms.aggregate import aggregate_token_losses
from posttrain.algorithms.sft import sft_token_losses
from posttrain.data.batching import MicroBatch

VARLEN_ATTENTION = "posttrain_varlen"


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


# ----------------------------------------------------------------------------- attention


def varlen_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    posttrain_block_masks: Sequence[torch.Tensor] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention inside each packed sequence (transformers attention interface).

    Args:
        query: [1, Hq, T, D]; key, value: [1, Hkv, T, D] (packed row, batch of one).
        cu_seq_lens_q: [S + 1] cumulative sequence lengths; None falls back to plain
            causal attention over the row (a single sequence).
        posttrain_block_masks: optional, one [L_s, L_s] bool mask per block of
            ``cu_seq_lens_q`` used instead of causal attention inside it (the shared-prompt
            layout of ``data.batching.collate_shared_prompt``).

    Returns:
        ([1, T, Hq, D] attention output, None).
    """
    out_dtype = query.dtype
    if query.device.type == "cpu" and out_dtype == torch.bfloat16:
        # CPU SDPA forward+backward is ~25% cheaper in fp32 than in bf16 (measured, 1 thread,
        # 9 heads x 200 tokens); the output goes back to bf16 for the next matmul.
        query, key, value = query.float(), key.float(), value.float()
    gqa = query.shape[1] != key.shape[1]  # grouped-query attention without copying key/value heads
    if cu_seq_lens_q is None or attention_mask is not None:
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
            is_causal=attention_mask is None and query.shape[2] > 1, enable_gqa=gqa,
        )
        return out.transpose(1, 2).contiguous().to(out_dtype), None
    if query.shape[0] != 1:
        raise ValueError("packed attention expects a single packed row")
    bounds = cu_seq_lens_q.tolist()
    pieces = []
    for block, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        block_mask = None if posttrain_block_masks is None else posttrain_block_masks[block]
        pieces.append(F.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], attn_mask=block_mask,
            dropout_p=dropout, scale=scaling, is_causal=block_mask is None and end - start > 1, enable_gqa=gqa,
        ))
    out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)
    return out.transpose(1, 2).contiguous().to(out_dtype), None


def register_varlen_attention() -> str:
    """Make ``posttrain_varlen`` a transformers attention implementation; returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_sdpa_attention)
    return VARLEN_ATTENTION


def choose_attention(packing: bool, requested: str | None) -> str:
    """The attention backend for training: the user's choice, else varlen SDPA when packing."""
    if requested:
        return requested
    return register_varlen_attention() if packing else "sdpa"


# ----------------------------------------------------------------------------- model


def unwrap_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers CausalLM inside an optional peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def train_top_blocks_only(model: torch.nn.Module, blocks: int,
                          also_train: Sequence[torch.nn.Module] = ()) -> torch.nn.Module:
    """Freeze everything but the top ``blocks`` decoder blocks, the final norm and the
    modules in ``also_train`` (a scalar head), in place; returns ``model``.

    Autograd then stops at the lowest trainable block: a step costs one forward plus about
    ``blocks / L`` of a backward (partial fine-tuning for small hardware). ``blocks=0``
    trains the norm (and ``also_train``) only. Raises ValueError outside ``0..L``.
    """
    decoder = unwrap_causal_lm(model).get_decoder()
    layers = list(getattr(decoder, "layers", None) or [])
    if not layers:
        raise ValueError(f"cannot find the decoder blocks of {type(decoder).__name__}")
    if not 0 <= blocks <= len(layers):
        raise ValueError(f"the model has {len(layers)} decoder blocks, got {blocks}")
    keep_modules = layers[len(layers) - blocks:] + [getattr(decoder, "norm", None), *also_train]
    keep = {id(p) for module in keep_modules if module is not None for p in module.parameters()}
    for parameter in model.parameters():
        if id(parameter) not in keep:
            parameter.requires_grad_(False)
    return model


def apply_lora(model: torch.nn.Module, *, r: int, alpha: float, dropout: float,
               target_modules: Sequence[str] | str, task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    """Wrap ``model`` with peft LoRA adapters; only adapter weights stay trainable.

    ``task_type="SEQ_CLS"`` for scalar-head models (reward model, critic): peft then also
    trains a full copy of the ``score`` head and ``merge_and_unload`` puts it back.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type=task_type,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
    )
    return get_peft_model(model, config)


def prepare_for_training(model: torch.nn.Module, *, attn_implementation: str,
                         gradient_checkpointing: bool) -> torch.nn.Module:
    """Set the attention backend, gradient checkpointing and train mode (in place)."""
    causal_lm = unwrap_causal_lm(model)
    if attn_implementation == VARLEN_ATTENTION:
        register_varlen_attention()
    elif attn_implementation in ("posttrain_flex", "auto"):  # FlexAttention on CUDA (train/attention_flex.py)
        from posttrain.train.attention_flex import resolve_attention

        attn_implementation = resolve_attention(attn_implementation, next(model.parameters()).device)
    causal_lm.config._attn_implementation = attn_implementation
    causal_lm.config.use_cache = False
    if gradient_checkpointing:
        causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.train()
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters), counting tied weights once."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable


def forward_hidden(model: torch.nn.Module, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the CausalLM up to its final hidden states; no logits are computed.

    The full model's forward is called (so FSDP's root hooks run) with ``logits_to_keep``
    selecting no position; the decoder's output is captured with a forward hook.

    Returns:
        (hidden_BTH [B, T, H] after the final norm, lm_head weight [V, H]).
    """
    causal_lm = unwrap_causal_lm(model)
    decoder = causal_lm.get_decoder()
    captured: list[torch.Tensor] = []

    def keep_output(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = decoder.register_forward_hook(keep_output)
    try:
        model(**model_inputs(batch),
              logits_to_keep=torch.zeros(0, dtype=torch.long, device=batch.input_ids.device))
    finally:
        handle.remove()
    lm_head = causal_lm.get_output_embeddings()
    return captured[-1], lm_head.weight


def model_inputs(batch: MicroBatch) -> dict[str, Any]:
    """Keyword arguments of a transformers forward for ``batch``: packed rows carry their
    sequence bounds (and shared-prompt block masks) to the varlen attention, padded rows
    their attention mask."""
    kwargs: dict[str, Any] = dict(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    if batch.packed:
        kwargs.update(cu_seq_lens_q=batch.cu_seq_lens, cu_seq_lens_k=batch.cu_seq_lens,
                      max_length_q=batch.max_seq_len, max_length_k=batch.max_seq_len)
        if batch.block_masks is not None:
            kwargs["posttrain_block_masks"] = batch.block_masks
    else:
        kwargs["attention_mask"] = batch.attention_mask
    return kwargs


def sft_micro_batch_loss(
    model: torch.nn.Module,
    batch: MicroBatch,
    *,
    loss_agg_mode: str,
    step_trained_tokens: float,
    step_sequences: float,
    chunk_size: int,
) -> tuple[torch.Tensor, dict[str, float]]:
    """This micro-batch's share of the SFT step loss (sum the shares over the step).

    Returns:
        (loss share, {"nll_sum": summed NLL of trained targets, "trained_tokens": count}).
    """
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
    return loss, {"nll_sum": float(nll_N.detach().sum()), "trained_tokens": float(nll_N.numel())}


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


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast (fp32 master weights) or nothing."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- one step


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    nll_sum: float
    trained_tokens: int
    seconds: float
    finite: bool = True  # False: the loss or gradient norm was NaN/inf and the update was NOT applied


LossFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]


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

    ``loss_fn(model, micro_batch)`` returns this micro-batch's share of the step loss
    (normalised by step-wide counts) and float metrics. Each share is multiplied by
    ``world_size`` before backward because data-parallel gradients are averaged over ranks.
    ``reduce_sum`` sums [loss, nll_sum, trained_tokens] over ranks (None: one process).

    A step whose (summed) loss or global gradient norm is NaN/inf is not applied: the
    gradients are dropped, the optimizer does not step (its moments stay finite), the
    scheduler still does (the schedule follows the step counter) and the result says
    ``finite=False``; the trainer decides whether to go on (``train.session.check_step_finite``).
    Every rank reaches the same verdict (the norm and the loss are global).
    """
    started = time.perf_counter()
    lr = optimizer.param_groups[0]["lr"]
    loss_total = nll_sum = trained = 0.0
    for micro_batch in micro_batches:
        with autocast_context(precision, device):
            loss, metrics = loss_fn(model, micro_batch)
        (loss * world_size).backward()
        loss_total += float(loss.detach())
        nll_sum += metrics.get("nll_sum", 0.0)
        trained += metrics.get("trained_tokens", 0.0)
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
                      trained_tokens=int(round(trained)), seconds=time.perf_counter() - started, finite=finite)


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
