"""The one way `trace` writes a file: to a temp name beside it, fsynced, then renamed over it.

A reader never sees half a file, and a crash leaves the old file (or none) plus at most a temp file.
`write_temp` and `commit` are the two halves, for writers that name a file after its bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from tracestore.errors import TraceError


def write_atomic(path: str | os.PathLike, content: bytes | Callable[[Path], None], *, temp: Path | None = None) -> None:
    """Write ``content`` (bytes, or a function that writes the file at the path it is given) to ``path``.

    ``temp`` names the temp file (default ``.NAME.tmp`` beside ``path``); writers sharing a folder
    give each their own, so that one never renames another's half-written file.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise TraceError(f"cannot write {path}: folder {path.parent} does not exist")
    temp = temp or path.with_name(f".{path.name}.tmp")
    try:
        write_temp(temp, content)
        commit(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def write_temp(temp: Path, content: bytes | Callable[[Path], None]) -> None:
    """Write ``content`` to ``temp`` and fsync it (the caller removes ``temp`` if anything fails)."""
    if isinstance(content, bytes):
        temp.write_bytes(content)
    else:
        content(temp)
    _fsync(temp)


def commit(temp: Path, path: Path) -> None:
    """Rename the fsynced ``temp`` over ``path`` and fsync the folder, so the rename survives a crash."""
    os.replace(temp, path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
