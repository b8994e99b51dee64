"""The trace on disk: a lazy reader and an atomic, resumable writer (the format itself: `tracestore.schema`).

A trace is a directory::

    trace.json                                   manifest (the cache key), with schema_version
    problems/part-w0-00001-3f09c2a1d5e8b7c4.parquet  each table is a folder of part files (a single
    steps/part-w0-00002-9b1e....parquet               TABLE.parquet file next to the folder is read too)
    tokens/part-w0-00002-9b1e....parquet
    hidden/...  scores/...
    _parts/w0.json                               the parts each writer committed
    .lock, .lock-w0                              the writer lock (tracestore.lock) while a writer runs

Every part is written under a hidden temp name, fsynced and renamed, so a reader never sees half a
file. `append_steps` writes the tokens part first and the steps part second under the same name; the
steps part is the commit mark: a tokens part without its steps part is the leftover of a crash,
ignored by readers and deleted when its writer reopens the trace. Parts are written with page
checksums; readers verify them (the tokens table, which holds most of the bytes, when read through
pyarrow and by `trace validate`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from tracestore.atomic import commit, write_atomic, write_temp
from tracestore.boundary import check_no_link_leaves
from tracestore.errors import TraceError
from tracestore.lock import WriterLock, manifest_lock
from tracestore.outputs import check_outside_trace
from tracestore.parts import lost_part_message, parts_records, read_parts_record, write_parts_record
from tracestore.schema import (
    CACHE_KEY_FIELDS,
    LOCK_FILE,
    MANIFEST_FILE,
    PART_NAME,
    ROW_GROUP_ROWS,
    ROW_KEYS,
    SCHEMAS,
    TABLES,
    TOKEN_ARRAY_COLUMNS,
    Manifest,
    first_difference,
    json_normal,
    lookup_field,
    make_step_id,
    manifest_json,
    part_name,
    read_manifest,
    schema_version_for,
)

log = logging.getLogger(__name__)
_WRITER_ID = re.compile(r"[A-Za-z0-9_]+")
HEAVY_TABLES = ("tokens",)  # pages verified when read through pyarrow and by validate, not on every open


def write_parquet(rows: pa.Table, path: str | os.PathLike, table: str) -> None:
    """Write one part of ``table`` as every part is written: zstd, streaming-sized row groups, page checksums."""
    pq.write_table(rows, path, compression="zstd", row_group_size=ROW_GROUP_ROWS[table], write_page_checksum=True)


def verify_part(path: str | os.PathLike) -> None:
    """Read every page of a part, checking its checksum (where the part has them): a flipped byte, a
    truncated page or a file that is not Parquet is a TraceError naming the file."""
    try:
        parquet = pq.ParquetFile(path, page_checksum_verification=True)
        for _ in parquet.iter_batches(batch_size=8_192, use_threads=False):  # what it leaves in the pool stays small
            pass
    except (pa.ArrowException, OSError) as error:
        raise TraceError(f"{path} is damaged: {_first_line(error)}") from None
    finally:
        pa.default_memory_pool().release_unused()  # the batches read are gone; their pages need not stay resident


def _first_line(error: Exception) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]


# ---------------------------------------------------------------- reader


def check_part(path: Path, table: str) -> None:
    """Read the Parquet footer of one part: a truncated or foreign file is named, not a traceback."""
    try:
        schema = pq.read_metadata(path).schema.to_arrow_schema()
    except (pa.ArrowException, OSError) as error:
        raise TraceError(f"{path} is not a readable Parquet file ({_first_line(error)})") from None
    expected = SCHEMAS[table]
    if schema.names != expected.names:
        raise TraceError(f"{path} has columns {schema.names}, but {table} needs {expected.names}")
    for field in expected:
        found = schema.field(field.name).type
        if found != field.type:
            raise TraceError(f"{path}: column {field.name} has type {found}, but {table} needs {field.type}")


def empty_frame(table: str) -> pl.DataFrame:
    return pl.from_arrow(SCHEMAS[table].empty_table())


class Trace:
    """Read side of a trace: lazy Polars scans over all committed part files of each table."""

    def __init__(self, root: Path, manifest: Manifest):
        self.root = root
        self.manifest = manifest
        self._checked: dict[str, list[str]] = {}

    def __repr__(self) -> str:
        return f"Trace({str(self.root)!r})"

    def table_dir(self, table: str) -> Path:
        if table not in SCHEMAS:
            raise TraceError(f"unknown table {table!r}: a trace has {', '.join(TABLES)}")
        return self.root / table

    def files(self, table: str) -> list[str]:
        """Committed part files of `table` (footers checked once), in name order. A table is the
        `*.parquet` files of its folder plus an optional TABLE.parquet; names starting with "."
        are writers' temp files and skipped; anything else in the folder is an error."""
        if table not in self._checked:
            directory = self.table_dir(table)
            # records before the listing: a writer records a part after committing it, so every part
            # recorded by now is in the listing unless it was lost
            recorded = parts_records(self.root)
            paths = []
            present = set()
            if directory.is_dir():
                for path in sorted(directory.iterdir()):
                    if path.name.startswith("."):
                        continue
                    if path.suffix != ".parquet" or not path.is_file():
                        raise TraceError(f"{path} does not belong in a trace table folder (only *.parquet parts)")
                    present.add(path.name)
                    if table == "tokens" and self._uncommitted(path):
                        continue
                    paths.append(path)
            self._check_recorded(table, recorded, present)
            single = self.root / f"{table}.parquet"
            if single.is_file():
                paths.insert(0, single)
            for path in paths:
                check_part(path, table)
                if table not in HEAVY_TABLES:
                    verify_part(path)
            self._checked[table] = [str(path) for path in paths]
        return list(self._checked[table])

    def _check_recorded(self, table: str, recorded: dict[str, dict[str, list[str]]], present: set[str]) -> None:
        """Every part a writer recorded committing must still be there."""
        for writer_id, record in recorded.items():
            for name in record.get(table, []):
                if name not in present:
                    raise TraceError(lost_part_message(self.root, table, name, writer_id))

    def uncommitted_files(self) -> list[str]:
        """Tokens parts whose steps part is missing: leftovers of an interrupted write, which readers skip
        and the writer that left them deletes when it reopens the trace."""
        directory = self.root / "tokens"
        parts = sorted(directory.glob("part-*.parquet")) if directory.is_dir() else []
        return [str(path) for path in parts if self._uncommitted(path)]

    def _uncommitted(self, tokens_part: Path) -> bool:
        """A writer's tokens part whose steps part never landed (a crash between the two renames)."""
        return tokens_part.name.startswith("part-") and not (self.root / "steps" / tokens_part.name).exists()

    def scan(self, table: str, *, with_file: str | None = None) -> pl.LazyFrame:
        """Lazy frame over all parts of `table` (empty, with the right columns, if it has none).
        `with_file` names an extra column holding each row's part file."""
        files = self.files(table)
        if not files:
            frame = empty_frame(table).lazy()
            return frame.with_columns(pl.lit(None, pl.String).alias(with_file)) if with_file else frame
        return pl.scan_parquet(files, include_file_paths=with_file, hive_partitioning=False, glob=False)

    def read(self, table: str, columns: Iterable[str] | None = None) -> pa.Table:
        """Eager Arrow read of `table` (selected columns) with the exact schema of SCHEMAS."""
        files = self.files(table)
        schema = SCHEMAS[table]
        columns = list(columns) if columns is not None else schema.names
        if not files:
            return pa.schema([schema.field(c) for c in columns]).empty_table()
        return pa.concat_tables(_read_verified(path, columns) for path in files)


