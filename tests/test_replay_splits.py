"""Deterministic splits by problem id."""

from __future__ import annotations

import pytest

from replay.splits import assign_splits, parse_fractions
from tracestore.errors import TraceError

IDS = [f"gsm8k-{i}" for i in range(3000)]


def test_a_problem_keeps_its_split_whatever_else_is_in_the_trace():
    full = dict(zip(IDS, assign_splits(IDS, seed=0)))
    subset = IDS[::7][::-1]
    assert dict(zip(subset, assign_splits(subset, seed=0))) == {pid: full[pid] for pid in subset}


def test_fractions_are_met_and_the_seed_reshuffles():
    splits = assign_splits(IDS, seed=0, fractions=(0.5, 0.1, 0.4))
    for name, fraction in (("train", 0.5), ("calibration", 0.1), ("test", 0.4)):
        share = splits.count(name) / len(IDS)
        assert abs(share - fraction) < 4 * (fraction * (1 - fraction) / len(IDS)) ** 0.5
    other = assign_splits(IDS, seed=1, fractions=(0.5, 0.1, 0.4))
    assert 0.3 < sum(a != b for a, b in zip(splits, other)) / len(IDS) < 0.8
    assert set(assign_splits(IDS, seed=0, fractions=(1.0, 0.0, 0.0))) == {"train"}


def test_bad_fractions():
    assert parse_fractions("0.8,0.1,0.1") == (0.8, 0.1, 0.1)
    for bad in ("0.5,0.5", "0.5,0.5,0.5", "a,b,c", "-0.1,0.6,0.5"):
        with pytest.raises(TraceError, match="split fractions"):
            parse_fractions(bad)
