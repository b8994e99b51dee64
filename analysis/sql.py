"""`trace sql`: DuckDB over a trace's Parquet parts, in place (views problems, steps, tokens, scores, hidden)."""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table
from rich.text import Text

from replay.atomic import write_atomic
from replay.errors import TraceError
from replay.schema import SCHEMAS, TABLES
from replay.store import Trace, open_trace

OUTPUT_FORMATS = (".csv", ".parquet")


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


def connect(root: str | os.PathLike) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one view per trace table over its part files."""
    trace = open_trace(root)
    connection = duckdb.connect()
    for table in TABLES:
        connection.execute(_view_sql(trace, table))
    return connection


def _sql_error(query: str, error: duckdb.Error) -> TraceError:
    message = str(error).split("\n\nLINE")[0]
    return TraceError(f"SQL error in {query.strip()!r}: {' '.join(message.split())}")


def run_sql(root: str | os.PathLike, query: str) -> pa.Table:
    """Result of `query` over the trace at `root` as an Arrow table (empty if it returns no rows)."""
    connection = connect(root)
    try:
        relation = connection.sql(query)
        return pa.table({}) if relation is None else relation.to_arrow_table()
    except duckdb.Error as error:
        raise _sql_error(query, error) from None
    finally:
        connection.close()


def check_out_path(out: str | os.PathLike) -> Path:
    """`out` if a result can be written there (checked before running a possibly long query)."""
    out = Path(out)
    if out.suffix not in OUTPUT_FORMATS:
        raise TraceError(f"--out {out}: the file name must end in {' or '.join(OUTPUT_FORMATS)}")
    if not out.parent.is_dir():
        raise TraceError(f"--out {out}: folder {out.parent} does not exist")
    return out


def write_result(result: pa.Table, out: str | os.PathLike) -> None:
    """Write a query result to .csv or .parquet, atomically (an existing file is replaced only on success)."""
    out = check_out_path(out)

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
