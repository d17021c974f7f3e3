"""HF rollout engine: exact sampled ids, eos trimming, n per prompt, stop strings."""

import torch

from posttrain.rollout.base import SamplingParams
from posttrain.rollout.hf import HFEngine


def test_greedy_matches_plain_generate_and_trims_after_eos(tiny_model, tokenizer):
    engine = HFEngine(tiny_model, tokenizer)
    prompts = [tokenizer.encode("hello there"), tokenizer.encode("a much longer prompt than the first one")]
    completions = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=8))
    assert [c.prompt_index for c in completions] == [0, 1]
    for completion, prompt in zip(completions, prompts):
        out = tiny_model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
        reference = out[0, len(prompt):].tolist()
        if tokenizer.eos_token_id in reference:
            reference = reference[: reference.index(tokenizer.eos_token_id) + 1]
        assert completion.token_ids == reference  # left padding does not change greedy output
        assert completion.finish_reason == ("stop" if reference[-1] == tokenizer.eos_token_id else "length")


def test_n_samples_per_prompt_with_logprobs(tiny_model, tokenizer):
    engine = HFEngine(tiny_model, tokenizer, batch_size=3)
    completions = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(n=3, temperature=1.0, max_new_tokens=4, seed=0,
                                                                       return_logprobs=True))
    assert [c.prompt_index for c in completions] == [0, 0, 0, 1, 1, 1]
    for c in completions:
        assert len(c.logprobs) == len(c.token_ids) and all(lp <= 0 for lp in c.logprobs)
    # the reported logprobs are the model's, at temperature 1, of the sampled ids
    c = completions[0]
    full = torch.tensor([[1, 2, 3] + c.token_ids])
    with torch.no_grad():
        logits = tiny_model(full).logits[0, 2:-1]
    expected = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(c.logprobs), expected, atol=1e-4)


class _FakeTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i) for i in ids if i != 0)


def test_stop_string_trims_at_first_token_completing_it():
    engine = HFEngine.__new__(HFEngine)
    engine.tokenizer, engine.eos_ids = _FakeTokenizer(), {0}
    # tokens decode to "abcdcd" then padding (eos id 0 was padding, never sampled)
    completion = engine._completion(0, [0 + 0, 1, 2, 3, 2, 3, 0, 0][1:], None, SamplingParams(stop=("cd",)))
    assert completion.token_ids == [1, 2, 3] and completion.text == "bcd" and completion.finish_reason == "stop"
    no_stop = engine._completion(0, [1, 1, 1], None, SamplingParams(stop=("zz",)))
    assert no_stop.token_ids == [1, 1, 1] and no_stop.finish_reason == "length"


def test_shared_prefill_samples_what_separate_prefills_sample(tiny_model, tokenizer):
    """The n copies of a prompt prefilled once: same greedy ids, same sampled ids for a seed,
    same reported log-probs as prefilling every row (prompts of different lengths: left padding)."""
    prompts = [tokenizer.encode("hello there"), tokenizer.encode("a much longer prompt than the first one")]
    for params in (SamplingParams(n=3, temperature=0, max_new_tokens=6, return_logprobs=True),
                   SamplingParams(n=3, temperature=1.0, max_new_tokens=6, seed=3, return_logprobs=True)):
        shared = HFEngine(tiny_model, tokenizer, share_prefill=True).generate(prompts, params)
        separate = HFEngine(tiny_model, tokenizer, share_prefill=False).generate(prompts, params)
        assert [c.token_ids for c in shared] == [c.token_ids for c in separate]
        for a, b in zip(shared, separate):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)
    engine = HFEngine(tiny_model, tokenizer)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts for _ in range(2)])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts for _ in range(2)])[:, None]).long()
    cache = engine._shared_prefill(ids, mask, [0, 0, 1, 1])
    assert cache.get_seq_length() == width - 1
    assert engine._shared_prefill(ids, mask, [0, 1, 2, 3]) is None  # nothing repeats: plain generate


def record_prefills(engine, name: str) -> tuple[list[bool], callable]:
    """Wrap ``engine.<name>`` (a prefill path): the list records, per call, whether the path was
    taken (returned a cache); also returns the unwrapped method."""
    taken, original = [], getattr(engine, name)

    def spy(*args):
        result = original(*args)
        taken.append(result is not None)
        return result

    setattr(engine, name, spy)
    return taken, original


def assert_same_completions(got, expected) -> None:
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    for a, b in zip(got, expected):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)


