import time

import pytest

from posttrain.rewards.math import MathReward, answers_match, check_answer, extract_answer
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


# ------------------------------------------------------------------ what a policy might try


@pytest.mark.parametrize("answer", [r"42\%", r"42 \%", "42%", r"42\,\%", "42 percent", r"42\text{ percent}",
                                    r"42\text{\%}", "42 per cent", "42\uff05"])
def test_a_percent_answer_matches_one_reading_the_number_before_the_sign(answer):
    assert answers_match(answer, "42") and answers_match(answer, r"42\%")
    assert not answers_match(answer, "0.42") and not answers_match(answer, r"\frac{42}{100}")
    reward = MathReward()
    out = reward(["q", "q"], [rf"\boxed{{{answer}}}"] * 2, [{"answer": "42"}, {"answer": "0.42"}])
    assert out.scores == [1.0, 0.0]


def test_a_percent_sign_that_does_not_end_a_value_matches_nothing():
    assert not answers_match("0.42", r"42\%") and not answers_match("0.42", "42 percent")
    assert not answers_match("4%2", "42") and not answers_match("4%2", "0.08") and not answers_match("4 % 2", "42")
    assert answers_match(r"12.5\%", "12.5") and not answers_match(r"12.5\%", "0.125")


HOSTILE_VALUES = [r"9^{9^{9^{9}}}", r"9^{9^{9}}", "9**9**9**9", r"2^{2^{40}}", r"2^{-10^{9}}", "1000000!",
                  r"(10^{7})!", "9" * 20000, "1" + "0" * 1200]


def deep_fraction(levels: int) -> str:
    text = "1"
    for _ in range(levels):
        text = r"\frac{1}{1+" + text + "}"
    return text


@pytest.mark.parametrize("value", HOSTILE_VALUES + [deep_fraction(40)], ids=lambda v: v[:16])
def test_oversized_answers_are_refused_at_once_and_counted_in_any_thread(value):
    from concurrent.futures import ThreadPoolExecutor

    reward = MathReward()
    started = time.perf_counter()
    with ThreadPoolExecutor(1) as pool:  # a worker thread: math-verify's SIGALRM timeouts cannot fire there
        out = pool.submit(reward, ["q"], [rf"\boxed{{{value}}}"], [{"answer": "42"}]).result(timeout=30)
    assert time.perf_counter() - started < 2.0
    assert out.scores == [0.0] and out.components["math/unverified"] == [1.0]
    assert out.details[0]["unverified"]


def test_a_slow_verification_is_cut_at_its_time_budget_and_the_next_one_still_runs():
    from concurrent.futures import ThreadPoolExecutor

    reward = MathReward(verify_seconds=1.0)
    reward(["q"], [r"\boxed{1}"], [{"answer": "1"}])  # the verifier process is up
    slow = [r"\boxed{\binom{10^{9}}{5 \cdot 10^{8}}}", r"\boxed{\Gamma(10^{8})}"]
    started = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda c: reward(["q"], [c], [{"answer": "42"}]), slow))
    assert time.perf_counter() - started < 10.0
    for out in outs:
        assert out.scores == [0.0] and out.components["math/unverified"] == [1.0]
        assert out.details[0]["unverified"] == "took more than 1 s"
    out = reward(["q", "q"], [r"\boxed{\frac{1}{2}}", "#### 41"], [{"answer": "0.5"}, {"answer": "41"}])
    assert out.scores == [1.0, 1.0] and "math/unverified" not in out.components


def test_legitimate_large_answers_are_still_compared():
    assert answers_match(r"2^{100}", str(2**100)) and answers_match("100!", "100!")
    assert answers_match(r"\frac{1}{1+\frac{1}{1+\frac{1}{2}}}", "3/5")
    assert check_answer(str(2**1000), str(2**1000)).unverified is None


@pytest.mark.parametrize("completion", ["\\boxed{" * 60000 + "41", "<answer>" * 60000 + "41",
                                        "\\boxed{1e999999999}", "1/" * 40000 + "1"], ids=lambda c: c[:10])
def test_extraction_and_the_plain_comparison_stay_fast_on_hostile_text(completion):
    started = time.perf_counter()
    out = MathReward(use_math_verify=False)(["q"], [completion], [{"answer": "42"}])
    assert out.scores == [0.0] and time.perf_counter() - started < 2.0


def test_verify_seconds_must_be_a_positive_number():
    for bad in (0, -1, True, "5", 1e9):
        with pytest.raises(ConfigError, match="verify_seconds"):
            MathReward(verify_seconds=bad)
