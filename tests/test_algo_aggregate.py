"""loss_agg_mode: hand-computed values and invariance to micro-batching / packing."""

import math

import pytest
import torch

from posttrain.algorithms.aggregate import (
    LOSS_AGG_MODES,
    aggregate_padded_token_losses,
    aggregate_token_losses,
    count_trained,
    count_trained_padded,
    masked_mean,
    masked_var,
)

# Two sequences, padded to T=3:
#   row 0: losses 1, 2, (pad 100)       mask 1 1 0
#   row 1: losses 3, 5, 7               mask 0 1 1
LOSS = torch.tensor([[1.0, 2.0, 100.0], [3.0, 5.0, 7.0]])
MASK = torch.tensor([[1, 1, 0], [0, 1, 1]])


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token-mean", (1 + 2 + 5 + 7) / 4),  # 15 / 4 trained tokens
        ("seq-mean-token-mean", ((1 + 2) / 2 + (5 + 7) / 2) / 2),  # (1.5 + 6) / 2
        ("seq-mean-token-sum", (3 + 12) / 2),
        ("sum", 15.0),
    ],
)
def test_hand_computed_values(mode, expected):
    tokens, seqs = count_trained_padded(MASK)
    assert (tokens, seqs) == (4, 2)
    got = aggregate_padded_token_losses(
        LOSS, MASK, mode, step_trained_tokens=tokens, step_sequences=seqs
    )
    assert got.item() == pytest.approx(expected)


def test_token_weights_multiply_loss_but_not_counts():
    weight = torch.tensor([[2.0, 1.0, 1.0], [1.0, 0.5, 1.0]])
    got = aggregate_padded_token_losses(
        LOSS, MASK, "token-mean", step_trained_tokens=4, step_sequences=2, token_weight_BT=weight
    )
    assert got.item() == pytest.approx((2 * 1 + 2 + 0.5 * 5 + 7) / 4)
    got = aggregate_padded_token_losses(
        LOSS, MASK, "seq-mean-token-mean", step_trained_tokens=4, step_sequences=2,
        token_weight_BT=weight,
    )
    assert got.item() == pytest.approx(((2 + 2) / 2 + (2.5 + 7) / 2) / 2)


def test_masked_inf_and_nan_do_not_leak_into_value_or_gradient():
    loss = torch.tensor([1.0, float("inf"), float("nan"), 3.0], requires_grad=True)
    mask = torch.tensor([1, 0, 0, 1])
    seq = torch.tensor([0, 0, 1, 1])
    for mode in LOSS_AGG_MODES:
        out = aggregate_token_losses(
            loss, mask, seq, mode, step_trained_tokens=2, step_sequences=2
        )
        assert torch.isfinite(out)
        (grad,) = torch.autograd.grad(out, loss)
        assert grad[1] == 0 and grad[2] == 0
        assert grad[0] > 0 and grad[3] > 0


def test_unknown_mode_raises():
    with pytest.raises(ValueError, match="loss_agg_mode"):
        aggregate_padded_token_losses(LOSS, MASK, "mean", step_trained_tokens=4, step_sequences=2)


