"""`trace info`: what a trace holds, what it cost to generate, and what it weighs on disk.

Sizes count the trace's tables (and apart from them its own bookkeeping); other files that share its
folder, such as results, policies and reports, are listed separately and counted in neither.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tracestore.remote import local_path
from tracestore.schema import DEFAULT_GRADES, TABLES, is_trace_metadata, model_char
from tracestore.store import open_trace


@dataclass
class TraceInfo:
    root: str
    problems: int
    worlds: int  # distinct world indices
    trees: int  # (problem, world) pairs that have steps
    models: list[dict]  # model, steps, gen_tokens
    chains: list[dict]  # one per model alone from the root: model, path_char, complete, correct, accuracy
    tables: list[dict]  # table, files, rows, bytes
    table_bytes: int  # the committed parts of every table
    bookkeeping_bytes: int  # trace.json, parts records, lock and writers' leftovers
    other_files: list[dict]  # what else lies in the folder (results, reports, ...): name, files, bytes
    bytes_per_gen_token: float | None  # of the tables only
    grade_sets: list[dict]  # name, grader, version: the default set (the steps' own grades) first
    last_audit: dict | None  # the latest `trace audit` summary in trace.json
    n_audits: int  # audits recorded in trace.json


def trace_info(root: str | os.PathLike) -> TraceInfo:
    trace = open_trace(local_path(root, "info"))
    steps = (
        trace.scan("steps")
        .select("problem_id", "world", "path", "model", "n_gen_tokens", "is_final", "correct")
        .collect()
    )
    roles = trace.manifest.roles
    models = (
        steps.group_by("model")
        .agg(steps=pl.len(), gen_tokens=pl.col("n_gen_tokens").cast(pl.Int64).sum())
        .sort(pl.col("model").replace_strict({r: i for i, r in enumerate(roles)}, default=len(roles)), "model")
    )
    trees = steps.select("problem_id", "world").n_unique() if steps.height else 0
    chains = []
    for role in roles:
        char = model_char(role)
        finals = steps.filter(pl.col("is_final") & pl.col("path").str.contains(f"^{re.escape(char)}+$"))
        correct = int(finals["correct"].sum() or 0)
        chains.append(
            {
                "model": role,
                "path_char": char,
                "complete": finals.height,
                "correct": correct,
                "accuracy": correct / finals.height if finals.height else None,
            }
        )
    tables = []
    for table in TABLES:
        files = trace.files(table)
        tables.append(
            {
                "table": table,
                "files": len(files),
                "rows": sum(pq.read_metadata(file).num_rows for file in files),
                "bytes": sum(Path(file).stat().st_size for file in files),
            }
        )
    table_bytes = sum(row["bytes"] for row in tables)
    parts = {Path(file).resolve() for table in TABLES for file in trace.files(table)}
    bookkeeping_bytes, other = 0, {}
    for path in sorted(Path(trace.root).rglob("*")):
        if not path.is_file() or path.resolve() in parts:
            continue
        relative = path.relative_to(trace.root).as_posix()
        first = relative.split("/", 1)[0]
        if first in TABLES or is_trace_metadata(relative):
            bookkeeping_bytes += path.stat().st_size
        else:
            entry = other.setdefault(first, {"name": first + ("/" if "/" in relative else ""), "files": 0, "bytes": 0})
            entry["files"] += 1
            entry["bytes"] += path.stat().st_size
    gen_tokens = int(models["gen_tokens"].sum() or 0)
    return TraceInfo(
        root=str(trace.root),
        problems=next(row["rows"] for row in tables if row["table"] == "problems"),
        worlds=steps["world"].n_unique(),
        trees=trees,
        models=models.to_dicts(),
        chains=chains,
        tables=tables,
        table_bytes=table_bytes,
        bookkeeping_bytes=bookkeeping_bytes,
        other_files=list(other.values()),
        bytes_per_gen_token=table_bytes / gen_tokens if gen_tokens else None,
        grade_sets=_grade_sets(trace.manifest),
        last_audit=trace.manifest.audits[-1] if trace.manifest.audits else None,
        n_audits=len(trace.manifest.audits),
    )


def _grade_sets(manifest) -> list[dict]:
    sets = [{"name": DEFAULT_GRADES, **_grader_fields(manifest.get("grader"))}]
    for name, entry in manifest.grade_sets.items():
        sets.append({"name": name, **_grader_fields(entry.get("grader"))})
    return sets


def _grader_fields(grader) -> dict:
    grader = grader if isinstance(grader, dict) else {}
    return {"grader": grader.get("name"), "version": grader.get("version")}


def _size(n_bytes: int) -> str:
    size = float(n_bytes)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def print_info(info: TraceInfo, console: Console) -> None:
    overview = Table(title=f"trace {escape(info.root)}", show_header=False)
    overview.add_column(style="bold")
    overview.add_column(justify="right")
    overview.add_row("problems", str(info.problems))
    overview.add_row("worlds", str(info.worlds))
    overview.add_row("trees (problem, world)", str(info.trees))
    overview.add_row("size of the tables", _size(info.table_bytes))
    per_token = info.bytes_per_gen_token
    overview.add_row("bytes per generated token (tables)", "-" if per_token is None else f"{per_token:.1f}")
    overview.add_row("trace.json, parts records, lock", _size(info.bookkeeping_bytes))
    console.print(overview)

    models = Table(title="generated by model")
    for column in ("model", "steps", "generated tokens"):
        models.add_column(column, justify="left" if column == "model" else "right")
    for row in info.models:
        models.add_row(row["model"], f"{row['steps']:,}", f"{row['gen_tokens']:,}")
    console.print(models)

    chains = Table(title="one model alone from the root")
    for column in ("path", "complete trees", "correct", "accuracy"):
        chains.add_column(column, justify="left" if column == "path" else "right")
    for row in info.chains:
        accuracy = "-" if row["accuracy"] is None else f"{row['accuracy']:.3f}"
        chains.add_row(f"all-{row['model']} ({row['path_char']}…)", str(row["complete"]), str(row["correct"]), accuracy)
    console.print(chains)

    tables = Table(title="tables")
    for column in ("table", "files", "rows", "size"):
        tables.add_column(column, justify="left" if column == "table" else "right")
    for row in info.tables:
        tables.add_row(row["table"], str(row["files"]), f"{row['rows']:,}", _size(row["bytes"]))
    console.print(tables)

    if len(info.grade_sets) > 1:
        grades = Table(title="grade sets (trace regrade; replay, report, sql and diff take --grades NAME)")
        for column in ("name", "grader", "version"):
            grades.add_column(column)
        for row in info.grade_sets:
            grades.add_row(*(escape(str(row[key] or "-")) for key in ("name", "grader", "version")))
        console.print(grades)

    if info.last_audit is not None:
        console.print(audit_table(info.last_audit, title=f"last audit ({info.n_audits} in trace.json)"))

    if info.other_files:
        other = Table(title="other files in the folder (not the trace's; not counted above)")
        for column in ("path", "files", "size"):
            other.add_column(column, justify="left" if column == "path" else "right")
        for row in info.other_files:
            other.add_row(escape(row["name"]), str(row["files"]), _size(row["bytes"]))
        console.print(other)


def audit_table(audit: dict, title: str) -> Table:
    """An audit summary (trace.json ``audits`` entry) as a two-column table."""

    def number(value, digits: str = ".3g") -> str:
        return "-" if value is None else format(value, digits)

    def percent(value) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    engine = audit.get("engine") or {}
    recorded = ", ".join(audit.get("recorded_engine") or [])
    differs = ", ".join(audit.get("engine_differs") or []) or "nothing"
    table.add_row("when", escape(str(audit.get("at"))))
    table.add_row(
        "engine", escape(f"{engine.get('name')} {engine.get('version')} (trace: {recorded}; differs in {differs})")
    )
    table.add_row("sample", f"{audit.get('audited')} steps (asked {audit.get('sample')}, seed {audit.get('seed')})")
    table.add_row(
        "identical token for token",
        f"{audit.get('identical')} = {percent(audit.get('identical_share'))} (over the trace, strata weighted: "
        f"{percent(audit.get('estimated_identical_share'))})",
    )
    firsts = audit.get("first_divergences") or []
    shown = ", ".join(f"{d['step_id']} @ token {d['position']} (depth {d['depth']})" for d in firsts[:5])
    more = audit.get("divergent", 0) - min(len(firsts), 5)
    table.add_row("first divergences", escape(shown + (f", and {more} more" if more > 0 else "")) or "-")
    table.add_row("max |Δ logprob| (agreeing tokens)", number(audit.get("max_abs_delta_logprob")))
    table.add_row("max |Δ max logit| (agreeing tokens)", number(audit.get("max_abs_delta_max_logit")))
    table.add_row(
        "changed",
        f"{audit.get('finality_changed')} finality, {audit.get('answers_changed')} answers, "
        f"{audit.get('correct_changed')} correctness",
    )
    verdict = "[green]passed[/]" if audit.get("passed") else "[red]failed[/]"
    table.add_row("verdict", f"{verdict} (--min-identical {audit.get('min_identical')})")
    return table
