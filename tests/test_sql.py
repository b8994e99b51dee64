"""DuckDB views over a trace: rows match what was written, empty tables keep their columns, output files."""

from __future__ import annotations

import csv
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tracebuild import build_trace, comb_steps, forget_part, step_and_tokens

from analysis.sql import run_sql, write_result
from tracestore.errors import TraceError
from tracestore.schema import SCHEMAS, TABLES

# The README's example queries (they must keep working on a comb-shaped trace).
ACCURACY_BY_ESCALATION = """
SELECT nullif(strpos(path, 'L'), 0) - 1 AS small_steps_before_escalation,
       count(*) AS trees, avg(correct::INT) AS accuracy
FROM steps WHERE is_final
GROUP BY 1 ORDER BY 1 NULLS FIRST
"""
TOKENS_BY_ESCALATION = """
SELECT nullif(strpos(f.path, 'L'), 0) - 1 AS small_steps_before_escalation,
       coalesce(sum(s.n_gen_tokens) FILTER (WHERE s.model = 'small'), 0) / count(DISTINCT f.step_id) AS small_tokens,
       coalesce(sum(s.n_gen_tokens) FILTER (WHERE s.model = 'large'), 0) / count(DISTINCT f.step_id) AS large_tokens
FROM steps f JOIN steps s
  ON s.problem_id = f.problem_id AND s.world = f.world AND starts_with(f.path, s.path)
WHERE f.is_final
GROUP BY 1 ORDER BY 1 NULLS FIRST
"""
CONFIDENCE_VS_SMALL_OUTCOME = """
WITH small_chain AS (
  SELECT problem_id, world, correct FROM steps WHERE is_final AND regexp_full_match(path, 's+'))
SELECT s.depth, c.correct AS small_chain_correct, count(*) AS steps,
       avg(s.conf_max_logit_math) AS mean_confidence
FROM steps s JOIN small_chain c USING (problem_id, world)
WHERE regexp_full_match(s.path, 's+')
GROUP BY ALL ORDER BY ALL
"""

LARGE_ONLY_BY_HAND = """
WITH test AS (SELECT DISTINCT problem_id FROM large_only)
SELECT count(DISTINCT problem_id) AS problems, avg(correct::INT) FILTER (WHERE is_final) AS accuracy,
       2 * 657408 * sum(n_gen_tokens) / count(DISTINCT problem_id) / 1e12 AS tflops_per_query
FROM steps JOIN test USING (problem_id) WHERE regexp_full_match(path, 'L+')
"""


def confidence(problem: str, path: str) -> float:
    return 8.0 - len(path) - (2.0 if problem == "p1" else 0.0)


@pytest.fixture
def graded_comb(tmp_path):
    """Comb trees (4 steps) with varied outcomes, token counts and confidences; returns (root, steps)."""
    outcomes = {"p0": lambda path: True, "p1": lambda path: path.count("L") >= 2, "p2": lambda path: "L" in path}
    steps = []
    for problem, correct in outcomes.items():
        for world in (0, 1):
            for step in comb_steps(problem, 4, world=world, correct=correct):
                path = step["path"]
                step["n_gen_tokens"] = 3 + len(path) + 5 * path.count("L")
                step["conf_max_logit_math"] = confidence(problem, path)
                steps.append(step)
    return build_trace(tmp_path / "t", steps, parts=3), [step_and_tokens(s)[0] for s in steps]


def rows(result) -> list[tuple]:
    return list(zip(*result.to_pydict().values()))


def escalation(path: str) -> int | None:
    return path.index("L") if "L" in path else None


def test_views_return_every_row_written(graded_comb):
    root, steps = graded_comb
    result = run_sql(root, "SELECT step_id, model, n_gen_tokens, correct FROM steps ORDER BY step_id")
    written = sorted((s["step_id"], s["model"], s["n_gen_tokens"], s["correct"]) for s in steps)
    assert rows(result) == written
    tokens = run_sql(root, "SELECT step_id, len(token_ids) AS n FROM tokens ORDER BY step_id")
    assert tokens.to_pydict()["n"] == [n for _, _, n, _ in written]
    problems = run_sql(root, "SELECT problem_id FROM problems ORDER BY 1").column(0).to_pylist()
    assert problems == sorted({s["problem_id"] for s in steps})


def test_accuracy_by_escalation(graded_comb):
    root, steps = graded_comb
    finals = [s for s in steps if s["is_final"]]
    groups = sorted({escalation(s["path"]) for s in finals}, key=lambda k: (k is not None, k))
    expected = []
    for group in groups:
        members = [s for s in finals if escalation(s["path"]) == group]
        expected.append((group, len(members), sum(s["correct"] for s in members) / len(members)))
    result = run_sql(root, ACCURACY_BY_ESCALATION)
    assert rows(result) == [pytest.approx(row) for row in expected]


def test_tokens_by_escalation(graded_comb):
    root, steps = graded_comb
    expected = []
    finals = [s for s in steps if s["is_final"]]
    for group in sorted({escalation(s["path"]) for s in finals}, key=lambda k: (k is not None, k)):
        members = [f for f in finals if escalation(f["path"]) == group]
        used = [
            s
            for f in members
            for s in steps
            if (s["problem_id"], s["world"]) == (f["problem_id"], f["world"]) and f["path"].startswith(s["path"])
        ]
        expected.append(
            (
                group,
                sum(s["n_gen_tokens"] for s in used if s["model"] == "small") / len(members),
                sum(s["n_gen_tokens"] for s in used if s["model"] == "large") / len(members),
            )
        )
    result = run_sql(root, TOKENS_BY_ESCALATION)
    assert rows(result) == [pytest.approx(row) for row in expected]


