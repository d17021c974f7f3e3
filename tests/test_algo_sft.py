"""SFT loss: the shift, packed boundaries, and chunked logits vs the plain computation."""

import math

import pytest
import torch
import torch.nn.functional as F

from posttrain.algorithms.aggregate import aggregate_token_losses
from posttrain.algorithms.sft import (
    IGNORE_INDEX,
    chunked_cross_entropy,
    chunked_token_logprobs_and_entropy,
    gather_trained_positions,
    next_token_targets,
    row_sequence_index,
    sequence_index_from_position_ids,
    sft_token_losses,
)


# ------------------------------------------------------------------------------ shift


def test_shift_moves_targets_mask_and_weights_together():
    ids = torch.tensor([5, 6, 7, 8])
    mask = torch.tensor([0, 1, 0, 1])
    weights = torch.tensor([9.0, 2.0, 9.0, 3.0])
    out = next_token_targets(ids, mask, weights)
    # position 0 predicts 6 (trained), position 1 predicts 7 (not), position 2 predicts 8
    assert out.targets.tolist() == [6, IGNORE_INDEX, 8, IGNORE_INDEX]
    assert out.target_mask.tolist() == [1, 0, 1, 0]
    assert out.target_weight.tolist() == [2.0, 0.0, 3.0, 0.0]


def test_packed_rows_never_predict_across_sequences():
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    pos = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]])
    mask = torch.ones_like(ids)
    seq = sequence_index_from_position_ids(pos)
    assert seq.tolist() == [[0, 0, 0, 1, 1], [2, 2, 3, 3, 3]]
    out = next_token_targets(ids, mask, sequence_index=seq)
    # 3 -> 4 crosses a boundary; 7 -> 8 crosses one; the last token of each row predicts nothing
    assert out.target_mask.tolist() == [[1, 1, 0, 1, 0], [1, 0, 1, 1, 0]]
    assert out.targets.tolist() == [[2, 3, -100, 5, -100], [7, -100, 9, 10, -100]]


def test_row_sequence_index():
    assert row_sequence_index(torch.zeros(2, 3)).tolist() == [[0, 0, 0], [1, 1, 1]]


# ---------------------------------------------------------------- tiny hand-computed vocab


def test_hand_computed_two_token_vocab():
    # V=2, H=1, W=[[1],[0]], h=ln 3 -> logits [ln 3, 0] -> p = [3/4, 1/4]
    weight = torch.tensor([[1.0], [0.0]])
    hidden = torch.full((2, 1), math.log(3.0))
    targets = torch.tensor([0, 1])
    nll = chunked_cross_entropy(hidden, weight, targets, chunk_size=1)
    assert nll.tolist() == pytest.approx([math.log(4 / 3), math.log(4)], rel=1e-6)
    logp, ent = chunked_token_logprobs_and_entropy(hidden, weight, targets, chunk_size=1)
    assert logp.tolist() == pytest.approx([math.log(3 / 4), math.log(1 / 4)], rel=1e-6)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert ent.tolist() == pytest.approx([h, h], rel=1e-6)
    # temperature 2: logits [ln 3 / 2, 0] -> p0 = sqrt3 / (sqrt3 + 1)
    logp_t, _ = chunked_token_logprobs_and_entropy(hidden, weight, targets, 1, temperature=2.0)
    p0 = math.sqrt(3) / (math.sqrt(3) + 1)
    assert logp_t.tolist() == pytest.approx([math.log(p0), math.log(1 - p0)], rel=1e-6)
    # d NLL(target 0) / d h = -(1 - p0) * W0 + p1 * W1 = -(1/4)
    hidden_g = hidden.clone().requires_grad_()
    chunked_cross_entropy(hidden_g, weight, targets[:1].repeat(2), 1).sum().backward()
    assert hidden_g.grad[:, 0].tolist() == pytest.approx([-0.25, -0.25], rel=1e-6)


