"""The one way `trace` writes a file: to a temp name beside it, fsynced, then renamed over it.

A reader never sees half a file, and a crash leaves the old file (or none) plus at most a temp file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from replay.errors import TraceError


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
        if isinstance(content, bytes):
            temp.write_bytes(content)
        else:
            content(temp)
        _fsync(temp)
        os.replace(temp, path)
        _fsync(path.parent)
    finally:
        temp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
