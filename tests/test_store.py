"""The store: schemas, round trip, atomic parts, resume after SIGKILL, manifest as cache key, bad parts."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from tracebuild import build_trace, comb_steps, default_manifest, default_problem, forget_part, step_and_tokens

from tracestore.errors import TraceError
from tracestore.schema import MANIFEST_FILE, SCHEMAS, TABLES, first_difference, model_char
from tracestore.store import TraceWriter, open_trace
from tracestore.validate import validate

TESTS_DIR = Path(__file__).resolve().parent


def all_files(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()}


def test_round_trip_keeps_every_value(tmp_path):
    steps = [
        {"path": "s", "text": "12+3=15", "conf_max_logit_math": 7.25, "gen_seconds": None},
        {"path": "ss", "is_final": True, "answer": "15", "correct": True, "token_ids": [5, 6, 7]},
        {"path": "L", "is_final": True, "finish_reason": "length", "correct": False, "conf_max_logit_math": None},
    ]
    hidden = [{"problem_id": "p0", "model": "small", "layer": -1, "where": "prompt_last", "vector": [0.5, -1.0]}]
    scores = [{"step_id": "p0/0/s", "scorer": "prm", "value": 0.75, "detail": None, "n_tokens_processed": 30}]
    root = build_trace(tmp_path / "t", steps, hidden=hidden, scores=scores)

    trace = open_trace(root)
    assert trace.manifest["schema_version"] == 1  # a small/large trace is written as version 1
    assert trace.manifest["sampling"]["temperature"] == 0.7
    for table in TABLES:
        assert trace.scan(table).collect_schema().names() == SCHEMAS[table].names
    read = {row["step_id"]: row for row in trace.scan("steps").collect().iter_rows(named=True)}
    for fields in steps:
        written, tokens = step_and_tokens(fields)
        assert read[written["step_id"]] == written
        stored_tokens = trace.scan("tokens").filter(pl.col("step_id") == written["step_id"]).collect()
        assert stored_tokens.row(0, named=True) == tokens
    assert read["p0/0/ss"]["n_gen_tokens"] == 3
    assert trace.scan("hidden").collect()["vector"].to_list() == [[0.5, -1.0]]
    assert trace.scan("scores").collect().row(0, named=True) == scores[0]
    assert trace.scan("problems").collect()["problem_id"].to_list() == ["p0"]


def test_parts_are_named_per_writer_and_atomic(tmp_path):
    root = build_trace(tmp_path / "t", comb_steps("p0", 2), parts=2)
    steps = sorted(p.name for p in (root / "steps").iterdir())
    assert [re.fullmatch(r"part-w0-(\d{5})-[0-9a-f]{16}\.parquet", name)[1] for name in steps] == ["00002", "00003"]
    assert sorted(p.name for p in (root / "tokens").iterdir()) == steps  # a tokens part shares its steps part's name
    assert pq.read_metadata(root / "steps" / steps[0]).row_group(0).column(0).compression == "ZSTD"
    # a second writer (a shard) adds its own parts next to the first writer's
    with TraceWriter(root, default_manifest(), writer_id="shard1", shard=True) as writer:
        rows = [step_and_tokens(s) for s in comb_steps("p1", 2)]
        writer.append_problems([default_problem("p1")])
        writer.append_steps([s for s, _ in rows], [t for _, t in rows])
    assert [p.name.split("-")[2] for p in (root / "steps").glob("part-shard1-*")] == ["00002"]
    assert open_trace(root).scan("steps").select(pl.len()).collect().item() == 10
    assert not [p for p in root.rglob(".*")]
    assert json.loads((root / "_parts" / "shard1.json").read_text())["parts"] == {
        table: [p.name for p in (root / table).glob("part-shard1-*")] for table in ("problems", "steps", "tokens")
    }
    validate(root)


def test_the_same_rows_give_the_same_names_and_bytes_and_other_rows_another_name(tmp_path):
    first, second = (build_trace(tmp_path / name, comb_steps("p0", 2)) for name in ("a", "b"))
    for table in ("problems", "steps", "tokens"):
        names = sorted(p.name for p in (first / table).iterdir())
        assert names == sorted(p.name for p in (second / table).iterdir())
        assert [(first / table / n).read_bytes() for n in names] == [(second / table / n).read_bytes() for n in names]
    other = build_trace(tmp_path / "c", comb_steps("p0", 2, correct=lambda path: True))
    assert sorted(p.name for p in (other / "steps").iterdir()) != sorted(p.name for p in (first / "steps").iterdir())


def test_empty_tables_scan_with_their_columns(tmp_path):
    TraceWriter(tmp_path / "t", default_manifest()).close()
    trace = open_trace(tmp_path / "t")
    for table in TABLES:
        frame = trace.scan(table).collect()
        assert frame.height == 0
        assert frame.columns == SCHEMAS[table].names


def test_appends_are_idempotent(tmp_path):
    steps = comb_steps("p0", 2)
    root = build_trace(tmp_path / "t", steps)
    with TraceWriter(root, default_manifest()) as writer:
        assert writer.done_step_ids() == {f"p0/0/{s['path']}" for s in steps}
        rows = [step_and_tokens(s) for s in steps]
        writer.append_steps([s for s, _ in rows], [t for _, t in rows])
        writer.append_problems(open_trace(root).scan("problems").collect().to_dicts())
        score = {"step_id": "p0/0/s", "scorer": "prm", "value": 0.5, "n_tokens_processed": 9}
        writer.update_manifest(scorers={"prm": {"model": "prm"}, "judge": {"model": "large"}})
        writer.append_scores([score])
        writer.append_scores([score, {**score, "scorer": "judge"}])
        assert writer.done_score_ids("prm") == {"p0/0/s"}
        vector = {"problem_id": "p0", "model": "large", "layer": 3, "where": "prompt_last", "vector": [1.0]}
        writer.append_hidden([vector])
        writer.append_hidden([vector])
    trace = open_trace(root)
    assert trace.scan("steps").select(pl.len()).collect().item() == len(steps)
    assert trace.scan("tokens").select(pl.len()).collect().item() == len(steps)
    assert trace.scan("problems").select(pl.len()).collect().item() == 1
    assert sorted(trace.scan("scores").collect()["scorer"]) == ["judge", "prm"]
    assert trace.scan("hidden").select(pl.len()).collect().item() == 1
    validate(root)


def test_problem_id_reused_for_another_question_is_refused(tmp_path):
    root = build_trace(tmp_path / "t", comb_steps("p0", 1))
    problem = open_trace(root).scan("problems").collect().row(0, named=True)
    with pytest.raises(TraceError, match="problem 'p0' is already stored with a different question"):
        with TraceWriter(root, default_manifest()) as writer:
            writer.append_problems([{**problem, "question": "Compute 1+1."}])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s, t: s.pop("n_gen_tokens"), "has no 'n_gen_tokens'"),
        (lambda s, t: s.update(gen_second=0.1), "unknown column 'gen_second'"),
        (lambda s, t: s.update(world=None), "has a null world"),
        (lambda s, t: s.update(depth="zero"), "do not fit the schema"),
        (lambda s, t: s.update(step_id="p0/1/s") or t.update(step_id="p0/1/s"), "should have step_id 'p0/0/s'"),
        (lambda s, t: t["logprobs"].pop(), "tokens.logprobs has 3 entries, but n_gen_tokens is 4"),
        (lambda s, t: t.update(step_id="p0/0/x"), "has 0 tokens rows"),
    ],
)
def test_writer_refuses_bad_rows_and_writes_nothing(tmp_path, change, message):
    root = build_trace(tmp_path / "t", [])
    step, tokens = step_and_tokens({"path": "s"})
    change(step, tokens)
    before = all_files(root)
    with pytest.raises(TraceError, match=message):
        with TraceWriter(root, default_manifest()) as writer:
            writer.append_steps([step], [tokens])
    assert all_files(root) == before


def test_reopen_with_a_different_cache_key_names_the_field(tmp_path):
    root = build_trace(tmp_path / "t", comb_steps("p0", 1))
    before = all_files(root)
    hotter = default_manifest(sampling={**default_manifest()["sampling"], "temperature": 0.8})
    with pytest.raises(
        TraceError, match=r"sampling\.temperature = 0\.7, but this run has sampling\.temperature = 0\.8"
    ):
        TraceWriter(root, hotter)
    models = default_manifest()["models"]
    other = default_manifest(models=[models[0], {**models[1], "revision": "v2"}])
    with pytest.raises(
        TraceError, match=r"models\.large\.revision = 'test', but this run has models\.large\.revision = 'v2'"
    ):
        TraceWriter(root, other)
    with pytest.raises(TraceError, match="delimiter"):
        TraceWriter(root, default_manifest(delimiter="\n"))
    assert all_files(root) == before
    # fields outside the cache key may differ; a key field the trace lacks is recorded
    manifest = default_manifest(expansion="closure", tool_version="9")
    del manifest["engine"]
    stored = json.loads((root / MANIFEST_FILE).read_text())
    del stored["engine"]
    (root / MANIFEST_FILE).write_text(json.dumps(stored))
    with TraceWriter(root, {**manifest, "engine": {"name": "vllm"}}) as writer:
        assert writer.manifest["expansion"] == "comb"
    assert open_trace(root).manifest["engine"] == {"name": "vllm"}


def test_update_manifest_is_atomic_and_guards_cache_keys(tmp_path):
    with TraceWriter(tmp_path / "t", default_manifest()) as writer:
        writer.update_manifest(n_problems=3, scorers={"prm": {"n_params": 5}})
        assert open_trace(tmp_path / "t").manifest["scorers"] == {"prm": {"n_params": 5}}
        with pytest.raises(TraceError, match="grader.version"):
            writer.update_manifest(grader={"name": "toy", "version": "2"})
    assert open_trace(tmp_path / "t").manifest["grader"]["version"] == "1"
    assert [p.name for p in (tmp_path / "t").iterdir()] == [MANIFEST_FILE]


def test_first_difference():
    assert first_difference({"a": [1, {"b": 2}]}, {"a": [1, {"b": 2}]}) is None
    assert first_difference({"a": [1, {"b": 2}]}, {"a": [1, {"b": 3}]}) == "a.1.b"
    assert first_difference({"a": 1}, {"a": 1, "c": 0}) == "c"
    assert first_difference({"x": True}, {"x": 1}) == "x"
    assert first_difference({"m": [1]}, {"m": [1, 2]}) == "m"


def test_model_char():
    assert [model_char(r) for r in ("small", "large", "m0", "m7")] == ["s", "L", "0", "7"]
    with pytest.raises(TraceError, match="unknown model role 'huge'"):
        model_char("huge")


def test_creating_a_trace_in_a_non_empty_foreign_directory_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(TraceError, match="is not empty and has no trace.json"):
        TraceWriter(tmp_path, default_manifest())
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_crash_leftovers_are_invisible_and_cleaned_on_reopen(tmp_path):
    steps = comb_steps("p0", 3)
    root = build_trace(tmp_path / "t", steps, parts=3)
    last = sorted((root / "steps").iterdir())[-1]
    kept = set(open_trace(root).scan("steps").collect()["step_id"]) - set(pl.read_parquet(last)["step_id"])
    # a crash after the tokens rename, before the steps rename (so before the writer recorded the part);
    # and one inside a part write
    last.unlink()
    forget_part(root, last.name)
    (root / "steps" / ".part-w0-00009.parquet.tmp").write_bytes(b"PAR1 half a file")
    (root / "tokens" / ".part-w0-00009.parquet.tmp").write_bytes(b"PAR1 half a file")
    trace = open_trace(root)
    assert set(trace.scan("tokens").collect()["step_id"]) == kept
    with pytest.raises(
        TraceError, match=f"{root / 'tokens' / last.name} has no steps part: it was left by an interrupted write"
    ):
        validate(root)
    # another writer's temp file is left alone: it may be writing right now
    (root / "steps" / ".part-w1-00001.parquet.tmp").write_bytes(b"busy")

    with TraceWriter(root, default_manifest()) as writer:
        assert writer.done_step_ids() == kept
        assert sorted(p.name for p in (root / "tokens").glob("part-*")) == sorted(
            p.name for p in (root / "steps").glob("part-*")
        )
        assert sorted(p.name for p in root.rglob(".*")) == [".lock", ".lock-w0", ".part-w1-00001.parquet.tmp"]
        rows = [step_and_tokens(s) for s in steps]
        writer.append_steps([s for s, _ in rows], [t for _, t in rows])
    stored = open_trace(root).scan("steps").collect()["step_id"]
    assert stored.len() == len(rows)
    assert set(stored) == {step["step_id"] for step, _ in rows}
    validate(root)


CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from tracestore.store import TraceWriter
    from tracebuild import comb_steps, default_manifest, default_problem, step_and_tokens

    writer = TraceWriter({root!r}, default_manifest())
    writer.append_problems([default_problem(f"p{{i}}") for i in range({n})])
    for i in range({n}):
        rows = [step_and_tokens(s) for s in comb_steps(f"p{{i}}", 4)]
        writer.append_steps([s for s, _ in rows], [t for _, t in rows])
        print(i, flush=True)
    """
)


