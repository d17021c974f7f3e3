"""Next-token cross-entropy for SFT, and per-token log-probs/entropy for RL, without ever
materialising the full [tokens x vocab] logits.

What it is for (docs/PREFLIGHT.md: loss masks, one tokenisation path):

1. The shift happens exactly once, here. A rendered sample carries ``input_ids`` and a
   ``loss_mask`` ALIGNED to them (1 = this token is a training target). Position ``t``
   predicts token ``t + 1``; ``next_token_targets`` moves targets, mask and weights one step
   left together and cuts the link between the last token of one packed sequence and the
   first token of the next. A sequence's first token can never be a target (nothing in its
   sequence predicts it) and is dropped even if its mask is 1.
2. Logits only where they are needed. The caller gathers the final hidden states of the
   predicting positions (``gather_trained_positions``) and ``chunked_cross_entropy`` /
   ``chunked_token_logprobs_and_entropy`` apply the output projection ``chunk_size`` rows
   at a time inside a ``torch.autograd.Function`` whose backward recomputes each chunk's
   logits. Forward and backward both hold O(chunk_size x vocab) activations (plus the
   [V, H] weight gradient, which any method needs). Compare: plain ``lm_head`` +
   ``F.cross_entropy`` keeps [B*T, V] logits (and their gradient) alive; for 135M-parameter
   SmolLM2 (V = 49152) at 16k tokens that is 3 GiB in fp32 per copy.

Numerics: logits, log-sum-exp and the logit gradient are computed in float32 (float64 for
float64 inputs) whatever the input dtype; matmuls run in the input dtype (bf16 on GPU) and
the weight gradient is accumulated in float32 and cast back at the end. Outputs are
float32 (float64 for float64 inputs).

Optional ``logit_scale`` (logits multiplied, e.g. 1/temperature for RL) and ``logit_softcap``
(Gemma-2 style ``cap * tanh(z / cap)``) are applied in that order after the bias.

Imports only torch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- targets


def sequence_index_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Sequence ids for packed rows whose ``position_ids`` restart at 0 for each sequence.

    Args:
        position_ids: [B, T] or [T] int; a new sequence starts wherever the position is 0
            (and at the start of every row).

    Returns:
        int64 tensor of the same shape, ids 0, 1, 2, ... counted row-major across the whole
        micro-batch, so they are distinct across rows too (what ``aggregate`` needs).

    Example: ``[[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]] -> [[0, 0, 0, 1, 1], [2, 2, 3, 3, 3]]``.
    """
    pos = position_ids if position_ids.dim() > 1 else position_ids.unsqueeze(0)
    starts = pos == 0
    starts[:, 0] = True
    index = torch.cumsum(starts.reshape(-1).to(torch.long), dim=0) - 1
    return index.reshape(position_ids.shape)


def row_sequence_index(input_ids_BT: torch.Tensor) -> torch.Tensor:
    """Sequence ids for a padded batch where each row is one sequence: [B, T] -> row number."""
    B, T = input_ids_BT.shape
    return torch.arange(B, device=input_ids_BT.device).unsqueeze(1).expand(B, T).contiguous()


class NextTokenTargets(NamedTuple):
    """Targets at PREDICTING positions (all [..., T], same shape as the inputs).

    targets: int64, token t+1 where position t is trained, else ``IGNORE_INDEX``.
    target_mask: int64 0/1, 1 where position t predicts a trained token of its own sequence.
    target_weight: float, per-token weight of the predicted token (0 where not trained).
    """

    targets: torch.Tensor
    target_mask: torch.Tensor
    target_weight: torch.Tensor


