"""A trace on object storage (or any filesystem pyarrow or fsspec knows), read in place: no copy first.

``open_trace("s3://bucket/runs/gsm8k")`` (also gs://, abfs://, hdfs://, file://, and fsspec's schemes
such as memory://) returns a ``RemoteTrace``: the same reader as a local trace -- the committed parts of
each table, footers checked, light tables' page checksums verified, parts that writers recorded and that
are gone named -- listing and reading through the filesystem, with Polars scanning the parts through
pyarrow datasets. Credentials come from the environment, as pyarrow and fsspec read them. Writing
(gen, score, repair) needs a local or mounted path: a writer's lock is a file lock; so do `validate`,
`info` and `sql`, which take a file:// URL as the path it names.

A store that does not answer is named within a time limit (``timeout``, `trace replay --timeout`): the
filesystem and the manifest are opened in a thread that is given up after that long (gs:// also stops
retrying then), so an unreachable endpoint is one line naming the URL and the cause, never a hang.
"""

from __future__ import annotations

import json
import posixpath
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tracestore.errors import TraceError
from tracestore.parts import lost_part_message
from tracestore.schema import (
    MANIFEST_FILE,
    PARTS_DIR,
    SCHEMAS,
    TABLES,
    Manifest,
    checked_manifest,
)

VERIFIED_ON_OPEN = tuple(table for table in TABLES if table != "tokens")  # as tracestore.store.HEAVY_TABLES says
DEFAULT_TIMEOUT = 30.0  # seconds a store has to open and hand over the manifest
GCS_SCHEMES = ("gs", "gcs")


def _first_line(error: Exception) -> str:
    line = (str(error).splitlines() or [type(error).__name__])[0]
    return line.split(" error_info={")[0]  # Google's client appends its whole retry bookkeeping


def is_uri(root) -> bool:
    return isinstance(root, str) and "://" in root


def local_path(root: str | Path, command: str) -> Path:
    """The folder of a trace given as a path or a file:// URL; a trace at any other URL is refused, naming the
    `trace` subcommand ``command`` that needs a local one."""
    if not is_uri(root):
        return Path(root)
    parsed = urllib.parse.urlsplit(root)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(urllib.parse.unquote(parsed.path))
    raise TraceError(
        f"trace {command} reads a local or mounted trace (a path or file:// URL), not {root}; "
        "trace replay reads one at any URL in place"
    )


def _within(seconds: float, uri: str, call: Callable):
    """``call()``, given up after ``seconds``: a daemon thread runs it, so a store that never answers holds
    nothing up (the thread ends with the process, or when the store's own retries do)."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as error:  # handed to the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=run, name=f"open {uri}", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TraceError(
            f"{uri}: no answer within {seconds:g} s (--timeout): the store is unreachable or slow; check the URL, "
            "the network and the credentials"
        )
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _with_retry_limit(uri: str, seconds: float) -> str:
    """``uri`` with Google Cloud Storage's retries bounded by ``seconds`` (its client retries for 15 minutes)."""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme not in GCS_SCHEMES or "retry_limit_seconds" in urllib.parse.parse_qs(parsed.query):
        return uri
    query = "&".join(filter(None, [parsed.query, f"retry_limit_seconds={seconds:g}"]))
    return urllib.parse.urlunsplit(parsed._replace(query=query))


def _bounded_s3(filesystem: pafs.S3FileSystem, seconds: float) -> pafs.S3FileSystem:
    """The same S3 filesystem (its options as pickling gives them) with each request's connection and answer
    bounded by ``seconds`` and AWS's standard three attempts (a URI gets the SDK's longer retrying)."""
    options = {**filesystem.__reduce__()[1][0], "connect_timeout": seconds, "request_timeout": seconds}
    return pafs.S3FileSystem(**options, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3))


def filesystem_of(uri: str, timeout: float = DEFAULT_TIMEOUT) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path of ``uri``: pyarrow's own (s3, gs, abfs, hdfs, file), else fsspec's; an
    object store's requests bounded by ``timeout`` seconds where its client allows."""
    try:
        filesystem, path = pafs.FileSystem.from_uri(_with_retry_limit(uri, timeout))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        pass
    except OSError as error:  # S3 asks the network for the bucket's region here
        raise TraceError(f"{uri}: cannot reach the store: {_first_line(error)}") from None
    else:
        if isinstance(filesystem, pafs.S3FileSystem):
            filesystem = _bounded_s3(filesystem, timeout)
        return filesystem, path
    try:
        import fsspec
    except ImportError:
        raise TraceError(f"{uri}: pyarrow does not know this scheme, and fsspec is not installed") from None
    try:
        filesystem, path = fsspec.core.url_to_fs(uri)
    except (ValueError, ImportError) as error:
        raise TraceError(f"{uri}: {_first_line(error)}") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem)), path


