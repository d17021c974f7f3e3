"""The 95% intervals every evaluation figure carries (eval.metrics): values computed by hand."""

import math
import random

import pytest

from posttrain.eval.metrics import (
    Z_95,
    PairedDifference,
    bootstrap_interval,
    clopper_pearson_interval,
    mean_and_spread,
    paired_difference,
    problem_interval,
    wilson_interval,
)


def test_wilson_13_of_100_by_hand():
    # p = 0.13, z^2 = 3.841459, z^2/n = 0.03841459, denominator 1.03841459
    # centre (0.13 + 0.01920729) / 1.03841459 = 0.143687
    # half 1.959964 * sqrt(0.1131/100 + 3.841459/40000) / 1.03841459 = 1.959964 * 0.0350291 / 1.03841459 = 0.066116
    low, high = wilson_interval(13, 100)
    assert low == pytest.approx(0.143687 - 0.066116, abs=2e-6) and high == pytest.approx(0.143687 + 0.066116, abs=2e-6)
    assert (round(low, 4), round(high, 4)) == (0.0776, 0.2098)
    assert Z_95 == pytest.approx(1.959964, abs=1e-6)


def test_wilson_at_the_ends_and_symmetry():
    # 0 of n: the upper end is (z^2/n) / (1 + z^2/n) = 0.03841459 / 1.03841459 = 0.0369935
    assert wilson_interval(0, 100)[0] == 0.0 and wilson_interval(0, 100)[1] == pytest.approx(0.0369935, abs=1e-6)
    assert wilson_interval(100, 100)[1] == 1.0 and wilson_interval(100, 100)[0] == pytest.approx(1 - 0.0369935, abs=1e-6)
    low, high = wilson_interval(37, 80)
    mirrored = wilson_interval(43, 80)
    assert (low, high) == pytest.approx((1 - mirrored[1], 1 - mirrored[0]))
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def test_wilson_covers_about_95_percent():
    """Coverage check: of 2000 simulated evaluations of 100 problems at p = 0.3, about 95%
    of the intervals hold p."""
    rng = random.Random(1)
    held = sum(low <= 0.3 <= high for low, high in
               (wilson_interval(sum(rng.random() < 0.3 for _ in range(100)), 100) for _ in range(2000)))
    assert 0.93 <= held / 2000 <= 0.97


def test_problem_interval_is_wilson_for_0_1_values_and_the_bootstrap_otherwise():
    assert problem_interval([1.0] * 13 + [0.0] * 87) == wilson_interval(13, 100)
    assert problem_interval([0.0] * 10) == (0.0, wilson_interval(0, 10)[1])  # never [0, 0] at 0 of 10
    fractions = [0.5, 0.25, 1.0, 0.0, 0.75]
    assert problem_interval(fractions) == bootstrap_interval(fractions)


def test_bootstrap_is_seeded_and_reads_percentiles():
    values = [0.0, 0.5, 1.0, 1.0, 0.25, 0.75, 0.0, 1.0]
    assert bootstrap_interval(values, seed=3) == bootstrap_interval(values, seed=3)
    spread_out = [i / 37 for i in range(37)]  # many distinct means: another seed draws other percentiles
    assert bootstrap_interval(spread_out, seed=3) != bootstrap_interval(spread_out, seed=4)
    low, high = bootstrap_interval(values)
    assert low < sum(values) / len(values) < high
    assert bootstrap_interval([0.5] * 7) == (0.5, 0.5)  # no spread between problems, none in the interval
    assert all(math.isnan(x) for x in bootstrap_interval([]))


def test_bootstrap_matches_the_exact_bootstrap_distribution():
    """Values [1, 1, 1, 1, 0]: a resample's mean is k/5 with k ~ Binomial(5, 0.8), so
    P(k <= 1) = 0.00672 and P(k <= 2) = 0.05792 put the 2.5% quantile at 0.4, and
    P(k = 5) = 0.32768 puts the 97.5% quantile at 1.0."""
    assert bootstrap_interval([1.0, 1.0, 1.0, 1.0, 0.0]) == (0.4, 1.0)