def next_token_targets(
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    sequence_index: torch.Tensor | None = None,
) -> NextTokenTargets:
    """Shift ids, loss mask and weights once: position t predicts token t + 1.

    Args:
        input_ids: [T] or [B, T] token ids of a sample, padded batch or packed rows.
        loss_mask: same shape, 0/1 ALIGNED with input_ids (1 = this token is a target).
        token_weights: optional same-shape float weights aligned with input_ids.
        sequence_index: optional same-shape sequence id per token (packed rows, see
            ``sequence_index_from_position_ids``). Position t only predicts t + 1 when both
            belong to the same sequence. None: each row is one sequence.

    Returns:
        ``NextTokenTargets`` of the same shape; the last position of every row (and of
        every packed sequence) has mask 0. Count ``target_mask`` (not ``loss_mask``) for the
        ``aggregate`` normalisers.
    """
    if loss_mask.shape != input_ids.shape:
        raise ValueError(
            f"loss_mask shape {tuple(loss_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    ids = input_ids.to(torch.long)
    mask_next = torch.zeros_like(ids)
    mask_next[..., :-1] = (loss_mask[..., 1:] != 0).to(torch.long)
    if sequence_index is not None:
        same_sequence = torch.zeros_like(ids, dtype=torch.bool)
        same_sequence[..., :-1] = sequence_index[..., 1:] == sequence_index[..., :-1]
        mask_next = mask_next * same_sequence.to(torch.long)
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[..., :-1] = ids[..., 1:]
    targets = torch.where(mask_next != 0, targets, torch.full_like(targets, IGNORE_INDEX))
    weight = mask_next.to(torch.float32)
    if token_weights is not None:
        shifted = torch.zeros_like(weight)
        shifted[..., :-1] = token_weights[..., 1:].to(torch.float32)
        weight = weight * shifted
    return NextTokenTargets(targets, mask_next, weight)


class TrainedPositions(NamedTuple):
    """Flattened predicting positions of a micro-batch, N = number of trained targets.

    hidden: [N, H] final hidden states at the predicting positions.
    targets: [N] int64 token to predict.
    weight: [N] float per-token weight.
    sequence_index: [N] int64 sequence id (for ``aggregate_token_losses``).
    """

    hidden: torch.Tensor
    targets: torch.Tensor
    weight: torch.Tensor
    sequence_index: torch.Tensor


def gather_trained_positions(
    hidden_BTH: torch.Tensor, next_targets: NextTokenTargets, sequence_index_BT: torch.Tensor
) -> TrainedPositions:
    """Keep only the positions whose next token is trained, before the output projection.

    Args:
        hidden_BTH: [B, T, H] final hidden states (after the final norm).
        next_targets: from ``next_token_targets`` on the same [B, T] batch.
        sequence_index_BT: [B, T] sequence ids (``row_sequence_index`` or
            ``sequence_index_from_position_ids``).

    Returns:
        ``TrainedPositions`` with N = target_mask.sum() rows; gradients flow to hidden_BTH.
    """
    keep = next_targets.target_mask.reshape(-1) != 0
    H = hidden_BTH.shape[-1]
    return TrainedPositions(
        hidden=hidden_BTH.reshape(-1, H)[keep],
        targets=next_targets.targets.reshape(-1)[keep],
        weight=next_targets.target_weight.reshape(-1)[keep],
        sequence_index=sequence_index_BT.reshape(-1)[keep].to(torch.long),
    )


# ------------------------------------------------------------------- chunked logits math


def _chunk_logits(
    hidden_CH: torch.Tensor,
    weight_VH: torch.Tensor,
    bias_V: torch.Tensor | None,
    logit_scale: float,
    logit_softcap: float | None,
    acc_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits [C, V] of one chunk in ``acc_dtype`` (a fresh buffer the caller may modify
    in place), and tanh(u / cap) if a softcap is used. hidden and weight share a dtype."""
    logits = hidden_CH @ weight_VH.t()
    if bias_V is not None:
        logits.add_(bias_V.to(logits.dtype))
    logits = logits.to(acc_dtype)
    if logit_scale != 1.0:
        logits.mul_(logit_scale)
    if logit_softcap is None:
        return logits, None
    tanh = logits.div_(logit_softcap).tanh_()
    return tanh * logit_softcap, tanh


def _matmul_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the projection runs in: the autocast dtype if autocast is on, else the
    hidden states' dtype. Fixed in forward and reused in backward so that the recomputed
    logits are bit-identical to the forward ones."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type) and hidden.dtype in (torch.float32, torch.float16,
                                                                   torch.bfloat16):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


class _ChunkedLogprobEntropy(torch.autograd.Function):
    """log p(target) and entropy per row, logits recomputed chunk by chunk in backward.

    Peak extra memory: forward 2 and backward 2-3 [chunk, V] buffers in ``acc_dtype``
    (float32), plus a [V, H] float32 accumulator for the weight gradient.
    """

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, bias_V, targets_N, chunk_size, logit_scale,
                logit_softcap, with_entropy):
        matmul_dtype = _matmul_dtype(hidden_NH)
        acc_dtype = torch.promote_types(matmul_dtype, torch.float32)
        N = hidden_NH.shape[0]
        device = hidden_NH.device
        logp_N = torch.zeros(N, dtype=acc_dtype, device=device)
        lse_N = torch.zeros(N, dtype=acc_dtype, device=device)
        entropy_N = torch.zeros(N, dtype=acc_dtype, device=device)
        valid_N = targets_N >= 0
        safe_targets_N = torch.where(valid_N, targets_N, torch.zeros_like(targets_N))
        weight_mm = weight_VH.to(matmul_dtype)
        with torch.autocast(device_type=device.type, enabled=False):
            for start in range(0, N, chunk_size):
                end = min(start + chunk_size, N)
                logits, _ = _chunk_logits(hidden_NH[start:end].to(matmul_dtype), weight_mm,
                                          bias_V, logit_scale, logit_softcap, acc_dtype)
                lse = torch.logsumexp(logits, dim=-1)
                lse_N[start:end] = lse
                picked = logits.gather(1, safe_targets_N[start:end, None]).squeeze(1)
                logp_N[start:end] = picked - lse
                if with_entropy:
                    logprobs = logits.sub_(lse[:, None])
                    probs = logprobs.exp()
                    entropy_N[start:end] = -probs.mul_(logprobs).sum(-1)
                    del probs
                del logits
        logp_N = torch.where(valid_N, logp_N, torch.zeros_like(logp_N))
        ctx.save_for_backward(hidden_NH, weight_VH, bias_V, safe_targets_N, valid_N, lse_N,
                              entropy_N)
        ctx.chunk_size = chunk_size
        ctx.logit_scale = logit_scale
        ctx.logit_softcap = logit_softcap
        ctx.with_entropy = with_entropy
        ctx.matmul_dtype = matmul_dtype
        return logp_N, entropy_N

    @staticmethod
    def backward(ctx, grad_logp_N, grad_entropy_N):
        hidden_NH, weight_VH, bias_V, targets_N, valid_N, lse_N, entropy_N = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        N = hidden_NH.shape[0]
        acc_dtype = lse_N.dtype
        matmul_dtype = ctx.matmul_dtype
        device = hidden_NH.device
        grad_hidden = torch.zeros_like(hidden_NH) if need_hidden else None
        grad_weight = (
            torch.zeros(weight_VH.shape, dtype=acc_dtype, device=device) if need_weight else None
        )
        grad_bias = (
            torch.zeros(bias_V.shape, dtype=acc_dtype, device=device)
            if (need_bias and bias_V is not None) else None
        )
        if grad_logp_N is None:
            grad_logp_N = torch.zeros(N, dtype=acc_dtype, device=device)
        grad_logp_N = torch.where(valid_N, grad_logp_N.to(acc_dtype), torch.zeros_like(lse_N))
        use_entropy = ctx.with_entropy and grad_entropy_N is not None
        weight_mm = weight_VH.to(matmul_dtype)
        with torch.autocast(device_type=device.type, enabled=False):
            for start in range(0, N, ctx.chunk_size):
                end = min(start + ctx.chunk_size, N)
                h = hidden_NH[start:end].to(matmul_dtype)
                logits, tanh = _chunk_logits(h, weight_mm, bias_V, ctx.logit_scale,
                                             ctx.logit_softcap, acc_dtype)
                logprobs = logits.sub_(lse_N[start:end, None])
                g = grad_logp_N[start:end, None]
                # d log p(y) / d z = onehot(y) - p ;  H = -sum p log p -> dH/dz = -p (log p + H)
                if use_entropy:
                    ge = grad_entropy_N[start:end, None].to(acc_dtype)
                    coeff = (logprobs + entropy_N[start:end, None]).mul_(ge).add_(g).neg_()
                    grad_z = logprobs.exp_().mul_(coeff)
                    del coeff
                else:
                    grad_z = logprobs.exp_().mul_(-g)
                grad_z.scatter_add_(1, targets_N[start:end, None], g)
                if tanh is not None:
                    grad_z.mul_(tanh.mul_(tanh).neg_().add_(1.0))
                    del tanh
                if ctx.logit_scale != 1.0:
                    grad_z.mul_(ctx.logit_scale)
                if grad_bias is not None:
                    grad_bias += grad_z.sum(0)
                grad_z_mm = grad_z.to(matmul_dtype)
                if need_hidden:
                    grad_hidden[start:end] = (grad_z_mm @ weight_mm).to(hidden_NH.dtype)
                if need_weight:
                    if matmul_dtype == acc_dtype:
                        grad_weight.addmm_(grad_z_mm.t(), h)
                    else:
                        grad_weight += (grad_z_mm.t() @ h).to(acc_dtype)
                del grad_z, grad_z_mm
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight_VH.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias_V.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def _validate(hidden, weight, targets, chunk_size):
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden size {hidden.shape[-1]} != lm_head weight in-features {weight.shape[1]}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def chunked_token_logprobs_and_entropy(
    hidden: torch.Tensor,
    lm_head_weight_VH: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 1024,
    *,
    lm_head_bias_V: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_softcap: float | None = None,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) and the entropy of the next-token distribution, per position (RL).

    Args:
        hidden: [..., H] final hidden states (e.g. [B, T, H] or gathered [N, H]).
        lm_head_weight_VH: [V, H] output projection (tied embeddings work: grads flow).
        targets: [...] int64 token whose log-prob is wanted; entries < 0 (``IGNORE_INDEX``)
            give logp 0 and no gradient (their entropy is still computed).
        chunk_size: rows of logits alive at once.
        lm_head_bias_V: optional [V] bias.
        temperature: logits are divided by it (match the sampling temperature).
        logit_softcap: optional ``cap * tanh(z / cap)`` after the temperature.
        with_entropy: compute the entropy (one extra exp-sum per chunk); else return None.

    Returns:
        ``(logp, entropy)``, float32, shape [...]. BOTH carry gradients (to hidden, weight
        and bias): entropy's gradient dH/dz_j = -p_j (log p_j + H) costs no extra matmul,
        so an entropy bonus can be trained through it. Detach it for logging.
    """
    _validate(hidden, lm_head_weight_VH, targets, chunk_size)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lead_shape = targets.shape
    H = hidden.shape[-1]
    logp_N, entropy_N = _ChunkedLogprobEntropy.apply(
        hidden.reshape(-1, H), lm_head_weight_VH, lm_head_bias_V,
        targets.reshape(-1).to(torch.long), int(chunk_size), 1.0 / float(temperature),
        logit_softcap, bool(with_entropy),
    )
    logp = logp_N.reshape(lead_shape)
    return logp, (entropy_N.reshape(lead_shape) if with_entropy else None)


def chunked_cross_entropy(
    hidden_NH: torch.Tensor,
    lm_head_weight_VH: torch.Tensor,
    targets_N: torch.Tensor,
    chunk_size: int = 1024,
    *,
    lm_head_bias_V: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """Per-token negative log-likelihood, logits built ``chunk_size`` rows at a time.

    Equals ``F.cross_entropy(hidden @ W.T + b, targets, reduction="none")`` (with the
    optional scale / softcap on the logits), but forward and backward keep only
    O(chunk_size x V) logits alive: backward recomputes each chunk's logits.

    Args:
        hidden_NH: [N, H] hidden states of predicting positions (``gather_trained_positions``).
        lm_head_weight_VH: [V, H] output projection.
        targets_N: [N] int64 targets; entries < 0 give NLL 0 and no gradient.
        chunk_size: rows per chunk.
        lm_head_bias_V: optional [V] bias.
        logit_scale: multiplies the logits (after the bias).
        logit_softcap: optional ``cap * tanh(z / cap)`` after the scale.

    Returns:
        [N] float32 NLL with gradients to hidden, weight and bias. Feed it to
        ``aggregate.aggregate_token_losses``.
    """
    _validate(hidden_NH, lm_head_weight_VH, targets_N, chunk_size)
    logp_N, _ = _ChunkedLogprobEntropy.apply(
        hidden_NH, lm_head_weight_VH, lm_head_bias_V, targets_N.to(torch.long),
        int(chunk_size), float(logit_scale), logit_softcap, False,
    )
    return -logp_N


def sft_token_losses(
    hidden_BTH: torch.Tensor,
    lm_head_weight_VH: torch.Tensor,
    input_ids_BT: torch.Tensor,
    loss_mask_BT: torch.Tensor,
    *,
    token_weights_BT: torch.Tensor | None = None,
    position_ids_BT: torch.Tensor | None = None,
    chunk_size: int = 1024,
    lm_head_bias_V: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
) -> tuple[torch.Tensor, TrainedPositions]:
    """Shift, gather the trained positions, chunked cross-entropy: the whole SFT token loss.

    Args:
        hidden_BTH: [B, T, H] final hidden states of the backbone (after its final norm).
        lm_head_weight_VH: [V, H].
        input_ids_BT, loss_mask_BT: [B, T] (mask aligned with ids, 1 = target).
        token_weights_BT: optional [B, T] weights aligned with ids.
        position_ids_BT: [B, T] for packed rows (positions restart at 0 per sequence);
            None: each row is one sequence.
        chunk_size, lm_head_bias_V, logit_scale, logit_softcap: see ``chunked_cross_entropy``.

    Returns:
        ``(nll_N, positions)``: per-target NLL [N] and the gathered ``TrainedPositions``
        (targets, weight, sequence_index). Aggregate with
        ``aggregate_token_losses(nll_N, torch.ones_like(nll_N), positions.sequence_index,
        mode, token_weight_N=positions.weight, ...)``; N is this micro-batch's trained-token
        count for the step normaliser.
    """
    if position_ids_BT is None:
        sequence_index_BT = row_sequence_index(input_ids_BT)
    else:
        sequence_index_BT = sequence_index_from_position_ids(position_ids_BT)
    next_targets = next_token_targets(input_ids_BT, loss_mask_BT, token_weights_BT,
                                      sequence_index_BT)
    positions = gather_trained_positions(hidden_BTH, next_targets, sequence_index_BT)
    nll_N = chunked_cross_entropy(
        positions.hidden, lm_head_weight_VH, positions.targets, chunk_size,
        lm_head_bias_V=lm_head_bias_V, logit_scale=logit_scale, logit_softcap=logit_softcap,
    )
    return nll_N, positions
