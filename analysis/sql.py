"""`trace sql`: DuckDB over a trace's Parquet parts, in place (views problems, steps, tokens, scores, hidden,
grades).

The connection only reads. DuckDB enforces it, not string matching: it runs exactly one statement,
which its parser must classify as a query (SELECT, WITH, FROM, VALUES, DESCRIBE, SHOW, SUMMARIZE);
file access is off except for the trace's parts and the files named with ``--file NAME=PATH``
(``enable_external_access=false`` with ``allowed_paths``); extensions are neither installed nor
loaded; nothing spills to disk; and the configuration is locked before the user's query runs. So a query
too large for the memory DuckDB may use (``--memory-limit``; DuckDB's default is 80% of the machine's) fails,
saying so, instead of writing files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tracestore.atomic import write_atomic
from tracestore.errors import TraceError
from tracestore.grades import check_grade_set, graded_steps
from tracestore.outputs import check_output_file
from tracestore.remote import local_path
from tracestore.schema import DEFAULT_GRADES, SCHEMAS, TABLES
from tracestore.store import Trace, open_trace

OUTPUT_FORMATS = (".csv", ".parquet")
FILE_READERS = {".parquet": "read_parquet", ".csv": "read_csv", ".tsv": "read_csv", ".json": "read_json"}
FILE_READERS |= {".jsonl": "read_json", ".ndjson": "read_json"}
_VIEW_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MEMORY = re.compile(r"\d+(\.\d+)?\s*([KMGT]i?B)", re.IGNORECASE)
READ_ONLY_SETTINGS = {
    "autoinstall_known_extensions": "false",
    "autoload_known_extensions": "false",
    "temp_directory": "",  # no spilling: a query too large for memory fails instead of writing files
}


def _duckdb_type(arrow_type: pa.DataType) -> str:
    if pa.types.is_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type):
        return _duckdb_type(arrow_type.value_type) + "[]"
    scalar = {
        pa.string(): "VARCHAR",
        pa.bool_(): "BOOLEAN",
        pa.int16(): "SMALLINT",
        pa.int32(): "INTEGER",
        pa.int64(): "BIGINT",
        pa.float16(): "FLOAT",  # DuckDB reads Parquet float16 as FLOAT
        pa.float32(): "FLOAT",
        pa.float64(): "DOUBLE",
    }
    return scalar[arrow_type]


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _view_sql(trace: Trace, table: str) -> str:
    files = trace.files(table)
    if files:
        return f"CREATE VIEW {table} AS SELECT * FROM read_parquet([{', '.join(_quote(f) for f in files)}])"
    # no parts yet: an empty view that still has every column, typed
    columns = ", ".join(f'CAST(NULL AS {_duckdb_type(field.type)}) AS "{field.name}"' for field in SCHEMAS[table])
    return f"CREATE VIEW {table} AS SELECT {columns} WHERE false"


def parse_file_option(text: str) -> tuple[str, Path]:
    """``NAME=PATH`` of ``--file``: a view NAME over the Parquet, CSV or JSON file at PATH."""
    name, sep, path = text.partition("=")
    if not sep or not _VIEW_NAME.fullmatch(name):
        raise TraceError(f"--file must look like NAME=PATH with NAME a SQL name (letters, digits, _), got {text!r}")
    if name in TABLES:
        raise TraceError(f"--file {text}: {name} is a table of the trace; choose another name")
    path = Path(path)
    if path.suffix not in FILE_READERS:
        raise TraceError(f"--file {text}: the file name must end in {', '.join(FILE_READERS)}")
    if not path.is_file():
        raise TraceError(f"--file {text}: {path} is not a file")
    return name, path


def _graded_steps_sql(trace: Trace, grades: str) -> str:
    """The steps view with answer and correct of the final steps taken from grade set ``grades``."""
    graded_steps(trace, trace.scan("steps").select("step_id", "is_final", "answer", "correct").collect(), grades)
    files = ", ".join(_quote(f) for f in trace.files("steps"))
    final = "s.is_final"
    return (
        f"CREATE VIEW steps AS SELECT s.* REPLACE (CASE WHEN {final} THEN g.answer END AS answer, "
        f"CASE WHEN {final} THEN g.correct END AS correct) FROM read_parquet([{files}]) s LEFT JOIN "
        f"(SELECT step_id, answer, correct FROM grades WHERE grade_set = {_quote(grades)}) g USING (step_id)"
    )


def connect(
    root: str | os.PathLike,
    files: dict[str, Path] | None = None,
    grades: str | None = None,
    memory_limit: str | None = None,
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection that can only read: one view per trace table over its part files
    and one per file in ``files`` (view name -> path), and no other file. With ``grades``, the steps view
    shows that grade set's answers and grades (see tracestore.grades). ``memory_limit``: e.g. "4GB"."""
    if memory_limit is not None and not _MEMORY.fullmatch(memory_limit):
        raise TraceError(f"--memory-limit must be a size such as 500MB or 4GB, got {memory_limit!r}")
    trace = open_trace(local_path(root, "sql"))
    files = files or {}
    if grades is not None:
        check_grade_set(trace, grades)
    limit = {"memory_limit": memory_limit} if memory_limit is not None else {}
    connection = duckdb.connect(config={**READ_ONLY_SETTINGS, **limit})
    readable = []
    for table in sorted(TABLES, key=lambda table: table == "steps"):  # steps last: it may read the grades view
        named = table == "steps" and grades not in (None, DEFAULT_GRADES) and trace.files("steps")
        connection.execute(_graded_steps_sql(trace, grades) if named else _view_sql(trace, table))
        readable += trace.files(table)
    for name, path in files.items():
        absolute = str(Path(path).resolve())
        connection.execute(f"CREATE VIEW {name} AS SELECT * FROM {FILE_READERS[Path(path).suffix]}({_quote(absolute)})")
        readable.append(absolute)
    connection.execute(f"SET allowed_paths = [{', '.join(_quote(path) for path in readable)}]")
    connection.execute("SET enable_external_access = false")
    connection.execute("SET lock_configuration = true")
    return connection


