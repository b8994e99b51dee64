"""Where a command may write what it produces (`--out` of replay, sql, train and report, and a new trace):
never into a trace's tables or bookkeeping, and over an existing file only when told to (``--force``).

A trace folder may hold other files beside its tables (the demo keeps results, policy and report
there); only its table folders and files, trace.json, its parts records and its lock are its own.
"""

from __future__ import annotations

import os
from pathlib import Path

from tracestore.errors import TraceError
from tracestore.schema import MANIFEST_FILE, is_own_entry


def check_outside_trace(path: str | os.PathLike, option: str = "--out") -> None:
    """TraceError if ``path`` is, or lies inside, a table folder, table file or bookkeeping file of a trace
    (``option`` names it in the message: the option that gave it, or what it is)."""
    path = Path(path)
    resolved = path.resolve()
    for ancestor in resolved.parents:
        if not (ancestor / MANIFEST_FILE).is_file():
            continue
        first = resolved.relative_to(ancestor).parts[0]
        if is_own_entry(first):
            raise TraceError(
                f"{option} {path} lies inside the trace {ancestor} ({first}), which only its writers write; "
                "choose a path outside its table folders"
            )


def check_output_file(path: str | os.PathLike, *, force: bool, option: str = "--out") -> Path:
    """``path`` if a command may write its file there: outside every trace's own files, in a folder that
    exists, and not over an existing file unless ``force``."""
    path = Path(path)
    check_outside_trace(path, option)
    if path.is_dir():
        raise TraceError(f"{option} {path} is a folder; name a file")
    if path.exists() and not force:
        raise TraceError(f"{option} {path} exists; pass --force to replace it")
    if not path.parent.is_dir():
        raise TraceError(f"{option} {path}: folder {path.parent} does not exist")
    return path