# --------------------------------------------------------------- chunked vs plain reference


def _problem(N=13, H=8, V=37, seed=0, dtype=torch.float64, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g, dtype=dtype) * 0.5).requires_grad_()
    b = (torch.randn(V, generator=g, dtype=dtype) * 0.1).requires_grad_() if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, b, targets


def _plain_logits(hidden, weight, bias, scale=1.0, softcap=None):
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def _grads(out, params):
    return torch.autograd.grad(out, [p for p in params if p is not None], retain_graph=True)


@pytest.mark.parametrize("chunk_size", [1, 4, 13, 100])
@pytest.mark.parametrize("scale, softcap", [(1.0, None), (0.7, None), (1.3, 2.5)])
def test_chunked_cross_entropy_matches_plain_values_and_grads(chunk_size, scale, softcap):
    hidden, weight, bias, targets = _problem()
    targets[3] = IGNORE_INDEX
    coef = torch.linspace(0.5, 2.0, targets.numel(), dtype=torch.float64)  # non-uniform grads
    got = chunked_cross_entropy(hidden, weight, targets, chunk_size, lm_head_bias_V=bias,
                                logit_scale=scale, logit_softcap=softcap)
    ref = F.cross_entropy(_plain_logits(hidden, weight, bias, scale, softcap), targets,
                          reduction="none", ignore_index=IGNORE_INDEX)
    assert got.dtype == torch.float64  # float64 inputs keep float64 accumulation
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)
    g_got = _grads((got * coef).sum(), [hidden, weight, bias])
    g_ref = _grads((ref * coef).sum(), [hidden, weight, bias])
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert torch.all(_grads(got.sum(), [hidden])[0][3] == 0)  # ignored target: no gradient


@pytest.mark.parametrize("chunk_size, softcap", [(3, None), (64, None), (4, 3.0)])
def test_chunked_logprobs_and_entropy_match_plain_values_and_grads(chunk_size, softcap):
    hidden, weight, _, targets = _problem(N=10, bias=False, seed=1)
    hidden3 = hidden.reshape(2, 5, -1)
    targets2 = targets.reshape(2, 5)
    logp, ent = chunked_token_logprobs_and_entropy(hidden3, weight, targets2, chunk_size,
                                                    temperature=0.8, logit_softcap=softcap)
    assert logp.shape == (2, 5) and ent.shape == (2, 5)
    logprobs = torch.log_softmax(_plain_logits(hidden3, weight, None, 1 / 0.8, softcap), dim=-1)
    ref_logp = logprobs.gather(-1, targets2[..., None]).squeeze(-1)
    ref_ent = -(logprobs.exp() * logprobs).sum(-1)
    torch.testing.assert_close(logp, ref_logp, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-9, atol=1e-10)
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 5, dtype=torch.float64, generator=g)
    b = torch.randn(2, 5, dtype=torch.float64, generator=g)
    g_got = _grads((a * logp + b * ent).sum(), [hidden, weight])
    g_ref = _grads((a * ref_logp + b * ref_ent).sum(), [hidden, weight])
    for x, y in zip(g_got, g_ref):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-10)


def test_bf16_inputs_close_to_fp32():
    hidden, weight, bias, targets = _problem(N=32, H=16, V=50, dtype=torch.float32)
    ref = chunked_cross_entropy(hidden, weight, targets, 8, lm_head_bias_V=bias)
    assert ref.dtype == torch.float32
    plain = F.cross_entropy(hidden @ weight.t() + bias, targets, reduction="none")
    torch.testing.assert_close(ref, plain, rtol=1e-5, atol=1e-5)
    got = chunked_cross_entropy(hidden.detach().bfloat16().requires_grad_(),
                                weight.detach().bfloat16().requires_grad_(), targets, 8,
                                lm_head_bias_V=bias.detach().bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref.detach(), rtol=0.05, atol=0.05)


