"""``posttrain_flex`` (FlexAttention with a block mask) against ``posttrain_varlen`` (SDPA per
sequence), on CPU: the mask rule by hand, the attention kernel (outputs and gradients, plain
packing and the shared-prompt layout, grouped-query heads), and whole tiny models (SFT loss
and RL log-probs with their parameter gradients). tests/test_cuda.py repeats the model checks
with the compiled kernel on a GPU.

torch refuses ``flex_attention`` backward on a CPU only in its argument check (the compiled
CPU kernel has no backward); the eager implementation, which these tests run, differentiates
fine, so the ``flex_cpu_backward`` fixture lifts that check for the test's duration.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.attention.flex_attention as flex_module
from conftest import build_tiny_llama
from test_loop import make_samples, step_counts
from test_rl_shared_prompt import make_groups

from posttrain.data.batching import collate_packed, collate_shared_prompt
from posttrain.errors import ConfigError
from posttrain.models import attention_flex
from posttrain.models.attention_flex import (
    FLEX_ATTENTION,
    build_block_mask,
    flex_packed_attention,
    mask_vectors,
    register_flex_attention,
    resolve_attention,
)
from posttrain.models.attention import VARLEN_ATTENTION, varlen_sdpa_attention
from posttrain.models.prepare import prepare_for_training
from posttrain.train.loop import sft_micro_batch_loss

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.fixture
def flex_cpu_backward(monkeypatch):
    monkeypatch.setattr(flex_module, "_validate_device", lambda *tensors: None)


def test_mask_vectors_by_hand():
    batch = collate_shared_prompt([([10, 11], [[20], [30, 31]]), ([40], [[50, 51]])])
    doc_start, prefix_end, run_start = (v[:8].tolist() for v in mask_vectors(batch.cu_seq_lens, batch.block_masks, 8))
    assert doc_start == [0, 0, 0, 0, 0, 5, 5, 5]
    # rows 3, 4 (the second completion) see the prompt [0, 2) and their own run from 3; every
    # other row sees one unbroken causal run, reported as a prefix up to itself
    assert prefix_end == [1, 2, 3, 2, 2, 6, 7, 8]
    assert run_start == [0, 0, 0, 3, 3, 5, 5, 5]
    plain = collate_packed(make_samples(3))
    doc_start, prefix_end, run_start = mask_vectors(plain.cu_seq_lens, None, plain.num_tokens)
    assert doc_start.numel() == 128 and torch.equal(prefix_end, doc_start) and torch.equal(run_start, doc_start)


def dense_mask(block_mask, total: int) -> torch.Tensor:
    return block_mask.to_dense()[0, 0].repeat_interleave(128, 0).repeat_interleave(128, 1)[:total, :total]


@pytest.mark.parametrize("layout", ["packed", "shared_prompt"])
def test_block_mask_reproduces_the_layout(layout):
    if layout == "packed":
        batch = collate_packed(make_samples(5))
        expected = torch.block_diag(*[torch.ones(n, n, dtype=torch.bool).tril()
                                      for n in batch.cu_seq_lens.diff().tolist()])
    else:
        batch = collate_shared_prompt([(g[0].prompt_ids, [s.response_ids for s in g]) for g in make_groups()])
        expected = torch.block_diag(*batch.block_masks)
    flex_mask = build_block_mask(batch.cu_seq_lens, batch.block_masks, batch.num_tokens)
    rows, cols = torch.meshgrid(torch.arange(batch.num_tokens), torch.arange(batch.num_tokens), indexing="ij")
    assert torch.equal(flex_mask.mask_mod(0, 0, rows, cols), expected)
    # the block-sparse summary never drops a tile that holds an allowed position
    assert bool((dense_mask(flex_mask, batch.num_tokens) | ~expected).all())


def test_a_block_mask_the_rule_cannot_express_is_refused():
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    mask[4, 1] = mask[4, 3] = False  # row 4 sees 0, 2, 4: more than a prefix and its own run
    with pytest.raises(ValueError, match="not of the form"):
        mask_vectors(torch.tensor([0, 5], dtype=torch.int32), [mask], 5)


def random_qkv(total: int, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, total, 8, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(1, 2, total, 8, generator=g, dtype=dtype).requires_grad_()  # grouped-query: 2 kv heads
    v = torch.randn(1, 2, total, 8, generator=g, dtype=dtype).requires_grad_()
    return q, k, v


@pytest.mark.parametrize("layout", ["packed", "shared_prompt"])
def test_flex_attention_equals_varlen_sdpa_outputs_and_gradients(layout, flex_cpu_backward):
    if layout == "packed":
        batch = collate_packed(make_samples(6, seed=3))
    else:
        batch = collate_shared_prompt([(g[0].prompt_ids, [s.response_ids for s in g]) for g in make_groups()])
    results = []
    for attention in (varlen_sdpa_attention, flex_packed_attention):
        q, k, v = random_qkv(batch.num_tokens)
        out, _ = attention(None, q, k, v, None, scaling=0.3, cu_seq_lens_q=batch.cu_seq_lens,
                           posttrain_block_masks=batch.block_masks)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
        results.append((out.detach(), *torch.autograd.grad(out, (q, k, v), upstream)))
    for reference, flex in zip(*results):
        torch.testing.assert_close(flex, reference, rtol=1e-9, atol=1e-10)


def test_without_sequence_bounds_it_is_plain_causal_attention():
    q, k, v = random_qkv(9)
    with torch.no_grad():
        flex, _ = flex_packed_attention(None, q, k, v, None)
        varlen, _ = varlen_sdpa_attention(None, q, k, v, None)
    torch.testing.assert_close(flex, varlen)


def use(model, attention):
    prepare_for_training(model, attn_implementation=VARLEN_ATTENTION, gradient_checkpointing=False)
    if attention == FLEX_ATTENTION:  # prepare_for_training refuses it on a CPU (no backward there)
        model.config._attn_implementation = register_flex_attention()
    return model


def test_sft_loss_and_gradients_of_a_model_equal_varlen(tokenizer, flex_cpu_backward):
    samples = make_samples(6, seed=4)
    tokens, sequences = step_counts(samples)
    batch = collate_packed(samples)
    results = []
    for attention in (VARLEN_ATTENTION, FLEX_ATTENTION):
        model = use(build_tiny_llama(tokenizer, vocab_size=512), attention)
        loss = sft_micro_batch_loss(model, batch, loss_agg_mode="token-mean", step_trained_tokens=tokens,
                                    step_sequences=sequences, chunk_size=7).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_shared_prompt_log_probs_and_gradients_equal_varlen(tokenizer, flex_cpu_backward):
    from posttrain.models.logprobs import response_token_logprobs
    from posttrain.train.rl_layout import pack_micro_batches
    from rl_fixtures import layout

    samples = [s for g in make_groups() for s in g]
    [(_, batch)] = pack_micro_batches(samples, layout(4096, True))
    assert batch.block_masks is not None
    results = []
    for attention in (VARLEN_ATTENTION, FLEX_ATTENTION):
        model = use(build_tiny_llama(tokenizer), attention)
        tokens = response_token_logprobs(model, batch, temperature=0.7, chunk_size=3, with_entropy=True)
        (tokens.logp.sum() + 0.5 * tokens.entropy.sum()).backward()
        results.append((tokens.logp.detach(), tokens.entropy.detach(),
                        {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (logp_a, ent_a, grads_a), (logp_b, ent_b, grads_b) = results
    torch.testing.assert_close(logp_b, logp_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent_b, ent_a, rtol=1e-5, atol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_mask_is_built_once_per_forward(tokenizer, monkeypatch):
    calls = []
    real = attention_flex.build_block_mask
    monkeypatch.setattr(attention_flex, "build_block_mask", lambda *a: calls.append(1) or real(*a))
    model = use(build_tiny_llama(tokenizer, vocab_size=512), FLEX_ATTENTION)  # 2 layers
    from posttrain.models.prepare import model_inputs

    with torch.no_grad():
        model(**model_inputs(collate_packed(make_samples(3))))
    assert len(calls) == 1


def test_resolve_attention_auto_and_cpu_refusal():
    assert resolve_attention("auto", torch.device("cpu")) == VARLEN_ATTENTION
    assert resolve_attention("auto", torch.device("cuda")) == FLEX_ATTENTION
    with pytest.raises(ConfigError, match="posttrain_flex"):
        resolve_attention(FLEX_ATTENTION, torch.device("cpu"))


def test_auto_on_cpu_trains_with_varlen(tokenizer):
    model = build_tiny_llama(tokenizer, vocab_size=512)
    prepare_for_training(model, attn_implementation="auto", gradient_checkpointing=False)
    assert model.config._attn_implementation == VARLEN_ATTENTION


@pytest.mark.parametrize("attention", ["posttrain_flex", "auto"])
def test_share_prompt_config_accepts_the_flex_backend(attention, tmp_path):
    from posttrain.config import RLConfig, validate_config

    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "1+1", "answer": "2"}\n')
    config = validate_config(RLConfig, {"data": {"train": str(data)}, "rl": {"share_prompt": True},
                                        "model": {"attn_implementation": attention}})
    assert config.model.attn_implementation == attention
