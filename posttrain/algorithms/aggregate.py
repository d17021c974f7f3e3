"""Turn per-token losses into the scalar an optimizer step minimises (``loss_agg_mode``).

Why this module exists: averaging a loss per micro-batch and then averaging the
micro-batches weights tokens unequally, so the gradient depends on how a batch happened to
be split (the gradient-accumulation bug fixed in transformers 4.46; see the Hugging Face
post "Fixing Gradient Accumulation", Oct 2024). Here every normaliser is a count over the WHOLE optimizer step (all
micro-batches, all ranks), passed in by the caller. Each micro-batch returns its share;
summing the shares over micro-batches (gradient accumulation just adds gradients) and
ranks gives exactly the one-big-batch value, whatever the split, padding or packing.

Modes (same names as veRL's ``loss_agg_mode``; ``w_i`` = loss_mask * optional token weight):

- ``token-mean``          sum_i w_i l_i / step_trained_tokens
- ``seq-mean-token-mean`` sum_s [ sum_{i in s} w_i l_i / n_s ] / step_sequences,
                          n_s = trained tokens of sequence s (each sequence counts equally)
- ``seq-mean-token-sum``  sum_i w_i l_i / step_sequences (longer sequences weigh more)
- ``sum``                 sum_i w_i l_i (no normaliser; e.g. Dr. GRPO, Liu et al. 2025,
                          divides this by a constant such as group_size * max_new_tokens,
                          which the caller can do since a constant does not depend on splits)

Token layout: tokens are flattened to ``N`` with a per-token ``sequence_index`` so the same
code serves padded ``[B, T]`` batches (sequence = row; see ``aggregate_padded_token_losses``)
and packed rows (several sequences in one row). A sequence must never be split across
micro-batches, because ``n_s`` is counted from the tokens present.

Ranks: DDP and FSDP *average* gradients over ranks. To turn that average into the sum this
module assumes, multiply the per-rank loss by ``world_size`` before ``backward()``
(or, equivalently, pass step counts divided by ``world_size``).

Imports only torch.
"""

from __future__ import annotations

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "sum")


def _check_mode(mode: str) -> None:
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {mode!r}")


def count_trained(
    loss_mask_N: torch.Tensor, sequence_index_N: torch.Tensor
) -> tuple[int, int]:
    """Count what a micro-batch contributes to the step normalisers.

    Args:
        loss_mask_N: [...] 0/1 (or bool) mask, 1 = trained token.
        sequence_index_N: [...] same shape, integer id of the sequence each token belongs
            to (ids only need to be distinct within this micro-batch).

    Returns:
        ``(trained_tokens, trained_sequences)``: number of tokens with mask 1, and number of
        distinct sequences with at least one trained token. Sum these over all micro-batches
        and ranks of an optimizer step to get ``step_trained_tokens`` / ``step_sequences``.
    """
    trained = loss_mask_N.reshape(-1) != 0
    trained_tokens = int(trained.sum().item())
    trained_sequences = int(torch.unique(sequence_index_N.reshape(-1)[trained]).numel())
    return trained_tokens, trained_sequences


def count_trained_padded(loss_mask_BT: torch.Tensor) -> tuple[int, int]:
    """``count_trained`` for a padded batch where each row is one sequence.

    Args:
        loss_mask_BT: [B, T] 0/1 mask.

    Returns:
        ``(trained_tokens, trained_sequences)`` (rows with at least one trained token).
    """
    trained = loss_mask_BT != 0
    return int(trained.sum().item()), int(trained.any(dim=-1).sum().item())