def _sql_error(query: str, error: duckdb.Error, memory_limit: str | None = None) -> TraceError:
    message = " ".join(str(error).split("\n\nLINE")[0].split())
    if isinstance(error, duckdb.PermissionException):
        message += "; trace sql reads only the trace's tables and the files named with --file NAME=PATH"
    if isinstance(error, duckdb.OutOfMemoryException):  # DuckDB's own advice (SET ...) is refused here
        limit = memory_limit or "DuckDB's default: 80% of this machine's memory"
        message = (
            f"{str(error).splitlines()[0]}; trace sql works in memory only (nothing spills to disk): raise "
            f"--memory-limit ({limit}), or ask less of the query (fewer columns, rows filtered early, no token arrays)"
        )
    return TraceError(f"SQL error in {query.strip()!r}: {message}")


def _one_query(connection: duckdb.DuckDBPyConnection, query: str) -> str:
    """The text of ``query``'s one statement, if DuckDB's parser says it is a query."""
    try:
        statements = connection.extract_statements(query)
    except duckdb.Error as error:
        raise _sql_error(query, error) from None
    if not statements:
        raise TraceError("the query is empty: give one SELECT statement")
    if len(statements) > 1:
        raise TraceError(f"give one statement, not {len(statements)}: {query.strip()!r}")
    statement = statements[0]
    if statement.type != duckdb.StatementType.SELECT:
        keyword = statement.query.split()[0].upper()
        raise TraceError(
            f"trace sql only reads: {keyword} is refused ({query.strip()!r}); run one query (SELECT, WITH, FROM, "
            "DESCRIBE, ...) over the trace's tables and the files named with --file NAME=PATH"
        )
    return statement.query


def run_sql(
    root: str | os.PathLike,
    query: str,
    files: dict[str, Path] | None = None,
    grades: str | None = None,
    memory_limit: str | None = None,
) -> pa.Table:
    """Result of the query ``query`` over the trace at ``root`` (and ``files``) as an Arrow table; the steps
    view graded by grade set ``grades`` (default: the steps' own grades), within ``memory_limit``."""
    connection = connect(root, files, grades, memory_limit)
    try:
        return connection.sql(_one_query(connection, query)).to_arrow_table()
    except duckdb.Error as error:
        raise _sql_error(query, error, memory_limit) from None
    finally:
        connection.close()


def check_out_path(out: str | os.PathLike, *, force: bool = False) -> Path:
    """`out` if a result can be written there (checked before running a possibly long query)."""
    out = Path(out)
    if out.suffix not in OUTPUT_FORMATS:
        raise TraceError(f"--out {out}: the file name must end in {' or '.join(OUTPUT_FORMATS)}")
    return check_output_file(out, force=force)


def write_result(result: pa.Table, out: str | os.PathLike, *, force: bool = False) -> None:
    """Write a query result to .csv or .parquet, atomically (an existing file is replaced only with ``force``)."""
    out = check_out_path(out, force=force)

    def write(temp: Path) -> None:
        if out.suffix == ".parquet":
            pq.write_table(result, temp, compression="zstd")
        else:
            connection = duckdb.connect()
            connection.register("result", result)
            connection.execute(f"COPY result TO {_quote(str(temp))} (FORMAT csv, HEADER)")
            connection.close()

    write_atomic(out, write)


def _cell(value) -> Text:
    if value is None:
        return Text("null", style="dim")
    if isinstance(value, float):
        return Text(f"{value:.6g}")
    text = str(value)
    return Text(text if len(text) <= 80 else text[:77] + "...")


def print_result(result: pa.Table, console: Console, max_rows: int) -> None:
    """Print the first `max_rows` rows of a query result as a rich table."""
    shown = result.slice(0, max_rows)
    table = Table()
    for field in result.schema:
        numeric = pa.types.is_integer(field.type) or pa.types.is_floating(field.type)
        table.add_column(field.name, justify="right" if numeric else "left")
    for row in zip(*(column.to_pylist() for column in shown.columns)):
        table.add_row(*(_cell(value) for value in row))
    console.print(table)
    shown_of = (
        f"{result.num_rows:,} rows"
        if result.num_rows <= max_rows
        else f"first {max_rows:,} of {result.num_rows:,} rows"
    )
    console.print(shown_of, style="dim")
