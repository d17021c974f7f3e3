"""Shared training functions: packed attention, chunked loss vs plain logits, split
invariance (1x8 vs 8x1 vs packed vs padded), schedule, one scheduler step per optimizer step."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from posttrain.data.batching import collate_packed, collate_padded
from posttrain.models.attention import choose_attention
from posttrain.models.prepare import prepare_for_training
from posttrain.train.loop import (
    build_optimizer,
    build_scheduler,
    evaluate_nll,
    lr_multiplier,
    optimizer_step,
    sft_micro_batch_loss,
)


def make_samples(n=8, seed=0, vocab=400):
    g = torch.Generator().manual_seed(seed)
    samples = []
    for k in range(n):
        length = int(torch.randint(4, 24, (1,), generator=g))
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        weights = None
        if k % 3 == 0:
            weights = (torch.rand(length, generator=g) + 0.5).tolist()
        samples.append(SimpleNamespace(
            input_ids=torch.randint(1, vocab, (length,), generator=g).tolist(),
            loss_mask=[0] * prompt + [1] * (length - prompt),
            weights=weights,
        ))
    return samples


def step_counts(samples):
    tokens = sum(sum(s.loss_mask[1:]) for s in samples)
    sequences = sum(1 for s in samples if sum(s.loss_mask[1:]) > 0)
    return tokens, sequences


@pytest.fixture
def small_vocab_model(tokenizer):
    from conftest import build_tiny_llama

    return build_tiny_llama(tokenizer, vocab_size=512)  # sample ids stay below 400


@pytest.fixture
def packed_model(small_vocab_model):
    return prepare_for_training(small_vocab_model, attn_implementation=choose_attention(True, None),
                                gradient_checkpointing=False)


def loss_of(model, batch, mode, tokens, sequences, chunk=5):
    return sft_micro_batch_loss(model, batch, loss_agg_mode=mode, step_trained_tokens=tokens,
                                step_sequences=sequences, chunk_size=chunk).loss


def test_packed_sequence_loss_equals_its_loss_alone(packed_model):
    samples = make_samples(4)
    with torch.no_grad():
        alone = [float(loss_of(packed_model, collate_packed([s]), "sum", 1, 1)) for s in samples]
        packed = float(loss_of(packed_model, collate_packed(samples), "sum", 1, 1))
    assert packed == pytest.approx(sum(alone), rel=1e-5)
    # the same row WITHOUT sequence boundaries (one long sequence) differs: the test can fail
    joined = collate_packed(samples)
    joined.cu_seq_lens = torch.tensor([0, joined.num_tokens], dtype=torch.int32)
    joined.position_ids = torch.arange(joined.num_tokens).unsqueeze(0)
    with torch.no_grad():
        assert abs(float(loss_of(packed_model, joined, "sum", 1, 1)) - packed) > 1e-3


def test_chunked_loss_matches_plain_logits_and_gradients(small_vocab_model):
    tiny_model = small_vocab_model
    samples = make_samples(3, seed=1)
    for s in samples:
        s.weights = None
    batch = collate_padded(samples, pad_token_id=0)
    tokens, sequences = step_counts(samples)
    prepare_for_training(tiny_model, attn_implementation="sdpa", gradient_checkpointing=False)
    loss = loss_of(tiny_model, batch, "token-mean", tokens, sequences, chunk=3)
    loss.backward()
    chunked_grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
    tiny_model.zero_grad()
    logits = tiny_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    targets = batch.input_ids[:, 1:].clone()
    targets[batch.loss_mask[:, 1:] == 0] = -100
    plain = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                            ignore_index=-100, reduction="sum") / tokens
    plain.backward()
    assert loss.item() == pytest.approx(plain.item(), rel=1e-5)
    for name, param in tiny_model.named_parameters():
        torch.testing.assert_close(chunked_grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


def grads_after(model, batches, mode, tokens, sequences):
    model.zero_grad(set_to_none=True)
    total = 0.0
    for batch in batches:
        loss = loss_of(model, batch, mode, tokens, sequences)
        loss.backward()
        total += float(loss)
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    return total, grads


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "sum"])
def test_split_invariance_one_by_eight_eight_by_one_packed_padded(packed_model, mode):
    packed_model.double()  # float64: agreement is exact up to summation order
    samples = make_samples(8, seed=2)
    tokens, sequences = step_counts(samples)
    packed_model.config._attn_implementation = "sdpa"
    one_by_eight = grads_after(packed_model, [collate_padded(samples, 0)], mode, tokens, sequences)
    eight_by_one = grads_after(packed_model, [collate_padded([s], 0) for s in samples], mode, tokens, sequences)
    packed_model.config._attn_implementation = choose_attention(True, None)
    packed_one = grads_after(packed_model, [collate_packed(samples)], mode, tokens, sequences)
    packed_three = grads_after(packed_model, [collate_packed(samples[:3]), collate_packed(samples[3:5]),
                                              collate_packed(samples[5:])], mode, tokens, sequences)
    for other in (eight_by_one, packed_one, packed_three):
        assert other[0] == pytest.approx(one_by_eight[0], rel=1e-10)
        torch.testing.assert_close(other[1], one_by_eight[1], rtol=1e-8, atol=1e-12)
    # per-micro-batch means would NOT agree (what the step-wide normaliser prevents)
    if mode == "token-mean":
        naive = sum(float(loss_of(packed_model, collate_packed([s]), mode, *step_counts([s]))) for s in samples) / 8
        assert abs(naive - one_by_eight[0]) > 1e-4


def test_lr_multiplier_hand_values():
    kw = dict(total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    assert lr_multiplier(0, schedule="cosine", **kw) == pytest.approx(1 / 3)
    assert lr_multiplier(1, schedule="cosine", **kw) == pytest.approx(2 / 3)
    assert lr_multiplier(2, schedule="cosine", **kw) == pytest.approx(1.0)
    # step 6: progress (6-2)/8 = 0.5 -> cosine midpoint 0.1 + 0.9 * 0.5 = 0.55
    assert lr_multiplier(6, schedule="cosine", **kw) == pytest.approx(0.55)
    assert lr_multiplier(6, schedule="linear", **kw) == pytest.approx(1 - 0.9 * 0.5)
    assert lr_multiplier(9, schedule="cosine", **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert lr_multiplier(9, schedule="constant", **kw) == 1.0
    assert lr_multiplier(10, schedule="linear", **kw) == pytest.approx(0.1)


def test_scheduler_steps_once_per_optimizer_step_not_per_micro_batch(packed_model):
    samples = make_samples(4, seed=3)
    tokens, sequences = step_counts(samples)
    optimizer = build_optimizer(packed_model, lr=1.0, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8)
    scheduler = build_scheduler(optimizer, total_steps=4, warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    lrs = []
    before = [p.detach().clone() for p in packed_model.parameters()]
    for _ in range(2):
        result = optimizer_step(
            packed_model, optimizer, scheduler, [collate_packed([s]) for s in samples],
            lambda m, b: sft_micro_batch_loss(m, b, loss_agg_mode="token-mean", step_trained_tokens=tokens,
                                              step_sequences=sequences, chunk_size=8),
            precision="fp32", device=torch.device("cpu"), max_grad_norm=1.0,
        )
        lrs.append(result.lr)
        assert result.trained_tokens == tokens and math.isfinite(result.grad_norm)
    assert lrs == [pytest.approx(1.0), pytest.approx(0.75)]  # 4 micro-batches, yet one decay step each
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)
    assert any(not torch.equal(a, b) for a, b in zip(before, packed_model.parameters()))


def test_weight_decay_skips_vectors(tiny_model):
    optimizer = build_optimizer(tiny_model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() < 2 for p in no_decay["params"])


def test_evaluate_nll_is_token_mean_over_all_batches(packed_model):
    samples = make_samples(5, seed=4)
    for s in samples:
        s.weights = None
    tokens, sequences = step_counts(samples)
    with torch.no_grad():
        expected = float(loss_of(packed_model, collate_packed(samples), "token-mean", tokens, sequences))
    result = evaluate_nll(packed_model, [collate_packed(samples[:2]), collate_packed(samples[2:])],
                          precision="fp32", device=torch.device("cpu"), chunk_size=4)
    assert result["val/loss"] == pytest.approx(expected, rel=1e-5)
    assert result["val/ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert result["val/tokens"] == tokens and packed_model.training


def test_bf16_autocast_loss_close_to_fp32(packed_model):
    samples = make_samples(4, seed=5)
    tokens, sequences = step_counts(samples)
    batch = collate_packed(samples)
    with torch.no_grad():
        full = float(loss_of(packed_model, batch, "token-mean", tokens, sequences))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = float(loss_of(packed_model, batch, "token-mean", tokens, sequences))
    assert half == pytest.approx(full, rel=2e-2)


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer):
    from conftest import build_tiny_llama

    samples = make_samples(4, seed=6)
    tokens, sequences = step_counts(samples)
    grads = []
    for checkpointing in (False, True):
        model = build_tiny_llama(tokenizer, vocab_size=512)
        prepare_for_training(model, attn_implementation=choose_attention(True, None),
                             gradient_checkpointing=checkpointing)
        assert model.is_gradient_checkpointing == checkpointing
        grads.append(grads_after(model, [collate_packed(samples)], "token-mean", tokens, sequences))
    assert grads[1][0] == pytest.approx(grads[0][0], rel=1e-6)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-5, atol=1e-8)


def test_is_due_every_n_steps_and_at_the_last():
    from posttrain.train.loop import is_due

    assert [s for s in range(1, 11) if is_due(s, 4, 10)] == [4, 8, 10]
    assert not any(is_due(s, None, 10) for s in range(1, 11))


def test_fused_adamw_matches_the_reference_loop(tokenizer):
    """build_optimizer picks torch's fused AdamW on CPU; it must step like the plain loop."""
    from conftest import build_tiny_llama

    from posttrain.train.loop import build_optimizer

    fast_model, slow_model = build_tiny_llama(tokenizer), build_tiny_llama(tokenizer)
    fast = build_optimizer(fast_model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    assert fast.defaults["fused"]
    slow = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in
                              build_optimizer(slow_model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95),
                                              eps=1e-8).param_groups],
                             lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        for model, optimizer in ((fast_model, fast), (slow_model, slow)):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    moved = 0.0
    start = build_tiny_llama(tokenizer).state_dict()
    for (name, a), b in zip(fast_model.state_dict().items(), slow_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        moved = max(moved, (a - start[name]).abs().max().item())
    assert moved > 1e-3


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_step_is_not_applied(packed_model, bad):
    """A NaN/inf loss (a poisoned token weight) leaves weights and Adam moments untouched; the
    schedule still advances; the next finite step trains as usual."""
    samples = make_samples(4, seed=5)
    poisoned = [SimpleNamespace(**vars(s)) for s in samples]
    poisoned[1].weights = [bad] * len(poisoned[1].input_ids)
    tokens, sequences = step_counts(samples)
    optimizer = build_optimizer(packed_model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    scheduler = build_scheduler(optimizer, total_steps=4, warmup_steps=0, schedule="linear", min_lr_ratio=0.0)

    def step(batch_samples):
        return optimizer_step(
            packed_model, optimizer, scheduler, [collate_packed([s]) for s in batch_samples],
            lambda m, b: sft_micro_batch_loss(m, b, loss_agg_mode="token-mean", step_trained_tokens=tokens,
                                              step_sequences=sequences, chunk_size=8),
            precision="fp32", device=torch.device("cpu"), max_grad_norm=1.0,
        )

    before = [p.detach().clone() for p in packed_model.parameters()]
    result = step(poisoned)
    assert not result.finite and not (math.isfinite(result.loss) and math.isfinite(result.grad_norm))
    assert all(torch.equal(a, b) for a, b in zip(before, packed_model.parameters()))
    assert not optimizer.state  # Adam never saw the step: no NaN moments
    assert all(p.grad is None for p in packed_model.parameters())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.75)  # the schedule moved on
    result = step(samples)
    assert result.finite and all(torch.isfinite(p).all() for p in packed_model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, packed_model.parameters()))
