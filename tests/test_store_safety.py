"""Issue 13: a trace cannot be damaged by its own tool. Each item's command, run on a copy of a small trace.

1 writer lock, part names, repair; 2 read-only SQL; 3 outputs; 4 checksums and value ranges; 5 lost scores
and parts; 6 parameter domains and prices; 7 sweep size; 9 messages. (Item 8, and the gen halves of 1 and
9, need the toy models: tests/test_gen.py and tests/test_datasets.py.)
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tracebuild import GENERATED_TOKENS, comb_steps, default_manifest, default_problem, rewrite_parts, step_and_tokens
from typer.testing import CliRunner

from cli import app
from replay import api, params
from replay import run as replay_run
from replay.costs import make_cost_model
from replay.data import ReplayData
from replay.params import parse_sweep
from replay.routers import ROUTERS, make_router
from replay.run import replay
from tracestore.errors import TraceError
from tracestore.store import TraceWriter, open_trace
from tracestore.validate import validate

TESTS_DIR = Path(__file__).resolve().parent
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(arg) for arg in args])


def one_line(text: str) -> str:
    return "".join(text.split())  # rich wraps long lines, even inside words


def assert_refused(result, message: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert one_line(message) in one_line(result.stderr), result.stderr


def snapshot(folder: Path) -> dict:
    return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def scored_trace(comb_trace):
    """The comb trace with prm and judge scores of its small steps, written as `trace score` writes them."""
    small = open_trace(comb_trace).scan("steps").filter(pl.col("model") == "small").collect()["step_id"]
    for scorer, value in (("prm", 0.75), ("judge", 8.0)):
        with TraceWriter(comb_trace, None, writer_id=f"score_{scorer}") as writer:
            entry = {"model": "large", "generated_tokens": GENERATED_TOKENS.get(scorer, 0)}
            writer.update_manifest(scorers={**writer.manifest.scorers, scorer: entry})
            writer.append_scores(
                [{"step_id": i, "scorer": scorer, "value": value, "n_tokens_processed": 10} for i in small]
            )
    return comb_trace


# ---------------------------------------------------------------- 1. one writer at a time; repair

HOLDER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from tracestore.store import TraceWriter
    from tracebuild import default_manifest

    with TraceWriter({root!r}, default_manifest(), writer_id={writer!r}, shard={shard!r}):
        print("holding", flush=True)
        sys.stdin.readline()
    """
)


