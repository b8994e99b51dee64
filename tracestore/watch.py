"""What a reader checks after running code it cannot sandbox (a router's fit and decide, in-process): that
the trace's table folders hold what they held before, naming any file that appeared, changed or vanished.
"""

from __future__ import annotations

import os
from pathlib import Path

from tracestore.errors import TraceError
from tracestore.parts import recorded_parts
from tracestore.schema import QUARANTINE_DIR, TABLES


def table_listing(root: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """Every entry of the trace's table folders and each TABLE.parquet, relative to ``root``, with its size
    and modification time (writers' hidden temp files left out)."""
    root = Path(root)
    listing = {}
    for table in TABLES:
        paths = [root / f"{table}.parquet"]
        if (root / table).is_dir():
            paths += [path for path in (root / table).iterdir() if not path.name.startswith(".")]
        for path in paths:
            if path.exists():
                stat = path.stat()
                listing[path.relative_to(root).as_posix()] = (stat.st_size, stat.st_mtime_ns)
    return listing


def check_unchanged(root: str | os.PathLike, before: dict[str, tuple[int, int]], who: str) -> None:
    """TraceError naming what appeared in, changed in or vanished from the trace's tables since ``before``
    was listed, while ``who`` ran. Parts a writer recorded meanwhile are a writer's, running beside."""
    root = Path(root)
    after = table_listing(root)
    recorded = {f"{table}/{name}" for table, name in recorded_parts(root)}
    changes = [f"{root / path} appeared" for path in sorted(after.keys() - before.keys()) if path not in recorded]
    kept = sorted(after.keys() & before.keys())
    changes += [f"{root / path} changed" for path in kept if after[path] != before[path]]
    changes += [f"{root / path} vanished" for path in sorted(before.keys() - after.keys())]
    if changes:
        raise TraceError(
            f"{root} changed while {who} ran: {', '.join(changes)}; replay only reads a trace, so that code wrote "
            f"there, and its results are withheld. `trace validate {root} --repair` moves files that no writer "
            f"recorded and no reader can read into {QUARANTINE_DIR}/"
        )
