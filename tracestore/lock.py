"""The writer lock of a trace: one writer at a time, except the shards of one sharded `trace gen`.

A writer holds an flock on ``ROOT/.lock``: exclusive, or shared for a ``trace gen --shard`` writer
(shards grow disjoint problems, so they may run side by side). It also holds an exclusive flock on
``ROOT/.lock-WRITER`` (its writer id), a small JSON file naming it: pid, host, command and start
time, which is what a refused writer is told. The kernel drops an flock when its process dies, so
a crashed writer never blocks the next one; the name file it leaves behind is taken over, and the
new holder says so. A name file left by another host cannot be checked from here and is refused,
naming the file to delete.

Writers nested in one process (the scorers `trace gen --expand closure` runs between rounds) share
that process's hold on ``.lock``; the name file of a writer id is still one holder at a time, and
a nested writer waits for it (two shards' closures take turns scoring).

Writers that run side by side (shards, Ray workers) each read, merge and rewrite trace.json; they take
turns doing so under ``manifest_lock``, an exclusive flock on ``ROOT/.lock.manifest`` held only for
that read-merge-write, so no writer overwrites another's update with what it read before.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tracestore.errors import TraceError
from tracestore.schema import LOCK_FILE, writer_lock_file

log = logging.getLogger(__name__)
POLL_SECONDS = 0.2
MANIFEST_LOCK_FILE = f"{LOCK_FILE}.manifest"


@dataclass
class _Hold:
    """This process's flock on one trace's .lock."""

    fd: int
    count: int = 1


_holds: dict[Path, _Hold] = {}


def holder_of(path: Path) -> dict | None:
    """The holder a writer's name file names (None if it is empty, absent or unreadable)."""
    try:
        text = path.read_text(encoding="utf-8")
        holder = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def describe(holder: dict) -> str:
    return (
        f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')} "
        f"(writer {holder.get('writer')}: {holder.get('command')})"
    )


def _is_local(holder: dict) -> bool:
    return holder.get("host") == socket.gethostname()


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _open_locked(path: Path, *, shared: bool, wait: bool) -> int | None:
    """A descriptor of ``path`` (created if need be) holding an flock on it; None if another holds it
    and ``wait`` is false. A holder deletes the file when it leaves last, so a lock taken on a file
    that is no longer at ``path`` is let go and the new one is tried."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if not wait:
                return None
            time.sleep(POLL_SECONDS)
            continue
        except OSError as error:
            os.close(fd)
            raise TraceError(
                f"cannot lock {path} ({error.strerror}): the trace's file system does not support file locks, "
                "which keep two writers from writing one trace"
            ) from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


class WriterLock:
    """Hold the writer lock of the trace at ``root`` (which must exist) as ``writer_id`` until ``release``.

    ``shared``: a shard of a sharded gen. ``wait``: wait for the lock instead of refusing (for writers
    nested in a run that already holds the trace).
    """

    def __init__(self, root: str | os.PathLike, writer_id: str, *, shared: bool = False, wait: bool = False):
        self.root = Path(root)
        self.writer_id = writer_id
        self._key = self.root.resolve()
        self._name_fd: int | None = None
        self._acquire_trace(shared, wait)
        try:
            self._acquire_name(wait)
        except BaseException:
            self._release_trace()
            raise

    # -- the trace's .lock, shared by the writers of one process

    def _acquire_trace(self, shared: bool, wait: bool) -> None:
        hold = _holds.get(self._key)
        if hold is not None:
            hold.count += 1
            return
        fd = _open_locked(self.root / LOCK_FILE, shared=shared, wait=wait)
        if fd is None:
            raise TraceError(self._busy_message())
        _holds[self._key] = _Hold(fd)
        if not shared:
            self._take_over_stale_names()

    def _busy_message(self) -> str:
        holders = [holder for path in self._name_files() if (holder := holder_of(path))]
        live = [holder for holder in holders if not _is_local(holder) or _pid_alive(holder.get("pid"))] or holders
        named = "; ".join(describe(holder) for holder in live) if live else "a writer that has not named itself yet"
        return f"{self.root} is being written by {named}; wait for it to finish (one writer per trace at a time)"

    def _name_files(self) -> list[Path]:
        return sorted(path for path in self.root.glob(f"{LOCK_FILE}-*") if path.is_file())

    def _take_over_stale_names(self) -> None:
        """With .lock held exclusively no other writer runs: name files of local writers are leftovers."""
        for path in self._name_files():
            holder = holder_of(path)
            if holder is not None and _is_local(holder) and path != self.root / writer_lock_file(self.writer_id):
                log.warning("%s: took over the lock of %s, which is no longer running", self.root, describe(holder))
                path.unlink(missing_ok=True)

    def _release_trace(self) -> None:
        hold = _holds[self._key]
        hold.count -= 1
        if hold.count == 0:
            del _holds[self._key]
            try:  # the last holder deletes .lock; a writer waiting on this file sees that and opens a new one
                fcntl.flock(hold.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                (self.root / LOCK_FILE).unlink(missing_ok=True)
            except BlockingIOError:
                pass  # other shards still hold it
            os.close(hold.fd)

    # -- the writer's name file

    def _acquire_name(self, wait: bool) -> None:
        path = self.root / writer_lock_file(self.writer_id)
        fd = _open_locked(path, shared=False, wait=wait)
        if fd is None:
            holder = holder_of(path)
            who = describe(holder) if holder else "another process"
            raise TraceError(f"{self.root} is being written by {who}; wait for it to finish")
        self._name_fd = fd
        previous = holder_of(path)
        if previous is not None and not (previous.get("pid") == os.getpid() and _is_local(previous)):
            if not _is_local(previous):
                self._name_fd = None
                os.close(fd)  # leaves the file as it is: it is not ours to delete
                raise TraceError(
                    f"{path} names {describe(previous)}, which this host cannot check; "
                    f"if that process no longer runs, delete {path} and run again"
                )
            log.warning("%s: took over the lock of %s, which is no longer running", self.root, describe(previous))
        holder = {
            "writer": self.writer_id,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        os.fsync(fd)

    def release(self) -> None:
        """Give the lock up (idempotent)."""
        if self._name_fd is None:
            return
        fd, self._name_fd = self._name_fd, None
        os.ftruncate(fd, 0)
        (self.root / writer_lock_file(self.writer_id)).unlink(missing_ok=True)
        os.close(fd)
        self._release_trace()


_manifest_holds: dict[Path, int] = {}
_manifest_guard = threading.RLock()  # threads of one process take turns; re-entrant for nested updates


@contextlib.contextmanager
def manifest_lock(root: str | os.PathLike) -> Iterator[None]:
    """Hold the trace's manifest lock (waiting for it) while trace.json is read, merged and rewritten.

    Re-entrant within a thread. The file is deleted by its holder before it lets go (a waiter on the
    deleted file sees that and opens the new one), so a trace at rest has no lock files."""
    path = Path(root) / MANIFEST_LOCK_FILE
    key = path.resolve()
    with _manifest_guard:
        fd = None if key in _manifest_holds else _open_locked(path, shared=False, wait=True)
        if fd is not None:
            _manifest_holds[key] = fd
        try:
            yield
        finally:
            if fd is not None:
                del _manifest_holds[key]
                path.unlink(missing_ok=True)
                os.close(fd)
