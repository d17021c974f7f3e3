import pytest

from posttrain.rewards.math import MathReward, answers_match, extract_answer
from posttrain.errors import ConfigError


@pytest.mark.parametrize(
    "text, methods, expected",
    [
        (r"Thus \boxed{\frac{a}{b+1}} is it", ["boxed"], r"\frac{a}{b+1}"),
        (r"\boxed{1} and later \boxed{2}", ["boxed"], "2"),
        ("steps\n#### 72\nextra", ["hash"], "72"),
        ("<answer>x=5</answer>", ["answer_tag"], "x=5"),
        ("I got 12 then 15.5 apples.", ["last_number"], "15.5"),
        ("costs $1,234,567 total", ["last_number"], "1234567"),
        ("#### 9\nbut \\boxed{8}", ["hash", "boxed"], "9"),
        ("#### 9 but \\boxed{8}", ["boxed", "hash"], "8"),
        ("nothing here", ["boxed", "hash", "answer_tag", "last_number"], None),
    ],
)
def test_extract_answer(text, methods, expected):
    assert extract_answer(text, methods) == expected


@pytest.mark.parametrize(
    "pred, ref, same",
    [
        (r"\frac{3}{4}", "0.75", True),
        ("0.75", "3/4", True),
        ("1000", "1,000", True),
        ("-3", "3", False),
        (r"2\sqrt{2}", r"\sqrt{8}", True),
        ("x = 7", "7", True),
        ("7.0001", "7", False),
        ("Paris", "paris", True),
    ],
)
def test_answers_match(pred, ref, same):
    assert answers_match(pred, ref) is same


def test_plain_fallback_without_math_verify():
    assert answers_match("1,000", "1000", use_math_verify=False)
    assert not answers_match(r"\frac{1}{2}", "0.5", use_math_verify=False)  # plain text differs


def test_math_reward_scores_and_missing_answer():
    reward = MathReward(extract=["hash", "last_number"])
    out = reward(["a", "b", "c", "d"], ["#### 5", "it is 6", "#### 5", "5"], [{"answer": 5}, {"answer": "6"}, {"answer": "4"}, {}])
    assert out.scores == [1.0, 1.0, 0.0, 0.0]
    assert out.components == {"math": [1.0, 1.0, 0.0, 0.0]}
    assert [d["extracted"] for d in out.details] == ["5", "6", "5", "5"]


def test_math_reward_in_worker_threads():
    """math-verify's SIGALRM timeouts must not break calls from a thread pool."""
    from concurrent.futures import ThreadPoolExecutor

    reward = MathReward()
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda i: reward(["q"], [rf"\boxed{{{i}/2}}"], [{"answer": str(i / 2)}]), range(4)))
    assert [o.scores for o in outs] == [[1.0]] * 4


def test_bad_extractor_is_a_config_error():
    with pytest.raises(ConfigError, match="extract"):
        MathReward(extract=["boxd"])
