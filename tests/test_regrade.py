"""`trace regrade`: offline re-grading into named grade sets, and replay/sql/report reading one with --grades."""

from __future__ import annotations

import json

import polars as pl
import pytest
from tracebuild import build_trace, default_manifest, step_and_tokens
from typer.testing import CliRunner

from analysis.sql import run_sql
from cli import app
from replay.routers import make_router
from replay.run import replay_trace
from tracegen.regrade import run_regrade
from tracestore.errors import TraceError
from tracestore.grades import graded_steps
from tracestore.store import TraceWriter, open_trace
from tracestore.validate import validate

REFERENCE = "5"
# problem -> (small final answer, its stored grade, large final answer, its stored grade); the stored grades
# are what an older grader said: p1's "5.0" and p3's "05" right (math-verify agrees), p2's "5" wrong (a bug).
FINALS = {
    "p0": ("5", True, "5", True),
    "p1": ("5.0", True, "5", True),
    "p2": ("5", False, "6", False),
    "p3": ("x", False, "05", True),
}


def problem(problem_id: str) -> dict:
    return {
        "problem_id": problem_id,
        "dataset": "toy",
        "split": "test",
        "question": "2 + 3?",
        "reference": REFERENCE,
        "meta": None,
    }


def steps() -> list[dict]:
    rows = []
    for problem_id, (small, small_ok, large, large_ok) in FINALS.items():
        rows += [
            {"problem_id": problem_id, "path": "s", "text": "2 + 3 = 5"},
            {
                "problem_id": problem_id,
                "path": "ss",
                "text": f"So \\boxed{{{small}}}",
                "is_final": True,
                "answer": "" if problem_id == "p2" else small,  # an answer the old extraction missed
                "correct": small_ok,
            },
            {
                "problem_id": problem_id,
                "path": "L",
                "text": f"2 + 3 = {large}, \\boxed{{{large}}}",
                "is_final": True,
                "answer": large,
                "correct": large_ok,
            },
        ]
    return rows


@pytest.fixture
def trace(tmp_path):
    return build_trace(tmp_path / "t", steps(), problems=[problem(p) for p in FINALS])


def step_bytes(root) -> dict:
    return {path.name: path.read_bytes() for path in (root / "steps").iterdir()}


def test_exact_grader_flips_the_known_answers_and_keeps_the_old_grades(trace):
    before = step_bytes(trace)
    summary = run_regrade(trace, "exact")
    assert summary.grade_set == "exact" and summary.grader == {"name": "exact", "version": "1"}
    assert (summary.final_steps, summary.new) == (8, 8)
    assert (summary.to_right, summary.to_wrong) == (1, 2)
    assert [e["step_id"] for e in summary.examples_to_right] == ["p2/0/ss"]
    assert [e["step_id"] for e in summary.examples_to_wrong] == ["p1/0/ss", "p3/0/L"]
    assert summary.examples_to_wrong[0] == {"step_id": "p1/0/ss", "answer": "5.0", "reference": "5"}
    assert summary.answers_changed == 1  # p2's small answer, extracted again
    assert step_bytes(trace) == before  # the default grades are untouched
    opened = open_trace(trace)
    assert opened.manifest.grade_sets["exact"]["grader"] == {"name": "exact", "version": "1"}
    stored = opened.scan("steps").filter(pl.col("is_final")).sort("step_id").collect()
    graded = graded_steps(opened, stored, "exact")
    assert dict(zip(stored["step_id"], stored["correct"])) == {
        f"{p}/0/{path}": ok for p, v in FINALS.items() for path, ok in (("ss", v[1]), ("L", v[3]))
    }
    assert dict(zip(graded["step_id"], graded["correct"])) == {
        "p0/0/L": True,
        "p0/0/ss": True,
        "p1/0/L": True,
        "p1/0/ss": False,
        "p2/0/L": False,
        "p2/0/ss": True,
        "p3/0/L": False,
        "p3/0/ss": False,
    }
    assert validate(trace)["grades"] == 8


def test_math_verify_accepts_equivalent_forms(trace):
    summary = run_regrade(trace, "math-verify", "mv")
    assert (summary.to_right, summary.to_wrong) == (1, 0)
    assert [e["step_id"] for e in summary.examples_to_right] == ["p2/0/ss"]
    # both sets live side by side
    run_regrade(trace, "exact")
    assert sorted(open_trace(trace).manifest.grade_sets) == ["exact", "mv"]
    assert validate(trace)["grades"] == 16


