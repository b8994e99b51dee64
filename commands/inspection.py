"""Look inside a trace: `trace validate`, `trace info`, `trace sql`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from commands.console import console
from commands.options import FORCE, GRADES, LOCAL_TRACE_DIR, out_option
from tracestore.errors import TraceError


def validate(
    trace_dir: str = LOCAL_TRACE_DIR,
    repair: bool = typer.Option(
        False,
        "--repair",
        help=(
            "First repair what concurrent or crashed writers left: drop exact duplicate rows, remove temp files and "
            "uncommitted tokens parts, forget recorded parts that are gone, move files of the table folders that "
            "no writer recorded and no reader can read to _quarantine/; print each thing done. Takes the "
            "trace's writer lock."
        ),
    ),
) -> None:
    """Check every invariant of a trace (page checksums and value ranges included); exit 1 naming the first
    violation."""
    from tracestore.repair import repair as repair_trace
    from tracestore.validate import validate as validate_trace

    if repair:
        report = repair_trace(trace_dir)
        for line in report.done:
            console.print(f"repaired: {escape(line)}", highlight=False)
        for line in report.left:
            console.print(f"[yellow]left as is:[/] {escape(line)}", highlight=False)
        if not report.done and not report.left:
            console.print("nothing to repair")
    counts = validate_trace(trace_dir)
    console.print(
        f"[green]ok[/] {escape(str(trace_dir))}: " + ", ".join(f"{n:,} {table}" for table, n in counts.items()),
        highlight=False,
    )


def info(trace_dir: str = LOCAL_TRACE_DIR) -> None:
    """Problems, worlds, steps and generated tokens per model, single-model accuracy, size of the tables on disk
    (other files in the trace's folder are listed apart)."""
    from analysis.info import print_info, trace_info

    print_info(trace_info(trace_dir), console)


# a query may start with an SQL comment ("-- accuracy by ..."), which the option parser would take for an option
CONTEXT_SETTINGS = {"sql": {"ignore_unknown_options": True}}


def sql(
    trace_dir: str = LOCAL_TRACE_DIR,
    query: str = typer.Argument(
        ...,
        help="One DuckDB query (SELECT, WITH, FROM, DESCRIBE, ...) over the views problems, steps, tokens, grades, "
        "scores, hidden and the --file views.",
    ),
    file: list[str] = typer.Option(
        [],
        "--file",
        help="NAME=PATH: also read this .parquet, .csv or .json(l) file, as the view NAME (repeatable). No other "
        "file is readable.",
    ),
    out: Path = out_option("Write the result to this .csv or .parquet file instead of printing it."),
    force: bool = FORCE,
    max_rows: int = typer.Option(50, "--max-rows", help="Rows to print (without --out)."),
    grades: str = GRADES,
    memory_limit: str = typer.Option(
        None,
        "--memory-limit",
        help="Memory the query may use, e.g. 4GB (default: DuckDB's, 80% of this machine's); nothing spills to disk.",
    ),
) -> None:
    """Run a read-only DuckDB query over the trace's Parquet parts, in place.

    Only one query runs (no COPY, ATTACH, CREATE, INSTALL, SET, ...), reading only the trace and --file files.
    """
    from analysis.sql import check_out_path, parse_file_option, print_result, run_sql, write_result

    if out is not None:
        check_out_path(out, force=force)
    files = {}
    for text in file:
        name, path = parse_file_option(text)
        if name in files:
            raise TraceError(f"--file {name} is given twice")
        files[name] = path
    result = run_sql(trace_dir, query, files, grades, memory_limit)
    if out is None:
        print_result(result, console, max_rows)
    else:
        write_result(result, out, force=force)
        console.print(f"wrote {result.num_rows:,} rows to {escape(str(out))}", highlight=False)