def test_confidence_vs_small_outcome(graded_comb):
    root, steps = graded_comb
    small = [s for s in steps if re.fullmatch("s+", s["path"])]
    outcome = {(s["problem_id"], s["world"]): s["correct"] for s in small if s["is_final"]}
    expected = {}
    for s in small:
        expected.setdefault((s["depth"], outcome[(s["problem_id"], s["world"])]), []).append(s["conf_max_logit_math"])
    result = run_sql(root, CONFIDENCE_VS_SMALL_OUTCOME)
    assert rows(result) == [pytest.approx((d, c, len(v), sum(v) / len(v))) for (d, c), v in sorted(expected.items())]


def test_empty_tables_are_views_with_typed_columns(comb_trace):
    for table in ("hidden", "scores"):
        result = run_sql(comb_trace, f"SELECT * FROM {table}")
        assert result.num_rows == 0
        assert result.schema.names == SCHEMAS[table].names
    types = run_sql(
        comb_trace, "SELECT typeof(vector) AS v, typeof(layer) AS l, typeof(detail) AS d FROM hidden, scores"
    )
    assert types.num_rows == 0
    described = run_sql(comb_trace, "DESCRIBE hidden").to_pydict()
    assert dict(zip(described["column_name"], described["column_type"]))["vector"] == "FLOAT[]"


def test_every_table_is_queryable(tmp_path):
    root = build_trace(
        tmp_path / "t",
        comb_steps("p0", 2),
        scores=[{"step_id": "p0/0/s", "scorer": "prm", "value": 0.25, "detail": [0.5, 0.5], "n_tokens_processed": 7}],
        hidden=[
            {"problem_id": "p0", "model": "large", "layer": 24, "where": "prompt_last", "vector": [0.5, -2.0, 4.0]}
        ],
        grades=[{"step_id": "p0/0/ss", "grade_set": "exact", "answer": "7", "correct": False}],
    )
    for table in TABLES:
        assert run_sql(root, f"SELECT count(*) FROM {table}").column(0)[0].as_py() >= 1
    joined = run_sql(root, "SELECT s.path, sc.value, sc.detail FROM steps s JOIN scores sc USING (step_id)")
    assert joined.to_pylist() == [{"path": "s", "value": 0.25, "detail": [0.5, 0.5]}]
    assert run_sql(root, "SELECT vector FROM hidden").to_pylist() == [{"vector": [0.5, -2.0, 4.0]}]


def test_uncommitted_tokens_part_is_not_in_the_view(comb_trace):
    last = sorted((comb_trace / "steps").glob("part-*"))[-1]
    n_lost = pq.read_metadata(last).num_rows
    last.unlink()  # a crash between the tokens and the steps rename, before the writer recorded the part
    forget_part(comb_trace, last.name)
    counts = run_sql(comb_trace, "SELECT (SELECT count(*) FROM steps) AS s, (SELECT count(*) FROM tokens) AS t")
    assert counts.to_pylist() == [{"s": 54 - n_lost, "t": 54 - n_lost}]


def test_write_csv_and_parquet(comb_trace, tmp_path):
    result = run_sql(
        comb_trace, "SELECT step_id, depth, correct, token_ids FROM steps JOIN tokens USING (step_id) ORDER BY step_id"
    )
    write_result(result, tmp_path / "r.parquet")
    assert pq.read_table(tmp_path / "r.parquet").equals(result)
    write_result(result, tmp_path / "r.csv")
    with open(tmp_path / "r.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["step_id"] for r in rows] == result.column("step_id").to_pylist()
    assert [json.loads(r["token_ids"]) for r in rows] == result.column("token_ids").to_pylist()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_sql_error_is_a_trace_error(comb_trace):
    with pytest.raises(
        TraceError, match="SQL error in 'SELECT nope FROM steps': Binder Error: Referenced column \"nope\" not found"
    ):
        run_sql(comb_trace, "SELECT nope FROM steps")


def test_bad_output_name(comb_trace, tmp_path):
    result = run_sql(comb_trace, "SELECT 1 AS one")
    with pytest.raises(TraceError, match="must end in .csv or .parquet"):
        write_result(result, tmp_path / "r.xlsx")
    with pytest.raises(TraceError, match="folder .*missing does not exist"):
        write_result(result, tmp_path / "missing" / "r.csv")
    assert list(tmp_path.iterdir()) == [comb_trace]


def test_large_only_by_hand_reads_the_results_file_named_with_file(graded_comb, tmp_path):
    root, steps = graded_comb
    results = tmp_path / "large-only.parquet"
    pq.write_table(pa.table({"problem_id": ["p1", "p2", "p2"]}), results)
    large = [s for s in steps if s["problem_id"] in ("p1", "p2") and re.fullmatch("L+", s["path"])]
    finals = [s for s in large if s["is_final"]]
    expected = (
        2,
        sum(s["correct"] for s in finals) / len(finals),
        2 * 657408 * sum(s["n_gen_tokens"] for s in large) / 2e12,
    )
    assert rows(run_sql(root, LARGE_ONLY_BY_HAND, {"large_only": results})) == [pytest.approx(expected)]
    with pytest.raises(TraceError, match="Table with name large_only does not exist"):
        run_sql(root, LARGE_ONLY_BY_HAND)
