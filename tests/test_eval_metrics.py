import itertools
import random

import pytest

from posttrain.eval.metrics import (
    majority_vote,
    majority_vote_correct,
    mean_pass_at_k,
    pass_at_k,
    pass_at_k_reference,
)


def test_stable_estimator_matches_exact_binomials():
    for n in range(1, 21):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(pass_at_k_reference(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_is_the_chance_that_a_random_k_subset_contains_a_correct_sample():
    """Definition check: enumerate all k-subsets of n samples."""
    n, k = 7, 3
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(range(n), k))
        hit = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(hit)


def test_large_n_is_finite_and_monotone_in_k():
    values = [pass_at_k(200, 3, k) for k in (1, 10, 100)]
    assert values == sorted(values) and 0 < values[0] < values[-1] < 1
    assert values[0] == pytest.approx(3 / 200)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_mean_and_majority():
    assert mean_pass_at_k([1, 0], n=2, k=1) == pytest.approx(0.25)
    assert majority_vote(["a", "b", "b"]) == "b"
    assert majority_vote(["a", "b"]) == "a"  # tie: first seen
    assert majority_vote_correct(["5", None, None], [True, False, False]) is True
    rng = random.Random(0)
    answers = [rng.choice("xyz") for _ in range(50)]
    top = max("xyz", key=answers.count)
    assert majority_vote(answers) == top
