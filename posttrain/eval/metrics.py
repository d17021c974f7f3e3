"""Evaluation statistics over sampled completions: pass@k, majority vote, accuracy.

pass@k is the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models
Trained on Code", section 2.1): with ``n`` samples of which ``c`` are correct,
``pass@k = 1 - C(n - c, k) / C(n, k)``, computed as the stable product
``1 - prod_{i = n - c + 1}^{n} (1 - k / i)``. Majority vote (self-consistency, Wang et al.
2022) picks the most frequent extracted answer among a prompt's samples.
"""

from __future__ import annotations

from collections import Counter
from math import comb
from typing import Hashable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``n`` samples, ``c`` of them correct.

    >>> pass_at_k(10, 0, 1), pass_at_k(10, 10, 5), round(pass_at_k(5, 2, 1), 6)
    (0.0, 1.0, 0.4)
    >>> round(pass_at_k(10, 3, 5), 6)  # 1 - C(7, 5) / C(10, 5) = 1 - 21/252
    0.916667
    """
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass@k needs 0 <= c <= n and k >= 1 (n={n}, c={c}, k={k})")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got n={n}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def pass_at_k_reference(n: int, c: int, k: int) -> float:
    """The same quantity with exact binomials (slow reference for tests)."""
    return 1.0 - comb(n - c, k) / comb(n, k)


def mean_pass_at_k(correct_counts: Sequence[int], n: int, k: int) -> float:
    """pass@k averaged over problems; ``correct_counts[i]`` of ``n`` samples were correct.

    >>> mean_pass_at_k([0, 1, 2], n=2, k=1)
    0.5
    """
    if not correct_counts:
        return float("nan")
    return sum(pass_at_k(n, c, k) for c in correct_counts) / len(correct_counts)


def majority_vote(answers: Sequence[Hashable | None]) -> Hashable | None:
    """The most frequent non-None answer; ties go to the one seen first; None if none.

    >>> majority_vote(["3", "4", "4", None, "3"]), majority_vote([None, None])
    ('3', None)
    """
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def majority_vote_correct(answers: Sequence[Hashable | None], correct: Sequence[bool]) -> bool:
    """Whether the voted answer is correct (judged by any sample that gave that answer).

    >>> majority_vote_correct(["7", "8", "8"], [True, False, False])
    False
    >>> majority_vote_correct(["7", "7", "8"], [True, True, False])
    True
    """
    voted = majority_vote(answers)
    if voted is None:
        return False
    return any(ok for a, ok in zip(answers, correct) if a == voted)