def test_resume_after_sigkill_gives_every_step_once(tmp_path):
    root, n_problems = tmp_path / "t", 30
    script = CHILD.format(tests=str(TESTS_DIR), root=str(root), n=n_problems)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    for line in child.stdout:
        if int(line) >= 5:
            break
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    written = open_trace(root).scan("steps").select(pl.len()).collect().item()
    expected = [step_and_tokens(s) for i in range(n_problems) for s in comb_steps(f"p{i}", 4)]
    assert 0 < written < len(expected)

    with TraceWriter(root, default_manifest()) as writer:  # takes over the lock the killed writer held
        for i in range(n_problems):
            rows = [step_and_tokens(s) for s in comb_steps(f"p{i}", 4)]
            writer.append_steps([s for s, _ in rows], [t for _, t in rows])

    trace = open_trace(root)
    stored = trace.scan("steps").collect()
    assert stored.height == len(expected)
    assert {row["step_id"]: row for row in stored.iter_rows(named=True)} == {s["step_id"]: s for s, _ in expected}
    assert trace.scan("tokens").select(pl.len()).collect().item() == len(expected)
    assert not [p for p in root.rglob(".*")]
    assert validate(root)["steps"] == len(expected)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is not a readable Parquet file"),
        (b"problem_id,question\np0,hi\n", "is not a readable Parquet file"),
    ],
)
def test_unreadable_part_is_named(tmp_path, content, message):
    root = build_trace(tmp_path / "t", comb_steps("p0", 1))
    bad = root / "steps" / "part-x-00001.parquet"
    bad.write_bytes(content)
    with pytest.raises(TraceError, match=f"{bad}.*{message}"):
        open_trace(root).scan("steps")


