"""Which samples go into which optimizer step, rank and micro-batch, and how a micro-batch
is laid out as tensors (padding-free packing or padded rows).

The way a batch is split must never change what is learned (docs/ARCHITECTURE.md,
"Split invariance"; docs/PREFLIGHT.md on micro-batches vs accumulation). The plan here is a pure function of the
sample lengths, the seed and the step number, so:

- every rank computes the SAME plan for all ranks without communicating, and so knows the
  step-wide normalisers (trained tokens and sequences of the whole optimizer step) before
  any forward pass (``StepPlan.trained_tokens`` / ``trained_sequences``);
- the data position of a resumed run is just the step number (exact resume);
- every rank runs the same number of micro-batches (a rank with less data runs empty
  micro-batches), which FSDP's collective forward/backward needs.

Global batch: ``global_batch_size`` sequences per optimizer step, or ``global_batch_tokens``
(sequences are added while the step stays within the budget; at least one). Each epoch
reshuffles with ``seed + epoch``. Inside a step, a rank's sequences are split into
micro-batches by a token budget (first-fit decreasing); a sequence is never split, which is
what ``algorithms.aggregate`` needs for per-sequence normalisers.

Layouts:
- packed (padding-free): one row ``[1, T]`` holding several sequences back to back,
  ``position_ids`` restarting at 0 for each, and ``cu_seq_lens`` (cumulative lengths, the
  flash-attention varlen convention) so attention never crosses a sequence boundary;
- padded: ``[B, T_max]`` rows, right padding, a 0/1 ``attention_mask``;
- shared-prompt (RL): each group's prompt once, then its completions, all in one block whose
  boolean mask lets every completion see the prompt and its own earlier tokens, never a
  sibling (``collate_shared_prompt``). A group of G completions of length C after a prompt
  of length P costs ``P + G*C`` tokens instead of ``G*(P + C)``; the math is unchanged.

Samples are duck-typed: anything with ``input_ids``, ``loss_mask`` and optionally
``weights`` (``posttrain.data.render.RenderedSample``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch


def sample_length(sample: Any) -> int:
    return len(sample.input_ids)


def trained_target_count(sample: Any) -> int:
    """Targets the loss will see for one sample: its mask shifted by one (the first token
    of a sequence is never a target; see ``algorithms.sft.next_token_targets``)."""
    return int(sum(1 for flag in sample.loss_mask[1:] if flag))


# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class StepPlan:
    """The samples of one optimizer step, split into ranks and micro-batches.

    micro_batches[rank][k] is a list of sample indices (possibly empty: a padding
    micro-batch that keeps ranks in lock-step). ``trained_tokens`` / ``trained_sequences``
    count the whole step over all ranks: the ``aggregate`` normalisers.
    """

    step: int
    epoch: int
    index_in_epoch: int
    steps_in_epoch: int
    sample_indices: tuple[int, ...]
    micro_batches: tuple[tuple[tuple[int, ...], ...], ...]
    tokens: int
    trained_tokens: int
    trained_sequences: int

    @property
    def epoch_progress(self) -> float:
        """Fractional epoch reached at the END of this step (for the ``epoch`` metric)."""
        return self.epoch + (self.index_in_epoch + 1) / self.steps_in_epoch


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The sample order of one epoch: a permutation seeded by ``seed`` and ``epoch``."""
    order = list(range(num_samples))
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def group_into_steps(
    order: Sequence[int],
    lengths: Sequence[int],
    *,
    global_batch_size: int | None = None,
    global_batch_tokens: int | None = None,
) -> list[list[int]]:
    """Cut an epoch's order into optimizer steps: by sequence count or by token budget.

    The last step of an epoch may be smaller (its normaliser counts what it holds, so it is
    still an exact mean over its own tokens).
    """
    if (global_batch_size is None) == (global_batch_tokens is None):
        raise ValueError("give exactly one of global_batch_size, global_batch_tokens")
    steps: list[list[int]] = []
    if global_batch_size is not None:
        for start in range(0, len(order), global_batch_size):
            steps.append(list(order[start : start + global_batch_size]))
        return steps
    current: list[int] = []
    current_tokens = 0
    for index in order:
        length = lengths[index]
        if current and current_tokens + length > global_batch_tokens:
            steps.append(current)
            current, current_tokens = [], 0
        current.append(index)
        current_tokens += length
    if current:
        steps.append(current)
    return steps


