"""Bootstrap over problems and McNemar's test, checked against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.stats import (
    EXACT_BELOW,
    bootstrap_counts,
    mcnemar,
    paired_problem_test,
    percentile_interval,
    ratio,
    resampled_ratio,
)


def exact_two_sided(k: int, n: int) -> float:
    """Twice the smaller binomial(n, 1/2) tail, at most 1, from math.comb."""
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(only_first: int, only_second: int, both_right: int = 7, both_wrong: int = 5):
    first = [True] * only_first + [False] * only_second + [True] * both_right + [False] * both_wrong
    second = [False] * only_first + [True] * only_second + [True] * both_right + [False] * both_wrong
    return np.array(first), np.array(second)


@pytest.mark.parametrize("only_first, only_second", [(0, 6), (3, 9), (5, 5), (11, 2), (0, 0), (12, 12)])
def test_mcnemar_exact_binomial_below_25_discordant_pairs(only_first, only_second):
    result = mcnemar(*paired(only_first, only_second))
    assert result.test == "exact binomial"
    assert (result.only_first, result.only_second, result.n_pairs) == (
        only_first,
        only_second,
        only_first + only_second + 12,
    )
    expected = 1.0 if only_first + only_second == 0 else exact_two_sided(only_first, only_first + only_second)
    assert result.p_value == pytest.approx(expected, rel=1e-12)
    assert result.statistic == min(only_first, only_second)


@pytest.mark.parametrize("only_first, only_second", [(5, 20), (20, 5), (30, 40), (100, 60)])
def test_mcnemar_chi_square_with_continuity_correction_from_25_discordant_pairs(only_first, only_second):
    result = mcnemar(*paired(only_first, only_second))
    assert result.test.startswith("chi-square")
    chi_square = (abs(only_first - only_second) - 1) ** 2 / (only_first + only_second)
    assert result.statistic == pytest.approx(chi_square)
    # chi-square with one degree of freedom: P(X > x) = erfc(sqrt(x / 2))
    assert result.p_value == pytest.approx(math.erfc(math.sqrt(chi_square / 2)), rel=1e-9)


def test_mcnemar_switches_test_at_the_threshold_and_ignores_concordant_pairs():
    assert mcnemar(*paired(EXACT_BELOW - 1, 0)).test == "exact binomial"
    assert mcnemar(*paired(EXACT_BELOW, 0)).test.startswith("chi-square")
    few, many = mcnemar(*paired(2, 9, 0, 0)), mcnemar(*paired(2, 9, 500, 300))
    assert few.p_value == many.p_value and many.n_pairs == few.n_pairs + 800
    with pytest.raises(ValueError):
        mcnemar(np.ones(3, bool), np.ones(4, bool))


def test_bootstrap_counts_draw_every_resample_with_replacement_and_follow_the_seed():
    counts = bootstrap_counts(7, 500, seed=3)
    assert counts.shape == (500, 7)
    assert (counts.sum(axis=1) == 7).all() and (counts >= 0).all()
    assert (counts == 0).any() and (counts > 1).any()  # with replacement
    assert np.array_equal(counts, bootstrap_counts(7, 500, seed=3))
    assert not np.array_equal(counts, bootstrap_counts(7, 500, seed=4))
    # every problem is drawn equally often on average
    assert np.allclose(counts.mean(axis=0), 1.0, atol=0.15)


def test_resampled_ratio_is_the_ratio_of_sums_over_the_drawn_problems():
    correct = np.array([2.0, 0.0, 1.0, 2.0])  # per problem, summed over 2 worlds
    finished = np.array([2.0, 2.0, 1.0, 2.0])  # problem 2 missed one world
    counts = np.array([[1, 1, 1, 1], [0, 4, 0, 0], [2, 0, 1, 1], [0, 0, 0, 0]], dtype=float)
    got = resampled_ratio(counts, correct, finished)
    assert got[:3].tolist() == pytest.approx([5 / 7, 0.0, 7 / 7])
    assert np.isnan(got[3])
    assert np.isnan(ratio(1.0, 0.0)) and ratio(3.0, 4.0) == 0.75


def test_percentile_interval_of_a_mean_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    outcomes = rng.random(400) < 0.7
    counts = bootstrap_counts(400, 4000, seed=1)
    samples = resampled_ratio(counts, outcomes.astype(float), np.ones(400))
    low, high = percentile_interval(samples)
    mean = outcomes.mean()
    half_width = 1.96 * math.sqrt(mean * (1 - mean) / 400)
    assert low < mean < high
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.1)
    assert percentile_interval(np.array([np.nan, np.nan])) is None
    assert percentile_interval(np.array([np.nan, 1.0, 1.0])) == (1.0, 1.0)


def test_paired_problem_test_by_hand():
    # three problems, two worlds each; per-problem mean differences 1, 0.5, 0: eight sign patterns, of which
    # four give |mean| >= the observed 0.5, so the exact two-sided p is 4/8
    problems = np.repeat(["a", "b", "c"], 2)
    first = np.array([True, True, True, True, False, True])
    second = np.array([False, False, True, False, False, True])
    result = paired_problem_test(first, second, problems)
    assert result.p_value == pytest.approx(0.5)
    assert result.statistic == pytest.approx(0.5) and (result.only_first, result.only_second) == (3, 0)
    assert result.n_pairs == 6 and result.test == "paired permutation over 3 problems"


def test_worlds_of_a_problem_are_not_independent_evidence():
    """Six problems where the router alone is right, four ties, five identical worlds each: McNemar over the
    50 (problem, world) pairs sees 30 discordant pairs; the problem-level test sees six problems, p = 2 / 2^6."""
    problems = np.repeat([f"p{i}" for i in range(10)], 5)
    first = np.ones(50, dtype=bool)
    second = np.repeat([False] * 6 + [True] * 4, 5)
    assert mcnemar(first, second).p_value < 1e-6
    assert paired_problem_test(first, second, problems).p_value == pytest.approx(2 / 2**6)
    assert paired_problem_test(first, first, problems).p_value == 1.0
