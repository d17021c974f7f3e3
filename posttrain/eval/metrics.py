"""Evaluation statistics over sampled completions: pass@k, majority vote, accuracy.

pass@k is the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models
Trained on Code", section 2.1): with ``n`` samples of which ``c`` are correct,
``pass@k = 1 - C(n - c, k) / C(n, k)``, computed as the stable product
``1 - prod_{i = n - c + 1}^{n} (1 - k / i)``. Majority vote (self-consistency, Wang et al.
2022) picks the most frequent extracted answer among a prompt's samples.

Intervals (95%, every figure ``posttrain eval``, the pipeline and the report print):

- ``wilson_interval``: a single proportion (Wilson 1927, "Probable inference, the law of
  succession, and statistical inference"): accuracy with one completion per problem, maj@n, any
  score that is 0 or 1 per problem. Unlike the normal approximation it never leaves [0, 1] and
  is not [0, 0] at 0 successes (0/100 -> [0, 3.7%]).
- ``bootstrap_interval``: the percentile bootstrap over problems (Efron & Tibshirani 1993, ch. 13)
  of a mean of per-problem values in [0, 1] (accuracy with n > 1 completions per problem,
  pass@k): problems are the unit that varies, the completions of one problem are not independent.
- ``problem_interval`` picks between the two: Wilson when every per-problem value is 0 or 1.
- ``paired_difference``: the change between two evaluations of the same problems. When every
  problem scores 0 or 1 in both (one completion each: the pipeline's usual case) the interval is
  exact and conditional on the discordant problems, as McNemar's test is: of the m problems that
  changed, b improved; the Clopper–Pearson interval [πL, πU] of b / m gives the change
  (b − c) / n = m (2π − 1) / n its interval [m (2πL − 1) / n, m (2πU − 1) / n], which excludes 0
  exactly when the exact McNemar test rejects at 5% (Fay 2010, "Two-sided exact tests and
  matching confidence intervals for discrete data"). Otherwise (fractions: n > 1 completions,
  pass@k, several seeds) a paired percentile bootstrap over problems (resample problems,
  average after − before).

Why not the bootstrap everywhere: with few problems that changed, all the same way, a
percentile bootstrap calls the change real too readily (4 of 100 problems newly right and none
newly wrong gives a bootstrap interval above 0, while the exact test's p is 0.125). Why not
McNemar everywhere: it needs 0/1 scores. Both keep the pairing (a problem both stages solve
adds no noise). Resampling is seeded (``seed``, default 0) with a fixed number of resamples
(default 2000), so the same results always print the same interval.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass
from math import comb
from typing import Hashable, Sequence

Z_95 = 1.959963984540054  # the 97.5% quantile of the standard normal: a two-sided 95% interval
RESAMPLES = 2000


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


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (95% at the default ``z``).

    ``(p + z²/2n ± z·sqrt(p(1 − p)/n + z²/4n²)) / (1 + z²/n)``; (nan, nan) when ``n`` is 0.

    >>> [round(x, 4) for x in wilson_interval(13, 100)]
    [0.0776, 0.2098]
    >>> [round(x, 4) for x in wilson_interval(0, 100)]
    [0.0, 0.037]
    """
    if not 0 <= successes <= n:
        raise ValueError(f"a proportion needs 0 <= successes <= n (successes={successes}, n={n})")
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if successes == 0 else max(0.0, center - half)  # exactly 0 and 1 at the ends, not rounding error
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def _percentiles(sorted_means: list[float], level: float) -> tuple[float, float]:
    """The two-sided ``level`` percentile interval of a sorted bootstrap distribution."""
    cut = int(len(sorted_means) * (1 - level) / 2)
    return sorted_means[cut], sorted_means[len(sorted_means) - 1 - cut]


