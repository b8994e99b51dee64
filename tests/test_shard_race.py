"""Shards of one `trace gen` started at the same moment into one new trace directory: each creates or
adopts trace.json and merges its record of the run into it, under the manifest lock (issue 18)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
from polars.testing import assert_frame_equal

from tests.test_gen import ROOT, options, toy_models  # noqa: F401 - toy_models is a fixture
from tracegen.gen import run_gen
from tracestore.store import open_trace
from tracestore.validate import validate

REPETITIONS = 10
EXACT = ["step_id", "parent_path", "model", "text", "n_prompt_tokens", "n_new_prefill_tokens", "n_cached_tokens"]
EXACT += ["n_gen_tokens", "finish_reason", "is_final", "answer", "correct"]


def assert_same_steps(root: Path, reference: Path) -> None:
    """The steps of ``root`` are those of ``reference``, step for step: ids, texts, token counts and grades
    exactly; the float signals to float32 rounding (a batch of other problems changes their last bits)."""
    got, expected = (
        open_trace(r).scan("steps").drop("gen_seconds").collect().sort("step_id") for r in (root, reference)
    )
    assert got["step_id"].is_unique().all(), f"{root} holds a step twice"
    assert got.select(EXACT).equals(expected.select(EXACT)), f"{root}: the steps differ from {reference}"
    floats = [name for name, dtype in got.schema.items() if dtype.is_float()]
    assert_frame_equal(got.select(floats), expected.select(floats), rel_tol=1e-4, abs_tol=1e-5)


# One shard process: for each repetition, say it is ready, wait for the other shard, then run gen.
SHARD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, "tests")  # as pytest's rootdir-relative imports: test_gen imports tracebuild
    from tests.test_gen import options
    from tracegen.gen import run_gen

    folder, index, small, large, repetitions = Path(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:5], int(sys.argv[5])
    for k in range(repetitions):
        (folder / f"ready-{k}-{index}").touch()
        while not all((folder / f"ready-{k}-{i}").exists() for i in (0, 1)):
            time.sleep(0.001)
        shard = options((small, large), folder / f"trace-{k}", limit=4, max_steps=2, shard=f"{index}/2", backend="fake")
        run_gen(shard)
    """
)


def test_two_shards_started_at_once_leave_a_valid_trace_each_time(toy_models, tmp_path):  # noqa: F811
    reference = tmp_path / "reference"
    run_gen(options(toy_models, reference, limit=4, max_steps=2, backend="fake"))
    shards = [
        subprocess.Popen(
            [sys.executable, "-c", SHARD, str(tmp_path), str(i), *toy_models, str(REPETITIONS)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (0, 1)
    ]
    for shard in shards:
        _, stderr = shard.communicate(timeout=600)
        assert shard.returncode == 0, stderr
    stored = open_trace(reference).manifest
    for k in range(REPETITIONS):
        root = tmp_path / f"trace-{k}"
        validate(root)
        trace = open_trace(root)
        assert trace.manifest.expansions == stored.expansions
        assert trace.manifest.worlds == stored.worlds and trace.manifest.get("engine") == stored.get("engine")
        assert_same_steps(root, reference)
        writers = {path.name.split("-")[1] for path in (root / "steps").glob("part-*.parquet")}
        assert writers == {"shard0of2", "shard1of2"}
        assert not list(root.glob(".lock*"))
    assert pl.Series([p.name for p in tmp_path.iterdir()]).str.starts_with("trace-").sum() == REPETITIONS