def split_across_ranks(indices: Sequence[int], lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Balance a step's samples over ranks by tokens (longest first, to the lightest rank).

    Deterministic: ties go to the lowest rank. Each rank's list keeps the step order.
    """
    shares: list[list[int]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    position = {index: k for k, index in enumerate(indices)}
    for index in sorted(indices, key=lambda i: (-lengths[i], position[i])):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        shares[rank].append(index)
        load[rank] += lengths[index]
    return [sorted(share, key=position.__getitem__) for share in shares]


def split_into_micro_batches(
    indices: Sequence[int], lengths: Sequence[int], micro_batch_tokens: int, *, packing: bool
) -> list[list[int]]:
    """Group sequences into micro-batches within a token budget (first-fit decreasing).

    Packed: the sum of lengths stays within the budget. Padded: rows x longest row stays
    within it. A sequence longer than the budget gets a micro-batch of its own (the config
    check refuses such settings before training; this keeps the function total).
    """
    bins: list[list[int]] = []
    bin_tokens: list[int] = []  # packed: sum of lengths; padded: rows * max length
    bin_longest: list[int] = []
    for index in sorted(indices, key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        placed = False
        for b in range(len(bins)):
            if packing:
                fits = bin_tokens[b] + length <= micro_batch_tokens
            else:
                fits = (len(bins[b]) + 1) * max(bin_longest[b], length) <= micro_batch_tokens
            if fits:
                bins[b].append(index)
                bin_longest[b] = max(bin_longest[b], length)
                bin_tokens[b] = (bin_tokens[b] + length) if packing else len(bins[b]) * bin_longest[b]
                placed = True
                break
        if not placed:
            bins.append([index])
            bin_tokens.append(length)
            bin_longest.append(length)
    return bins


class StepPlanner:
    """Deterministic plan of every optimizer step: ``planner.plan(step)`` for any step.

    Args:
        lengths: token count of each sample.
        trained_counts: trained targets of each sample (``trained_target_count``).
        global_batch_size / global_batch_tokens: one of them, the step size.
        micro_batch_tokens: per-rank token budget of one forward/backward.
        packing: padding-free packing (else padded rows).
        world_size: number of data-parallel ranks.
        seed: data-order seed (epoch e uses seed and e).
        shuffle: reshuffle each epoch.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        trained_counts: Sequence[int],
        *,
        global_batch_size: int | None,
        global_batch_tokens: int | None,
        micro_batch_tokens: int,
        packing: bool,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if not lengths:
            raise ValueError("no samples to plan")
        self.lengths = list(lengths)
        self.trained_counts = list(trained_counts)
        self.global_batch_size = global_batch_size
        self.global_batch_tokens = global_batch_tokens
        self.micro_batch_tokens = micro_batch_tokens
        self.packing = packing
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self._epochs: dict[int, list[list[int]]] = {}
        self._epoch_starts: list[int] = [0]  # global step at which epoch e starts

    def epoch_steps(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            order = epoch_order(len(self.lengths), self.seed, epoch, self.shuffle)
            self._epochs[epoch] = group_into_steps(
                order, self.lengths, global_batch_size=self.global_batch_size,
                global_batch_tokens=self.global_batch_tokens,
            )
        return self._epochs[epoch]

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in epoch 0 (by token budget, later epochs may differ by a step)."""
        return len(self.epoch_steps(0))

    def total_steps(self, epochs: float, max_steps: int | None) -> int:
        if max_steps is not None:
            return max_steps
        return max(1, math.ceil(epochs * self.steps_per_epoch - 1e-9))

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, index in epoch) of global optimizer step ``step`` (0-based)."""
        epoch = 0
        start = 0
        while True:
            count = len(self.epoch_steps(epoch))
            if step < start + count:
                return epoch, step - start
            start += count
            epoch += 1

    def plan(self, step: int) -> StepPlan:
        epoch, index_in_epoch = self.locate(step)
        steps = self.epoch_steps(epoch)
        indices = steps[index_in_epoch]
        per_rank = split_across_ranks(indices, self.lengths, self.world_size)
        micro = [
            split_into_micro_batches(share, self.lengths, self.micro_batch_tokens, packing=self.packing)
            for share in per_rank
        ]
        depth = max(len(m) for m in micro)
        padded = tuple(tuple(tuple(mb) for mb in m) + ((),) * (depth - len(m)) for m in micro)
        return StepPlan(
            step=step,
            epoch=epoch,
            index_in_epoch=index_in_epoch,
            steps_in_epoch=len(steps),
            sample_indices=tuple(indices),
            micro_batches=padded,
            tokens=sum(self.lengths[i] for i in indices),
            trained_tokens=sum(self.trained_counts[i] for i in indices),
            trained_sequences=sum(1 for i in indices if self.trained_counts[i] > 0),
        )

    def iter_plans(self, start_step: int, total_steps: int) -> Iterator[StepPlan]:
        for step in range(start_step, total_steps):
            yield self.plan(step)


# ----------------------------------------------------------------------------- collation


@dataclass
class PredictedTokens:
    """Per trained token of a micro-batch, in sample order (N tokens): ``index`` [N], the flat
    row position whose hidden state predicts it; ``targets`` [N], its id; ``sequence`` [N], its
    sample's index in the micro-batch. All int64."""

    index: torch.Tensor
    targets: torch.Tensor
    sequence: torch.Tensor


@dataclass
class MicroBatch:
    """Tensors of one forward/backward.

    input_ids, loss_mask, weights: [B, T] (packed: B = 1).
    position_ids: [B, T], restarting at 0 per packed sequence.
    attention_mask: [B, T] 0/1 for padded rows; None when packed.
    cu_seq_lens: [S + 1] int32 cumulative sequence lengths when packed (varlen attention).
    max_seq_len: longest sequence (packed).
    num_tokens: real (non-padding) tokens.
    block_masks: shared-prompt layout only: per ``cu_seq_lens`` block, a [L, L] bool mask
        (True = may attend) replacing plain causal attention inside that block.
    predicted: shared-prompt layout only (``PredictedTokens``): where each trained token is
        predicted from, since there a completion's first token is predicted by its prompt's
        last position, not by the position before it in the row.
    """

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    weights: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    cu_seq_lens: torch.Tensor | None = None
    max_seq_len: int = 0
    num_tokens: int = 0
    predicted: PredictedTokens | None = None
    block_masks: list[torch.Tensor] | None = None

    @property
    def packed(self) -> bool:
        return self.cu_seq_lens is not None

    def to(self, device: torch.device | str) -> "MicroBatch":
        def move(t):
            return t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t

        return MicroBatch(
            move(self.input_ids), move(self.loss_mask), move(self.position_ids), move(self.weights),
            move(self.attention_mask), move(self.cu_seq_lens), self.max_seq_len, self.num_tokens,
            None if self.predicted is None else PredictedTokens(*(move(t) for t in (
                self.predicted.index, self.predicted.targets, self.predicted.sequence))),
            None if self.block_masks is None else [move(m) for m in self.block_masks],
        )


def shared_prompt_block_mask(prompt_length: int, completion_lengths: Sequence[int]) -> torch.Tensor:
    """Attention mask of one shared-prompt block: [L, L] bool, L = P + sum(C_i), True = may attend.

    Prompt rows attend causally within the prompt; completion i's rows attend to the whole
    prompt and causally within completion i (never to another completion).

    Example, P = 2, C = (1, 2) (rows = queries):
    ``[[1,0,0,0,0], [1,1,0,0,0], [1,1,1,0,0], [1,1,0,1,0], [1,1,0,1,1]]``.
    """
    total = prompt_length + sum(completion_lengths)
    mask = torch.zeros(total, total, dtype=torch.bool)
    mask[:prompt_length, :prompt_length] = torch.ones(prompt_length, prompt_length, dtype=torch.bool).tril()
    start = prompt_length
    for length in completion_lengths:
        end = start + length
        mask[start:end, :prompt_length] = True
        mask[start:end, start:end] = torch.ones(length, length, dtype=torch.bool).tril()
        start = end
    return mask


def collate_shared_prompt(groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]
                                         | tuple[Sequence[int], Sequence[Sequence[int]], Sequence[Sequence[int] | None]]]
                          ) -> MicroBatch:
    """Lay out (prompt ids, [completion ids, ...]) groups with each prompt stored once.

    Per group one block ``prompt + completion_1 + ... + completion_k``; position ids run
    0..P-1 over the prompt and P..P+C_i-1 over each completion (what each would have alone).
    A completion's first token is predicted by the prompt's last position, shared by the
    group; later tokens by the previous token of the same completion. Response tokens come
    out in sample order (group by group, completion by completion) in ``predicted``.

    A group may carry a third element, one mask per completion (1 = trained, 0 = an env
    token of a multi-turn trajectory; None = all trained): only trained tokens are listed.
    """
    ids: list[int] = []
    mask: list[int] = []
    positions: list[int] = []
    predict_index: list[int] = []
    predict_targets: list[int] = []
    predict_sequence: list[int] = []
    block_masks: list[torch.Tensor] = []
    cu = [0]
    longest = 0
    sample = 0
    for prompt, completions, *rest in groups:
        completion_masks = rest[0] if rest else [None] * len(completions)
        if not prompt:
            raise ValueError("a shared-prompt group needs a non-empty prompt")
        start = len(ids)
        ids.extend(prompt)
        mask.extend([0] * len(prompt))
        positions.extend(range(len(prompt)))
        for completion, completion_mask in zip(completions, completion_masks):
            offset = len(ids)
            trained = [1] * len(completion) if completion_mask is None else list(completion_mask)
            ids.extend(completion)
            mask.extend(trained)
            positions.extend(range(len(prompt), len(prompt) + len(completion)))
            for j, token in enumerate(completion):
                if not trained[j]:
                    continue
                predict_index.append(start + len(prompt) - 1 if j == 0 else offset + j - 1)
                predict_targets.append(int(token))
                predict_sequence.append(sample)
            longest = max(longest, len(prompt) + len(completion))
            sample += 1
        block_masks.append(shared_prompt_block_mask(len(prompt), [len(c) for c in completions]))
        cu.append(len(ids))
    return MicroBatch(
        input_ids=torch.tensor([ids], dtype=torch.long),
        loss_mask=torch.tensor([mask], dtype=torch.long),
        position_ids=torch.tensor([positions], dtype=torch.long),
        cu_seq_lens=torch.tensor(cu, dtype=torch.int32),
        max_seq_len=longest,
        num_tokens=len(ids),
        predicted=PredictedTokens(torch.tensor(predict_index, dtype=torch.long),
                                  torch.tensor(predict_targets, dtype=torch.long),
                                  torch.tensor(predict_sequence, dtype=torch.long)),
        block_masks=block_masks,
    )