def _make_sequences(seed=0, n=8):
    """Eight variable-length sequences; token loss = (theta * x)^2 so gradients exist."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(n):
        length = int(torch.randint(2, 9, (1,), generator=g))
        x = torch.randn(length, generator=g)
        mask = (torch.rand(length, generator=g) > 0.3).long()
        mask[-1] = 1  # at least one trained token per sequence
        weight = torch.rand(length, generator=g) + 0.5
        seqs.append((x, mask, weight))
    return seqs


def _padded_microbatch(seqs, theta):
    T = max(len(x) for x, _, _ in seqs)
    x = torch.zeros(len(seqs), T)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    weight = torch.ones(len(seqs), T)
    for i, (xi, mi, wi) in enumerate(seqs):
        x[i, : len(xi)] = xi
        mask[i, : len(xi)] = mi
        weight[i, : len(xi)] = wi
    return (theta * x) ** 2, mask, weight


def _step_loss_padded(seqs, theta, mode, micro_batch_size):
    tokens = sum(int(m.sum()) for _, m, _ in seqs)
    sequences = len(seqs)
    total = 0.0
    for start in range(0, len(seqs), micro_batch_size):
        loss, mask, weight = _padded_microbatch(seqs[start : start + micro_batch_size], theta)
        total = total + aggregate_padded_token_losses(
            loss, mask, mode, step_trained_tokens=tokens, step_sequences=sequences,
            token_weight_BT=weight,
        )
    return total


def _step_loss_packed(seqs, theta, mode, rows):
    """Pack the sequences into `rows` rows (flattened, with sequence ids)."""
    tokens = sum(int(m.sum()) for _, m, _ in seqs)
    total = 0.0
    for r in range(rows):
        chunk = seqs[r::rows]
        x = torch.cat([s[0] for s in chunk])
        mask = torch.cat([s[1] for s in chunk])
        weight = torch.cat([s[2] for s in chunk])
        seq_index = torch.cat([torch.full((len(s[0]),), i) for i, s in enumerate(chunk)])
        # count_trained agrees with what we know
        t, s = count_trained(mask, seq_index)
        assert t == int(mask.sum()) and s == len(chunk)
        total = total + aggregate_token_losses(
            (theta * x) ** 2, mask, seq_index, mode,
            step_trained_tokens=tokens, step_sequences=len(seqs), token_weight_N=weight,
        )
    return total


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_micro_batching_and_packing_change_neither_loss_nor_gradient(mode):
    seqs = _make_sequences()
    results = []
    for layout in [("padded", 8), ("padded", 1), ("padded", 4), ("packed", 1), ("packed", 3)]:
        theta = torch.tensor(1.3, requires_grad=True)
        if layout[0] == "padded":
            loss = _step_loss_padded(seqs, theta, mode, micro_batch_size=layout[1])
        else:
            loss = _step_loss_packed(seqs, theta, mode, rows=layout[1])
        (grad,) = torch.autograd.grad(loss, theta)
        results.append((loss.item(), grad.item()))
    ref_loss, ref_grad = results[0]
    for loss, grad in results[1:]:
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert grad == pytest.approx(ref_grad, rel=1e-5)


def test_token_mean_one_batch_equals_plain_masked_mean():
    seqs = _make_sequences(seed=3)
    theta = torch.tensor(0.7)
    loss, mask, _ = _padded_microbatch(seqs, theta)
    expected = loss[mask.bool()].mean()
    got = _step_loss_padded([(x, m, torch.ones_like(x)) for x, m, _ in seqs], theta, "token-mean", 2)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_naive_per_microbatch_mean_would_differ():
    """Guard that the invariance test is able to fail: averaging per micro-batch means is
    not the same as the step token-mean for unequal micro-batches."""
    seqs = _make_sequences()
    theta = torch.tensor(1.3)
    naive = 0.0
    for start in range(0, 8, 2):
        loss, mask, weight = _padded_microbatch(seqs[start : start + 2], theta)
        naive += (loss * weight)[mask.bool()].mean().item() / 4
    exact = _step_loss_padded(seqs, theta, "token-mean", 8).item()
    assert not math.isclose(naive, exact, rel_tol=1e-3)


def test_masked_mean_and_var():
    v = torch.tensor([1.0, 2.0, 3.0, 100.0])
    m = torch.tensor([1, 1, 1, 0])
    assert masked_mean(v, m).item() == pytest.approx(2.0)
    assert masked_var(v, m).item() == pytest.approx(1.0)  # unbiased: (1+0+1)/2
    assert masked_var(v, m, unbiased=False).item() == pytest.approx(2 / 3)
    assert masked_mean(v, torch.zeros(4)).item() == 0.0


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_two_simulated_ranks_with_gradient_averaging(mode):
    """DDP/FSDP average gradients over ranks: each rank scales its share by world_size."""
    seqs = _make_sequences(seed=5)
    theta_ref = torch.tensor(0.9, requires_grad=True)
    (ref_grad,) = torch.autograd.grad(_step_loss_padded(seqs, theta_ref, mode, 8), theta_ref)
    tokens = sum(int(m.sum()) for _, m, _ in seqs)
    world_size = 2
    rank_grads = []
    for rank in range(world_size):
        theta = torch.tensor(0.9, requires_grad=True)
        loss, mask, weight = _padded_microbatch(seqs[rank::world_size], theta)
        share = aggregate_padded_token_losses(loss, mask, mode, step_trained_tokens=tokens,
                                              step_sequences=len(seqs), token_weight_BT=weight)
        (g,) = torch.autograd.grad(share * world_size, theta)
        rank_grads.append(g)
    averaged = sum(rank_grads) / world_size  # what all-reduce(AVG) produces
    assert averaged.item() == pytest.approx(ref_grad.item(), rel=1e-5)
