"""The shared-prompt layout of the RL passes: each group's prompt stored once, completions
attending to it and never to each other. Checked by hand on the layout, then against the
plain packed layout (one sequence per completion) on log-probs, entropies, gradients, critic
values and a whole optimizer step."""

from __future__ import annotations

import pytest
import torch

from posttrain.data.batching import collate_shared_prompt, shared_prompt_block_mask
from posttrain.models.attention import choose_attention
from posttrain.models.prepare import prepare_for_training
from posttrain.models.logprobs import response_token_logprobs, response_token_values
from posttrain.train.rl_advantages import compute_advantages
from posttrain.train.rl_layout import mini_batches, pack_micro_batches
from posttrain.train.rl_samples import RolloutSample
from posttrain.train.rl_update import update_model

from conftest import build_tiny_llama
from rl_fixtures import advantage_settings, layout, loss_settings, objective, update_settings


def test_block_mask_by_hand():
    expected = torch.tensor([[1, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0],
                             [1, 1, 1, 0, 0],
                             [1, 1, 0, 1, 0],
                             [1, 1, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(shared_prompt_block_mask(2, [1, 2]), expected)


def test_layout_by_hand():
    batch = collate_shared_prompt([([10, 11], [[20], [30, 31]]), ([40], [[50, 51]])])
    assert batch.input_ids.tolist() == [[10, 11, 20, 30, 31, 40, 50, 51]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 2, 3, 0, 1, 2]]
    assert batch.loss_mask.tolist() == [[0, 0, 1, 1, 1, 0, 1, 1]]
    assert batch.cu_seq_lens.tolist() == [0, 5, 8]
    # token 20 and token 30 are both predicted by the prompt's last position (index 1)
    assert batch.predicted.index.tolist() == [1, 1, 3, 5, 6]
    assert batch.predicted.targets.tolist() == [20, 30, 31, 50, 51]
    assert batch.predicted.sequence.tolist() == [0, 1, 1, 2, 2]
    assert [m.shape for m in batch.block_masks] == [(5, 5), (3, 3)]


def make_groups(prompts=((1, 5, 7, 9), (1, 6)), sizes=(3, 2), seed=0) -> list[list[RolloutSample]]:
    generator = torch.Generator().manual_seed(seed)
    groups = []
    for g, (prompt, size) in enumerate(zip(prompts, sizes)):
        group = []
        for i in range(size):
            response = torch.randint(100, 2000, (2 + 2 * i + g,), generator=generator).tolist()
            group.append(RolloutSample(row=g, group=g, prompt_ids=list(prompt), response_ids=response, text="",
                                       finish_reason="stop", reward=float(i)))
        groups.append(group)
    return groups


def varlen(model):
    prepare_for_training(model, attn_implementation=choose_attention(True, None), gradient_checkpointing=False)
    return model


def test_log_probs_entropies_and_gradients_equal_the_plain_packed_layout(tokenizer):
    samples = [s for g in make_groups() for s in g]
    results = []
    for share in (False, True):
        model = varlen(build_tiny_llama(tokenizer))
        [(chunk, batch)] = pack_micro_batches(samples, layout(4096, share))
        if share:
            assert chunk == samples  # groups in order, completions in order
        tokens = response_token_logprobs(model, batch, temperature=0.7, chunk_size=3, with_entropy=True)
        (tokens.logp.sum() + 0.5 * tokens.entropy.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        # per sample, in the order of ``samples`` (the plain layout packs longest first)
        sizes = [len(s.response_ids) for s in chunk]
        by_sample = {id(s): (lp, en, sq) for s, lp, en, sq in zip(
            chunk, tokens.logp.detach().split(sizes), tokens.entropy.detach().split(sizes),
            tokens.sequence_index.split(sizes))}
        assert all(torch.equal(sq, torch.full_like(sq, k)) for k, (_, _, sq) in enumerate(
            by_sample[id(s)] for s in chunk))
        logp = torch.cat([by_sample[id(s)][0] for s in samples])
        entropy = torch.cat([by_sample[id(s)][1] for s in samples])
        results.append((logp, entropy, grads, batch.num_tokens))
    (logp_a, ent_a, grads_a, tokens_a), (logp_b, ent_b, grads_b, tokens_b) = results
    assert tokens_b == tokens_a - 2 * 4 - 1 * 2  # the prompts of 2 of 3 and 1 of 2 completions are not repeated
    torch.testing.assert_close(logp_b, logp_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent_b, ent_a, rtol=1e-5, atol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6)


def test_critic_values_equal_the_plain_packed_layout(tiny_model_dir):
    from posttrain.models.scalar_head import load_scalar_head_model

    critic = varlen(load_scalar_head_model(tiny_model_dir, seed=0)).eval()
    samples = [s for g in make_groups() for s in g]
    values = []
    with torch.no_grad():
        for share in (False, True):
            [(chunk, batch)] = pack_micro_batches(samples, layout(4096, share))
            per_sample = dict(zip(map(id, chunk), response_token_values(critic, batch).split(
                [len(s.response_ids) for s in chunk])))
            values.append(torch.cat([per_sample[id(s)] for s in samples]))
    plain, shared = values
    assert plain.numel() == sum(len(s.response_ids) for s in samples)
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)


def test_a_group_larger_than_the_budget_is_split_with_its_prompt_repeated():
    samples = [s for g in make_groups() for s in g]
    bins = pack_micro_batches(samples, layout(12, True))
    assert len(bins) > 1
    assert [s for chunk, _ in bins for s in chunk] == samples
    for chunk, batch in bins:
        assert batch.num_tokens <= 12 or len(chunk) == 1
        flat = batch.input_ids[0][batch.loss_mask[0] != 0].tolist()
        assert flat == [t for s in chunk for t in s.response_ids]


def test_one_optimizer_step_is_the_same_shared_or_not_and_whatever_the_budget(tokenizer):
    groups = make_groups(sizes=(3, 3))
    compute_advantages(groups, advantage_settings("grpo"), kl_coef=0.0)
    settings = loss_settings(loss_agg_mode="seq-mean-token-mean", entropy_coef=0.01, temperature=0.7, chunk_size=4)
    results, losses = [], []
    for share, budget in ((False, 4096), (True, 4096), (True, 12)):
        model = varlen(build_tiny_llama(tokenizer))
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        metrics = update_model(model, optimizer, scheduler, mini_batches(groups, 1, seed=0), objective(settings),
                               update_settings(settings, micro_batch_tokens=budget, share_prompt=share), step=0)
        results.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        losses.append((metrics["loss"], metrics["pg_loss"], metrics["optimizer_steps"]))
    # the logged policy loss is the step's, however the step was laid out or split
    assert losses[2][2] == 1
    for loss, pg_loss, _ in losses[1:]:
        assert loss == pytest.approx(losses[0][0], rel=1e-5, abs=1e-7)
        assert pg_loss == pytest.approx(losses[0][1], rel=1e-5, abs=1e-7)
    start = build_tiny_llama(tokenizer).state_dict()
    assert max((results[0][k] - start[k]).abs().max().item() for k in start) > 1e-3
    for other in results[1:]:
        for key in results[0]:
            torch.testing.assert_close(other[key], results[0][key], rtol=1e-4, atol=1e-5)
