"""Packed and shared-prompt attention on GPU with FlexAttention and a block-sparse mask.

``posttrain_varlen`` (``models.attention.varlen_sdpa_attention``) runs one scaled-dot-product
attention per packed sequence: exact, and cheap on a CPU, but on a GPU it launches one
kernel per sequence per layer and, for the shared-prompt layout, feeds each block a dense
[L, L] boolean mask (which rules out the flash kernel). This module registers
``posttrain_flex``, the same attention computed by one ``flex_attention`` call over the
whole packed row with a ``BlockMask``:

- plain packing (``data.batching.collate_packed``): the document mask, causal inside each
  sequence of ``cu_seq_lens`` and blind across them (the "document masking / jagged
  sequences" example of the FlexAttention docs and blog:
  https://pytorch.org/docs/stable/nn.attention.flex_attention.html,
  https://pytorch.org/blog/flexattention/);
- shared prompt (``data.batching.collate_shared_prompt``): inside each block the prompt is
  causal, every completion sees the whole prompt and its own earlier tokens, never a sibling
  (the tree / prefix-sharing mask of the same blog).

Both are one mask rule over three per-token vectors, row ``q`` may attend to column ``kv``
iff::

    doc_start[q] <= kv <= q  and  (kv < prefix_end[q]  or  kv >= run_start[q])

(plain packing: ``prefix_end = run_start = doc_start``; shared prompt: ``prefix_end`` is the
prompt's end for completion rows, ``run_start`` the completion's first token). The vectors
are read off the block masks the batch carries and checked to reproduce them exactly, so any
block mask this rule cannot express is refused instead of silently changed.

FlexAttention's fused kernels need ``torch.compile`` and a GPU (CUDA); elsewhere the eager
implementation materialises the scores, which is only good for checking (the tests compare
it with ``posttrain_varlen`` on CPU, outputs and gradients). torch refuses ``flex_attention``
backward on a CPU, so training with ``posttrain_flex`` needs CUDA; ``resolve_attention``
refuses it on a CPU in one line.

``auto`` (``model.attn_implementation: auto``) picks ``posttrain_flex`` on CUDA and
``posttrain_varlen`` elsewhere. ``benchmarks/gpu/bench_attention.py`` measures the two on
the GPU (packed and shared-prompt batches); see docs/PERFORMANCE.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from posttrain.errors import ConfigError

FLEX_ATTENTION = "posttrain_flex"
AUTO_ATTENTION = "auto"
_MASK_BLOCK = 128  # BlockMask's default tile; per-token vectors are padded to a multiple of it

# The last (cu_seq_lens, block_masks, device) -> BlockMask: every layer of one forward passes
# the same tensors, so the mask is built once per forward (and reused by checkpoint recompute).
_last_mask: tuple[Any, Any, Any, Any] | None = None
_compiled_flex: Any = None


# ----------------------------------------------------------------------------- mask vectors


def _rule_vectors_of_block(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefix_end, run_start) [L] of one [L, L] block mask, block-local indices.

    Row q's visible columns must be ``[0, prefix_end[q]) ∪ [run_start[q], q]``: a leading run
    of True (the shared prompt) and a trailing run ending on the diagonal (the row's own
    sequence). Raises ValueError if the mask is anything else (checked exactly).
    """
    L = block_mask.shape[0]
    if block_mask.shape != (L, L):
        raise ValueError(f"a block mask must be square, got {tuple(block_mask.shape)}")
    mask = block_mask.to(torch.bool)
    rows = torch.arange(L, device=mask.device)
    prefix_end = torch.cumprod(mask.to(torch.int32), dim=1).sum(dim=1)
    upper = rows[None, :] > rows[:, None]  # columns right of the diagonal count as True here
    trailing = torch.cumprod((mask | upper).flip(1).to(torch.int32), dim=1).sum(dim=1)  # from the last column back
    run_start = rows + 1 - (trailing - (L - 1 - rows))  # the diagonal's run of True, back to its start
    prefix_end = torch.minimum(prefix_end, rows + 1)
    rebuilt = _rule_mask(prefix_end, run_start, rows)
    if not torch.equal(rebuilt, mask):
        raise ValueError("posttrain_flex: a block mask is not of the form 'causal prefix + own causal run' "
                         "(the shared-prompt layout); use attn_implementation=posttrain_varlen")
    return prefix_end, run_start


