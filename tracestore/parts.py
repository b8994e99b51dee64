"""The parts each writer committed (``_parts/WRITER.json``): a part a record names but the trace lacks is a
lost part, named with the command that grows its rows again, never silently ignored."""

from __future__ import annotations

import json
from pathlib import Path

from tracestore.atomic import write_atomic
from tracestore.errors import TraceError
from tracestore.schema import PARTS_DIR, TABLES, parts_record_file


def read_parts_record(root: Path, writer_id: str) -> dict[str, list[str]]:
    """The parts ``writer_id`` recorded committing, by table ({} if it has no record)."""
    path = root / parts_record_file(writer_id)
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        parts = record["parts"]
        if not all(isinstance(names, list) for names in parts.values()):
            raise ValueError
    except (ValueError, KeyError, TypeError, AttributeError):
        raise TraceError(f"{path} is not a parts record (JSON with parts: table -> list of file names)") from None
    return {table: [str(name) for name in names] for table, names in parts.items()}


def parts_records(root: Path) -> dict[str, dict[str, list[str]]]:
    """Every writer's parts record, by writer id."""
    directory = root / PARTS_DIR
    if not directory.is_dir():
        return {}
    return {path.stem: read_parts_record(root, path.stem) for path in sorted(directory.glob("*.json"))}


def recorded_parts(root: Path) -> set[tuple[str, str]]:
    """(table, file name) of every part some writer recorded committing."""
    records = parts_records(root).values()
    return {(table, name) for record in records for table, names in record.items() for name in names}


def write_parts_record(root: Path, writer_id: str, parts: dict[str, list[str]]) -> None:
    """Replace ``writer_id``'s parts record (atomically; tables in schema order, names as given)."""
    path = root / parts_record_file(writer_id)
    path.parent.mkdir(exist_ok=True)
    record = {"writer": writer_id, "parts": {table: list(parts[table]) for table in TABLES if parts.get(table)}}
    write_atomic(path, (json.dumps(record, indent=1) + "\n").encode())


def rerun_hint(root: str | Path, writer_id: str) -> str:
    """The command whose rerun grows a writer's rows again."""
    if writer_id.startswith("score_"):
        return f"`trace score {root} --scorer {writer_id.removeprefix('score_')}`"
    return "the `trace gen` command that wrote it"


def lost_part_message(root: str | Path, table: str, name: str, writer_id: str) -> str:
    """What every reader says of a part that ``writer_id`` recorded and that is gone (``root``: a path or URL)."""
    return (
        f"{root}/{table}/{name} is missing: writer {writer_id} recorded it in {root}/{parts_record_file(writer_id)}, "
        f"so the trace lost its rows; rerun {rerun_hint(root, writer_id)} to grow them again, or "
        f"`trace validate {root} --repair` to forget the part"
    )
