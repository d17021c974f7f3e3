"""PPO-ptx: a supervised term beside the policy loss of every RL optimizer step.

Ouyang et al. 2022 ("Training language models to follow instructions with human feedback",
eq. 2) add ``gamma * E_pretrain[log pi(x)]`` to the RL objective so that the policy keeps what
the reward does not ask for; OpenRLHF calls the weight ``ptx_coef``. Here the rows are SFT
data (``ptx.data``, rendered and audited as ``posttrain sft`` renders them, masks included),
and the term is ``ptx.coef`` x the token-mean next-token loss of the step's rows.

Which rows an optimizer step reads is a pure function of (seed, RL step, optimizer step
within the update), so a resumed run reads the same rows and the checkpoint holds nothing
for it. Every rank holds every row and trains its share of the step's rows; the loss is
divided by the trained tokens of all of them (every rank knows that count without a
collective), so how the rows are split over micro-batches or ranks never changes it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

import torch

from posttrain.data.batching import (MicroBatch, collate, sample_length, split_across_ranks, split_into_micro_batches,
                                     trained_target_count)
from posttrain.train.loop import MicroResult, sft_micro_batch_loss


@dataclass(frozen=True)
class PtxMix:
    """The rendered SFT rows and how a step uses them."""

    samples: Sequence[Any]  # rendered SFT samples (input_ids, loss_mask, ...)
    coef: float
    rows_per_step: int
    seed: int
    micro_batch_tokens: int
    pad_token_id: int
    chunk_size: int

    @cached_property
    def lengths(self) -> list[int]:  # read on every optimizer step: computed once
        return [sample_length(s) for s in self.samples]


@dataclass(frozen=True)
class PtxStep:
    """This rank's micro-batches of one optimizer step's rows, and the step-wide normalisers."""

    micro_batches: list[MicroBatch]
    trained_tokens: float  # trained targets of every row of the step (all ranks)
    sequences: float


def ptx_rows(count: int, rows: int, *, seed: int, step: int, optimizer_step: int) -> list[int]:
    """Indices (into ``count`` rows) that optimizer step ``optimizer_step`` of RL step ``step``
    trains: ``rows`` distinct rows when there are that many, else every row then repeats.

    >>> ptx_rows(5, 3, seed=0, step=2, optimizer_step=0) == ptx_rows(5, 3, seed=0, step=2, optimizer_step=0)
    True
    >>> sorted(ptx_rows(3, 3, seed=1, step=0, optimizer_step=0))
    [0, 1, 2]
    >>> ptx_rows(0, 3, seed=0, step=0, optimizer_step=0)
    Traceback (most recent call last):
    ValueError: ptx: no SFT rows to draw from
    """
    if count < 1:
        raise ValueError("ptx: no SFT rows to draw from")
    rng = random.Random(f"ptx/{seed}/{step}/{optimizer_step}")
    drawn: list[int] = []
    while len(drawn) < rows:
        drawn += rng.sample(range(count), min(count, rows - len(drawn)))
    return drawn


def ptx_step(mix: PtxMix, step: int, optimizer_step: int, rank: int = 0, world_size: int = 1,
             device: torch.device | None = None) -> PtxStep:
    """The rows of (``step``, ``optimizer_step``), balanced over ranks by tokens, this rank's
    share packed into micro-batches of ``mix.micro_batch_tokens``."""
    rows = ptx_rows(len(mix.samples), mix.rows_per_step, seed=mix.seed, step=step, optimizer_step=optimizer_step)
    lengths = mix.lengths
    # a row drawn twice is two positions of the step: index positions, not rows
    position_lengths = [lengths[i] for i in rows]
    share = split_across_ranks(list(range(len(rows))), position_lengths, world_size)[rank]
    groups = split_into_micro_batches(share, position_lengths, mix.micro_batch_tokens, packing=True)
    batches = [collate([mix.samples[rows[p]] for p in group], packing=True, pad_token_id=mix.pad_token_id)
               for group in groups]
    if device is not None:
        batches = [b.to(device) for b in batches]
    tokens = float(sum(trained_target_count(mix.samples[i]) for i in rows))
    return PtxStep(batches, tokens, float(len(rows)))


def ptx_micro_loss(model: torch.nn.Module, batch: MicroBatch, mix: PtxMix, step_rows: PtxStep) -> MicroResult:
    """This micro-batch's share of ``coef`` x the step rows' token-mean NLL, and ``ptx/nll``
    (its own mean NLL per trained token) as a metric weighted by its trained tokens."""
    result = sft_micro_batch_loss(model, batch, loss_agg_mode="token-mean", step_trained_tokens=step_rows.trained_tokens,
                                  step_sequences=step_rows.sequences, chunk_size=mix.chunk_size)
    count = max(result.count, 1.0)
    return MicroResult(result.loss * mix.coef, result.count, {"ptx/nll": result.nll_sum / count})
