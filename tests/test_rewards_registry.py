"""Building rewards from config: names, parameters, composites, user import paths, errors."""

import sys
import textwrap

import pytest

from posttrain.errors import ConfigError
from posttrain.rewards.registry import build_reward


def test_builtin_by_name_and_params():
    reward = build_reward({"name": "math", "params": {"extract": ["hash"]}})
    assert reward(["q", "q"], ["#### 4", "4"], [{"answer": "4"}] * 2).scores == [1.0, 0.0]
    with pytest.raises(ConfigError, match=r"^x\.pattern: the format reward needs"):
        build_reward("format", key="x")


def test_seed_compute_reward_as_composite():
    """The composite of docs/PIPELINE.md: 1.0 * passed/total + 0.2 * format - max(0, len - 2000) * 1e-4."""
    reward = build_reward(
        {
            "name": "composite",
            "terms": {
                "code": {"weight": 1.0, "wall_seconds": 5},
                "format": {"weight": 0.2, "pattern": r"```python\n.*```"},
                "length": {"weight": 1.0, "budget": 2000, "penalty_per_unit": 0.0001},
            },
        }
    )
    good = "```python\ndef sq(x):\n    return x * x\n```"
    half = "def sq(x):\n    return x * 2" + " " * 2490  # 2 of 3 pass? no: sq(2)==4 passes only
    tests = {"tests": ["assert sq(2) == 4", "assert sq(3) == 9", "assert sq(0) == 0"]}
    out = reward(["p", "p"], [good, half], [tests, tests])
    # good: 3/3 + 0.2 + 0 ; half: x*2 passes sq(2)==4 and sq(0)==0 -> 2/3, no fence, len 2516 -> -0.0516
    assert out.scores == pytest.approx([1.2, 2 / 3 - (len(half) - 2000) * 0.0001])
    assert out.components["code"] == pytest.approx([1.0, 2 / 3])
    assert out.components["format"] == [1.0, 0.0]
    assert out.components["length"] == pytest.approx([0.0, -(len(half) - 2000) * 0.0001])


def test_same_reward_twice_under_different_terms():
    reward = build_reward(
        {
            "name": "composite",
            "terms": {
                "think": {"reward": "format", "required_tags": ["think"]},
                "answer": {"reward": "format", "required_tags": ["answer"], "weight": 2},
            },
        }
    )
    out = reward(["q"], ["<answer>1</answer>"])
    assert out.scores == [2.0] and out.components == {"think": [0.0], "answer": [1.0]}


def test_user_reward_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent(
            """
            def brevity(prompts, completions, metadata):
                return [1.0 if len(c) < 5 else 0.0 for c in completions]

            def make_contains(word):
                return lambda prompts, completions, metadata: [float(word in c) for c in completions]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    brevity = build_reward("my_rewards:brevity")
    out = brevity(["q", "q"], ["hi", "a long answer"], None)
    assert out.scores == [1.0, 0.0] and out.components == {"brevity": [1.0, 0.0]}
    contains = build_reward({"name": "my_rewards:make_contains", "params": {"word": "cat"}})
    assert contains(["q", "q"], ["a cat", "a dog"], None).scores == [1.0, 0.0]
    sys.modules.pop("my_rewards", None)


@pytest.mark.parametrize(
    "spec, key_in_message",
    [
        ({"name": "maths"}, "rl.reward.name"),
        ({"name": "math", "extrct": ["boxed"]}, "rl.reward.extrct"),
        ({"name": "math", "extract": ["boxd"]}, "rl.reward.extract"),
        ({"name": "no_such_module_xyz:f"}, "rl.reward.name"),
        ({"name": "posttrain.rewards.math:nope"}, "rl.reward.name"),
        ({"name": "composite", "terms": {"code": {"weight": "high"}}}, "rl.reward.terms.code.weight"),
        ({"name": "composite", "terms": {"length": {"budjet": 3}}}, "rl.reward.terms.length.budjet"),
        ({"name": "composite"}, "rl.reward.terms"),
        (42, "rl.reward"),
    ],
)
def test_config_errors_name_the_key(spec, key_in_message):
    with pytest.raises(ConfigError) as info:
        build_reward(spec, key="rl.reward")
    message = str(info.value)
    assert message.startswith(key_in_message) and "\n" not in message