def test_clopper_pearson_by_hand():
    # all successes: P(X >= n) = p^n = 0.025 -> low = 0.025^(1/n); none: high = 1 - 0.025^(1/n)
    assert clopper_pearson_interval(4, 4) == pytest.approx((0.025 ** 0.25, 1.0))
    assert clopper_pearson_interval(0, 10) == pytest.approx((0.0, 1 - 0.025 ** 0.1))
    # 1 of 2: P(X >= 1) = 1 - (1 - p)^2 = 0.025 -> p = 1 - sqrt(0.975); symmetric upper end
    low, high = clopper_pearson_interval(1, 2)
    assert low == pytest.approx(1 - 0.975 ** 0.5) and high == pytest.approx(0.975 ** 0.5)
    assert clopper_pearson_interval(3, 10) == pytest.approx((0.066740, 0.652453), abs=1e-6)  # the tabulated value


def test_paired_difference_on_a_tiny_set():
    """0/1 scores: exact and conditional on the problems that changed (McNemar)."""
    before = [0, 0, 0, 0, 0]
    after = [1, 1, 1, 1, 0]
    change = paired_difference(before, after)
    # b = 4 improved of m = 4 changed, n = 5: pi in [0.025^(1/4), 1] = [0.397635, 1];
    # the change m (2 pi - 1) / n is in [4 (0.795271 - 1) / 5, 4 / 5] = [-0.163783, 0.8]
    assert change.delta == 0.8 and change.n == 5
    assert change.low == pytest.approx(-0.163783, abs=1e-6) and change.high == pytest.approx(0.8)
    assert not change.excludes_zero  # McNemar's exact p = 2 * 0.5^4 = 0.125: not at 5%
    # the pairing matters: one problem improved and one got worse (b = c = 1, m = 2, n = 4):
    # pi in [1 - sqrt(0.975), sqrt(0.975)], the change in +-2 (2 sqrt(0.975) - 1) / 4
    mixed = paired_difference([1, 0, 1, 0], [0, 1, 1, 0])
    half = 2 * (2 * 0.975 ** 0.5 - 1) / 4
    assert mixed.delta == 0.0 and (mixed.low, mixed.high) == pytest.approx((-half, half)) and not mixed.excludes_zero
    assert paired_difference([1, 1, 0], [1, 1, 0]) == PairedDifference(0.0, 0.0, 0.0, 3)  # identical: no change
    with pytest.raises(ValueError, match="same problems"):
        paired_difference([1, 0], [1])


def test_paired_difference_of_fractions_is_the_paired_bootstrap():
    """Fractions (n > 1 completions per problem): the bootstrap of the per-problem differences,
    seeded; [1, 1, 1, 1, 0] as differences has the exact bootstrap quantiles 0.4 and 1.0."""
    before = [0.0, 0.0, 0.0, 0.0, 0.5]
    after = [1.0, 1.0, 1.0, 1.0, 0.5]
    change = paired_difference(before, after)
    assert change == PairedDifference(delta=0.8, low=0.4, high=1.0, n=5) and change.excludes_zero
    assert paired_difference(before, after, seed=7) == paired_difference(before, after, seed=7)


def test_a_4_point_gain_on_100_problems_is_noise_and_a_20_point_one_is_not():
    """The issue's example: 10 problems newly right and 6 newly wrong out of 100 is +4 points,
    and its paired interval holds 0; 24 newly right and 4 newly wrong (+20) excludes it."""
    before = [1] * 40 + [0] * 60
    noise = paired_difference(before, [1] * 34 + [0] * 6 + [1] * 10 + [0] * 50)
    assert noise.delta == pytest.approx(0.04) and noise.low < 0 < noise.high
    real = paired_difference(before, [1] * 36 + [0] * 4 + [1] * 24 + [0] * 36)
    assert real.delta == pytest.approx(0.20) and real.excludes_zero and real.low > 0.05


def test_four_problems_newly_right_and_none_wrong_is_not_yet_a_gain():
    """A percentile bootstrap would put this change above 0 (no resample draws none of the 4
    with chance (0.96)^100 = 1.7% < 2.5%); the exact test's p is 0.125, and the interval says so."""
    before = [1] * 40 + [0] * 60
    change = paired_difference(before, [1] * 44 + [0] * 56)
    assert bootstrap_interval([1.0] * 4 + [0.0] * 96)[0] > 0
    assert change.delta == pytest.approx(0.04) and change.low < 0 < change.high and not change.excludes_zero


def test_mean_and_spread_over_seeds():
    mean, spread = mean_and_spread([0.40, 0.44, 0.42])
    assert mean == pytest.approx(0.42) and spread == pytest.approx(0.02)  # sqrt((0.0004 + 0.0004 + 0) / 2)
    assert mean_and_spread([0.5]) == (0.5, 0.0)
