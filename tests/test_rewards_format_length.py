import pytest

from posttrain.errors import ConfigError, DataError
from posttrain.rewards.format import FormatReward, parse_tool_call
from posttrain.rewards.length import LengthReward


def test_regex_and_tags_components():
    reward = FormatReward(pattern=r"^<think>.*</think>\s*<answer>.*</answer>$", required_tags=["think", "answer"])
    out = reward(["q"] * 3, ["<think>a</think> <answer>1</answer>", "<think>a</think><answer>1</answer> tail", "1"])
    assert out.components["format/regex"] == [1.0, 0.0, 0.0]
    assert out.components["format/tags"] == [1.0, 1.0, 0.0]
    assert out.scores == [1.0, 0.0, 0.0]
    partial = FormatReward(pattern=r"^<think>.*</think>\s*<answer>.*</answer>$", required_tags=["think", "answer"], partial=True)
    assert partial(["q"] * 2, ["<think>a</think><answer>1</answer> tail", "1"]).scores == [0.5, 0.0]


@pytest.mark.parametrize(
    "text, name",
    [
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "get_weather"),
        ('Sure.\n```json\n{"name": "f", "parameters": {"x": 1}}\n```', "f"),
        ('{"name": "f", "arguments": "not json"}', None),
        ('{"arguments": {}}', None),
        ("<tool_call>{broken</tool_call>", None),
    ],
)
def test_parse_tool_call(text, name):
    call = parse_tool_call(text)
    assert (call["name"] if call else None) == name


def test_format_needs_a_check_and_valid_regex():
    with pytest.raises(ConfigError):
        FormatReward()
    with pytest.raises(ConfigError, match="pattern"):
        FormatReward(pattern="(unclosed")


def test_length_penalty_by_hand():
    reward = LengthReward(budget=5, penalty_per_unit=0.1)
    assert reward(["q"] * 3, ["abc", "abcde", "abcdefgh"]).scores == pytest.approx([0.0, 0.0, -0.3])


class FakeTokenizer:
    def encode(self, text):
        return text.split()


def test_length_in_tokens_uses_metadata_then_tokenizer():
    reward = LengthReward(budget=2, unit="tokens", penalty_per_unit=1.0, tokenizer=FakeTokenizer())
    out = reward(["q"] * 2, ["a b c d", "a b c d"], [{}, {"completion_tokens": 2}])
    assert out.scores == [-2.0, 0.0]
    with pytest.raises(DataError):
        LengthReward(unit="tokens")(["q"], ["a b"], [{}])


@pytest.mark.parametrize("completion", ["[" * 100_000, '{"name": "f", "arguments": ' + "[" * 100_000 + "]" * 100_000 + "}",
                                        "<tool_call>" * 20_000 + '{"name": "f", "arguments": {}}',
                                        "```json\n" * 20_000, '<tool_call>{"name": "f", "arguments": "' + "[" * 100_000 + '"}'],
                         ids=["deep list", "deep arguments", "unclosed tags", "unclosed fences", "deep string arguments"])
def test_hostile_tool_call_text_is_no_call_and_is_read_in_linear_time(completion):
    import time

    started = time.perf_counter()
    assert FormatReward(tool_call=True)(["q"], [completion]).scores == [0.0]
    assert time.perf_counter() - started < 2.0


def test_length_in_tokens_set_from_a_config_reads_the_sampled_token_count():
    """``unit: tokens`` from a config has no tokenizer: RL scoring and RL's held-out eval
    hand it the number of tokens the model sampled (a trajectory's tool output excluded)."""
    from posttrain.rewards import build_reward
    from posttrain.rollout.base import Completion
    from posttrain.eval.generate import evaluate_rows, trainer_metrics
    from posttrain.eval.prompts import PromptRow
    from posttrain.rollout.base import SamplingParams
    from posttrain.train.rl_samples import RolloutSample
    from posttrain.train.rl_scoring import score_groups
    from rl_fixtures import scoring

    reward = build_reward({"name": "length", "unit": "tokens", "budget": 3, "penalty_per_unit": 0.5})
    rows = [PromptRow([1], "q", {"answer": "4"}, 1)]
    short = RolloutSample(row=0, group=0, prompt_ids=[1], response_ids=[5, 6, 7], text="abcdefghij",
                          finish_reason="stop", reward=0.0)
    long = RolloutSample(row=0, group=0, prompt_ids=[1], response_ids=[5, 6, 7, 8, 9, 10, 11], text="a",
                         finish_reason="stop", reward=0.0)
    tool = RolloutSample(row=0, group=0, prompt_ids=[1], response_ids=[5, 6, 7, 8, 9, 10, 11], text="a",
                         finish_reason="stop", reward=0.0, response_mask=[1, 1, 0, 0, 0, 0, 1])
    score_groups([[short, long, tool]], rows, reward, scoring())
    assert [s.reward for s in (short, long, tool)] == [0.0, -2.0, 0.0]  # 3, 7, 3 sampled tokens

    class Fixed:
        def generate(self, prompt_ids, params):
            return [Completion(0, [5] * 9, "x", "stop")]

    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=16, seed=0)
    metrics = trainer_metrics(evaluate_rows(Fixed(), rows, reward, params).metrics)
    assert metrics["eval/reward"] == -3.0  # 9 sampled tokens, 6 over the budget