def _weights_of(sample: Any) -> list[float] | None:
    weights = getattr(sample, "weights", None)
    return None if weights is None else list(weights)


def collate_packed(samples: Sequence[Any], pad_token_id: int = 0) -> MicroBatch:
    """Concatenate samples into one padding-free row with restarting position ids.

    An empty ``samples`` gives a one-token row with nothing trained (a rank's filler
    micro-batch that keeps FSDP collectives in lock-step).
    """
    if not samples:
        return MicroBatch(
            input_ids=torch.full((1, 1), pad_token_id, dtype=torch.long),
            loss_mask=torch.zeros((1, 1), dtype=torch.long),
            position_ids=torch.zeros((1, 1), dtype=torch.long),
            cu_seq_lens=torch.tensor([0, 1], dtype=torch.int32),
            max_seq_len=1,
            num_tokens=0,
        )
    ids: list[int] = []
    mask: list[int] = []
    positions: list[int] = []
    weights: list[float] = []
    any_weights = any(_weights_of(s) is not None for s in samples)
    cu = [0]
    for sample in samples:
        n = len(sample.input_ids)
        ids.extend(sample.input_ids)
        mask.extend(int(bool(m)) for m in sample.loss_mask)
        positions.extend(range(n))
        if any_weights:
            w = _weights_of(sample)
            weights.extend(w if w is not None else [1.0] * n)
        cu.append(cu[-1] + n)
    return MicroBatch(
        input_ids=torch.tensor([ids], dtype=torch.long),
        loss_mask=torch.tensor([mask], dtype=torch.long),
        position_ids=torch.tensor([positions], dtype=torch.long),
        weights=torch.tensor([weights], dtype=torch.float32) if any_weights else None,
        cu_seq_lens=torch.tensor(cu, dtype=torch.int32),
        max_seq_len=max(len(s.input_ids) for s in samples),
        num_tokens=len(ids),
    )


