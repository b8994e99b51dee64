"""`trace regrade`: grade every final step's answer again, offline (no engine), into a new named grade set.

The answer is extracted again from the step's whole solution (its ancestors' texts and its own, joined by
the step delimiter, as `trace gen` did) and graded by the chosen grader against the problem's reference.
The grades go to the grades table under the set's name and the grader's name and version to trace.json
``grade_sets.NAME``; the steps' own grades (the default set) and every other set stay as they are. A set
is graded by one grader only: regrading into it with another is refused, while the same grader grades
just the final steps it lacks (steps grown since), so an interrupted or outdated regrade is finished by
running it again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from tracegen.grading import Grader, extract_answer, grader_for, grader_named
from tracegen.prompts import STEP_DELIMITER
from tracestore.errors import TraceError
from tracestore.grades import grade_set_rows
from tracestore.schema import DEFAULT_GRADES, Manifest, first_difference, lookup_field
from tracestore.store import Trace, TraceWriter, open_trace

REGRADE_WRITER = "regrade"
FLIP_EXAMPLES = 5


@dataclass
class RegradeSummary:
    grade_set: str
    grader: dict  # name, version
    final_steps: int  # final steps in the trace, all graded in the set afterwards
    new: int  # grades written by this run
    to_right: int = 0  # wrong in the default set, right in this one
    to_wrong: int = 0
    answers_changed: int = 0  # answers extracted now that differ from the stored ones
    examples_to_right: list[dict] = field(default_factory=list)  # step_id, answer, reference (first few)
    examples_to_wrong: list[dict] = field(default_factory=list)


def delimiter_of(manifest: Manifest) -> str:
    delimiter = manifest.get("delimiter")
    return delimiter if isinstance(delimiter, str) and delimiter else STEP_DELIMITER


def solution_texts(steps: pl.DataFrame, wanted: pl.DataFrame, delimiter: str) -> dict[str, str]:
    """The solution text up to and including each step of ``wanted`` (step_id, problem_id, world, path):
    the texts of the steps on its path joined by ``delimiter``. ``steps`` must hold every ancestor."""
    texts = {
        (row["problem_id"], row["world"], row["path"]): row["text"]
        for row in steps.select("problem_id", "world", "path", "text").iter_rows(named=True)
    }
    solutions = {}
    for row in wanted.select("step_id", "problem_id", "world", "path").iter_rows(named=True):
        key = row["problem_id"], row["world"]
        try:
            parts = [texts[(*key, row["path"][:end])] for end in range(1, len(row["path"]) + 1)]
        except KeyError:
            raise TraceError(f"step {row['step_id']!r} continues a node whose step the trace lacks") from None
        solutions[row["step_id"]] = delimiter.join(parts)
    return solutions


def default_grader(trace: Trace) -> str:
    """The grader of the trace's dataset (math-verify for math sets, toy-exact for the toy world)."""
    recorded = (trace.manifest.get("grader") or {}).get("name")
    if trace.manifest.dataset_name:
        try:
            return grader_for(trace.manifest.dataset_name).name
        except TraceError:
            pass
    if recorded:
        return recorded
    raise TraceError(f"{trace.root} records no dataset or grader; name one with --grader")


def run_regrade(root: str | Path, grader_name: str | None = None, grade_set: str | None = None) -> RegradeSummary:
    """Grade every final step of the trace at ``root`` with ``grader_name`` into ``grade_set`` (default:
    the grader's name)."""
    trace = open_trace(root)
    grader: Grader = grader_named(grader_name or default_grader(trace))
    name = grade_set or grader.name
    if name == DEFAULT_GRADES:
        raise TraceError(f"{DEFAULT_GRADES!r} is the steps' own grade set; choose another --name")
    entry = {"grader": grader.manifest_entry()}
    recorded = trace.manifest.grade_sets.get(name)
    if recorded is not None:
        differing = first_difference(recorded.get("grader"), entry["grader"])
        if differing:
            raise TraceError(
                f"{root} has grade set {name!r} graded with grader.{differing} = "
                f"{lookup_field(recorded.get('grader'), differing)!r}, but this run has "
                f"{lookup_field(entry['grader'], differing)!r}; choose another --name"
            )
    with TraceWriter(root, None, writer_id=REGRADE_WRITER) as writer:
        trace = open_trace(root)
        steps = trace.scan("steps").select(
            "step_id", "problem_id", "world", "path", "text", "is_final", "answer", "correct"
        )
        steps = steps.collect()
        finals = steps.filter(pl.col("is_final")).sort("step_id")
        done = writer.done_grade_ids(name)
        todo = finals.filter(~pl.col("step_id").is_in(list(done)))
        references = dict(trace.scan("problems").select("problem_id", "reference").collect().iter_rows())
        solutions = solution_texts(steps, todo, delimiter_of(trace.manifest))
        rows = []
        for row in todo.iter_rows(named=True):
            answer = extract_answer(solutions[row["step_id"]]) or ""
            rows.append(
                {
                    "step_id": row["step_id"],
                    "grade_set": name,
                    "answer": answer,
                    "correct": bool(grader.grade(answer or None, references[row["problem_id"]])),
                }
            )
        if recorded is None:  # described before its rows land, so that validate never sees undescribed grades
            entry["created_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            entry["answers"] = "extracted again from each final step's solution text"
            writer.update_manifest(grade_sets={**writer.manifest.grade_sets, name: entry})
        writer.append_grades(rows)
    return _summary(open_trace(root), finals, name, grader, len(rows), references)


def _summary(trace: Trace, finals: pl.DataFrame, name: str, grader: Grader, new: int, references) -> RegradeSummary:
    graded = finals.join(
        grade_set_rows(trace, name).rename({"answer": "new_answer", "correct": "new_correct"}), on="step_id"
    )
    summary = RegradeSummary(name, grader.manifest_entry(), finals.height, new)
    to_right = graded.filter(~pl.col("correct") & pl.col("new_correct")).sort("step_id")
    to_wrong = graded.filter(pl.col("correct") & ~pl.col("new_correct")).sort("step_id")
    summary.to_right, summary.to_wrong = to_right.height, to_wrong.height
    summary.answers_changed = graded.filter(pl.col("answer").ne_missing(pl.col("new_answer"))).height
    for flips, examples in ((to_right, summary.examples_to_right), (to_wrong, summary.examples_to_wrong)):
        for row in flips.head(FLIP_EXAMPLES).iter_rows(named=True):
            examples.append(
                {"step_id": row["step_id"], "answer": row["new_answer"], "reference": references[row["problem_id"]]}
            )
    return summary
