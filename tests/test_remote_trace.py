"""A trace on object storage replays in place: the same outcomes as from the local directory, read through
a filesystem (fsspec's in-memory one here, pyarrow's file:// too) with nothing copied to local disk."""

from __future__ import annotations

import fsspec
import numpy as np
import pytest

from replay.routers import make_router
from replay.run import replay_trace
from tracestore.errors import TraceError
from tracestore.store import open_trace


def upload(local, bucket: str) -> str:
    """The local trace copied into fsspec's memory filesystem, as an object store would hold it; its URI."""
    memory = fsspec.filesystem("memory")
    for path in local.rglob("*"):
        if path.is_file():
            memory.pipe(f"/{bucket}/{path.relative_to(local)}", path.read_bytes())
    return f"memory://{bucket}"


def replayed(root) -> object:
    """The outcomes, but for where they were replayed (the trace's address, which is what differs)."""
    outcomes = replay_trace(root, make_router("random"), sweep={"p": np.linspace(0, 1, 11)}, split="all").outcomes
    return outcomes.drop("replayed_on")


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_a_trace_at_a_uri_replays_as_the_local_one(comb_trace, scheme, tmp_path):
    uri = upload(comb_trace, f"bucket-{tmp_path.name}") if scheme == "memory" else f"file://{comb_trace}"
    trace = open_trace(uri)
    assert type(trace).__name__ == "RemoteTrace"
    assert trace.scan("steps").collect().height == open_trace(comb_trace).scan("steps").collect().height
    assert replayed(uri).equals(replayed(comb_trace))


def test_a_lost_part_and_a_missing_trace_are_named(comb_trace, tmp_path):
    bucket = f"lost-{tmp_path.name}"
    uri = upload(comb_trace, bucket)
    memory = fsspec.filesystem("memory")
    part = sorted(memory.ls(f"/{bucket}/steps", detail=False))[0]
    memory.rm(part)
    with pytest.raises(TraceError, match=r"is missing: writer w0 recorded it"):
        open_trace(uri).scan("steps")
    with pytest.raises(TraceError, match=r"memory://nowhere is not a trace: it has no trace.json"):
        open_trace("memory://nowhere")
    with pytest.raises(TraceError, match=r"nosuchscheme://x"):
        open_trace("nosuchscheme://x")