class Holder:
    """A writer of ``root`` in another process, holding its lock until stopped."""

    def __init__(self, root: Path, writer: str = "w0", shard: bool = False):
        script = HOLDER.format(tests=str(TESTS_DIR), root=str(root), writer=writer, shard=shard)
        self.process = subprocess.Popen(
            [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout.readline().strip() == "holding"

    def stop(self) -> None:
        self.process.communicate("\n")
        assert self.process.returncode == 0


def test_a_second_writer_is_refused_naming_the_holder(comb_trace):
    holder = Holder(comb_trace)
    try:
        before = snapshot(comb_trace / "steps")
        with pytest.raises(TraceError) as refused:
            TraceWriter(comb_trace, default_manifest())
        message = str(refused.value)
        assert f"is being written by pid {holder.process.pid} on {socket.gethostname()}" in message
        assert "writer w0" in message
        with pytest.raises(TraceError, match=f"pid {holder.process.pid}"):  # any writer: a scorer too
            TraceWriter(comb_trace, None, writer_id="score_prm")
        assert snapshot(comb_trace / "steps") == before
    finally:
        holder.stop()
    with TraceWriter(comb_trace, default_manifest()):  # free again
        pass
    assert not list(comb_trace.glob(".lock*"))


def test_shards_write_side_by_side_but_not_beside_an_unsharded_writer(comb_trace):
    shard = Holder(comb_trace, "shard0of2", shard=True)
    try:
        with TraceWriter(comb_trace, default_manifest(), writer_id="shard1of2", shard=True) as writer:
            rows = [step_and_tokens(s) for s in comb_steps("p9", 2)]
            writer.append_problems([default_problem("p9")])
            writer.append_steps([s for s, _ in rows], [t for _, t in rows])
        with pytest.raises(TraceError, match=f"pid {shard.process.pid} .*writer shard0of2"):
            TraceWriter(comb_trace, default_manifest())
        with pytest.raises(TraceError, match=f"pid {shard.process.pid}"):  # the same shard twice
            TraceWriter(comb_trace, default_manifest(), writer_id="shard0of2", shard=True)
    finally:
        shard.stop()


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_lock_of_a_dead_writer_is_taken_over_and_said(comb_trace, caplog):
    pid = dead_pid()
    holder = {"writer": "w0", "pid": pid, "host": socket.gethostname(), "since": "earlier", "command": "trace gen"}
    (comb_trace / ".lock-w0").write_text(json.dumps(holder))
    with TraceWriter(comb_trace, default_manifest()):
        pass
    assert f"took over the lock of pid {pid} on {socket.gethostname()}" in caplog.text
    assert "which is no longer running" in caplog.text
    assert not list(comb_trace.glob(".lock*"))


def test_a_lock_named_by_another_host_is_refused_with_the_file_to_delete(comb_trace):
    holder = {"writer": "w0", "pid": 1, "host": "elsewhere", "since": "earlier", "command": "trace gen"}
    (comb_trace / ".lock-w0").write_text(json.dumps(holder))
    with pytest.raises(
        TraceError, match=r"names pid 1 on elsewhere .*which this host cannot check.*delete .*\.lock-w0"
    ):
        TraceWriter(comb_trace, default_manifest())
    assert json.loads((comb_trace / ".lock-w0").read_text())["host"] == "elsewhere"


def duplicate_parts(root: Path, writer: str = "w1") -> int:
    """What two writers that ran at once leave: the same rows (here every steps and tokens row) in parts of
    two names. Returns the number of duplicated steps rows."""
    n = 0
    for path in sorted((root / "steps").glob("part-w0-*")):
        name = path.name.replace("part-w0-", f"part-{writer}-")
        shutil.copy(root / "tokens" / path.name, root / "tokens" / name)
        shutil.copy(path, root / "steps" / name)
        n += pq.read_metadata(path).num_rows
    return n


def test_repair_drops_exact_duplicate_rows_and_says_what_it_did(comb_trace):
    n_steps = validate(comb_trace)["steps"]
    copies = duplicate_parts(comb_trace)
    assert_refused(run("validate", comb_trace), "appears more than once")
    assert_refused(run("replay", comb_trace, "--router", "small-only"), "continue the same node with the same model")

    result = run("validate", comb_trace, "--repair")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    for table in ("steps", "tokens"):
        dropped = [line for line in text.split("repaired: ")[1:] if f"exact duplicate {table} row(s)" in line]
        assert sum(int(line.split()[1]) for line in dropped) == copies
    assert f"{n_steps:,} steps, {n_steps:,} tokens" in text
    assert not list((comb_trace / "steps").glob("part-w1-*"))  # emptied parts are gone
    assert run("replay", comb_trace, "--router", "small-only").exit_code == 0

    again = run("validate", comb_trace, "--repair")
    assert "nothing to repair" in again.stdout


def test_repair_leaves_rows_that_share_a_key_but_differ(comb_trace):
    duplicate_parts(comb_trace)
    for path in (comb_trace / "steps").glob("part-w1-*"):  # the second writer wrote other texts
        pq.write_table(pq.read_table(path).set_column(7, "text", pa.array(["another"] * 27)), path)
    result = run("validate", comb_trace, "--repair")
    assert result.exit_code == 1
    assert "left as is: steps rows with step_id =" in " ".join(result.stdout.split())


def test_repair_waits_for_no_writer(comb_trace):
    holder = Holder(comb_trace)
    try:
        assert_refused(run("validate", comb_trace, "--repair"), f"is being written by pid {holder.process.pid}")
    finally:
        holder.stop()


# ---------------------------------------------------------------- 2. trace sql only reads


@pytest.mark.parametrize(
    "query, message",
    [
        ("COPY (SELECT 1 AS x) TO '{part}'", "COPY is refused"),
        ("COPY steps TO '{outside}/copy.csv'", "COPY is refused"),
        ("ATTACH '{outside}/db.duckdb' AS other", "ATTACH is refused"),
        ("CREATE VIEW v AS SELECT 1", "CREATE is refused"),
        ("CREATE TABLE t AS SELECT * FROM steps", "CREATE is refused"),
        ("DROP VIEW steps", "DROP is refused"),
        ("INSTALL httpfs", "INSTALL is refused"),
        ("LOAD httpfs", "LOAD is refused"),
        ("SET threads = 1", "SET is refused"),
        ("SELECT 1; COPY steps TO '{outside}/x.csv'", "give one statement, not 2"),
        ("SELECT * FROM read_text('{secret}')", "Permission Error"),
        ("SELECT * FROM read_csv('{secret}')", "Permission Error"),
        ("SELECT * FROM read_parquet('{outside}/*.parquet')", "Permission Error"),
        ("SELECT * FROM glob('{outside}/*')", "Permission Error"),
        ("", "the query is empty"),
        ("/* only a comment */", "the query is empty"),
    ],
)
def test_sql_refuses_everything_but_reading_the_trace(comb_trace, tmp_path, query, message):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.csv").write_text("password\nhunter2\n")
    pq.write_table(pl.DataFrame({"a": [1]}).to_arrow(), outside / "other.parquet")
    part = sorted((comb_trace / "steps").glob("part-*"))[0]
    before = snapshot(tmp_path)
    query = query.format(part=part, outside=outside, secret=outside / "secret.csv")
    result = run("sql", comb_trace, query)
    assert_refused(result, message)
    if "Permission" in message:
        assert "reads only the trace's tables and the files named with --file" in " ".join(result.stderr.split())
    assert "hunter2" not in result.output
    assert snapshot(tmp_path) == before
    assert run("sql", comb_trace, "SELECT count(*) AS n FROM steps").exit_code == 0  # the views are intact


def test_sql_reads_files_named_with_file(comb_trace, tmp_path):
    results = tmp_path / "results.parquet"
    pq.write_table(pl.DataFrame({"problem_id": ["p0", "p1"]}).to_arrow(), results)
    query = "SELECT count(*) AS n FROM steps JOIN test USING (problem_id) WHERE is_final"
    result = run("sql", comb_trace, query, "--file", f"test={results}")
    assert result.exit_code == 0, result.output
    assert "│ 16 │" in result.stdout  # 2 problems x 2 worlds x 4 final steps
    direct = run("sql", comb_trace, f"SELECT count(*) AS n FROM read_parquet('{results}')", "--file", f"t={results}")
    assert direct.exit_code == 0 and "│ 2 │" in direct.stdout
    assert_refused(run("sql", comb_trace, "SELECT 1", "--file", f"steps={results}"), "steps is a table of the trace")
    assert_refused(run("sql", comb_trace, "SELECT 1", "--file", f"x={tmp_path / 'no.csv'}"), "is not a file")


# ---------------------------------------------------------------- 3. outputs


def test_out_never_lands_in_a_trace_table_and_replaces_only_with_force(comb_trace, tmp_path):
    part = sorted((comb_trace / "steps").glob("part-*"))[0]
    before = snapshot(comb_trace)
    for args in (
        ["replay", comb_trace, "--router", "small-only", "--out", part],
        ["replay", comb_trace, "--router", "small-only", "--out", comb_trace / "tokens" / "new.parquet", "--force"],
        ["sql", comb_trace, "SELECT 1 AS x", "--out", comb_trace / "scores" / "x.parquet"],
        ["sql", comb_trace, "SELECT 1 AS x", "--out", comb_trace / "steps.parquet"],
        ["train", "steer", comb_trace, "--out", comb_trace / "_parts" / "steer.json"],
        ["report", comb_trace, part, "--out", comb_trace / "problems" / "report"],
    ):
        assert_refused(run(*args), "lies inside the trace")
    assert snapshot(comb_trace) == before

    out = comb_trace / "small-only.parquet"  # beside the tables is fine, as scripts/demo.sh does
    assert run("replay", comb_trace, "--router", "small-only", "--out", out).exit_code == 0
    written = out.read_bytes()
    assert_refused(run("replay", comb_trace, "--router", "large-only", "--out", out), "exists; pass --force")
    assert out.read_bytes() == written
    assert run("replay", comb_trace, "--router", "large-only", "--out", out, "--force").exit_code == 0
    assert pl.read_parquet(out)["router"].unique().to_list() == ["large-only"]
    csv = tmp_path / "r.csv"
    csv.write_text("mine")
    assert_refused(run("sql", comb_trace, "SELECT 1 AS x", "--out", csv), "exists; pass --force")
    assert_refused(run("train", "steer", comb_trace, "--out", csv), "exists; pass --force")
    assert csv.read_text() == "mine"
    validate(comb_trace)


# ---------------------------------------------------------------- 4. checksums, value ranges


def flip_byte_in_column(part: Path, column: str) -> None:
    """Flip one bit near the end of ``column``'s chunk: inside its data, where only the page checksum can tell."""
    metadata = pq.ParquetFile(part).metadata.row_group(0)
    chunk = next(metadata.column(i) for i in range(metadata.num_columns) if metadata.column(i).path_in_schema == column)
    data = bytearray(part.read_bytes())
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    data[start + chunk.total_compressed_size - 3] ^= 0x01
    part.write_bytes(bytes(data))


def test_a_flipped_bit_in_a_page_is_caught_by_its_checksum(comb_trace):
    part = sorted((comb_trace / "tokens").glob("part-*"))[0]
    flip_byte_in_column(part, "logprobs.list.element")
    result = run("validate", comb_trace)
    assert_refused(result, f"{part} is damaged: could not verify page integrity, CRC checksum verification failed")
    assert result.stderr.count("error:") == 1
    with pytest.raises(TraceError, match=f"{part} is damaged"):  # pyarrow reads of the tokens verify too
        open_trace(comb_trace).read("tokens", ["logprobs"])


def test_bytes_flipped_in_the_middle_of_a_part_are_one_message_naming_it(comb_trace):
    part = sorted((comb_trace / "tokens").glob("part-*"))[0]
    data = bytearray(part.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(255 - b for b in data[middle : middle + 8])
    part.write_bytes(bytes(data))
    result = run("validate", comb_trace)
    assert result.exit_code == 1 and result.stderr.count("error:") == 1 and "Traceback" not in result.output
    assert one_line(f"error: {part}") in one_line(result.stderr)


def test_a_damaged_steps_part_is_named_by_every_reader(comb_trace):
    part = sorted((comb_trace / "steps").glob("part-*"))[0]
    flip_byte_in_column(part, "text")
    for args in (["validate", comb_trace], ["replay", comb_trace, "--router", "small-only"], ["info", comb_trace]):
        assert_refused(run(*args), f"{part} is damaged")


@pytest.mark.parametrize(
    "table, change, message",
    [
        ("tokens", lambda f: f.with_columns(pl.col("logprobs").list.eval(pl.element() + 6.9e18)), "a logprob that"),
        (
            "tokens",
            lambda f: f.with_columns(pl.col("topk_logprobs").list.eval(pl.element().list.reverse())),
            "top-k logprobs not sorted from the likeliest down",
        ),
        (
            "tokens",
            lambda f: f.with_columns(pl.col("topk_ids", "topk_logprobs").list.eval(pl.element().list.head(2))),
            "not k = 3 top-k entries",
        ),
        ("tokens", lambda f: f.with_columns(pl.col("token_ids").list.eval(-pl.element())), "a token id below -1"),
        ("steps", lambda f: f.with_columns(logprob_mean=pl.lit(0.5, pl.Float32)), "logprob_mean = 0.5"),
        ("steps", lambda f: f.with_columns(n_cached_tokens=pl.col("n_prompt_tokens") + 1), "n_cached_tokens"),
        ("steps", lambda f: f.with_columns(conf_top1_prob_min_math=pl.lit(1.5, pl.Float32)), "a probability"),
        ("steps", lambda f: f.with_columns(conf_max_logit_math=pl.lit(float("nan"), pl.Float32)), "finite"),
    ],
)
def test_values_out_of_range_are_named(comb_trace, table, change, message):
    rewrite_parts(comb_trace, table, change)
    assert_refused(run("validate", comb_trace), message)


# ---------------------------------------------------------------- 5. lost scores and parts


def test_lost_scores_are_named_with_the_command_to_run(scored_trace):
    shutil.rmtree(scored_trace / "scores")
    # the parts records know the parts, and the command that wrote them
    assert_refused(run("validate", scored_trace), f"rerun `trace score {scored_trace} --scorer judge`")
    for router in ("rsd", "specreason"):
        assert_refused(run("replay", scored_trace, "--router", router), "trace score")
    # a trace whose parts are not recorded (written before records existed): trace.json still lists the scorers
    shutil.rmtree(scored_trace / "_parts")
    assert_refused(run("validate", scored_trace), "lists the scorer(s) judge, prm, but the scores table holds none")
    for router, scorer in (("rsd", "prm"), ("specreason", "judge")):
        assert_refused(
            run("replay", scored_trace, "--router", router), f"run `trace score {scored_trace} --scorer {scorer}`"
        )


def test_a_deleted_steps_part_is_named_not_replayed_as_misses(comb_trace, caplog):
    part = sorted((comb_trace / "steps").glob("part-*"))[-1]
    n_lost = pq.read_metadata(part).num_rows
    part.unlink()
    message = f"{part} is missing: writer w0 recorded it"
    for args in (
        ["replay", comb_trace, "--router", "small-only"],
        ["validate", comb_trace],
        ["sql", comb_trace, "SELECT 1"],
    ):
        assert_refused(run(*args), message)
    # rerunning the writer that lost it grows its rows again: reopened, it says so, and the trace reads
    with TraceWriter(comb_trace, default_manifest()):
        pass
    assert f"{part} is missing (writer w0 recorded it)" in caplog.text
    assert open_trace(comb_trace).scan("steps").collect().height == 54 - n_lost


def test_repair_forgets_a_lost_part_and_says_so(comb_trace):
    part = sorted((comb_trace / "tokens").glob("part-*"))[-1]
    part.unlink()
    result = run("validate", comb_trace, "--repair")
    text = " ".join(result.stdout.split())
    assert f"forgot tokens/{part.name}, recorded by writer w0 but gone" in text
    assert_refused(result, "has no tokens row")  # the steps it committed stay without tokens


# ---------------------------------------------------------------- 6. parameters


@pytest.mark.parametrize(
    "args, message",
    [
        (["--router", "rsd", "--param", "tau=nan"], "tau must be a finite number in [0, 1], got nan"),
        (["--router", "rsd", "--param", "tau=5"], "tau must be a finite number in [0, 1], got 5.0"),
        (["--router", "rsd", "--sweep", "tau=0:2:0.5"], "--sweep tau must be a finite number in [0, 1], got 1.5"),
        (["--router", "specreason", "--param", "tau=10"], "tau must be a finite number in [0, 9]"),
        (["--router", "random", "--param", "p=-0.1"], "p must be a finite number in [0, 1]"),
        (["--router", "random", "--param", "seed=-1"], "seed must be an integer >= 0"),
        (["--router", "steer", "--param", "min_samples=1"], "min_samples must be an integer >= 2"),
        (["--router", "cascade", "--param", "t_ik=inf"], "t_ik must be a finite number in [0, 1]"),
        (["--router", "policy", "--param", "path=x.pt", "--param", "kappa=2"], "kappa must be a finite number"),
        (["--router", "small-only", "--cost", "api", "--price", "lrage=1/1/1"], "--price lrage: not a model role"),
        (["--router", "small-only", "--cost", "api", "--price", "small=nan/1/1"], "must be finite and not negative"),
        (["--router", "small-only", "--cost", "api", "--price", "small=1/-1/1"], "must be finite and not negative"),
        (
            ["--router", "small-only", "--cost", "api", "--price", "small=1/1/1", "--price", "small=2/2/2"],
            "--price small is given twice",
        ),
        (["--router", "small-only", "--price", "small=1/1/1"], "--price applies to --cost api, not flops"),
    ],
)
def test_parameters_outside_their_domain_are_refused(comb_trace, args, message):
    assert_refused(run("replay", comb_trace, *args), message)


def test_every_numeric_router_parameter_has_a_domain():
    for name, cls in ROUTERS.builtins().items():
        for param, default in cls.param_defaults().items():
            numeric = default is None or (isinstance(default, (int, float)) and not isinstance(default, bool))
            if numeric or param in cls.sweepable:
                assert param in cls.domains, f"router {name}: parameter {param} has no domain"
                assert cls.domains[param].contains(default), f"router {name}: default {param}={default} is outside"


# ---------------------------------------------------------------- 7. sweeps


def test_a_huge_sweep_is_refused_before_it_is_built_naming_its_size(comb_trace):
    assert_refused(
        run("replay", comb_trace, "--router", "rsd", "--sweep", "tau=0:1:1e-9"),
        "has 1,000,000,001 values (at least 300 GB of memory); at most 20,000 configurations run",
    )
    grid = ["--router", "cascade", "--param", "pik=false", "--param", "p_true=final_min"]
    grid += ["--sweep", "t_true=0:1:0.01", "--sweep", "t_ik=0:1:0.005"]
    assert_refused(
        run("replay", comb_trace, *grid, "--split", "all"),
        "--sweep gives 101 x 201 = 20,301 configurations x 6 walks = 121,806 walk states (about 0.0934 GB",
    )
    assert_refused(
        run("replay", comb_trace, "--router", "random", "--sweep", "p=0:1:0.01", "--max-configs", "100"),
        "has 101 values",
    )
    lifted = run("replay", comb_trace, "--router", "random", "--sweep", "p=0:1:0.01", "--max-configs", "101")
    assert lifted.exit_code == 0, lifted.output


def test_a_sweep_beyond_the_memory_available_is_refused_naming_both_numbers(comb_trace, monkeypatch):
    # issue 29: --max-configs raised, the sweep grew until the kernel killed it (or numpy raised, a traceback)
    huge = run("replay", comb_trace, "--router", "random", "--sweep", "p=0:1:1e-11", "--max-configs", 10**12)
    assert_refused(huge, "values) needs about 30,000 GB of memory, but")
    assert "--no-memory-check" in huge.stderr
    grid = ["--router", "cascade", "--param", "pik=false", "--param", "p_true=final_min"]
    grid += ["--sweep", "t_true=0:1:1e-5", "--sweep", "t_ik=0:1:1e-5"]
    assert_refused(
        run("replay", comb_trace, *grid, "--split", "all", "--max-configs", 10**11),
        "--sweep's 100001 x 100001 = 10,000,200,001 configurations x 6 walks = 60,001,200,006 walk states needs "
        "about 3,000 GB of memory, but",  # outcomes streamed: a summary row a configuration, one block of states
    )
    monkeypatch.setattr(params, "available_memory", lambda: 1_000)
    small = ["replay", comb_trace, "--router", "random", "--sweep", "p=0:1:0.5"]
    assert_refused(run(*small), "--sweep p=0:1:0.5 (3 values) needs about 4.8e-06 GB of memory, but 1e-06 GB is")
    assert run(*small, "--no-memory-check").exit_code == 0


def test_a_very_large_sweep_streams_its_outcomes_to_disk(comb_trace, monkeypatch, tmp_path):
    sweep = {"p": "0:1:0.05"}  # 21 configurations x 6 walks
    held = api.replay(comb_trace, "random", sweep=sweep, split="all")
    monkeypatch.setattr(replay_run, "STREAM_STATES", 100)
    monkeypatch.setattr(replay_run, "STREAM_BLOCK_STATES", 24)  # blocks of 4 configurations
    streamed = api.replay(comb_trace, "random", sweep=sweep, split="all")
    assert held.outcomes_file is None and streamed.outcomes_file.is_file()
    assert pq.ParquetFile(streamed.outcomes_file).num_row_groups == 6
    assert streamed.outcomes.equals(held.outcomes) and streamed.misses.equals(held.misses)
    assert streamed.summary().equals(held.summary()) and streamed.n_outcomes == held.outcomes.height == 126
    out = tmp_path / "streamed.parquet"
    result = run("replay", comb_trace, "--router", "random", "--sweep", "p=0:1:0.05", "--split", "all", "--out", out)
    assert result.exit_code == 0, result.output
    assert pl.read_parquet(out).equals(held.outcomes) and "wrote 126 outcomes" in result.stdout
    file = streamed.outcomes_file
    del streamed
    assert not file.exists()  # the temp file goes with its result


def test_a_grid_walked_in_chunks_gives_the_same_outcomes(comb_trace, monkeypatch):
    data = ReplayData.from_trace(open_trace(comb_trace))
    sweep = dict([parse_sweep("p=0:1:0.05")])
    router = make_router("random").fit(data)
    cost = make_cost_model("flops", data.manifest)
    whole = replay(data, router, cost, sweep)
    assert whole.outcomes["config"].n_unique() == 21 and whole.misses.height > 0  # mixed paths leave the comb
    # 6 walks x 21 configurations: one walk per chunk, then chunks of 4 and 2 walks
    for chunk_states in (7, 84):
        monkeypatch.setattr(replay_run, "CHUNK_STATES", chunk_states)
        chunked = replay(data, router, cost, sweep)
        assert chunked.outcomes.equals(whole.outcomes) and chunked.misses.equals(whole.misses)


# ---------------------------------------------------------------- 9. messages


def test_messages_say_what_was_typed(comb_trace, tmp_path):
    assert_refused(run("replay", comb_trace, "--router", "steer", "--sweep", "tau0:1:0.1"), "--sweep must look like")
    odd = tmp_path / "a:b:c [bold]x"
    shutil.copytree(comb_trace, odd)
    result = run("validate", odd)
    assert result.exit_code == 0 and one_line(f"ok {odd}:") in one_line(result.stdout)
    for args in (["replay", odd, "--router", "small-only"], ["info", odd], ["sql", odd, "SELECT count(*) FROM steps"]):
        result = run(*args)
        assert result.exit_code == 0, result.output
        assert args[0] == "sql" or one_line(str(odd)) in one_line(result.stdout)  # not an emoji, not markup
    assert_refused(run("sql", comb_trace, ""), "the query is empty")
    results = tmp_path / "results"
    results.mkdir()
    assert_refused(
        run("report", comb_trace, results, "--out", tmp_path / "r"), f"{results} is a folder; pass the files"
    )


def test_trace_info_counts_tables_apart_from_other_files(comb_trace):
    def per_token(output: str) -> str:
        return next(line for line in output.splitlines() if "bytes per generated token" in line)

    before = per_token(run("info", comb_trace).stdout)
    (comb_trace / "report").mkdir()
    (comb_trace / "report" / "index.html").write_bytes(b"x" * 100_000)
    after = run("info", comb_trace)
    assert per_token(after.stdout) == before
    assert "report/" in after.stdout and "97.7 KiB" in after.stdout