def test_equal_prompts_passed_separately_share_one_prefill(tiny_model, tokenizer):
    """An agent asks for each trajectory of a group with n=1: equal prompts still get one prefill
    between them, and sample what separate prefills sample."""
    hello, longer = tokenizer.encode("hello there"), tokenizer.encode("a much longer prompt than the first one")
    prompts = [hello, longer, hello, hello, longer]
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=6, seed=5, return_logprobs=True)
    engine = HFEngine(tiny_model, tokenizer, share_prefill=True)
    prefilled = []
    original = engine._shared_prefill

    def spy(ids, mask, keys):
        prefilled.append(list(keys))
        return original(ids, mask, keys)

    engine._shared_prefill = spy
    shared = engine.generate(prompts, params)
    separate = HFEngine(tiny_model, tokenizer, share_prefill=False).generate(prompts, params)
    assert prefilled == [[0, 1, 0, 0, 1]]
    assert_same_completions(shared, separate)
    assert [c.prompt_index for c in shared] == [0, 1, 2, 3, 4]


def test_a_prefix_all_prompts_share_is_prefilled_once_and_samples_what_separate_prefills_sample(tiny_model, tokenizer):
    """A system turn every prompt starts with: prefilled once, each prompt's rest right-aligned
    after it (padding between), the last tokens decoded together. Same greedy and seeded ids,
    same log-probs as prefilling every prompt whole; prompts whose rest is empty or repeats too."""
    system = tokenizer.encode("you are a careful assistant that answers with one short line")
    rests = ["what is two", "a much longer question than the first one, with more words", "what is two", "", "x"]
    prompts = [system + tokenizer.encode(rest) + tokenizer.encode(" ok") for rest in rests]
    engine = HFEngine(tiny_model, tokenizer, share_prefill=True, reuse_kv=False)
    taken, _ = record_prefills(engine, "_common_prefix_prefill")
    for params in (SamplingParams(n=2, temperature=0, max_new_tokens=6, return_logprobs=True),
                   SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=11, return_logprobs=True)):
        shared = engine.generate(prompts, params)
        assert_same_completions(shared, HFEngine(tiny_model, tokenizer, share_prefill=False).generate(prompts, params))
    assert taken == [True, True]
    short = [tokenizer.encode("hello there"), tokenizer.encode("a different start")]
    assert engine._common_prefix_prefill(short, [0, 1], "cpu") is None  # nothing long enough in common


def test_the_next_turn_reuses_the_keys_and_values_of_the_last_call(tiny_model, tokenizer):
    """An agent's next turn: the last prompt + its completion + new text. Its kept ids are not
    prefilled again, and it samples what a fresh engine samples (ids, log-probs); a prompt that
    shares too little is prefilled whole; new weights make the kept rows unusable."""
    system = "you are a careful assistant who answers every question in one short line."
    first = [tokenizer.encode(system + " question one: what is two"),
             tokenizer.encode(system + " question two, a longer one: what is three")]
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=5, seed=7, return_logprobs=True)
    engine = HFEngine(tiny_model, tokenizer)
    reused, original = record_prefills(engine, "_reused_prefill")
    turn = engine.generate(first, params)
    assert reused == []  # nothing kept yet
    second = [prompt + c.token_ids + tokenizer.encode(" output: 4. next") for prompt, c in zip(first, turn)]
    second.append(tokenizer.encode(system + " a new question"))  # shares the system text only
    again = engine.generate(second, params)
    fresh = HFEngine(tiny_model, tokenizer, share_prefill=False, reuse_kv=False).generate(second, params)
    assert reused == [True]
    assert_same_completions(again, fresh)
    assert original([tokenizer.encode("something else entirely here")], engine._kept, "cpu") is None
    with torch.no_grad():  # an optimizer step on the generating weights: what was kept is stale
        next(engine.model.parameters()).add_(0.01)
    engine.generate(second[:1], params)
    assert reused == [True]  # not read again


def test_bf16_generation_copy_follows_the_policy(tokenizer):
    from conftest import build_tiny_llama

    policy = build_tiny_llama(tokenizer)
    engine = HFEngine(policy, tokenizer, dtype=torch.bfloat16, prepack=False)
    assert engine.model is not policy and next(engine.model.parameters()).dtype == torch.bfloat16
    assert next(policy.parameters()).dtype == torch.float32  # the trainer's weights are untouched
    params = SamplingParams(n=2, temperature=0, max_new_tokens=5)
    before = [c.token_ids for c in engine.generate([[1, 2, 3]], params)]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.5)
    engine.update_weights(policy)
    for name, p in engine.model.state_dict().items():
        torch.testing.assert_close(p, policy.state_dict()[name].to(torch.bfloat16))
    after = [c.token_ids for c in engine.generate([[1, 2, 3]], params)]
    assert before != after
    assert HFEngine(policy, tokenizer, dtype=torch.float32, prepack=False).model is policy  # same dtype: no copy


