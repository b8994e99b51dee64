"""Deterministic train / calibration / test splits by problem id.

A problem's split depends only on (seed, problem_id): adding problems to a trace or reading
its rows in another order never moves a problem to another split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

from tracestore.errors import TraceError

SPLITS = ("train", "calibration", "test")
DEFAULT_FRACTIONS = (0.5, 0.1, 0.4)
DEFAULT_SPLIT_SEED = 0


def hash_uniform(names: Iterable[str], seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per name, from a hash of (seed, name): stable across runs and machines."""
    values = []
    for name in names:
        digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
        values.append(int.from_bytes(digest, "big") / 2**64)
    return np.asarray(values, dtype=np.float64)


def parse_fractions(text: str) -> tuple[float, float, float]:
    """Parse ``"0.5,0.1,0.4"`` into (train, calibration, test) fractions that sum to 1."""
    parts = text.split(",")
    try:
        fractions = tuple(float(part) for part in parts)
    except ValueError:
        raise TraceError(f"split fractions must be three numbers like 0.5,0.1,0.4, got {text!r}") from None
    return check_fractions(fractions)


def check_fractions(fractions: tuple[float, ...]) -> tuple[float, float, float]:
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise TraceError(
            f"split fractions must be three non-negative numbers (train, calibration, test) "
            f"summing to 1, got {fractions}"
        )
    return fractions  # type: ignore[return-value]


def assign_splits(
    problem_ids: list[str], seed: int = DEFAULT_SPLIT_SEED, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
) -> list[str]:
    """The split name of each problem id, in the same order."""
    check_fractions(fractions)
    edges = np.cumsum(fractions)[:-1]
    buckets = np.searchsorted(edges, hash_uniform(problem_ids, seed), side="right")
    return [SPLITS[bucket] for bucket in buckets]
