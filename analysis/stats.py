"""Significance for router comparisons: a cluster bootstrap over problems, McNemar's paired test (one world
per problem) and a paired permutation test over problems (several worlds).

Worlds of one problem share its difficulty, so they are not independent draws: the bootstrap
resamples problems with replacement and keeps all worlds of a drawn problem together. Every
statistic is a ratio of per-problem sums (correct / finished walks, cost / finished walks, ...),
so a resample is a vector of draw counts per problem and all statistics of all routers come from
one matrix product over the same resamples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EXACT_BELOW = 25  # McNemar: exact binomial test when discordant pairs are fewer, else chi-square
PERMUTATIONS = 9999  # paired permutation test: random sign flips (all of them when there are fewer)


def bootstrap_counts(n_problems: int, n_resamples: int, seed: int) -> np.ndarray:
    """(n_resamples, n_problems): how often each problem is drawn in each resample of n_problems draws."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_problems, np.full(n_problems, 1.0 / n_problems), size=n_resamples).astype(np.float64)


def ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, NaN where the denominator is zero."""
    numerator, denominator = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    out = np.full(np.broadcast(numerator, denominator).shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float] | None:
    """Equal-tailed percentile interval of the finite samples; None when there are none."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return None
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def resampled_ratio(counts: np.ndarray, numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """sum(numerator) / sum(denominator) over the problems of each resample (per-problem sums in)."""
    return ratio(counts @ numerator, counts @ denominator)


@dataclass(frozen=True)
class PairedTest:
    """A paired test of two routers' correctness on the same (problem, world) walks."""

    n_pairs: int  # walks both were graded on
    only_first: int  # walks the first got right and the second wrong
    only_second: int  # walks the first got wrong and the second right
    test: str  # "exact binomial", "chi-square (continuity corrected)" or the permutation test's name
    statistic: float  # the smaller discordant count (exact), the chi-square value, or the mean difference
    p_value: float


def mcnemar(first: np.ndarray, second: np.ndarray) -> PairedTest:
    """Two-sided McNemar test on paired booleans: exact binomial when the discordant pairs number fewer
    than EXACT_BELOW, else chi-square with continuity correction, 1 degree of freedom."""
    first, second = np.asarray(first, dtype=bool), np.asarray(second, dtype=bool)
    if first.shape != second.shape:
        raise ValueError("mcnemar needs paired arrays of one shape")
    only_first = int(np.sum(first & ~second))
    only_second = int(np.sum(~first & second))
    discordant = only_first + only_second
    from scipy import stats  # here, not at import: scipy.stats takes a second to import, and few commands test

    if discordant < EXACT_BELOW:
        p_value = 1.0 if discordant == 0 else float(stats.binomtest(only_first, discordant, 0.5).pvalue)
        return PairedTest(
            first.size,
            only_first,
            only_second,
            "exact binomial",
            float(min(only_first, only_second)),
            min(p_value, 1.0),
        )
    chi_square = (abs(only_first - only_second) - 1) ** 2 / discordant
    return PairedTest(
        first.size,
        only_first,
        only_second,
        "chi-square (continuity corrected)",
        float(chi_square),
        float(stats.chi2.sf(chi_square, df=1)),
    )


def paired_problem_test(first: np.ndarray, second: np.ndarray, problems: np.ndarray, seed: int = 0) -> PairedTest:
    """Two-sided paired permutation test with the problem as the unit, for walks over several worlds.

    Worlds of one problem are not independent pairs (they share its difficulty), so McNemar's test
    over (problem, world) pairs would overstate the evidence. Each problem contributes the mean
    correctness of each router over its worlds; the statistic is the mean over problems of the
    difference, and the null distribution flips the sign of each problem's difference (scipy's
    paired-samples permutation test, exact when there are at most PERMUTATIONS sign patterns).
    """
    first, second = np.asarray(first, dtype=bool), np.asarray(second, dtype=bool)
    if not first.shape == second.shape == np.shape(problems):
        raise ValueError("paired_problem_test needs paired arrays of one shape")
    _, index = np.unique(problems, return_inverse=True)
    counts = np.bincount(index)
    first_means = np.bincount(index, weights=first) / counts
    second_means = np.bincount(index, weights=second) / counts
    if np.array_equal(first_means, second_means):
        p_value = 1.0
    else:
        from scipy import stats

        result = stats.permutation_test(
            (first_means, second_means),
            lambda x, y, axis: np.mean(x - y, axis=axis),
            permutation_type="samples",
            vectorized=True,
            n_resamples=PERMUTATIONS,
            alternative="two-sided",
            random_state=seed,
        )
        p_value = float(result.pvalue)
    return PairedTest(
        first.size,
        int(np.sum(first & ~second)),
        int(np.sum(~first & second)),
        f"paired permutation over {counts.size} problems",
        float(np.mean(first_means - second_means)),
        min(p_value, 1.0),
    )
