"""Log-probs (and entropies) of the response tokens of a packed micro-batch, and a critic's
values at the positions that predict them: what RL's rollout-time passes, its update and DPO
all read from a model.

The model runs to its final hidden states (``models.prepare.forward_hidden``); log-probs and
entropies are computed only at the positions that predict trained tokens, chunk by chunk
(``algorithms.sft.chunked_token_logprobs_and_entropy``), so the [T, vocab] logits of a long
row never exist at once. Tokens come out in sample order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.algorithms.sft import (
    chunked_token_logprobs_and_entropy,
    next_token_targets,
    sequence_index_from_position_ids,
)
from posttrain.data.batching import MicroBatch
from posttrain.models.prepare import forward_hidden
from posttrain.models.scalar_head import token_values


@dataclass
class ResponseTokens:
    """Per response token of one micro-batch, N = its response tokens (sample order).

    logp, entropy: [N] float32 (carry grad when computed with grad); sequence_index: [N].
    values: [N] critic values at the predicting positions (when a critic ran).
    """

    logp: torch.Tensor
    entropy: torch.Tensor | None
    sequence_index: torch.Tensor


def response_token_logprobs(model: torch.nn.Module, batch: MicroBatch, *, temperature: float, chunk_size: int,
                            with_entropy: bool) -> ResponseTokens:
    """log pi(response token) (and entropy) for every response token of a packed micro-batch."""
    hidden_BTH, lm_head_weight = forward_hidden(model, batch)
    index, targets, sequence_index = response_positions(batch)
    hidden = hidden_BTH.reshape(-1, hidden_BTH.shape[-1]).index_select(0, index)
    logp, entropy = chunked_token_logprobs_and_entropy(
        hidden, lm_head_weight, targets, chunk_size, temperature=temperature, with_entropy=with_entropy)
    return ResponseTokens(logp, entropy, sequence_index)


def response_token_values(critic: torch.nn.Module, batch: MicroBatch) -> torch.Tensor:
    """The critic's value at each position that predicts a response token: [N] (sample order)."""

    return token_values(critic, batch).reshape(-1).index_select(0, response_positions(batch)[0])


def response_positions(batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per response token (N, sample order): the flat row position whose hidden state predicts
    it, its id and its sample's index in the micro-batch; each [N] int64.

    The shared-prompt layout lists them (``data.batching.collate_shared_prompt``); in packed
    rows position t predicts t + 1 within its own sequence (``algorithms.sft.next_token_targets``).
    """
    if batch.predicted is not None:
        return batch.predicted.index, batch.predicted.targets, batch.predicted.sequence
    sequence_index = sequence_index_from_position_ids(batch.position_ids).reshape(-1)
    shifted = next_token_targets(batch.input_ids.reshape(-1), batch.loss_mask.reshape(-1), None, sequence_index)
    index = shifted.target_mask.nonzero().squeeze(-1)
    return index, shifted.targets[index], sequence_index[index]