def test_truncated_part_is_named(tmp_path):
    root = build_trace(tmp_path / "t", comb_steps("p0", 2))
    part = next((root / "tokens").iterdir())
    part.write_bytes(part.read_bytes()[:-100])
    with pytest.raises(TraceError, match=f"{part} is not a readable Parquet file"):
        open_trace(root).files("tokens")


def test_part_with_wrong_columns_is_named(tmp_path):
    root = build_trace(tmp_path / "t", comb_steps("p0", 1))
    part = root / "scores" / "part-x-00001.parquet"
    part.parent.mkdir()
    pq.write_table(pl.DataFrame({"step_id": ["p0/0/s"], "value": [1.0]}).to_arrow(), part)
    with pytest.raises(TraceError, match="has columns \\['step_id', 'value'\\], but scores needs"):
        open_trace(root).scan("scores")
    pq.write_table(pl.DataFrame({c: [1] for c in SCHEMAS["scores"].names}).to_arrow(), part)
    with pytest.raises(TraceError, match="column step_id has type int64, but scores needs string"):
        open_trace(root).scan("scores")


def test_stray_file_in_a_table_folder_is_named(tmp_path):
    root = build_trace(tmp_path / "t", comb_steps("p0", 1))
    (root / "steps" / "notes.txt").write_text("hello")
    with pytest.raises(TraceError, match="notes.txt does not belong in a trace table folder"):
        open_trace(root).files("steps")


@pytest.mark.parametrize(
    "manifest_text, message",
    [
        (None, "is not a trace: it has no trace.json"),
        ("{not json", "trace.json is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"schema_version": 99}', "has schema_version 99; this version of trace reads schema_version 1 and 2"),
        ('{"models": []}', "has schema_version None"),
    ],
)
def test_bad_manifest_is_named(tmp_path, manifest_text, message):
    if manifest_text is not None:
        (tmp_path / MANIFEST_FILE).write_text(manifest_text)
    with pytest.raises(TraceError, match=message):
        open_trace(tmp_path)


def test_missing_trace_directory(tmp_path):
    with pytest.raises(TraceError, match=f"trace directory {tmp_path / 'nope'} does not exist"):
        open_trace(tmp_path / "nope")
