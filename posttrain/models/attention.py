"""Packed attention for training: ``posttrain_varlen``, causal scaled-dot-product attention
computed sequence by sequence from ``cu_seq_lens`` (no sequence attends to another, no [T, T]
mask is ever built), registered as a transformers attention implementation. FlexAttention,
the CUDA alternative, lives in ``models/attention_flex.py``."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

VARLEN_ATTENTION = "posttrain_varlen"



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
