"""`trace diff`: paired counts and tests on hand-built result files, whose values are worked out by hand here."""

from __future__ import annotations

import json
import math

import polars as pl
import pytest
from test_regrade import FINALS, problem, steps
from tracebuild import build_trace
from typer.testing import CliRunner

from analysis.diff import BOTH_RIGHT, BOTH_WRONG, ONLY_A, ONLY_B, run_diff
from cli import app
from tracegen.regrade import run_regrade
from tracestore.errors import TraceError


def results_file(path, outcomes: dict[tuple[str, int], bool | None], router="steer", config=0, params=None):
    """A trace replay --out file with one configuration: (problem, world) -> correct (None = a miss)."""
    keys = sorted(outcomes)
    frame = pl.DataFrame(
        {
            "router": [router] * len(keys),
            "params": [json.dumps(params or {"tau": 0.5})] * len(keys),
            "config": pl.Series([config] * len(keys), dtype=pl.Int32),
            "problem_id": [p for p, _ in keys],
            "world": pl.Series([w for _, w in keys], dtype=pl.Int32),
            "path": ["s"] * len(keys),
            "correct": pl.Series([outcomes[k] for k in keys], dtype=pl.Boolean),
            "cost": [1.0] * len(keys),
            "misses": pl.Series([int(outcomes[k] is None) for k in keys], dtype=pl.Int32),
        }
    )
    frame.write_parquet(path)
    return path


def one_world(counts: dict[str, int]) -> tuple[dict, dict]:
    """Outcomes of A and B over problems q000.. in world 0 with the given outcome counts, in that order."""
    a, b = {}, {}
    pattern = {BOTH_RIGHT: (True, True), ONLY_A: (True, False), ONLY_B: (False, True), BOTH_WRONG: (False, False)}
    index = 0
    for outcome, n in counts.items():
        for _ in range(n):
            a[(f"q{index:03d}", 0)], b[(f"q{index:03d}", 0)] = pattern[outcome]
            index += 1
    return a, b


def test_few_discordant_pairs_get_the_exact_binomial_test(tmp_path):
    a, b = one_world({BOTH_RIGHT: 10, ONLY_A: 8, ONLY_B: 2, BOTH_WRONG: 10})
    a[("q100", 0)], b[("q100", 0)] = None, True  # A missed this walk: excluded from the pairs
    result = run_diff(results_file(tmp_path / "a.parquet", a), results_file(tmp_path / "b.parquet", b))
    (comparison,) = result.comparisons
    assert comparison.counts == {BOTH_RIGHT: 10, ONLY_A: 8, ONLY_B: 2, BOTH_WRONG: 10, "excluded": 1}
    test = comparison.test
    assert test.test == "exact binomial" and (test.n_pairs, test.only_first, test.only_second) == (30, 8, 2)
    # two-sided: 2 P(X <= 2), X ~ Binomial(10, 1/2) = 2 (1 + 10 + 45) / 1024
    assert test.p_value == pytest.approx(112 / 1024, abs=1e-12)
    assert comparison.flipped(ONLY_B) == ["q018/0", "q019/0"]
    assert comparison.flipped(ONLY_A) == [f"q{i:03d}/0" for i in range(10, 18)]
    assert result.a.endswith("(steer config 0 (tau=0.5))")


def test_many_discordant_pairs_get_the_corrected_chi_square(tmp_path):
    a, b = one_world({BOTH_RIGHT: 5, ONLY_A: 20, ONLY_B: 8, BOTH_WRONG: 3})
    comparison = run_diff(results_file(tmp_path / "a.parquet", a), results_file(tmp_path / "b.parquet", b)).comparisons[
        0
    ]
    chi_square = (abs(20 - 8) - 1) ** 2 / 28
    assert comparison.test.test == "chi-square (continuity corrected)"
    assert comparison.test.statistic == pytest.approx(121 / 28)
    # chi-square with one degree of freedom: P(X > x) = erfc(sqrt(x / 2))
    assert comparison.test.p_value == pytest.approx(math.erfc(math.sqrt(chi_square / 2)), rel=1e-9)