def test_replay_sql_and_report_read_the_chosen_grade_set(trace):
    run_regrade(trace, "exact")

    def accuracy(router: str, grades: str | None) -> dict:
        outcomes = replay_trace(trace, make_router(router), split="all", grades=grades).outcomes
        return dict(zip(outcomes["problem_id"], outcomes["correct"]))

    assert accuracy("large-only", None) == {"p0": True, "p1": True, "p2": False, "p3": True}
    assert accuracy("large-only", "exact") == {"p0": True, "p1": True, "p2": False, "p3": False}
    assert accuracy("small-only", "exact") == {"p0": True, "p1": False, "p2": True, "p3": False}
    query = "SELECT step_id, answer, correct FROM steps WHERE path = 'ss' ORDER BY step_id"
    assert run_sql(trace, query).column("correct").to_pylist() == [True, True, False, False]
    assert run_sql(trace, query, grades="exact").column("correct").to_pylist() == [True, False, True, False]
    assert run_sql(trace, query, grades="exact").column("answer").to_pylist() == ["5", "5.0", "5", "x"]
    non_final = run_sql(trace, "SELECT answer, correct FROM steps WHERE path = 's'", grades="exact")
    assert set(non_final.column("correct").to_pylist()) == {None}
    with pytest.raises(TraceError, match="no grade set 'nope'; it has default, exact"):
        run_sql(trace, query, grades="nope")


def test_a_report_needs_results_replayed_with_its_grade_set(trace, tmp_path):
    run_regrade(trace, "exact")
    results = tmp_path / "large.parquet"
    runner = CliRunner()
    replayed = runner.invoke(
        app,
        ["replay", str(trace), "--router", "large-only", "--split", "all", "--grades", "exact", "--out", str(results)],
    )
    assert replayed.exit_code == 0, replayed.output
    mixed = runner.invoke(app, ["report", str(trace), str(results), "--out", str(tmp_path / "r"), "--split", "all"])
    assert mixed.exit_code == 1 and "need the same --grades here" in " ".join(mixed.output.split())
    report = runner.invoke(
        app,
        ["report", str(trace), str(results), "--out", str(tmp_path / "r"), "--split", "all", "--pick-split", "reported"]
        + ["--grades", "exact"],
    )
    assert report.exit_code == 0, report.output


def test_a_grade_set_is_finished_by_rerunning_and_kept_to_one_grader(trace):
    run_regrade(trace, "exact")
    again = run_regrade(trace, "exact")
    assert again.new == 0 and (again.to_right, again.to_wrong) == (1, 2)
    with pytest.raises(TraceError, match="graded with grader.name = 'exact'.*choose another --name"):
        run_regrade(trace, "math-verify", "exact")
    with pytest.raises(TraceError, match="'default' is the steps' own grade set"):
        run_regrade(trace, "exact", "default")
    with pytest.raises(TraceError, match="unknown grader 'fuzzy'"):
        run_regrade(trace, "fuzzy")
    # a final step grown after the regrade: replaying the set refuses, a rerun grades just that step
    grown = step_and_tokens(
        {"problem_id": "p0", "path": "sL", "text": "\\boxed{5}", "is_final": True, "answer": "5", "correct": True}
    )
    with TraceWriter(trace, default_manifest()) as writer:
        writer.append_steps([grown[0]], [grown[1]])
    with pytest.raises(TraceError, match="final step 'p0/0/sL' has no grade in grade set 'exact'.*trace regrade"):
        replay_trace(trace, make_router("large-only"), split="all", grades="exact")
    assert run_regrade(trace, "exact").new == 1
    assert validate(trace)["grades"] == 9


def test_regrade_cli_prints_the_flips(trace):
    result = CliRunner().invoke(app, ["regrade", str(trace), "--grader", "exact"])
    assert result.exit_code == 0, result.output
    assert "1 flipped wrong -> right and 2 right -> wrong" in " ".join(result.output.split())
    assert "wrong -> right: p2/0/ss answer '5', reference '5'" in result.output
    assert "right -> wrong: p3/0/L answer '05', reference '5'" in result.output
    info = CliRunner().invoke(app, ["info", str(trace)])
    assert info.exit_code == 0 and "grade sets" in info.output and "exact" in info.output
    manifest = json.loads((trace / "trace.json").read_text())
    assert manifest["grade_sets"]["exact"]["grader"]["name"] == "exact"
    missing = CliRunner().invoke(app, ["regrade", str(trace / "nope")])
    assert missing.exit_code == 1 and "does not exist" in missing.output