def _read_verified(path: str, columns: list[str]) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as error:
        raise TraceError(f"{path} is damaged: {_first_line(error)}") from None


def open_trace(root: str | os.PathLike, *, timeout: float | None = None) -> Trace:
    """The trace at ``root``: a directory, or a URI (s3://, gs://, memory://, ...) read in place (tracestore.remote),
    which has ``timeout`` seconds (default: tracestore.remote.DEFAULT_TIMEOUT) to open and hand over its manifest."""
    if isinstance(root, str) and "://" in root:
        from tracestore.remote import DEFAULT_TIMEOUT, open_remote

        return open_remote(root, DEFAULT_TIMEOUT if timeout is None else timeout)
    root = Path(root)
    if not root.exists():
        raise TraceError(f"trace directory {root} does not exist")
    if not root.is_dir():
        raise TraceError(f"{root} is not a directory; a trace is a directory with a {MANIFEST_FILE}")
    return Trace(root, read_manifest(root))


# ---------------------------------------------------------------- writer


class TraceWriter:
    """Append-only, crash-safe writer of one trace directory; holds the trace's writer lock until closed
    (use it as a context manager, or call ``close``).

    `manifest` creates the trace or, if it exists, must agree with its trace.json on every
    CACHE_KEY_FIELDS entry it sets (a field the stored manifest lacks is added). `manifest=None`
    reopens an existing trace as it is (for scorers adding tables).

    One writer per trace at a time (see tracestore.lock); the exception is `shard` writers, which each
    grow their own problems under their own `writer_id`. `wait` waits for the lock instead of refusing.
    Each writer only cleans up its own leftovers. A trace inside another trace's table folders, or one
    with a symbolic link among its own files that leads out of it (tracestore.boundary), is refused.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        manifest: dict | None,
        *,
        writer_id: str = "w0",
        shard: bool = False,
        wait: bool = False,
    ):
        if not _WRITER_ID.fullmatch(writer_id):
            raise TraceError(f"writer_id {writer_id!r} must be letters, digits and underscores")
        self.root = Path(root)
        self.writer_id = writer_id
        check_outside_trace(self.root, "the trace")
        check_no_link_leaves(self.root)
        if manifest is None and not (self.root / MANIFEST_FILE).is_file():
            raise TraceError(f"{self.root} is not a trace: it has no {MANIFEST_FILE}")
        if self.root.exists() and not self.root.is_dir():
            raise TraceError(f"{self.root} exists and is not a directory")
        self.root.mkdir(parents=True, exist_ok=True)
        lock = WriterLock(self.root, writer_id, shared=shard, wait=wait)
        self._release = weakref.finalize(self, lock.release)
        try:
            with manifest_lock(self.root):  # shards starting at once: one creates trace.json, the others adopt it
                if (self.root / MANIFEST_FILE).exists():
                    self._manifest = read_manifest(self.root).to_dict()
                    if manifest is not None:
                        self._adopt(manifest)
                else:
                    self._create(manifest)
            self._clean_leftovers()
            self._parts = self._reconcile_parts_record()
        except BaseException:
            self.close()
            raise
        self._next_seq = self._last_seq() + 1
        self._keys: dict[str, set] = {}

    def close(self) -> None:
        """Release the writer lock (idempotent); the writer cannot append afterwards."""
        self._release()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- manifest

    @property
    def manifest(self) -> Manifest:
        """The trace's manifest as this writer last read or wrote it."""
        return Manifest(self._manifest)

    def _create(self, manifest: dict) -> None:
        if any(not path.name.startswith(LOCK_FILE) for path in self.root.iterdir()):
            raise TraceError(f"{self.root} is not empty and has no {MANIFEST_FILE}; refusing to write a trace into it")
        expected = schema_version_for(Manifest(manifest).roles) if "models" in manifest else 1
        version = manifest.get("schema_version", expected)
        if version != expected:
            raise TraceError(f"manifest has schema_version {version!r}; a trace of its models is written as {expected}")
        self._manifest = json_normal({**manifest, "schema_version": expected})
        self._write_manifest()

    def _adopt(self, manifest: dict) -> None:
        new = json_normal(manifest)
        added = {}
        for key in CACHE_KEY_FIELDS:
            if key not in new:
                continue
            if key not in self._manifest:
                added[key] = new[key]
                continue
            self._refuse_change(key, new[key])
        if added:
            self._manifest.update(added)
            self._write_manifest()

    def _refuse_change(self, key: str, value: Any) -> None:
        stored = {key: self._manifest[key]}
        differing = first_difference(stored, {key: value})
        if differing:
            parts = differing.split(".")
            model = ""
            if parts[0] == "models" and len(parts) > 2 and parts[2] != "name":  # which model, not just which field
                role = parts[1]
                names = [lookup_field(entry, f"models.{role}.name") for entry in (stored, {key: value})]
                model = f" (the {role} model: {names[0]!r} in the trace, {names[1]!r} in this run)"
            raise TraceError(
                f"{self.root} was written with {differing} = {lookup_field(stored, differing)!r}, "
                f"but this run has {differing} = {lookup_field({key: value}, differing)!r}{model}; "
                "use a new output directory or the trace's settings"
            )

    def _write_manifest(self) -> None:
        write_atomic(
            self.root / MANIFEST_FILE,
            manifest_json(self._manifest).encode("utf-8"),
            temp=self.root / f".{MANIFEST_FILE}.{self.writer_id}.tmp",
        )

    def update_manifest(self, **fields) -> None:
        """Set manifest fields (atomic rewrite). A cache-key field already recorded cannot change."""
        self.edit_manifest(lambda _: fields)

    def edit_manifest(self, change: Callable[[Manifest], dict]) -> None:
        """Set the fields ``change`` returns, given the manifest as stored now: the read, the change and the
        rewrite happen under the manifest lock, so writers running side by side (shards) never lose
        each other's updates. A cache-key field already recorded cannot change."""
        with manifest_lock(self.root):
            self._manifest = read_manifest(self.root).to_dict()
            new = json_normal(change(Manifest(self._manifest)))
            for key, value in new.items():
                if key in CACHE_KEY_FIELDS and key in self._manifest:
                    self._refuse_change(key, value)
            self._manifest.update(new)
            self._write_manifest()

    # -- part files

    def _own_parts(self) -> Iterable[tuple[str, int, Path]]:
        for table in TABLES:
            directory = self.root / table
            if directory.is_dir():
                for path in directory.iterdir():
                    match = PART_NAME.fullmatch(path.name)
                    if match and match["writer"] == self.writer_id:
                        yield table, int(match["seq"]), path

    def _clean_leftovers(self) -> None:
        """Delete this writer's temp files and tokens parts whose steps part never landed (the lock says
        no other process writes as this writer, so they are leftovers of a crash)."""
        for table in TABLES:
            directory = self.root / table
            if directory.is_dir():
                for path in directory.iterdir():
                    if path.name.startswith(f".part-{self.writer_id}-") and path.name.endswith(".tmp"):
                        path.unlink()
        (self.root / f".{MANIFEST_FILE}.{self.writer_id}.tmp").unlink(missing_ok=True)
        for table, _, path in list(self._own_parts()):
            if table == "tokens" and not (self.root / "steps" / path.name).exists():
                path.unlink()

    def _reconcile_parts_record(self) -> dict[str, list[str]]:
        """This writer's parts record made true again: parts committed but not yet recorded (a crash
        between the two, or a trace from before records) are added; a recorded part that is gone is
        named and dropped, since this run grows its rows again."""
        recorded = read_parts_record(self.root, self.writer_id)
        present: dict[str, list[str]] = {}
        for table, _, path in self._own_parts():
            present.setdefault(table, []).append(path.name)
        present = {table: sorted(names) for table, names in present.items()}
        for table, names in recorded.items():
            for name in sorted(set(names) - set(present.get(table, []))):
                log.warning(
                    "%s is missing (writer %s recorded it); this run writes its rows again where it covers them",
                    self.root / table / name,
                    self.writer_id,
                )
        if present != recorded:
            write_parts_record(self.root, self.writer_id, present)
        return present

    def _last_seq(self) -> int:
        return max((seq for _, seq, _ in self._own_parts()), default=0)

    def _write_parts(self, rows: dict[str, pa.Table]) -> None:
        """One append: each table's rows as a part, all under one name (this writer, its next sequence
        number, a digest of the parts' bytes), renamed into place in the order given, then recorded."""
        if not self._release.alive:
            raise TraceError(f"the writer of {self.root} is closed")
        seq = self._take_seq()
        temps: dict[str, Path] = {}
        digest = hashlib.sha256()
        try:
            for table, arrow in rows.items():
                directory = self.root / table
                directory.mkdir(exist_ok=True)
                temps[table] = directory / f".part-{self.writer_id}-{seq:05d}.{os.getpid()}.tmp"
                write_temp(temps[table], lambda temp, arrow=arrow, table=table: write_parquet(arrow, temp, table))
                with open(temps[table], "rb") as handle:
                    for block in iter(lambda handle=handle: handle.read(1 << 20), b""):
                        digest.update(block)
            name = part_name(self.writer_id, seq, digest.hexdigest())
            for table, temp in temps.items():
                commit(temp, self.root / table / name)
        finally:
            for temp in temps.values():
                temp.unlink(missing_ok=True)
        for table in rows:
            self._parts.setdefault(table, []).append(name)
        write_parts_record(self.root, self.writer_id, self._parts)

    def _stored_keys(self, table: str) -> set:
        if table not in self._keys:
            stored = Trace(self.root, self.manifest).read(table, ROW_KEYS[table])
            self._keys[table] = {_row_key(table, row) for row in stored.to_pylist()}
        return self._keys[table]

    def _new_rows(self, table: str, rows: list[dict]) -> list[dict]:
        """`rows` minus those already stored; a key repeated inside `rows` is an error."""
        keys = [_row_key(table, row) for row in rows]
        repeated = [key for key, count in Counter(keys).items() if count > 1]
        if repeated:
            raise TraceError(f"{table} rows to append repeat the key {'/'.join(ROW_KEYS[table])} = {repeated[0]!r}")
        stored = self._stored_keys(table)
        return [row for row, key in zip(rows, keys) if key not in stored]

    def _to_arrow(self, table: str, rows: list[dict]) -> pa.Table:
        schema = SCHEMAS[table]
        required = {field.name for field in schema if not field.nullable}
        known = set(schema.names)
        for row in rows:
            extra = row.keys() - known
            missing = required - row.keys()
            if extra or missing:
                what = f"unknown column {sorted(extra)[0]!r}" if extra else f"no {sorted(missing)[0]!r}"
                raise TraceError(f"{table} row {_row_label(table, row)} has {what}")
        try:
            arrow = pa.Table.from_pylist(rows, schema=schema)
        except (pa.ArrowException, TypeError, ValueError) as error:
            raise TraceError(f"{table} rows do not fit the schema: {str(error).splitlines()[0]}") from None
        for field in schema:
            if not field.nullable and arrow.column(field.name).null_count:
                row = rows[arrow.column(field.name).is_null().to_pylist().index(True)]
                raise TraceError(f"{table} row {_row_label(table, row)} has a null {field.name}")
        return arrow

    def _remember(self, table: str, rows: list[dict]) -> None:
        self._stored_keys(table).update(_row_key(table, row) for row in rows)

    def _append(self, table: str, rows: list[dict]) -> None:
        rows = self._new_rows(table, rows)
        if rows:
            self._write_parts({table: self._to_arrow(table, rows)})
            self._remember(table, rows)

    def _take_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    # -- public appends

    def done_step_ids(self) -> set[str]:
        """step_ids already stored (by any writer, as of opening, plus this writer's appends)."""
        return set(self._stored_keys("steps"))

    def done_score_ids(self, scorer: str) -> set[str]:
        """step_ids that already have a score from `scorer`."""
        return {step_id for step_id, name in self._stored_keys("scores") if name == scorer}

    def append_steps(self, steps: list[dict], tokens: list[dict]) -> None:
        """Store steps with their token rows (one each); steps already stored are skipped."""
        per_step = Counter(row.get("step_id") for row in tokens)
        ids = [row.get("step_id") for row in steps]
        for step_id in ids:
            if per_step.get(step_id, 0) != 1:
                raise TraceError(f"step {step_id!r} has {per_step.get(step_id, 0)} tokens rows; it needs exactly 1")
        stray = per_step.keys() - set(ids)
        if stray:
            raise TraceError(f"tokens row for step {sorted(stray, key=str)[0]!r}, which is not among the steps")
        steps = self._new_rows("steps", steps)
        if not steps:
            return
        todo = {row["step_id"] for row in steps}
        tokens = [row for row in tokens if row["step_id"] in todo]
        steps_arrow = self._to_arrow("steps", steps)
        tokens_arrow = self._to_arrow("tokens", tokens)
        by_id = {row["step_id"]: row for row in tokens}
        for step in steps:
            expected = make_step_id(step["problem_id"], step["world"], step["path"])
            if step["step_id"] != expected:
                raise TraceError(f"step {step['step_id']!r} should have step_id {expected!r} (problem_id/world/path)")
            for column in TOKEN_ARRAY_COLUMNS:
                if by_id[step["step_id"]][column] is None:  # max_logits of an API-served step
                    continue
                n_values = len(by_id[step["step_id"]][column])
                if n_values != step["n_gen_tokens"]:
                    raise TraceError(
                        f"step {step['step_id']!r}: tokens.{column} has {n_values} entries, "
                        f"but n_gen_tokens is {step['n_gen_tokens']}"
                    )
        self._write_parts({"tokens": tokens_arrow, "steps": steps_arrow})  # steps last: the commit mark
        self._remember("steps", steps)

    def append_problems(self, rows: list[dict]) -> None:
        """Store problems; a problem_id already stored is skipped if it has the same question and reference."""
        stored = self._stored_keys("problems")
        clash = [row for row in rows if row.get("problem_id") in stored]
        if clash:
            trace = Trace(self.root, self.manifest)
            old = trace.scan("problems").filter(pl.col("problem_id").is_in([r["problem_id"] for r in clash]))
            old = {r["problem_id"]: r for r in old.collect().iter_rows(named=True)}
            for row in clash:
                for column in ("question", "reference"):
                    if row.get(column) != old[row["problem_id"]][column]:
                        raise TraceError(f"problem {row['problem_id']!r} is already stored with a different {column}")
        self._append("problems", rows)

    def append_hidden(self, rows: list[dict]) -> None:
        """Store hidden-state vectors; a (problem_id, model, layer, where) already stored is skipped."""
        self._append("hidden", rows)

    def append_scores(self, rows: list[dict]) -> None:
        """Store scores; a (step_id, scorer) already stored is skipped."""
        self._append("scores", rows)

    def done_grade_ids(self, grade_set: str) -> set[str]:
        """step_ids that already have a grade in ``grade_set``."""
        return {step_id for step_id, name in self._stored_keys("grades") if name == grade_set}

    def append_grades(self, rows: list[dict]) -> None:
        """Store a grade set's grades; a (step_id, grade_set) already stored is skipped."""
        self._append("grades", rows)


def _row_key(table: str, row: dict) -> Any:
    """The identifying value of a row: one column's value, or a tuple for composite keys."""
    columns = ROW_KEYS[table]
    return row.get(columns[0]) if len(columns) == 1 else tuple(row.get(column) for column in columns)


def _row_label(table: str, row: dict) -> str:
    return repr("/".join(str(row.get(column)) for column in ROW_KEYS[table]))