def bootstrap_interval(values_P: Sequence[float], *, resamples: int = RESAMPLES, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(values_P)`` over problems: ``resamples`` draws of
    P problems with replacement (``random.Random(seed)``), the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles of their means. ``values_P``: one value per problem [P].
    (nan, nan) for no problems.

    >>> bootstrap_interval([0.5, 0.5, 0.5])
    (0.5, 0.5)
    >>> bootstrap_interval([0.0, 1.0], resamples=4, seed=0) == bootstrap_interval([0.0, 1.0], resamples=4, seed=0)
    True
    """
    values = [float(v) for v in values_P]
    if not values:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    count = len(values)
    means = sorted(sum(rng.choices(values, k=count)) / count for _ in range(resamples))
    return _percentiles(means, level)


def problem_interval(values_P: Sequence[float], *, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """The 95% interval of the mean of per-problem values in [0, 1] [P]: Wilson's when every
    value is 0 or 1 (the mean is then a single proportion over problems), else the bootstrap
    over problems.

    >>> [round(x, 4) for x in problem_interval([1.0] * 13 + [0.0] * 87)]
    [0.0776, 0.2098]
    """
    values = [float(v) for v in values_P]
    if all(v in (0.0, 1.0) for v in values):
        return wilson_interval(int(sum(values)), len(values))
    return bootstrap_interval(values, resamples=resamples, seed=seed)


def _binomial_log_pmf(k: int, n: int, p: float) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p)


def _binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), 0 < p < 1."""
    return min(1.0, sum(math.exp(_binomial_log_pmf(i, n, p)) for i in range(k + 1)))


def clopper_pearson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper & Pearson 1934) interval of a binomial proportion: the p at which
    P(X >= successes) and P(X <= successes) are each (1 - level) / 2, found by bisection.

    >>> [round(x, 6) for x in clopper_pearson_interval(4, 4)]  # low = 0.025 ** (1 / 4)
    [0.397635, 1.0]
    >>> [round(x, 6) for x in clopper_pearson_interval(0, 10)]  # high = 1 - 0.025 ** (1 / 10)
    [0.0, 0.308497]
    """
    if not 0 <= successes <= n or n == 0:
        raise ValueError(f"a proportion needs 0 <= successes <= n and n > 0 (successes={successes}, n={n})")
    tail = (1 - level) / 2

    def solve(too_low) -> float:  # the p where too_low(p) turns False, on (0, 1)
        low, high = 0.0, 1.0
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (middle, high) if too_low(middle) else (low, middle)
        return (low + high) / 2

    lower = 0.0 if successes == 0 else solve(lambda p: 1 - _binomial_cdf(successes - 1, n, p) < tail)
    upper = 1.0 if successes == n else solve(lambda p: _binomial_cdf(successes, n, p) > tail)
    return lower, upper


@dataclass(frozen=True)
class PairedDifference:
    """``after − before`` on the same problems: the mean change ``delta``, its paired 95%
    interval [``low``, ``high``] and the number of problems ``n``."""

    delta: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly above or below 0 (the change is not noise at 95%)."""
        return self.low > 0 or self.high < 0


def paired_difference(before_P: Sequence[float], after_P: Sequence[float], *, resamples: int = RESAMPLES,
                      seed: int = 0, level: float = 0.95) -> PairedDifference:
    """The change ``mean(after_P − before_P)`` of two evaluations of the same P problems (same
    order) with its paired 95% interval: exact and conditional on the discordant problems
    (McNemar) when every score is 0 or 1, else the paired percentile bootstrap over problems
    (module docstring).

    4 of 5 problems newly right, none newly wrong: the exact test's p is 2 × 0.5⁴ = 0.125, so
    the interval, 4 × (2 × 0.025^(1/4) − 1) / 5 = −0.164 to 4 × (2 × 1 − 1) / 5 = 0.8, holds 0.

    >>> d = paired_difference([0, 0, 0, 0, 0], [1, 1, 1, 1, 0])
    >>> d.delta, round(d.low, 4), d.high, d.excludes_zero
    (0.8, -0.1638, 0.8, False)
    """
    if len(before_P) != len(after_P):
        raise ValueError(f"paired values need the same problems: {len(before_P)} before, {len(after_P)} after")
    differences = [float(a) - float(b) for b, a in zip(before_P, after_P)]
    count = len(differences)
    if not differences:
        return PairedDifference(float("nan"), float("nan"), float("nan"), 0)
    delta = sum(differences) / count
    if all(float(v) in (0.0, 1.0) for v in (*before_P, *after_P)):
        improved, changed = differences.count(1.0), sum(d != 0 for d in differences)
        if changed == 0:
            return PairedDifference(delta, 0.0, 0.0, count)
        low, high = clopper_pearson_interval(improved, changed, level)
        return PairedDifference(delta, changed * (2 * low - 1) / count, changed * (2 * high - 1) / count, count)
    low, high = bootstrap_interval(differences, resamples=resamples, seed=seed, level=level)
    return PairedDifference(delta, low, high, count)


def mean_and_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0 for one value) of one figure over seeds.

    >>> [round(x, 6) for x in mean_and_spread([0.4, 0.44, 0.42])]
    [0.42, 0.02]
    """
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return mean, spread
