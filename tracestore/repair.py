"""`trace validate --repair`: undo what writers that ran at the same time, or crashed, left behind.

Under the trace's writer lock (no writer may run meanwhile) it moves what lies in a table folder, was
recorded by no writer and cannot be read as a part of that table (a plugin's stray file, a trace grown
inside the folder) into ``_quarantine/TABLE/``, never deleting it; removes writers' temp files and
tokens parts whose steps part never landed, forgets parts that writers recorded but that are gone
(their rows stay lost until the command that wrote them is rerun), and drops every row that is an
exact copy of an earlier row of its table (all columns equal; parts in name order, rows in file
order), rewriting each affected part atomically under its name. Rows that share a key but differ
are left alone and reported: which copy is right is not the repair's to guess.

Every state between two of its writes is one a rerun of the repair finishes from: tokens parts are
rewritten before steps parts, and a steps part whose tokens part still holds rows is kept, even empty.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tracestore.atomic import write_atomic
from tracestore.boundary import check_no_link_leaves
from tracestore.errors import TraceError
from tracestore.lock import WriterLock
from tracestore.parts import parts_records, recorded_parts, write_parts_record
from tracestore.remote import local_path
from tracestore.schema import MANIFEST_FILE, PART_NAME, PARTS_DIR, QUARANTINE_DIR, ROW_KEYS, TABLES
from tracestore.store import Trace, check_part, open_trace, verify_part, write_parquet

REPAIR_WRITER = "repair"
REPAIR_ORDER = (
    "problems",
    "tokens",
    "steps",
    "hidden",
    "scores",
    "grades",
)  # tokens before the steps parts that commit them


@dataclass
class RepairReport:
    done: list[str] = field(default_factory=list)  # one sentence per thing repaired
    left: list[str] = field(default_factory=list)  # what it found but may not repair (rows that share a key, differ)


def repair(root: str | os.PathLike) -> RepairReport:
    """Repair the trace at ``root`` (a path or file:// URL) under its writer lock (refused while a writer runs,
    and for a trace with a symbolic link that leads out of it)."""
    trace = open_trace(local_path(root, "validate --repair"))
    check_no_link_leaves(trace.root)
    lock = WriterLock(trace.root, REPAIR_WRITER)
    report = RepairReport()
    try:
        report.done += _quarantine_strays(trace.root)  # first: a stray tokens file is no leftover to delete
        report.done += _remove_leftovers(trace.root)
        report.done += _forget_lost_parts(trace.root)
        for table in REPAIR_ORDER:
            dropped, differing = _drop_exact_copies(trace, table)
            report.done += dropped
            report.left += differing
    finally:
        lock.release()
    return report


def _quarantine_strays(root: Path) -> list[str]:
    """Move every entry of a table folder that no writer recorded and that is not a readable part of its table
    into QUARANTINE_DIR/TABLE/ (under a free name); writers' hidden temp files are left to _remove_leftovers."""
    recorded = recorded_parts(root)
    done = []
    for table in TABLES:
        directory = root / table
        if not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            if path.name.startswith(".") or (table, path.name) in recorded or _readable_part(path, table):
                continue
            target = _free_path(root / QUARANTINE_DIR / table / path.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            path.rename(target)
            done.append(f"moved {path} to {target}: no writer recorded it and no reader can read it as a {table} part")
    return done


def _readable_part(path: Path, table: str) -> bool:
    if path.suffix != ".parquet" or not path.is_file():
        return False
    try:
        check_part(path, table)
        verify_part(path)
    except TraceError:
        return False
    return True


def _free_path(path: Path) -> Path:
    """``path``, or ``path`` with the first suffix .1, .2, ... that names nothing yet."""
    candidate, number = path, 0
    while candidate.exists() or candidate.is_symlink():
        number += 1
        candidate = path.with_name(f"{path.name}.{number}")
    return candidate


def _remove_leftovers(root: Path) -> list[str]:
    done = []
    for table in TABLES:
        directory = root / table
        if not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                path.unlink()
                done.append(f"removed {path}, a temp file of an interrupted write")
        for path in sorted(directory.glob("part-*.parquet")) if table == "tokens" else []:
            if not (root / "steps" / path.name).exists():
                path.unlink()
                done.append(f"removed {path}: a tokens part without its steps part (an interrupted write, or lost)")
    for path in sorted([*root.glob(f".{MANIFEST_FILE}.*.tmp"), *root.glob(f"{PARTS_DIR}/.*.tmp")]):
        path.unlink()
        done.append(f"removed {path}, a temp file of an interrupted write")
    return done


def _forget_lost_parts(root: Path) -> list[str]:
    done = []
    for writer_id, record in parts_records(root).items():
        kept = {table: [name for name in names if (root / table / name).is_file()] for table, names in record.items()}
        lost = [f"{table}/{name}" for table, names in record.items() for name in names if name not in kept[table]]
        if lost:
            write_parts_record(root, writer_id, kept)
            done.append(
                f"forgot {', '.join(lost)}, recorded by writer {writer_id} but gone: their rows stay lost "
                "until the command that wrote them runs again"
            )
    return done


def _drop_exact_copies(trace: Trace, table: str) -> tuple[list[str], list[str]]:
    """Drop rows of ``table`` equal to an earlier row; returns (what was done, keys whose rows differ)."""
    keys = ROW_KEYS[table]
    seen: dict[tuple, tuple[str, str]] = {}  # key -> (the first row's text, its file)
    differing: dict[tuple, str] = {}
    drops: dict[str, list[int]] = {}
    repeated, files = _repeated_keys(trace.files(table), keys)
    for file in files:
        rows = pq.read_table(file).to_pylist()
        for index, row in enumerate(rows):
            key = tuple(row[column] for column in keys)
            if key not in repeated:
                continue
            text = repr(tuple(row.values()))  # exact, and equal for equal NaNs
            if key not in seen:
                seen[key] = (text, file)
            elif seen[key][0] == text:
                drops.setdefault(file, []).append(index)
            else:
                differing[key] = (
                    f"{table} rows with {'/'.join(keys)} = {'/'.join(map(str, key))!r} differ "
                    f"between {seen[key][1]} and {file}"
                )
    done = []
    for file, indices in drops.items():
        _rewrite_without(trace.root, Path(file), table, indices)
        done.append(f"dropped {len(indices)} exact duplicate {table} row(s) from {file}")
    return done, list(differing.values())


def _repeated_keys(files: list[str], keys: tuple[str, ...]) -> tuple[set[tuple], list[str]]:
    """The keys that occur more than once, and the files (in order) that hold any of them."""
    counts: dict[tuple, int] = {}
    per_file = {}
    for file in files:
        per_file[file] = [tuple(row[c] for c in keys) for row in pq.read_table(file, columns=list(keys)).to_pylist()]
        for key in per_file[file]:
            counts[key] = counts.get(key, 0) + 1
    repeated = {key for key, count in counts.items() if count > 1}
    return repeated, [file for file in files if repeated.intersection(per_file[file])]


def _rewrite_without(root: Path, path: Path, table: str, indices: list[int]) -> None:
    rows = pq.read_table(path)
    dropped = set(indices)
    rows = rows.filter(pa.array([index not in dropped for index in range(rows.num_rows)]))
    committing_tokens = table == "steps" and (root / "tokens" / path.name).exists()
    if rows.num_rows or committing_tokens:
        write_atomic(path, lambda temp: write_parquet(rows, temp, table))
        return
    path.unlink()
    match = PART_NAME.fullmatch(path.name)
    if match:
        writer_id = match["writer"]
        record = parts_records(root).get(writer_id)
        if record is not None:
            kept = {table: [name for name in names if name != path.name] for table, names in record.items()}
            write_parts_record(root, writer_id, kept)
