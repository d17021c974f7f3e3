"""The compacting decode loop: finished rows leave the batch, and what every row samples, and
the log-probs it reports, are what the model gives that row alone."""

import torch

from posttrain.rollout.base import SamplingParams
from posttrain.rollout.decode import stop_string_hit
from posttrain.rollout.hf import HFEngine

PROMPTS = ["hello there", "a much longer prompt than the first one", "three", "four words in here"]


def _batch_sizes(model):
    """Record the batch size of every forward pass of ``model``."""
    sizes: list[int] = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]),
                                             with_kwargs=True)
    return sizes, handle


def _an_early_token(tiny_model, tokenizer, prompts):
    """A token that greedy decoding emits early in one row but not in every row: made an end id,
    it ends rows at different steps."""
    plain = HFEngine(tiny_model, tokenizer, compact=False).generate(prompts, SamplingParams(temperature=0,
                                                                                           max_new_tokens=10))
    for step in range(1, 6):
        for completion in plain:
            token = completion.token_ids[step]
            if sum(token in c.token_ids[: step + 1] for c in plain) < len(plain):
                return token
    raise AssertionError("the tiny model repeats one token everywhere")


def test_greedy_ids_equal_generate_and_finished_rows_leave_the_batch(tiny_model, tokenizer):
    prompts = [tokenizer.encode(text) for text in PROMPTS]
    early = _an_early_token(tiny_model, tokenizer, prompts)
    params = SamplingParams(n=2, temperature=0, max_new_tokens=10)
    slow, fast = HFEngine(tiny_model, tokenizer, compact=False), HFEngine(tiny_model, tokenizer, compact=True)
    for engine in (slow, fast):
        engine.eos_ids = engine.eos_ids | {early}
    sizes, handle = _batch_sizes(fast.model)
    try:
        compacted = fast.generate(prompts, params)
    finally:
        handle.remove()
    assert [c.token_ids for c in compacted] == [c.token_ids for c in slow.generate(prompts, params)]
    assert any(c.token_ids[-1] == early and c.finish_reason == "stop" for c in compacted)
    assert min(sizes) < max(sizes) == len(prompts) * 2  # rows left the batch once they ended
    assert len(sizes) <= 1 + max(len(c.token_ids) for c in compacted)  # and it stopped when all had ended


def test_sampled_rows_report_the_log_probs_the_model_gives_each_row_alone(tiny_model, tokenizer):
    """Rows leave the batch at different steps (a fifth of the vocabulary made end ids): each
    survivor's cache, mask and positions stay its own, so its log-probs equal a plain forward
    over prompt + completion at the sampling temperature."""
    prompts = [tokenizer.encode(text) for text in PROMPTS]
    engine = HFEngine(tiny_model, tokenizer, compact=True)
    engine.eos_ids = set(range(0, tiny_model.config.vocab_size, 5))
    params = SamplingParams(n=3, temperature=0.7, max_new_tokens=8, seed=1, return_logprobs=True)
    completions = engine.generate(prompts, params)
    assert len({len(c.token_ids) for c in completions}) > 1
    for completion in completions:
        prompt = prompts[completion.prompt_index]
        with torch.no_grad():
            logits = tiny_model(torch.tensor([prompt + completion.token_ids])).logits[0, len(prompt) - 1 : -1]
        expected = torch.log_softmax(logits.float() / 0.7, -1).gather(
            -1, torch.tensor(completion.token_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(completion.logprobs), expected, atol=1e-4, rtol=0)
    again = engine.generate(prompts, params)
    assert [c.token_ids for c in again] == [c.token_ids for c in completions]  # a seed gives the same ids


def test_sampling_draws_from_softmax_of_logits_over_temperature(tiny_model, tokenizer):
    """The first sampled token over many rows follows softmax(logits / T) (total variation
    distance from the model's distribution within sampling noise)."""
    prompt = tokenizer.encode("hello there")
    engine = HFEngine(tiny_model, tokenizer, batch_size=4000, compact=True)
    completions = engine.generate([prompt], SamplingParams(n=4000, temperature=1.5, max_new_tokens=1, seed=0))
    with torch.no_grad():
        probs = torch.softmax(tiny_model(torch.tensor([prompt])).logits[0, -1].float() / 1.5, -1)
    counts = torch.bincount(torch.tensor([c.token_ids[0] for c in completions]), minlength=probs.numel()).float()
    top = probs.topk(20).indices
    distance = 0.5 * (counts[top] / 4000 - probs[top]).abs().sum()
    assert distance < 0.05


class _LetterTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i) for i in ids)


def test_a_stop_string_is_found_in_the_newest_tokens_only_once_complete():
    hit = stop_string_hit(_LetterTokenizer(), ("cd", "xyz"))
    assert not hit([0, 1, 2]) and hit([0, 1, 2, 3]) and hit([25] * 30 + [23, 24, 25])
    assert not hit([23, 24]) and not hit([2] + [0] * 40)  # an old partial match far back is not looked at


def test_a_row_ends_at_the_token_that_completes_a_stop_string(tiny_model, tokenizer):
    """Greedy rows stop at the first token after which their completion's text holds the stop
    string (the prompt's text is not searched, as in vLLM; transformers' criterion also matches
    a stop string that starts in the prompt)."""
    prompts = [tokenizer.encode(text) for text in PROMPTS]
    plain = HFEngine(tiny_model, tokenizer, compact=False).generate(prompts, SamplingParams(temperature=0,
                                                                                           max_new_tokens=10))
    stop = tokenizer.decode(plain[1].token_ids[3:5], skip_special_tokens=True)
    fast = HFEngine(tiny_model, tokenizer, compact=True).generate(
        prompts, SamplingParams(temperature=0, max_new_tokens=10, stop=(stop,)))
    for row, completion in zip(plain, fast):
        ends = [k for k in range(1, 11) if stop in tokenizer.decode(row.token_ids[:k], skip_special_tokens=True)]
        assert completion.token_ids == row.token_ids[: ends[0] if ends else 10]
        assert completion.finish_reason == ("stop" if ends else "length")
    assert fast[1].finish_reason == "stop" and len(fast[1].token_ids) <= 5


def test_a_prepacked_copy_with_biases_follows_its_source():
    """Linear layers with a bias (Qwen's q/k/v projections) are copied and refreshed too."""
    from posttrain.rollout.prepacked import TransposedLinear, prepacked_copy, refresh

    torch.manual_seed(0)
    source = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2, bias=False))
    packed = prepacked_copy(source)
    assert all(isinstance(packed[i], TransposedLinear) for i in (0, 2)) and packed[0].weight_t.is_contiguous()
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), source(x))
        for p in source.parameters():
            p.add_(1.0)
    refresh(packed, source)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), source(x))
