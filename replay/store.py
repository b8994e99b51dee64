"""The trace on disk: file names, Arrow schemas, the manifest, an atomic resumable writer and a lazy reader.

A trace is a directory::

    trace.json                      manifest (the cache key), with schema_version
    problems/part-w0-00001.parquet  each table is a folder of part files (a single
    steps/part-w0-00002.parquet     TABLE.parquet file next to the folder is read too)
    tokens/part-w0-00002.parquet
    hidden/...  scores/...

Every part is written under a hidden temp name, fsynced and renamed, so a reader
never sees half a file. `append_steps` writes the tokens part first and the steps
part second under the same name; the steps part is the commit mark: a tokens part
without its steps part is the leftover of a crash, ignored by readers and deleted
when its writer reopens the trace.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from replay.errors import TraceError

SCHEMA_VERSION: int = 1
MANIFEST_FILE = "trace.json"
TABLES = ("problems", "steps", "tokens", "hidden", "scores")

# Manifest fields that change what a step or score would contain. Reopening a trace
# with a manifest that differs in one of these is refused (see TraceWriter).
CACHE_KEY_FIELDS: tuple[str, ...] = (
    "schema_version",
    "models",
    "dataset",
    "prompt_template",
    "sampling",
    "delimiter",
    "grader",
    "engine",
    "seeds",
)

FINISH_REASONS = ("delimiter", "eos", "length")
ROLE_CHARS = {"small": "s", "large": "L"}  # roles m0..m9 of K-model traces use their index digit


def _field(name: str, type_: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable)


SCHEMAS: dict[str, pa.Schema] = {
    "problems": pa.schema(
        [
            _field("problem_id", pa.string()),
            _field("dataset", pa.string()),
            _field("split", pa.string()),
            _field("question", pa.string()),
            _field("reference", pa.string()),
            _field("meta", pa.string(), nullable=True),  # JSON object as a string
        ]
    ),
    "steps": pa.schema(
        [
            _field("step_id", pa.string()),
            _field("problem_id", pa.string()),
            _field("world", pa.int32()),
            _field("parent_path", pa.string()),
            _field("path", pa.string()),
            _field("depth", pa.int32()),
            _field("model", pa.string()),
            _field("text", pa.string()),
            _field("n_prompt_tokens", pa.int32()),
            _field("n_new_prefill_tokens", pa.int32()),
            _field("n_cached_tokens", pa.int32()),
            _field("n_gen_tokens", pa.int32()),
            _field("finish_reason", pa.string()),
            _field("is_final", pa.bool_()),
            _field("answer", pa.string(), nullable=True),
            _field("correct", pa.bool_(), nullable=True),
            _field("conf_max_logit_mean", pa.float32()),
            _field("conf_max_logit_math", pa.float32(), nullable=True),
            _field("conf_top1_prob_min_math", pa.float32(), nullable=True),
            _field("logprob_mean", pa.float32()),
            _field("logprob_min", pa.float32()),
            _field("first_token_logprob", pa.float32()),
            _field("gen_seconds", pa.float32(), nullable=True),
        ]
    ),
    "tokens": pa.schema(
        [
            _field("step_id", pa.string()),
            _field("token_ids", pa.list_(pa.int32())),
            _field("logprobs", pa.list_(pa.float32())),
            _field("max_logits", pa.list_(pa.float32())),
            _field("topk_ids", pa.list_(pa.list_(pa.int32()))),
            _field("topk_logprobs", pa.list_(pa.list_(pa.float32()))),
            _field("is_math", pa.list_(pa.bool_())),
        ]
    ),
    # DESIGN.md says fixed_size_list<float16>; models of different widths share this
    # column, so it is a variable list (every row of one model has the same length).
    "hidden": pa.schema(
        [
            _field("problem_id", pa.string()),
            _field("model", pa.string()),
            _field("layer", pa.int16()),  # -1 = last layer
            _field("where", pa.string()),  # "prompt_last"
            _field("vector", pa.list_(pa.float16())),
        ]
    ),
    "scores": pa.schema(
        [
            _field("step_id", pa.string()),
            _field("scorer", pa.string()),
            _field("value", pa.float32()),
            _field("detail", pa.list_(pa.float32()), nullable=True),
            _field("n_tokens_processed", pa.int32()),
        ]
    ),
}

TOKEN_ARRAY_COLUMNS = ("token_ids", "logprobs", "max_logits", "topk_ids", "topk_logprobs", "is_math")
# Columns that identify a row: appending a row whose key is already stored is a no-op.
ROW_KEYS: dict[str, tuple[str, ...]] = {
    "problems": ("problem_id",),
    "steps": ("step_id",),
    "tokens": ("step_id",),
    "hidden": ("problem_id", "model", "layer", "where"),
    "scores": ("step_id", "scorer"),
}
# Row groups of a few MB so that readers can stream (token rows are ~100x wider than step rows).
ROW_GROUP_ROWS = {"problems": 65_536, "steps": 65_536, "tokens": 2_048, "hidden": 4_096, "scores": 65_536}

_WRITER_ID = re.compile(r"[A-Za-z0-9_]+")


def model_char(role: str) -> str:
    """The character a step by `role` adds to a node path: small -> "s", large -> "L", m3 -> "3"."""
    if role in ROLE_CHARS:
        return ROLE_CHARS[role]
    match = re.fullmatch(r"m(\d)", role)
    if match is None:
        raise TraceError(f"unknown model role {role!r}: expected small, large or m0..m9")
    return match.group(1)


def manifest_roles(manifest: dict) -> list[str]:
    """Model roles in manifest order; `models` is a list of objects with a "role" (or a dict keyed by role)."""
    models = manifest.get("models")
    if isinstance(models, dict):
        return list(models)
    if isinstance(models, list) and all(isinstance(model, dict) and "role" in model for model in models):
        return [model["role"] for model in models]
    raise TraceError(f"trace.json: 'models' must be a list of objects with a 'role', not {models!r}")


def make_step_id(problem_id: str, world: int, path: str) -> str:
    return f"{problem_id}/{world}/{path}"


def part_name(writer_id: str, seq: int) -> str:
    return f"part-{writer_id}-{seq:05d}.parquet"


def _temp_name(writer_id: str, seq: int) -> str:
    return f".{part_name(writer_id, seq)}.tmp"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, temp: Path, write) -> None:
    """Write through `write(file)` to `temp`, fsync, then rename over `path`."""
    with open(temp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    _fsync_dir(path.parent)


# ---------------------------------------------------------------- manifest


def read_manifest(root: Path) -> dict:
    """The manifest of the trace at `root`, checked for a known schema_version."""
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise TraceError(f"{root} is not a trace: it has no {MANIFEST_FILE}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TraceError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(manifest, dict):
        raise TraceError(f"{path} must hold a JSON object, not {type(manifest).__name__}")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise TraceError(
            f"{path} has schema_version {version!r}; this version of trace reads schema_version {SCHEMA_VERSION}"
        )
    return manifest


def _json_normal(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value))


def first_difference(stored: Any, new: Any, where: str = "") -> str | None:
    """Dotted name of the first field where two manifest values differ, e.g. `sampling.temperature`,
    `models.large.revision` (list items of dicts with a role are named by role); None if they are equal."""
    if isinstance(stored, dict) and isinstance(new, dict):
        for key in sorted(set(stored) | set(new)):
            name = f"{where}.{key}" if where else key
            if key not in stored or key not in new:
                return name
            found = first_difference(stored[key], new[key], name)
            if found:
                return found
        return None
    if isinstance(stored, list) and isinstance(new, list):
        if len(stored) != len(new):
            return where
        for index, (a, b) in enumerate(zip(stored, new)):
            label = _role(a) or index
            found = first_difference(a, b, f"{where}.{label}")
            if found:
                return found
        return None
    same_kind = isinstance(stored, bool) == isinstance(new, bool)  # True == 1 in Python, not in a manifest
    return None if stored == new and same_kind else where


def lookup_field(value: Any, dotted: str) -> Any:
    """The value `first_difference` named, for the error message (None where absent)."""
    for part in dotted.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list):
            matches = [item for index, item in enumerate(value) if part in (str(index), _role(item))]
            value = matches[0] if matches else None
        else:
            return None
    return value


def _role(item: Any) -> str | None:
    return item.get("role") if isinstance(item, dict) else None


# ---------------------------------------------------------------- reader


def _check_part(path: Path, table: str) -> None:
    """Read the Parquet footer of one part: a truncated or foreign file is named, not a traceback."""
    try:
        schema = pq.read_metadata(path).schema.to_arrow_schema()
    except (pa.ArrowException, OSError) as error:
        raise TraceError(f"{path} is not a readable Parquet file ({str(error).splitlines()[0]})") from None
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

    def __init__(self, root: Path, manifest: dict):
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
            paths = []
            if directory.is_dir():
                for path in sorted(directory.iterdir()):
                    if path.name.startswith("."):
                        continue
                    if path.suffix != ".parquet" or not path.is_file():
                        raise TraceError(f"{path} does not belong in a trace table folder (only *.parquet parts)")
                    if table == "tokens" and self._uncommitted(path):
                        continue
                    paths.append(path)
            single = self.root / f"{table}.parquet"
            if single.is_file():
                paths.insert(0, single)
            for path in paths:
                _check_part(path, table)
            self._checked[table] = [str(path) for path in paths]
        return list(self._checked[table])

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
        return pl.scan_parquet(files, include_file_paths=with_file, hive_partitioning=False)

    def read(self, table: str, columns: Iterable[str] | None = None) -> pa.Table:
        """Eager Arrow read of `table` (selected columns) with the exact schema of SCHEMAS."""
        files = self.files(table)
        schema = SCHEMAS[table]
        columns = list(columns) if columns is not None else schema.names
        if not files:
            return pa.schema([schema.field(c) for c in columns]).empty_table()
        return pa.concat_tables(pq.read_table(path, columns=columns) for path in files)


def open_trace(root: str | os.PathLike) -> Trace:
    root = Path(root)
    if not root.exists():
        raise TraceError(f"trace directory {root} does not exist")
    if not root.is_dir():
        raise TraceError(f"{root} is not a directory; a trace is a directory with a {MANIFEST_FILE}")
    return Trace(root, read_manifest(root))


# ---------------------------------------------------------------- writer


class TraceWriter:
    """Append-only, crash-safe writer of one trace directory.

    `manifest` creates the trace or, if it exists, must agree with its trace.json on every
    CACHE_KEY_FIELDS entry it sets (a field the stored manifest lacks is added). `manifest=None`
    reopens an existing trace as it is (for scorers adding tables).

    Concurrent writers into one directory (shards) need distinct `writer_id`s; each only cleans
    up its own leftovers.
    """

    def __init__(self, root: str | os.PathLike, manifest: dict | None, *, writer_id: str = "w0"):
        if not _WRITER_ID.fullmatch(writer_id):
            raise TraceError(f"writer_id {writer_id!r} must be letters, digits and underscores")
        self.root = Path(root)
        self.writer_id = writer_id
        if (self.root / MANIFEST_FILE).exists():
            self.manifest = read_manifest(self.root)
            if manifest is not None:
                self._adopt(manifest)
        elif manifest is None:
            raise TraceError(f"{self.root} is not a trace: it has no {MANIFEST_FILE}")
        else:
            self._create(manifest)
        self._clean_leftovers()
        self._next_seq = self._last_seq() + 1
        self._keys: dict[str, set] = {}

    # -- manifest

    def _create(self, manifest: dict) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise TraceError(f"{self.root} exists and is not a directory")
        if self.root.exists() and any(self.root.iterdir()):
            raise TraceError(f"{self.root} is not empty and has no {MANIFEST_FILE}; refusing to write a trace into it")
        version = manifest.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise TraceError(f"manifest has schema_version {version!r}; this writer writes {SCHEMA_VERSION}")
        self.root.mkdir(parents=True, exist_ok=True)
        self.manifest = _json_normal({**manifest, "schema_version": SCHEMA_VERSION})
        self._write_manifest()

    def _adopt(self, manifest: dict) -> None:
        new = _json_normal(manifest)
        added = {}
        for key in CACHE_KEY_FIELDS:
            if key not in new:
                continue
            if key not in self.manifest:
                added[key] = new[key]
                continue
            self._refuse_change(key, new[key])
        if added:
            self.manifest.update(added)
            self._write_manifest()

    def _refuse_change(self, key: str, value: Any) -> None:
        differing = first_difference({key: self.manifest[key]}, {key: value})
        if differing:
            raise TraceError(
                f"{self.root} was written with {differing} = {lookup_field({key: self.manifest[key]}, differing)!r}, "
                f"but this run has {differing} = {lookup_field({key: value}, differing)!r}; "
                "use a new output directory or the trace's settings"
            )

    def _write_manifest(self) -> None:
        text = json.dumps(self.manifest, indent=2, sort_keys=True) + "\n"
        _atomic_write(
            self.root / MANIFEST_FILE,
            self.root / f".{MANIFEST_FILE}.{self.writer_id}.tmp",
            lambda handle: handle.write(text.encode("utf-8")),
        )

    def update_manifest(self, **fields) -> None:
        """Set manifest fields (atomic rewrite). A cache-key field already recorded cannot change."""
        current = read_manifest(self.root)
        new = _json_normal(fields)
        for key, value in new.items():
            if key in CACHE_KEY_FIELDS and key in current:
                self.manifest = current
                self._refuse_change(key, value)
        current.update(new)
        self.manifest = current
        self._write_manifest()

    # -- part files

    def _own_parts(self) -> Iterable[tuple[str, int, Path]]:
        pattern = re.compile(rf"part-{re.escape(self.writer_id)}-(\d+)\.parquet")
        for table in TABLES:
            directory = self.root / table
            if directory.is_dir():
                for path in directory.iterdir():
                    match = pattern.fullmatch(path.name)
                    if match:
                        yield table, int(match.group(1)), path

    def _clean_leftovers(self) -> None:
        """Delete this writer's temp files and tokens parts whose steps part never landed."""
        temp = re.compile(rf"\.part-{re.escape(self.writer_id)}-\d+\.parquet\.tmp")
        for table in TABLES:
            directory = self.root / table
            if directory.is_dir():
                for path in directory.iterdir():
                    if temp.fullmatch(path.name):
                        path.unlink()
        (self.root / f".{MANIFEST_FILE}.{self.writer_id}.tmp").unlink(missing_ok=True)
        for table, _, path in list(self._own_parts()):
            if table == "tokens" and not (self.root / "steps" / path.name).exists():
                path.unlink()

    def _last_seq(self) -> int:
        return max((seq for _, seq, _ in self._own_parts()), default=0)

    def _write_part(self, table: str, rows: pa.Table, seq: int) -> None:
        directory = self.root / table
        directory.mkdir(exist_ok=True)
        _atomic_write(
            directory / part_name(self.writer_id, seq),
            directory / _temp_name(self.writer_id, seq),
            lambda handle: pq.write_table(
                rows, handle, compression="zstd", row_group_size=ROW_GROUP_ROWS[table]
            ),
        )

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
            self._write_part(table, self._to_arrow(table, rows), self._take_seq())
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
                n_values = len(by_id[step["step_id"]][column])
                if n_values != step["n_gen_tokens"]:
                    raise TraceError(
                        f"step {step['step_id']!r}: tokens.{column} has {n_values} entries, "
                        f"but n_gen_tokens is {step['n_gen_tokens']}"
                    )
        seq = self._take_seq()
        self._write_part("tokens", tokens_arrow, seq)
        self._write_part("steps", steps_arrow, seq)
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
                        raise TraceError(
                            f"problem {row['problem_id']!r} is already stored with a different {column}"
                        )
        self._append("problems", rows)

    def append_hidden(self, rows: list[dict]) -> None:
        """Store hidden-state vectors; a (problem_id, model, layer, where) already stored is skipped."""
        self._append("hidden", rows)

    def append_scores(self, rows: list[dict]) -> None:
        """Store scores; a (step_id, scorer) already stored is skipped."""
        self._append("scores", rows)


def _row_key(table: str, row: dict) -> Any:
    """The identifying value of a row: one column's value, or a tuple for composite keys."""
    columns = ROW_KEYS[table]
    return row.get(columns[0]) if len(columns) == 1 else tuple(row.get(column) for column in columns)


def _row_label(table: str, row: dict) -> str:
    return repr("/".join(str(row.get(column)) for column in ROW_KEYS[table]))
