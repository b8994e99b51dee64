"""`trace validate`, `trace info`, `trace sql` through the real CLI: output on a good trace; on bad input
one clear error line, exit 1, and no file touched."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import polars as pl
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cli import app
from tracestore.schema import MANIFEST_FILE, TABLES

runner = CliRunner()


def snapshot(folder) -> dict:
    return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(text: str) -> str:
    return " ".join(text.split())


def assert_one_error(result, message: str) -> None:
    """Exit 1 with one `error:` message (rich may wrap it) containing `message`, nothing on stdout."""
    assert result.exit_code == 1
    assert result.stdout == ""
    text = one_line(result.stderr)
    assert text.startswith("error: ") and text.count("error:") == 1 and "Traceback" not in text, result.stderr
    assert "".join(message.split()) in "".join(text.split())  # rich wraps long lines, even inside words


def test_validate_ok(comb_trace):
    result = runner.invoke(app, ["validate", str(comb_trace)])
    assert result.exit_code == 0, result.output
    counts = "3 problems, 6 trees, 54 steps, 54 tokens, 0 scores, 0 hidden, 0 grades"
    assert one_line(result.stdout) == f"ok {comb_trace}: {counts}"


def test_info_reports_counts_accuracy_and_size(comb_trace):
    # what scripts/demo.sh keeps beside the tables is listed apart and counted in no size (issue 13, item 9)
    (comb_trace / "results").mkdir()
    (comb_trace / "results" / "rsd.parquet").write_bytes(b"r" * 5120)
    (comb_trace / "policy.pt").write_bytes(b"p" * 3072)
    result = runner.invoke(app, ["info", str(comb_trace)])
    assert result.exit_code == 0, result.output
    steps = pl.concat(pl.read_parquet(p) for p in sorted((comb_trace / "steps").glob("part-*")))
    lines = [one_line(line) for line in result.stdout.splitlines()]
    assert "│ problems │ 3 │" in lines
    assert "│ trees (problem, world) │ 6 │" in lines
    for model in ("small", "large"):
        mine = steps.filter(pl.col("model") == model)
        assert f"│ {model} │ {mine.height} │ {mine['n_gen_tokens'].sum()} │" in lines
    # the comb fixture: all-small is right only for p0 (2 of 6 trees), all-large always
    assert "│ all-small (s…) │ 6 │ 2 │ 0.333 │" in lines
    assert "│ all-large (L…) │ 6 │ 6 │ 1.000 │" in lines
    tables = sum(p.stat().st_size for table in TABLES for p in (comb_trace / table).glob("part-*"))
    assert f"│ bytes per generated token (tables) │ {tables / steps['n_gen_tokens'].sum():.1f} │" in lines
    assert "│ results/ │ 1 │ 5.0 KiB │" in lines and "│ policy.pt │ 1 │ 3.0 KiB │" in lines


def test_sql_prints_a_table(comb_trace):
    query = "SELECT model, count(*) AS n FROM steps GROUP BY model ORDER BY model"
    result = runner.invoke(app, ["sql", str(comb_trace), query])
    assert result.exit_code == 0, result.output
    lines = [one_line(line) for line in result.stdout.splitlines()]
    assert "│ large │ 36 │" in lines and "│ small │ 18 │" in lines
    assert "2 rows" in lines


def test_sql_max_rows(comb_trace):
    result = runner.invoke(app, ["sql", str(comb_trace), "SELECT step_id FROM steps", "--max-rows", "5"])
    assert result.exit_code == 0, result.output
    assert "first 5 of 54 rows" in result.stdout
    assert sum("p" in line and "/" in line for line in result.stdout.splitlines()) == 5


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_sql_out(comb_trace, tmp_path, suffix):
    out = tmp_path / f"result{suffix}"
    result = runner.invoke(
        app, ["sql", str(comb_trace), "SELECT step_id, depth FROM steps ORDER BY step_id", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert one_line(result.stdout) == f"wrote 54 rows to {out}"
    frame = pl.read_csv(out) if suffix == ".csv" else pl.read_parquet(out)
    steps = pl.concat(pl.read_parquet(p) for p in sorted((comb_trace / "steps").glob("part-*")))
    assert frame["step_id"].to_list() == sorted(steps["step_id"])


def test_a_library_notice_prints_as_one_note_line(comb_trace):
    # the lock of a writer that died is taken over, and said so on stderr (not as a bare log record)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    holder = {"writer": "w0", "pid": dead.pid, "host": socket.gethostname(), "since": "earlier", "command": "trace gen"}
    (comb_trace / ".lock-w0").write_text(json.dumps(holder))
    result = runner.invoke(app, ["validate", str(comb_trace), "--repair"])
    assert result.exit_code == 0, result.output
    assert one_line(result.stderr) == (
        f"note: {comb_trace}: took over the lock of pid {dead.pid} on {socket.gethostname()} since earlier (writer w0: "
        "trace gen), which is no longer running"
    )


# -- bad input: one message, exit 1, nothing touched


def truncate_part(root):
    part = sorted((root / "steps").glob("part-*"))[0]
    part.write_bytes(part.read_bytes()[:-64])
    return f"{part} is not a readable Parquet file"


def foreign_part(root):
    part = root / "steps" / "part-x-00001.parquet"
    part.write_text("step_id,path\n")
    return f"{part} is not a readable Parquet file"


def stray_file(root):
    (root / "problems" / "problems.csv").write_text("problem_id\np0\n")
    return "problems.csv does not belong in a trace table folder"


def future_schema(root):
    manifest = json.loads((root / MANIFEST_FILE).read_text())
    (root / MANIFEST_FILE).write_text(json.dumps({**manifest, "schema_version": 7}))
    return "has schema_version 7; this version of trace reads schema_version 1 and 2"


def manifest_disagrees(root):
    manifest = json.loads((root / MANIFEST_FILE).read_text())
    (root / MANIFEST_FILE).write_text(json.dumps({**manifest, "models": manifest["models"][:1]}))
    return "is by model 'large', which is not a role in trace.json"


def missing_directory(root):
    return None


BREAKAGES = [missing_directory, truncate_part, foreign_part, stray_file, future_schema]


@pytest.mark.parametrize("command", ["validate", "info", "sql"])
@pytest.mark.parametrize("breakage", BREAKAGES, ids=[b.__name__ for b in BREAKAGES])
def test_bad_trace(comb_trace, tmp_path, command, breakage):
    root = comb_trace if breakage is not missing_directory else tmp_path / "nope"
    message = breakage(root) or f"trace directory {root} does not exist"
    out = tmp_path / "out.csv"
    before = snapshot(tmp_path)
    args = {
        "validate": ["validate", str(root)],
        "info": ["info", str(root)],
        "sql": [
            "sql",
            str(root),
            "SELECT count(*) FROM steps JOIN tokens USING (step_id) JOIN problems USING (problem_id)",
            "--out",
            str(out),
        ],
    }[command]
    result = runner.invoke(app, args)
    assert_one_error(result, message)
    assert snapshot(tmp_path) == before


def test_validate_manifest_disagreeing_with_tables(comb_trace, tmp_path):
    message = manifest_disagrees(comb_trace)
    before = snapshot(tmp_path)
    result = runner.invoke(app, ["validate", str(comb_trace)])
    assert result.exit_code == 1
    assert_one_error(result, message)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("out_exists", [False, True])
def test_sql_error_writes_nothing(comb_trace, tmp_path, out_exists):
    out = tmp_path / "result.parquet"
    if out_exists:
        pq.write_table(pl.DataFrame({"kept": [1]}).to_arrow(), out)
    before = snapshot(tmp_path)
    force = ["--force"] if out_exists else []
    result = runner.invoke(app, ["sql", str(comb_trace), "SELECT depth FROM stepz", "--out", str(out), *force])
    assert result.exit_code == 1
    assert_one_error(
        result, "SQL error in 'SELECT depth FROM stepz': Catalog Error: Table with name stepz does not exist"
    )
    assert snapshot(tmp_path) == before


def test_sql_bad_out_suffix_runs_nothing(comb_trace, tmp_path):
    before = snapshot(tmp_path)
    result = runner.invoke(app, ["sql", str(comb_trace), "SELECT 1", "--out", str(tmp_path / "r.json")])
    assert result.exit_code == 1
    assert_one_error(result, "the file name must end in .csv or .parquet")
    assert snapshot(tmp_path) == before
