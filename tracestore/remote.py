"""A trace on object storage (or any filesystem pyarrow or fsspec knows), read in place: no copy first.

``open_trace("s3://bucket/runs/gsm8k")`` (also gs://, abfs://, hdfs://, file://, and fsspec's schemes
such as memory://) returns a ``RemoteTrace``: the same reader as a local trace -- the committed parts of
each table, footers checked, light tables' page checksums verified, parts that writers recorded and that
are gone named -- listing and reading through the filesystem, with Polars scanning the parts through
pyarrow datasets. Credentials come from the environment, as pyarrow and fsspec read them. Writing
(gen, score, repair) needs a local or mounted path: a writer's lock is a file lock.
"""

from __future__ import annotations

import json
import posixpath

import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tracestore.errors import TraceError
from tracestore.schema import MANIFEST_FILE, PARTS_DIR, SCHEMAS, TABLES, Manifest, checked_manifest

VERIFIED_ON_OPEN = tuple(table for table in TABLES if table != "tokens")  # as tracestore.store.HEAVY_TABLES says


def _first_line(error: Exception) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]


def filesystem_of(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path of ``uri``: pyarrow's own (s3, gs, abfs, hdfs, file), else fsspec's."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        pass
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
                        raise TraceError(
                            f"{self.root}/{table}/{name} is missing: writer {writer_id} recorded it, so the trace "
                            "lost its rows"
                        )
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


def open_remote(uri: str) -> RemoteTrace:
    filesystem, path = filesystem_of(uri)
    manifest_path = posixpath.join(path.rstrip("/"), MANIFEST_FILE)
    try:
        with filesystem.open_input_stream(manifest_path) as stream:
            manifest = json.loads(stream.read())
    except FileNotFoundError:
        raise TraceError(f"{uri} is not a trace: it has no {MANIFEST_FILE}") from None
    except (OSError, pa.ArrowException) as error:
        raise TraceError(f"cannot read {uri}/{MANIFEST_FILE}: {_first_line(error)}") from None
    except ValueError as error:
        raise TraceError(f"{uri}/{MANIFEST_FILE} is not valid JSON ({error})") from None
    return RemoteTrace(uri, filesystem, path, checked_manifest(manifest, f"{uri}/{MANIFEST_FILE}"))
