"""Perplexity of a model on a held-out chat file, over the tokens SFT would train.

Held-out loss/perplexity is necessary but not sufficient (docs/PIPELINE.md, "Evaluate more than the loss"). Each
conversation is rendered exactly as for training (``posttrain.data.render``), so the
measured tokens are the assistant tokens (the loss mask) and perplexity is
``exp(sum of token NLL / number of trained tokens)`` over the whole file (token-weighted,
not an average of per-conversation perplexities).
"""

from __future__ import annotations

import math
import random

import torch

from posttrain.errors import DataError
from posttrain.data.formats import conversation_from_row, read_rows
from posttrain.data.render import render_conversation, truncate_sample


def masked_token_nll(logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor, loss_mask_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token NLL over positions whose target is trained, and their count.

    ``logits_BTV: [B, T, V]`` predicts token ``t + 1`` at position ``t``; ``loss_mask_BT[b, t]
    == 1`` marks token ``t`` as a target. Returns ``(nll_sum, token_count)`` (scalars).
    """
    logp = torch.log_softmax(logits_BTV[:, :-1].float(), dim=-1)
    targets = input_ids_BT[:, 1:]
    mask = loss_mask_BT[:, 1:].to(logp.dtype)
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (nll * mask).sum(), mask.sum()


@torch.no_grad()
def perplexity(model, tokenizer, path: str, *, limit: int | None = None, seed: int | None = None,
               max_length: int = 2048) -> dict[str, float]:
    """``{"ppl", "nll", "tokens", "conversations"}`` of ``model`` on chat file ``path``."""

    rows = list(read_rows(path))
    if seed is not None:
        random.Random(seed).shuffle(rows)
    rows = rows[:limit] if limit is not None else rows
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens, used = 0.0, 0.0, 0
    try:
        for n, row in rows:
            conversation = conversation_from_row(row, f"{path}:{n}")
            for sample in render_conversation(conversation.messages, tokenizer, tools=conversation.tools, line=n, source=path):
                if len(sample.input_ids) > max_length:
                    sample = truncate_sample(sample, max_length)
                ids = torch.tensor([sample.input_ids], device=device)
                mask = torch.tensor([sample.loss_mask], device=device)
                logits = model(input_ids=ids).logits
                nll, count = masked_token_nll(logits, ids, mask)
                total_nll += float(nll)
                total_tokens += float(count)
            used += 1
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise DataError(f"{path}: no assistant tokens to measure perplexity on")
    mean_nll = total_nll / total_tokens
    return {"ppl": math.exp(mean_nll), "nll": mean_nll, "tokens": int(total_tokens), "conversations": used}