def test_several_worlds_get_the_problem_level_test_and_per_world_counts(tmp_path):
    # per problem (worlds 0, 1): A right in  p0: both, p1: both, p2: world 0, p3: none
    #                            B right in  p0: none, p1: world 1, p2: world 0, p3: none
    a = {("p0", 0): True, ("p0", 1): True, ("p1", 0): True, ("p1", 1): True}
    a |= {("p2", 0): True, ("p2", 1): False, ("p3", 0): False, ("p3", 1): False}
    b = {("p0", 0): False, ("p0", 1): False, ("p1", 0): False, ("p1", 1): True}
    b |= {("p2", 0): True, ("p2", 1): False, ("p3", 0): False, ("p3", 1): False}
    comparison = run_diff(
        results_file(tmp_path / "a.parquet", a), results_file(tmp_path / "b.parquet", b, router="rsd")
    ).comparisons[0]
    assert comparison.counts == {BOTH_RIGHT: 2, ONLY_A: 3, ONLY_B: 0, BOTH_WRONG: 3, "excluded": 0}
    rows = {row["world"]: row for row in comparison.by_world.iter_rows(named=True)}
    assert [rows[0][o] for o in (BOTH_RIGHT, ONLY_A, ONLY_B, BOTH_WRONG)] == [1, 2, 0, 1]
    assert [rows[1][o] for o in (BOTH_RIGHT, ONLY_A, ONLY_B, BOTH_WRONG)] == [1, 1, 0, 2]
    assert rows[0]["p_value"] == pytest.approx(0.5)  # McNemar in world 0: 2 P(X <= 0 | n = 2) = 2 / 4
    assert rows[1]["p_value"] == pytest.approx(1.0)
    # per-problem mean differences d = (1, 0.5, 0, 0), statistic mean(d) = 0.375; the 16 sign flips give
    # mean >= 0.375 in 4 (both nonzero signs +), so the two-sided p = 2 * 4/16
    test = comparison.test
    assert test.test == "paired permutation over 4 problems"
    assert test.statistic == pytest.approx(0.375)
    assert test.p_value == pytest.approx(0.5)
    assert comparison.flipped(ONLY_A) == ["p0/0", "p0/1", "p1/0"]


def test_two_grade_sets_of_one_trace(tmp_path):
    trace = build_trace(tmp_path / "t", steps(), problems=[problem(p) for p in FINALS])
    run_regrade(trace, "exact")
    result = run_diff(trace, trace, grades_b="exact")
    small, large = result.comparisons
    assert (small.label, large.label) == ("all-small chain", "all-large chain")
    assert small.counts == {BOTH_RIGHT: 1, ONLY_A: 1, ONLY_B: 1, BOTH_WRONG: 1, "excluded": 0}
    assert (small.flipped(ONLY_A), small.flipped(ONLY_B)) == (["p1/0"], ["p2/0"])
    assert large.counts == {BOTH_RIGHT: 2, ONLY_A: 1, ONLY_B: 0, BOTH_WRONG: 1, "excluded": 0}
    assert large.flipped(ONLY_A) == ["p3/0"]
    assert small.test.p_value == pytest.approx(1.0)  # 2 P(X <= 1 | n = 2) = 1.5, capped at 1
    with pytest.raises(TraceError, match="same trace"):
        run_diff(trace, trace)