def aggregate_token_losses(
    token_loss_N: torch.Tensor,
    loss_mask_N: torch.Tensor,
    sequence_index_N: torch.Tensor | None,
    mode: str,
    *,
    step_trained_tokens: float,
    step_sequences: float,
    token_weight_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """This micro-batch's share of the optimizer step's loss.

    Args:
        token_loss_N: [N] (or any shape) per-token loss, e.g. NLL or PPO surrogate.
        loss_mask_N: same shape, 0/1: which tokens are trained. Masked tokens contribute
            nothing and receive exactly zero gradient (even if their loss is inf/nan).
        sequence_index_N: same shape, int64 sequence id per token (ids distinct within the
            micro-batch; gaps allowed; value ignored where the mask is 0). Only needed for
            ``seq-mean-token-mean``; may be None for the other modes.
        mode: one of ``LOSS_AGG_MODES``.
        step_trained_tokens: trained tokens in the whole optimizer step (all micro-batches
            and ranks): the ``token-mean`` normaliser. Counts mask entries, not weights.
        step_sequences: sequences with >= 1 trained token in the whole step: the
            ``seq-mean-*`` normaliser.
        token_weight_N: optional same-shape per-token weight multiplying the loss.

    Returns:
        0-dim tensor. Summed over the micro-batches and ranks of a step it equals the
        one-big-batch loss (and so does its gradient).
    """
    _check_mode(mode)
    loss = token_loss_N.reshape(-1)
    trained = loss_mask_N.reshape(-1) != 0
    weight = trained.to(loss.dtype)
    if token_weight_N is not None:
        weight = weight * token_weight_N.reshape(-1).to(loss.dtype)
    # where() rather than multiply, so inf/nan at masked positions cannot leak into the
    # value or the gradient.
    weighted = torch.where(trained, loss * weight, torch.zeros_like(loss))

    if mode == "sum":
        return weighted.sum()
    if mode == "token-mean":
        return weighted.sum() / max(float(step_trained_tokens), 1.0)
    if mode == "seq-mean-token-sum":
        return weighted.sum() / max(float(step_sequences), 1.0)

    # seq-mean-token-mean: per-sequence mean over its own trained tokens.
    if sequence_index_N is None:
        raise ValueError("seq-mean-token-mean needs sequence_index_N")
    seq = sequence_index_N.reshape(-1).to(torch.long)
    seq = torch.where(trained, seq, torch.zeros_like(seq))
    if seq.numel() == 0:
        return weighted.sum()
    if int(seq.min()) < 0:
        raise ValueError("sequence_index_N must be >= 0 at trained tokens")
    n_slots = int(seq.max()) + 1
    per_seq_sum = torch.zeros(n_slots, dtype=loss.dtype, device=loss.device)
    per_seq_sum = per_seq_sum.index_add(0, seq, weighted)
    per_seq_count = torch.zeros(n_slots, dtype=loss.dtype, device=loss.device)
    per_seq_count = per_seq_count.index_add(0, seq, trained.to(loss.dtype))
    per_seq_mean = per_seq_sum / per_seq_count.clamp(min=1.0)
    return per_seq_mean.sum() / max(float(step_sequences), 1.0)


def aggregate_padded_token_losses(
    token_loss_BT: torch.Tensor,
    loss_mask_BT: torch.Tensor,
    mode: str,
    *,
    step_trained_tokens: float,
    step_sequences: float,
    token_weight_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    """``aggregate_token_losses`` for a padded batch in which each row is one sequence.

    Args:
        token_loss_BT: [B, T] per-token loss.
        loss_mask_BT: [B, T] 0/1 trained-token mask (padding = 0).
        mode, step_trained_tokens, step_sequences: as in ``aggregate_token_losses``.
        token_weight_BT: optional [B, T] per-token weight.

    Returns:
        0-dim tensor: this micro-batch's share of the step loss.
    """
    if token_loss_BT.dim() != 2:
        raise ValueError(f"expected [B, T] token losses, got shape {tuple(token_loss_BT.shape)}")
    B, T = token_loss_BT.shape
    row_index_BT = torch.arange(B, device=token_loss_BT.device).unsqueeze(1).expand(B, T)
    return aggregate_token_losses(
        token_loss_BT,
        loss_mask_BT,
        row_index_BT,
        mode,
        step_trained_tokens=step_trained_tokens,
        step_sequences=step_sequences,
        token_weight_N=token_weight_BT,
    )


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` != 0 (masked entries cannot leak inf/nan)."""
    return torch.where(mask != 0, values, torch.zeros_like(values)).sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over entries where ``mask`` != 0; 0 when nothing is selected."""
    count = (mask != 0).sum().clamp(min=1).to(values.dtype)
    return masked_sum(values, mask) / count


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` over entries where ``mask`` != 0 (Bessel-corrected if
    ``unbiased`` and more than one entry); 0 when fewer entries than needed."""
    selected = mask != 0
    count = selected.sum()
    mean = masked_mean(values, mask)
    sq = masked_sum((values - mean) ** 2, mask)
    denom = count - 1 if (unbiased and int(count) > 1) else count
    return sq / denom.clamp(min=1).to(values.dtype)