class RemoteTrace:
    """Read side of a trace at a URI, with tracestore.store.Trace's reading methods; see the module."""

    def __init__(self, uri: str, filesystem: pafs.FileSystem, path: str, manifest: Manifest):
        self.root = uri
        self.manifest = manifest
        self._checked: dict[str, list[str]] = {}
        self.filesystem = filesystem
        self.path = path.rstrip("/")

    def __repr__(self) -> str:
        return f"RemoteTrace({self.root!r})"

    def _listing(self, folder: str) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(posixpath.join(self.path, folder), allow_not_found=True)
        return sorted(self.filesystem.get_file_info(selector), key=lambda info: info.base_name)

    def _exists(self, relative: str) -> bool:
        return self.filesystem.get_file_info(posixpath.join(self.path, relative)).type == pafs.FileType.File

    def _parts_records(self) -> dict[str, dict[str, list[str]]]:
        records = {}
        for info in self._listing(PARTS_DIR):
            if info.base_name.endswith(".json"):
                with self.filesystem.open_input_stream(info.path) as stream:
                    records[info.base_name[: -len(".json")]] = json.loads(stream.read())["parts"]
        return records

    def files(self, table: str) -> list[str]:
        """The committed parts of ``table`` (paths on the filesystem), checked as a local trace's are."""
        if table not in SCHEMAS:
            raise TraceError(f"unknown table {table!r}: a trace has {', '.join(SCHEMAS)}")
        if table not in self._checked:
            recorded = self._parts_records()
            steps = {info.base_name for info in self._listing("steps")} if table == "tokens" else set()
            paths, present = [], set()
            for info in self._listing(table):
                if info.base_name.startswith("."):
                    continue
                if not info.base_name.endswith(".parquet") or info.type != pafs.FileType.File:
                    raise TraceError(f"{self.root}/{table}/{info.base_name} does not belong in a trace table folder")
                present.add(info.base_name)
                if table == "tokens" and info.base_name.startswith("part-") and info.base_name not in steps:
                    continue  # the leftover of an interrupted write
                paths.append(info.path)
            for writer_id, record in recorded.items():
                for name in record.get(table, []):
                    if name not in present:
                        raise TraceError(lost_part_message(self.root, table, name, writer_id))
            if self._exists(f"{table}.parquet"):
                paths.insert(0, posixpath.join(self.path, f"{table}.parquet"))
            for path in paths:
                self._check(path, table, verify=table in VERIFIED_ON_OPEN)
            self._checked[table] = paths
        return list(self._checked[table])

    def _check(self, path: str, table: str, *, verify: bool) -> None:
        try:
            with self.filesystem.open_input_file(path) as handle:
                parquet = pq.ParquetFile(handle, page_checksum_verification=True)
                names = parquet.schema_arrow.names
                if names != SCHEMAS[table].names:
                    raise TraceError(f"{path} has columns {names}, but {table} needs {SCHEMAS[table].names}")
                if verify:
                    for _ in parquet.iter_batches(batch_size=65_536):
                        pass
        except (pa.ArrowException, OSError) as error:
            raise TraceError(f"{self.root}: {path} is damaged: {_first_line(error)}") from None
        finally:
            pa.default_memory_pool().release_unused()

    def scan(self, table: str, *, with_file: str | None = None) -> pl.LazyFrame:
        if with_file is not None:
            raise TraceError(f"{self.root}: naming each row's part file needs a local trace")
        files = self.files(table)
        if not files:
            return pl.from_arrow(SCHEMAS[table].empty_table()).lazy()
        dataset = ds.dataset(files, schema=SCHEMAS[table], format="parquet", filesystem=self.filesystem)
        return pl.scan_pyarrow_dataset(dataset)

    def read(self, table: str, columns=None) -> pa.Table:
        columns = list(columns) if columns is not None else SCHEMAS[table].names
        files = self.files(table)
        if not files:
            return pa.schema([SCHEMAS[table].field(c) for c in columns]).empty_table()
        return pa.concat_tables(
            pq.read_table(path, columns=columns, filesystem=self.filesystem, page_checksum_verification=True)
            for path in files
        )

    def uncommitted_files(self) -> list[str]:
        steps = {info.base_name for info in self._listing("steps")}
        return [info.path for info in self._listing("tokens") if info.base_name not in steps]


def open_remote(uri: str, timeout: float = DEFAULT_TIMEOUT) -> RemoteTrace:
    """The trace at ``uri``, or a TraceError within ``timeout`` seconds naming the URL and the cause."""
    if not timeout > 0:
        raise TraceError(f"--timeout must be above 0 seconds, got {timeout:g}")
    return _within(timeout, uri, lambda: _open_remote(uri, timeout))


def _open_remote(uri: str, timeout: float) -> RemoteTrace:
    filesystem, path = filesystem_of(uri, timeout)
    manifest_path = posixpath.join(path.rstrip("/"), MANIFEST_FILE)
    try:
        with filesystem.open_input_stream(manifest_path) as stream:
            manifest = json.loads(stream.read())
    except FileNotFoundError:
        raise TraceError(f"{uri} is not a trace: it has no {MANIFEST_FILE}") from None
    except (OSError, pa.ArrowException) as error:
        raise TraceError(f"{uri}: cannot read {MANIFEST_FILE}: {_first_line(error)}") from None
    except ValueError as error:
        raise TraceError(f"{uri}/{MANIFEST_FILE} is not valid JSON ({error})") from None
    return RemoteTrace(uri, filesystem, path, checked_manifest(manifest, f"{uri}/{MANIFEST_FILE}"))
