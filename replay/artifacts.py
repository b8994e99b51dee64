"""What the `trace train` commands share: the train split they fit on, and the checks routers run when
they load what was saved.

Every saved fitted part (policy, P(IK) probes, STEER mixtures) records the problem ids it was fitted
on; a router that loads it checks they all lie in the train split of the replay at hand, so a file
fitted under other split settings cannot leak test problems into a replay.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from replay.data import ReplayData
from replay.splits import SPLITS, assign_splits, check_fractions
from tracestore.errors import TraceError
from tracestore.store import open_trace


def load_train_split(root: str | os.PathLike, split_seed: int, fractions: tuple[float, float, float]) -> ReplayData:
    """The train split of the trace at ``root``, drawn exactly as `trace replay` draws it."""
    check_fractions(fractions)
    data = ReplayData.from_trace(open_trace(root))
    ids = data.problems["problem_id"].to_list()
    train_ids = [pid for pid, split in zip(ids, assign_splits(ids, split_seed, fractions)) if split == SPLITS[0]]
    if not train_ids:
        raise TraceError(f"the train split of {root} holds no problems (fractions {fractions}, seed {split_seed})")
    return data.subset(train_ids)


def check_fitted_within(path: str | os.PathLike, fitted_ids: list[str] | None, train_ids: list[str]) -> None:
    """TraceError if the file at ``path`` was fitted on problems outside this replay's train split."""
    if fitted_ids is None:
        return
    outside = sorted(set(fitted_ids) - set(train_ids))
    if outside:
        raise TraceError(
            f"{path} was fitted on {len(outside)} problem(s) outside this replay's train split "
            f"(first: {outside[0]!r}); replay with the --split-seed and --split-fractions it was "
            f"trained with, or train it again"
        )


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes: what the `trace train` commands print for the file they wrote, so that two
    machines can tell whether they trained the same thing."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_artifact(
    path: str | os.PathLike,
    read: Callable[[Path], object],
    kind: str,
    fmt: str,
    version: int | tuple[int, ...],
    keys: tuple[str, ...],
) -> dict:
    """Read a saved fitted part with ``read`` and check its format tag, version (or one of several) and required
    keys."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{kind} file {path} does not exist")
    try:
        saved = read(path)
    except Exception as error:  # unpicklers raise many types for foreign or truncated files
        raise TraceError(f"{path} is not a readable {kind} file ({str(error).splitlines()[0]})") from None
    if not isinstance(saved, dict) or saved.get("format") != fmt:
        raise TraceError(f"{path} is not a trace {kind} file (no format {fmt!r})")
    versions = version if isinstance(version, tuple) else (version,)
    if saved.get("version") not in versions:
        raise TraceError(
            f"{path} has {kind} version {saved.get('version')!r}; this trace reads {' or '.join(map(str, versions))}"
        )
    for key in keys:
        if key not in saved:
            raise TraceError(f"{kind} file {path} has no {key!r}")
    return saved