def collate_padded(samples: Sequence[Any], pad_token_id: int) -> MicroBatch:
    """Right-pad samples into ``[B, T_max]`` rows with an attention mask."""
    if not samples:
        return MicroBatch(
            input_ids=torch.full((1, 1), pad_token_id, dtype=torch.long),
            loss_mask=torch.zeros((1, 1), dtype=torch.long),
            position_ids=torch.zeros((1, 1), dtype=torch.long),
            attention_mask=torch.ones((1, 1), dtype=torch.long),
            num_tokens=0,
        )
    longest = max(len(s.input_ids) for s in samples)
    B = len(samples)
    input_ids = torch.full((B, longest), pad_token_id, dtype=torch.long)
    loss_mask = torch.zeros((B, longest), dtype=torch.long)
    attention_mask = torch.zeros((B, longest), dtype=torch.long)
    any_weights = any(_weights_of(s) is not None for s in samples)
    weights = torch.zeros((B, longest), dtype=torch.float32) if any_weights else None
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        input_ids[row, :n] = torch.tensor(sample.input_ids, dtype=torch.long)
        loss_mask[row, :n] = torch.tensor([int(bool(m)) for m in sample.loss_mask], dtype=torch.long)
        attention_mask[row, :n] = 1
        if weights is not None:
            w = _weights_of(sample)
            weights[row, :n] = torch.tensor(w if w is not None else [1.0] * n, dtype=torch.float32)
    position_ids = torch.arange(longest, dtype=torch.long).unsqueeze(0).expand(B, longest).contiguous()
    return MicroBatch(
        input_ids=input_ids, loss_mask=loss_mask, position_ids=position_ids, weights=weights,
        attention_mask=attention_mask, num_tokens=int(attention_mask.sum()),
    )


def collate(samples: Sequence[Any], *, packing: bool, pad_token_id: int) -> MicroBatch:
    return collate_packed(samples, pad_token_id) if packing else collate_padded(samples, pad_token_id)
