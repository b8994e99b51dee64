"""Grade sets: which grades a reader sees. The default set is the steps table's own answer/correct (graded
by trace.json's ``grader`` when the step was generated); a named set is one `trace regrade` wrote into the
grades table. Replay, report, sql and diff read the default set unless told ``--grades NAME``.
"""

from __future__ import annotations

import polars as pl

from tracestore.errors import TraceError
from tracestore.schema import DEFAULT_GRADES
from tracestore.store import Trace


def grade_set_names(trace: Trace) -> list[str]:
    """The default grade set, then every named one trace.json describes."""
    return [DEFAULT_GRADES, *(name for name in trace.manifest.grade_sets if name != DEFAULT_GRADES)]


def check_grade_set(trace: Trace, name: str) -> None:
    """TraceError unless the trace has grade set ``name``."""
    names = grade_set_names(trace)
    if name not in names:
        raise TraceError(
            f"{trace.root} has no grade set {name!r}; it has {', '.join(names)} "
            f"(`trace regrade {trace.root} --grader NAME` writes a new one)"
        )


def grade_set_rows(trace: Trace, name: str) -> pl.DataFrame:
    """step_id, answer, correct of every final step graded in the named set ``name``."""
    check_grade_set(trace, name)
    rows = trace.scan("grades").filter(pl.col("grade_set") == name).select("step_id", "answer", "correct").collect()
    twice = rows.filter(pl.col("step_id").is_duplicated())
    if twice.height:
        raise TraceError(f"step {twice['step_id'][0]!r} has more than one grade in grade set {name!r}")
    return rows


def graded_steps(trace: Trace, steps: pl.DataFrame, name: str | None) -> pl.DataFrame:
    """``steps`` (with step_id, is_final, answer, correct) whose answer and correct come from grade set
    ``name`` (None or the default set: as stored). A final step the set lacks (grown after the regrade)
    is a TraceError naming it: a replay must not read it as wrong."""
    if name is None or name == DEFAULT_GRADES:
        check_grade_set(trace, DEFAULT_GRADES)
        return steps
    grades = grade_set_rows(trace, name).rename({"answer": "_grade_answer", "correct": "_grade_correct"})
    joined = steps.join(grades, on="step_id", how="left", maintain_order="left")
    ungraded = joined.filter(pl.col("is_final") & pl.col("_grade_correct").is_null())
    if ungraded.height:
        grader = (trace.manifest.grade_sets[name].get("grader") or {}).get("name", "NAME")
        raise TraceError(
            f"final step {ungraded['step_id'][0]!r} has no grade in grade set {name!r} ({ungraded.height} such "
            f"step(s), grown after the regrade); run `trace regrade {trace.root} --grader {grader} --name {name}` "
            "to grade them"
        )
    final = pl.col("is_final")
    return joined.with_columns(
        answer=pl.when(final).then(pl.col("_grade_answer")),
        correct=pl.when(final).then(pl.col("_grade_correct")),
    ).drop("_grade_answer", "_grade_correct")
