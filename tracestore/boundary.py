"""The edge of a trace: a symbolic link among its own files (table folders and files, trace.json, parts
records, API responses, locks) whose target lies outside it would take a writer's parts, records or lock
elsewhere, and `validate` would check the target as if it were the trace. Writers refuse to open such a
trace, and `validate` names the link.
"""

from __future__ import annotations

import os
from pathlib import Path

from tracestore.errors import TraceError
from tracestore.schema import is_own_entry


def links_leaving(root: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(link, target) for every symbolic link among the trace's own files and folders, at any depth,
    whose target lies outside the trace."""
    root = Path(root)
    if not root.is_dir():
        return []
    inside = root.resolve()
    found = []
    for entry in sorted(root.iterdir()):
        if not is_own_entry(entry.name):
            continue
        for path in [entry, *_below(entry)]:
            if path.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(inside):
                    found.append((path, target))
    return found


def _below(folder: Path) -> list[Path]:
    """Everything under ``folder`` reached without following a link (nothing if it is a link or a file)."""
    if folder.is_symlink() or not folder.is_dir():
        return []
    paths = []
    for directory, folders, files in os.walk(folder):
        paths += [Path(directory, name) for name in sorted(folders + files)]
    return paths


def check_no_link_leaves(root: str | os.PathLike) -> None:
    """TraceError naming the first symbolic link that leads out of the trace at ``root``."""
    found = links_leaving(root)
    if found:
        link, target = found[0]
        raise TraceError(
            f"{link} is a symbolic link to {target}, outside the trace: trace writers never write through it and "
            "validate would check files that are not the trace's; move what it points to into the trace in its place"
        )