def _rule_mask(prefix_end: torch.Tensor, run_start: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Dense [L, L] mask of the rule (one block, block-local indices), for checking."""
    q, kv = rows[:, None], rows[None, :]
    return (kv <= q) & ((kv < prefix_end[:, None]) | (kv >= run_start[:, None]))


def mask_vectors(cu_seq_lens: torch.Tensor, block_masks: Sequence[torch.Tensor] | None,
                 total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (doc_start, prefix_end, run_start), global indices, int32, on cu_seq_lens' device.

    Args:
        cu_seq_lens: [S + 1] cumulative block lengths (``cu_seq_lens[-1] == total``).
        block_masks: None (plain packing: causal inside each block), or one [L_s, L_s] bool
            mask per block (shared-prompt layout).
        total: T, tokens in the packed row.

    Returns:
        three [T_pad] int32 tensors, T_pad = T rounded up to a multiple of 128; padded rows
        get ``doc_start = T_pad`` (they see nothing, and nothing sees them).
    """
    device = cu_seq_lens.device
    bounds = cu_seq_lens.to(torch.long)
    lengths = bounds[1:] - bounds[:-1]
    if int(bounds[-1]) != total:
        raise ValueError(f"cu_seq_lens ends at {int(bounds[-1])} but the packed row has {total} tokens")
    doc_start = torch.repeat_interleave(bounds[:-1], lengths)
    if block_masks is None:
        prefix_end, run_start = doc_start, doc_start
    else:
        if len(block_masks) != len(lengths):
            raise ValueError(f"{len(block_masks)} block masks for {len(lengths)} blocks of cu_seq_lens")
        prefix_parts, run_parts = [], []
        for start, mask in zip(bounds[:-1].tolist(), block_masks):
            prefix, run = _rule_vectors_of_block(mask.to(device))
            prefix_parts.append(prefix + start)
            run_parts.append(run + start)
        prefix_end, run_start = torch.cat(prefix_parts), torch.cat(run_parts)
        if prefix_end.numel() != total:
            raise ValueError(f"block masks cover {prefix_end.numel()} tokens, the packed row has {total}")
    padded = -(-total // _MASK_BLOCK) * _MASK_BLOCK
    fill = torch.full((padded - total,), padded, dtype=torch.long, device=device)
    return tuple(torch.cat([v.to(torch.long), fill]).to(torch.int32) for v in (doc_start, prefix_end, run_start))


def build_block_mask(cu_seq_lens: torch.Tensor, block_masks: Sequence[torch.Tensor] | None, total: int):
    """The FlexAttention ``BlockMask`` of a packed row (document or shared-prompt mask)."""
    from torch.nn.attention.flex_attention import create_block_mask

    doc_start, prefix_end, run_start = mask_vectors(cu_seq_lens, block_masks, total)

    def mask_mod(b, h, q_idx, kv_idx):
        return ((kv_idx <= q_idx) & (kv_idx >= doc_start[q_idx])
                & ((kv_idx < prefix_end[q_idx]) | (kv_idx >= run_start[q_idx])))

    device = cu_seq_lens.device
    return create_block_mask(mask_mod, None, None, total, total, device=device, _compile=device.type == "cuda")


def _block_mask_for(cu_seq_lens: torch.Tensor, block_masks: Sequence[torch.Tensor] | None, total: int):
    global _last_mask
    if (_last_mask is not None and _last_mask[0] is cu_seq_lens and _last_mask[1] is block_masks
            and _last_mask[2] == total):
        return _last_mask[3]
    mask = build_block_mask(cu_seq_lens, block_masks, total)
    _last_mask = (cu_seq_lens, block_masks, total, mask)
    return mask


def _flex_function(device: torch.device):
    """``flex_attention`` compiled (fused kernels) on CUDA, eager elsewhere (reference math)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


# ----------------------------------------------------------------------------- attention


def flex_packed_attention(
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
    """Causal attention inside each packed sequence via one ``flex_attention`` call
    (transformers attention interface; same contract as ``models.attention.varlen_sdpa_attention``).

    Args:
        query: [1, Hq, T, D]; key, value: [1, Hkv, T, D] (packed row, batch of one).
        cu_seq_lens_q: [S + 1] cumulative sequence lengths; None (or a padded batch's
            ``attention_mask``) falls back to plain causal SDPA over each row.
        posttrain_block_masks: optional, one [L_s, L_s] bool mask per block of
            ``cu_seq_lens_q`` (shared-prompt layout), honoured exactly.

    Returns:
        ([1, T, Hq, D] attention output, None).
    """
    if cu_seq_lens_q is None or attention_mask is not None:
        import torch.nn.functional as F

        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
            is_causal=attention_mask is None and query.shape[2] > 1, enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2).contiguous(), None
    if query.shape[0] != 1:
        raise ValueError("packed attention expects a single packed row")
    if dropout:
        raise ValueError("posttrain_flex has no attention dropout; set the model's attention_dropout to 0")
    block_mask = _block_mask_for(cu_seq_lens_q, posttrain_block_masks, query.shape[2])
    out = _flex_function(query.device)(query, key, value, block_mask=block_mask, scale=scaling,
                                       enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register_flex_attention() -> str:
    """Make ``posttrain_flex`` a transformers attention implementation; returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(FLEX_ATTENTION, flex_packed_attention)
    return FLEX_ATTENTION


def resolve_attention(requested: str, device: torch.device) -> str:
    """The registered backend for ``posttrain_flex`` or ``auto`` on ``device``.

    ``auto``: ``posttrain_flex`` on CUDA, else ``posttrain_varlen``. ``posttrain_flex`` on a
    CPU raises ConfigError (torch has no CPU backward for ``flex_attention``).
    """
    if requested == AUTO_ATTENTION:
        if device.type == "cuda":
            return register_flex_attention()
        from posttrain.models.attention import register_varlen_attention

        return register_varlen_attention()
    if requested == FLEX_ATTENTION:
        if device.type == "cpu":
            raise ConfigError("model.attn_implementation=posttrain_flex: torch's flex_attention has no CPU backward; "
                             "train on CUDA, or use posttrain_varlen (the default) on a CPU")
        return register_flex_attention()
    raise ValueError(f"not a posttrain attention backend: {requested!r}")