def test_the_prepacked_generation_copy_computes_what_the_policy_computes_after_every_update(tokenizer):
    """On CPU the engine generates with a copy whose linear weights are stored transposed
    (rollout.prepacked): same logits as the policy (tied output layer included), before and
    after an update; the trainer's modules are untouched; LoRA-wrapped policies are not copied."""
    from conftest import build_tiny_llama

    from posttrain.rollout.prepacked import TransposedLinear

    policy = build_tiny_llama(tokenizer)
    engine = HFEngine(policy, tokenizer)
    assert engine.prepack and engine.model is not policy
    assert isinstance(engine.model.lm_head, TransposedLinear) and type(policy.lm_head) is torch.nn.Linear
    ids = torch.tensor([[1, 2, 3, 4]])
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        with torch.no_grad():
            torch.testing.assert_close(engine.model(ids).logits, policy(ids).logits, atol=1e-5, rtol=1e-5)
            for p in policy.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
        engine.update_weights(policy)
    params = SamplingParams(n=2, temperature=0, max_new_tokens=6)
    assert ([c.token_ids for c in engine.generate([[1, 2, 3]], params)]
            == [c.token_ids for c in HFEngine(policy, tokenizer, prepack=False).generate([[1, 2, 3]], params)])
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(build_tiny_llama(tokenizer), LoraConfig(r=2, target_modules=["q_proj"]))
    assert not HFEngine(lora, tokenizer).prepack


class _Collect:
    """Everything transformers warns about, both ways it warns: ``warnings`` (FutureWarning,
    DeprecationWarning) and its ``transformers`` logger (``logger.warning_once``), with the
    once-only caches cleared so an earlier test cannot hide a warning."""

    def __enter__(self):
        import logging
        import warnings

        from transformers.utils import logging as hf_logging

        hf_logging.warning_once.cache_clear()
        self.records: list[str] = []
        collect = self.records

        class Handler(logging.Handler):
            def emit(self, record):
                collect.append(record.getMessage())

        self.handler = Handler(level=logging.WARNING)
        self.logger = logging.getLogger("transformers")
        self.logger.addHandler(self.handler)
        self.catcher = warnings.catch_warnings(record=True)
        self.caught = self.catcher.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc_info):
        self.catcher.__exit__(*exc_info)
        self.logger.removeHandler(self.handler)

    def deprecations(self) -> list[str]:
        messages = self.records + [str(w.message) for w in self.caught
                                   if issubclass(w.category, (FutureWarning, DeprecationWarning))]
        return [m for m in messages if "deprecat" in m.lower()]


def test_generation_with_a_shared_prefill_uses_no_deprecated_transformers_api(tiny_model, tokenizer):
    """The cache handed to generate and read from the prefill uses transformers' current name:
    nothing is deprecated (``past_key_values`` is removed in transformers 6)."""
    prompts = [tokenizer.encode("hello there"), tokenizer.encode("a longer prompt than the first")]
    with _Collect() as collected:
        completions = HFEngine(tiny_model, tokenizer).generate(
            prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=4, seed=0))
    assert len(completions) == 6
    assert collected.deprecations() == []


def test_the_engine_reports_sequences_and_decode_steps_to_the_current_phase(tiny_model, tokenizer, capsys):
    """Inside a generation phase the engine counts finished sequences batch by batch and beats
    once per decode step (a plain line when one is due), and the ids it samples are the ones it
    samples outside any phase."""
    from posttrain.log import Progress

    prompts = [tokenizer.encode(text) for text in ("one", "two words", "three words here", "four", "five")]
    params = SamplingParams(n=2, temperature=0, max_new_tokens=5)
    engine = HFEngine(tiny_model, tokenizer, batch_size=4)
    plain = engine.generate(prompts, params)
    with Progress(10, "eval t: generate", generation=True, unit="completions", interval_s=0.0, keys=()) as phase:
        tracked = engine.generate(prompts, params)
        assert phase.done == 10
    assert [c.token_ids for c in tracked] == [c.token_ids for c in plain]
    lines = capsys.readouterr().err.splitlines()
    counts = [line.split("] ")[1].split()[0] for line in lines if line.startswith("[eval t: generate]")]
    assert counts[0] == "0/10" and counts[-1] == "10/10" and {"4/10", "8/10"} <= set(counts)
    assert counts.count("0/10") >= 3  # decode steps of the first batch beat before any sequence is done


def test_rollout_prepacked_copy_false_generates_with_the_policy_itself(tiny_model_dir, tokenizer, tmp_path):
    """``rollout.prepacked_copy: false`` saves the copy's memory (the engine uses the policy
    module); unset, a full model on a CPU gets the prepacked copy."""
    from conftest import build_tiny_llama
    from test_rl import make_config

    from posttrain.rollout.sources import hf_source
    from posttrain.train.rl_settings import source_settings

    policy = build_tiny_llama(tokenizer)
    off = source_settings(make_config(tiny_model_dir, tmp_path, rollout={"prepacked_copy": False}), None)
    assert hf_source(policy, tokenizer, off).model is policy
    assert hf_source(policy, tokenizer, source_settings(make_config(tiny_model_dir, tmp_path), None)).prepack