def test_two_traces_over_the_same_problems(tmp_path):
    trace_a = build_trace(tmp_path / "a", steps(), problems=[problem(p) for p in FINALS])
    regrown = [  # B: another run whose large model gets p2 right and whose small model finishes p0 nowhere
        {**row, "correct": True} if (row["problem_id"], row["path"]) == ("p2", "L") else row
        for row in steps()
        if (row["problem_id"], row["path"]) != ("p0", "ss")
    ]
    trace_b = build_trace(tmp_path / "b", regrown, problems=[problem(p) for p in FINALS])
    small, large = run_diff(trace_a, trace_b).comparisons
    assert small.counts == {BOTH_RIGHT: 1, ONLY_A: 0, ONLY_B: 0, BOTH_WRONG: 2, "excluded": 1}
    assert small.pairs.filter(pl.col("outcome") == "excluded")["problem_id"].to_list() == ["p0"]
    assert large.counts == {BOTH_RIGHT: 3, ONLY_A: 0, ONLY_B: 1, BOTH_WRONG: 0, "excluded": 0}
    assert large.flipped(ONLY_B) == ["p2/0"]
    fewer = build_trace(
        tmp_path / "c",
        [r for r in steps() if r["problem_id"] != "p3"],
        problems=[problem(p) for p in FINALS if p != "p3"],
    )
    with pytest.raises(TraceError, match="has problem 'p3' world 0, which .* lacks"):
        run_diff(trace_a, fewer)


def test_cli_prints_table_test_and_ids_and_writes_the_csv(tmp_path):
    a, b = one_world({BOTH_RIGHT: 2, ONLY_A: 1, ONLY_B: 3, BOTH_WRONG: 1})
    files = [str(results_file(tmp_path / f"{side}.parquet", outcomes)) for side, outcomes in (("a", a), ("b", b))]
    out = tmp_path / "pairs.csv"
    result = CliRunner().invoke(app, ["diff", *files, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "exact binomial: only A 1, only B 3 of 7 pairs" in result.output
    assert "p = 0.625" in result.output  # 2 (1 + 4) / 16
    assert "right only B: q003/0, q004/0, q005/0" in result.output
    pairs = pl.read_csv(out)
    assert pairs.columns == ["comparison", "problem_id", "world", "a_correct", "b_correct", "outcome"]
    assert pairs["outcome"].value_counts().sort("outcome").rows() == [
        (BOTH_RIGHT, 2),
        (BOTH_WRONG, 1),
        (ONLY_A, 1),
        (ONLY_B, 3),
    ]
    again = CliRunner().invoke(app, ["diff", *files, "--out", str(out)])
    assert again.exit_code == 1 and "exists; pass --force" in again.output


def test_bad_inputs_are_one_clear_error(tmp_path):
    a, b = one_world({BOTH_RIGHT: 2, ONLY_A: 1})
    file_a = results_file(tmp_path / "a.parquet", a)
    other = results_file(tmp_path / "other.parquet", {**b, ("zzz", 0): True})
    with pytest.raises(TraceError, match="has problem 'zzz' world 0, which .* lacks"):
        run_diff(file_a, other)
    sweep = pl.concat([pl.read_parquet(file_a), pl.read_parquet(file_a).with_columns(config=pl.lit(1, pl.Int32))])
    sweep.write_parquet(tmp_path / "sweep.parquet")
    with pytest.raises(TraceError, match="holds 2 router configurations .*--config-a"):
        run_diff(tmp_path / "sweep.parquet", file_a)
    assert run_diff(tmp_path / "sweep.parquet", file_a, config_a=1).comparisons[0].counts[BOTH_RIGHT] == 3
    with pytest.raises(TraceError, match="has no configuration 7"):
        run_diff(tmp_path / "sweep.parquet", file_a, config_a=7)
    trace = build_trace(tmp_path / "t", steps(), problems=[problem(p) for p in FINALS])
    with pytest.raises(TraceError, match="is a trace and B .* a results file"):
        run_diff(trace, file_a)
    with pytest.raises(TraceError, match="not a trace replay result"):
        pl.DataFrame({"x": [1]}).write_parquet(tmp_path / "x.parquet")
        run_diff(tmp_path / "x.parquet", file_a)
    result = CliRunner().invoke(app, ["diff", str(tmp_path / "missing.parquet"), str(file_a)])
    assert result.exit_code == 1 and "does not exist" in result.output