def test_autocast_runs_projection_in_autocast_dtype_and_returns_input_dtype_grads():
    hidden, weight, _, targets = _problem(N=16, H=16, V=40, dtype=torch.float32, bias=False)
    plain = F.cross_entropy(hidden @ weight.t(), targets, reduction="none")
    g_plain = _grads(plain.sum(), [hidden, weight])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_cross_entropy(hidden, weight, targets, 5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, plain, rtol=0.05, atol=0.05)
    assert not torch.allclose(got, plain, rtol=1e-6, atol=1e-6)  # it really ran in bf16
    g_got = _grads(got.sum(), [hidden, weight])
    for a, b in zip(g_got, g_plain):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)


def _saved_tensor_numels(fn):
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sizes


def test_chunked_loss_never_keeps_full_logits_for_backward():
    N, V, H = 64, 300, 8
    hidden, weight, _, targets = _problem(N=N, H=H, V=V, dtype=torch.float32, bias=False)
    _, chunked = _saved_tensor_numels(
        lambda: chunked_cross_entropy(hidden, weight, targets, chunk_size=8).sum())
    _, plain = _saved_tensor_numels(
        lambda: F.cross_entropy(hidden @ weight.t(), targets, reduction="sum"))
    assert max(plain) >= N * V  # the reference does keep [N, V] (so this test can fail)
    assert max(chunked) <= V * H  # only inputs (hidden, weight) and [N] vectors are kept


# -------------------------------------------------------------- whole SFT loss, packed


def test_packed_loss_equals_each_sequence_alone():
    """Packed rows + shift + gather + chunked CE + aggregate == per-sequence plain loss."""
    torch.manual_seed(0)
    V, H = 23, 6
    weight = torch.randn(V, H, requires_grad=True)
    embed = torch.randn(V, H)
    seqs = [torch.randint(0, V, (n,)) for n in (5, 3, 6)]
    masks = [torch.tensor([0, 0, 1, 1, 1]), torch.tensor([1, 1, 1]), torch.tensor([0, 1, 1, 0, 1, 1])]

    # reference: each sequence alone, plain logits, token-mean over the whole step
    nll_sum = 0.0
    count = 0
    for ids, m in zip(seqs, masks):
        logits = embed[ids[:-1]] @ weight.t()
        tgt_mask = m[1:].bool()
        nll_sum = nll_sum + F.cross_entropy(logits[tgt_mask], ids[1:][tgt_mask], reduction="sum")
        count += int(tgt_mask.sum())
    ref = nll_sum / count
    (ref_grad,) = torch.autograd.grad(ref, weight)

    # packed: one row of 14 tokens
    ids = torch.cat(seqs).unsqueeze(0)
    mask = torch.cat(masks).unsqueeze(0)
    pos = torch.cat([torch.arange(len(s)) for s in seqs]).unsqueeze(0)
    nll, positions = sft_token_losses(embed[ids], weight, ids, mask, position_ids_BT=pos,
                                      chunk_size=4)
    assert nll.numel() == count  # 3 + 2 + 3 trained targets; first tokens never predicted
    loss = aggregate_token_losses(nll, torch.ones_like(nll), positions.sequence_index,
                                  "token-mean", step_trained_tokens=count, step_sequences=3,
                                  token_weight_N=positions.weight)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    (grad,) = torch.autograd.grad(loss, weight)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


def test_gather_trained_positions_keeps_only_predicting_rows():
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    mask = torch.tensor([[0, 1, 1], [0, 0, 1]])
    hidden = torch.arange(6.0).reshape(2, 3, 1)
    nt = next_token_targets(ids, mask)
    pos = gather_trained_positions(hidden, nt, row_sequence_index(ids))
    assert pos.hidden[:, 0].tolist() == [0.0, 1.0, 4.0]
    assert pos.targets.tolist() == [2, 3, 6]
    assert pos.sequence_index.tolist() == [0, 0, 1]
