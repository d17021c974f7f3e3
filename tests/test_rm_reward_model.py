"""The ``model`` reward: a reward model exported in HF format scores (prompt, completion)
batches exactly as the trainer rendered its pairs; config errors name the parameter."""

from __future__ import annotations

import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.rewards.model import ModelReward, prompt_messages
from posttrain.rewards.registry import build_reward
from posttrain.data.scored_sequence import render_for_scoring
from posttrain.models.scalar_head import export_tokenizer, load_scalar_head_model, score_layer, score_sequences


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tiny_model_dir, tokenizer):
    """A tiny reward model saved the way ``posttrain rm`` exports one."""
    path = tmp_path_factory.mktemp("tiny-rm")
    exported = export_tokenizer(tokenizer)
    model = load_scalar_head_model(tiny_model_dir, seed=5, pad_token_id=exported.pad_token_id)
    with torch.no_grad():
        score_layer(model).weight.mul_(100)  # spread the scores so mix-ups show
    model.save_pretrained(path)
    exported.save_pretrained(path)
    return str(path)


PROMPTS = ["What is 2 + 3?", "What is 7 * 6?", "Name a colour."]
COMPLETIONS = ["2 + 3 = 5. The answer is 5.", "42", "Blue, because the sky is blue on most days."]


def test_scores_match_direct_scoring(reward_model_dir, tokenizer):
    reward = build_reward({"name": "model", "path": reward_model_dir})
    assert isinstance(reward, ModelReward)
    out = reward(PROMPTS, COMPLETIONS, [{}, {}, {}])
    model = load_scalar_head_model(reward_model_dir)
    sequences = [render_for_scoring([{"role": "user", "content": p}], [{"role": "assistant", "content": c}], tokenizer)
                 for p, c in zip(PROMPTS, COMPLETIONS)]
    expected = score_sequences(model, sequences, pad_token_id=model.config.pad_token_id)
    assert out.scores == pytest.approx(expected, abs=1e-5)
    assert out.components == {"model": out.scores}
    assert len(set(round(s, 3) for s in out.scores)) == 3
    # batch order does not matter, and a small token budget (several forward passes) neither
    small = ModelReward(path=reward_model_dir, batch_tokens=64)
    reversed_out = small(PROMPTS[::-1], COMPLETIONS[::-1])
    assert reversed_out.scores[::-1] == pytest.approx(out.scores, abs=1e-5)


def test_prompt_messages_from_metadata(reward_model_dir):
    reward = ModelReward(path=reward_model_dir)
    system = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": PROMPTS[0]}]
    plain = reward(PROMPTS[:1], COMPLETIONS[:1]).scores[0]
    with_system = reward(PROMPTS[:1], COMPLETIONS[:1], [{"prompt_messages": system}]).scores[0]
    assert with_system != pytest.approx(plain, abs=1e-4)
    assert prompt_messages("x", {"messages": system}) == system
    assert prompt_messages("x", {"messages": "not a list"}) == [{"role": "user", "content": "x"}]


def test_composite_term_and_empty_batch(reward_model_dir):
    reward = build_reward({"name": "composite", "terms": {
        "model": {"weight": 0.5, "path": reward_model_dir},
        "math": {"weight": 1.0},
    }})
    out = reward(PROMPTS[:2], COMPLETIONS[:2], [{"answer": 5}, {"answer": 41}])
    direct = ModelReward(path=reward_model_dir)(PROMPTS[:2], COMPLETIONS[:2]).scores
    assert out.components["math"] == [1.0, 0.0]
    assert out.scores == pytest.approx([0.5 * direct[0] + 1.0, 0.5 * direct[1]], abs=1e-5)
    assert ModelReward(path=reward_model_dir)([], []).scores == []


def test_config_errors_name_the_parameter(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match=r"^reward\.path: model .*nope.* not found"):
        build_reward({"name": "model", "path": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match=r"^reward\.path: .* is not a reward model \(LlamaForCausalLM\)"):
        build_reward({"name": "model", "path": tiny_model_dir})
    with pytest.raises(ConfigError, match=r"^reward\.batch_tokens: must be a positive integer"):
        build_reward({"name": "model", "path": tiny_model_dir, "batch_tokens": 0})
    with pytest.raises(ConfigError, match=r"^reward\.batch_size: unknown parameter for reward 'model'"):
        build_reward({"name": "model", "path": tiny_model_dir, "batch_size": 4})


@pytest.mark.parametrize("name", ["posttrain.rewards.model", "posttrain.data.scored_sequence"])
def test_docstring_examples(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0
