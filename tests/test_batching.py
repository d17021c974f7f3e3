"""Step planning, rank split, micro-batches by token budget, packed/padded collation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from posttrain.data.batching import (
    StepPlanner,
    collate_packed,
    collate_padded,
    epoch_order,
    group_into_steps,
    split_across_ranks,
    split_into_micro_batches,
    trained_target_count,
)


def sample(ids, mask, weights=None):
    return SimpleNamespace(input_ids=list(ids), loss_mask=list(mask), weights=weights)


def test_group_into_steps_by_sequences_and_by_tokens():
    order = [4, 0, 3, 1, 2]
    lengths = [10, 20, 30, 40, 50]
    assert group_into_steps(order, lengths, global_batch_size=2) == [[4, 0], [3, 1], [2]]
    # budget 60: 50+10=60 fits, +40 no; 40 alone (+20=60 fits), then 30
    assert group_into_steps(order, lengths, global_batch_tokens=60) == [[4, 0], [3, 1], [2]]
    assert group_into_steps(order, lengths, global_batch_tokens=45) == [[4], [0], [3], [1], [2]]
    with pytest.raises(ValueError):
        group_into_steps(order, lengths)


def test_split_across_ranks_balances_tokens_and_keeps_step_order():
    lengths = [100, 10, 60, 50, 5]
    shares = split_across_ranks([0, 1, 2, 3, 4], lengths, 2)
    # longest first to the lightest rank: 100->r0, 60->r1, 50->r1 (60 < 100), 10->r0 (100 < 110),
    # 5: tie at 110/110 -> lowest rank r0
    assert shares == [[0, 1, 4], [2, 3]]
    assert sum(lengths[i] for i in shares[0]) == 115 and sum(lengths[i] for i in shares[1]) == 110
    assert split_across_ranks([0], lengths, 3) == [[0], [], []]


def test_micro_batches_respect_token_budget_first_fit_decreasing():
    lengths = [7, 3, 5, 2, 6]
    packed = split_into_micro_batches([0, 1, 2, 3, 4], lengths, 10, packing=True)
    assert packed == [[0, 1], [4, 3], [2]]  # 7+3, 6+2, 5
    assert all(sum(lengths[i] for i in mb) <= 10 for mb in packed)
    padded = split_into_micro_batches([0, 1, 2, 3, 4], lengths, 14, packing=False)
    # rows x longest <= 14: [7,6] -> 2x7=14; [5,3,2] -> 3x5=15 too big -> [5,3] (10), [2]
    assert padded == [[0, 4], [2, 1], [3]]
    for mb in padded:
        assert len(mb) * max(lengths[i] for i in mb) <= 14


def test_trained_target_count_ignores_first_token():
    assert trained_target_count(sample([1, 2, 3, 4], [1, 0, 1, 1])) == 2
    assert trained_target_count(sample([1], [1])) == 0


def _planner(lengths, world_size=1, **kw):
    counts = [max(0, n - 2) for n in lengths]
    settings = dict(global_batch_size=4, global_batch_tokens=None, micro_batch_tokens=40, packing=True,
                    world_size=world_size, seed=3)
    settings.update(kw)
    return StepPlanner(lengths, counts, **settings), counts


def test_planner_covers_each_epoch_once_and_reshuffles():
    lengths = [5 + (i * 7) % 23 for i in range(10)]
    planner, counts = _planner(lengths)
    assert planner.steps_per_epoch == 3
    epoch0 = [i for s in range(3) for i in planner.plan(s).sample_indices]
    epoch1 = [i for s in range(3, 6) for i in planner.plan(s).sample_indices]
    assert sorted(epoch0) == list(range(10)) and sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1
    assert planner.plan(4).epoch == 1 and planner.plan(4).index_in_epoch == 1
    plan = planner.plan(1)
    assert plan.trained_tokens == sum(counts[i] for i in plan.sample_indices)
    assert plan.tokens == sum(lengths[i] for i in plan.sample_indices)
    # deterministic: a fresh planner (a resumed run) plans the same step identically
    again, _ = _planner(lengths)
    assert again.plan(4) == planner.plan(4)
    assert planner.total_steps(1.5, None) == 5 and planner.total_steps(1.0, 7) == 7


def test_planner_ranks_have_equal_micro_batch_depth_and_disjoint_samples():
    lengths = [30, 30, 30, 5]
    planner, _ = _planner(lengths, world_size=2, global_batch_size=4, micro_batch_tokens=35)
    plan = planner.plan(0)
    assert len(plan.micro_batches) == 2
    assert len(plan.micro_batches[0]) == len(plan.micro_batches[1])
    seen = [i for rank in plan.micro_batches for mb in rank for i in mb]
    assert sorted(seen) == sorted(plan.sample_indices)
    # 3 ranks for 1 sample: two ranks get a filler (empty) micro-batch
    planner3, _ = _planner([9], world_size=3, global_batch_size=1)
    assert planner3.plan(0).micro_batches == (((0,),), ((),), ((),))


def test_epoch_order_is_a_seeded_permutation():
    assert sorted(epoch_order(7, 0, 0)) == list(range(7))
    assert epoch_order(7, 0, 0) == epoch_order(7, 0, 0)
    assert epoch_order(7, 0, 0) != epoch_order(7, 0, 1)
    assert epoch_order(5, 0, 0, shuffle=False) == [0, 1, 2, 3, 4]


def test_collate_packed_positions_restart_and_cu_seq_lens():
    batch = collate_packed([sample([5, 6, 7], [0, 1, 1]), sample([8, 9], [0, 1], weights=[1.0, 0.5])])
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert batch.loss_mask.tolist() == [[0, 1, 1, 0, 1]]
    assert batch.cu_seq_lens.tolist() == [0, 3, 5]
    assert batch.weights.tolist() == [[1.0, 1.0, 1.0, 1.0, 0.5]]
    assert batch.max_seq_len == 3 and batch.num_tokens == 5 and batch.packed
    filler = collate_packed([], pad_token_id=2)
    assert filler.loss_mask.sum() == 0 and filler.num_tokens == 0


def test_collate_padded_right_pads_with_attention_mask():
    batch = collate_padded([sample([5, 6, 7], [0, 1, 1]), sample([8, 9], [0, 1])], pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.loss_mask.tolist() == [[0, 1, 1], [0, 1, 0]]
    assert batch.weights is None and not batch.packed and batch.num_tokens == 5
    assert batch.input_ids.dtype == torch.long
