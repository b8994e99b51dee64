"""Issue 29: no way out of the trace and no secret in it. Each item's command, run on a copy of a small trace.

1 a trace inside another trace's table folder; 2 symbolic links out of the trace; 3 a router that writes into
the trace, and the quarantine; 4 unreachable object stores; 5 a key in an endpoint URL; 6 a URL that is not
http(s); 8 file:// URLs for validate, info and sql; 9 trace sql's memory (a Ray worker's own error is in
tests/test_ray_gen.py, beside the Ray instance it needs).
(Item 7, the memory of very large sweeps, is tested beside the other sweep limits.)
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_store_safety import assert_refused, one_line, run, snapshot

from tracestore.errors import TraceError
from tracestore.store import TraceWriter
from tracestore.validate import validate

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-secret-7f3a9e"


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------- 1. a trace inside a trace's table folder


@pytest.mark.parametrize("table", ["steps", "grades"])
def test_gen_and_score_refuse_a_trace_inside_a_table_folder(comb_trace, tmp_path, table):
    before = snapshot(comb_trace)
    inside = comb_trace / table / "sub"
    gen = ["gen", "--model", "toy-small", "--large", "toy-large", "--dataset", "toy", "--limit", "1"]
    refused = run(*gen, "--backend", "fake", "--out", inside)
    assert_refused(refused, f"--out {inside} lies inside the trace {comb_trace}")
    assert snapshot(comb_trace) == before

    nested = shutil.copytree(comb_trace, tmp_path / "copy")  # a trace already there, as an older version left it
    inside.parent.mkdir(exist_ok=True)
    shutil.move(nested, inside)
    assert_refused(run("score", inside, "--scorer", "verifier"), f"{inside} lies inside the trace {comb_trace}")
    assert_refused(run("validate", comb_trace), "does not belong in a trace table folder")
    repaired = run("validate", comb_trace, "--repair")
    assert repaired.exit_code == 0, repaired.output
    kept = comb_trace / "_quarantine" / table / "sub"
    assert one_line(f"moved {inside} to {kept}") in one_line(repaired.stdout)
    assert validate(kept)["steps"] == validate(comb_trace)["steps"]  # moved whole, nothing deleted


# ---------------------------------------------------------------- 2. symbolic links out of the trace


def test_writers_never_write_through_a_link_that_leaves_the_trace(comb_trace, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (comb_trace / "scores").symlink_to(elsewhere)
    message = f"{comb_trace / 'scores'} is a symbolic link to {elsewhere}, outside the trace"
    with pytest.raises(TraceError, match="is a symbolic link to .*, outside the trace"):
        TraceWriter(comb_trace, None, writer_id="score_prm")  # what `trace score` opens
    assert_refused(run("validate", comb_trace), message)
    (comb_trace / "scores").unlink()
    (comb_trace / "grades").symlink_to(elsewhere)
    assert_refused(run("regrade", comb_trace, "--grader", "exact"), f"{comb_trace / 'grades'} is a symbolic link")
    assert_refused(run("validate", comb_trace, "--repair"), f"{comb_trace / 'grades'} is a symbolic link")
    assert list(elsewhere.iterdir()) == []
    assert not list(comb_trace.glob(".lock*"))


# ---------------------------------------------------------------- 3. a router that writes into the trace

WRITING_ROUTER = """
from pathlib import Path

from replay.routers.base import DraftRouter


class Vandal(DraftRouter):
    name = "vandal"

    def __init__(self, trace=""):
        self.trace = trace

    def draft_signal(self, data):
        Path(self.trace, "steps", "part-evil-00001-0000000000000000.parquet").write_bytes(b"not parquet")
        return data.steps["logprob_min"].to_numpy()

    def accept(self, signal, params):
        return signal > -1.0
"""


def test_a_router_that_writes_into_the_trace_is_named_and_repair_quarantines_its_file(comb_trace, tmp_path):
    plugin = tmp_path / "vandal.py"
    plugin.write_text(WRITING_ROUTER)
    out = tmp_path / "vandal.parquet"
    evil = comb_trace / "steps" / "part-evil-00001-0000000000000000.parquet"
    result = run("replay", comb_trace, "--router", f"{plugin}:Vandal", "--param", f"trace={comb_trace}", "--out", out)
    assert_refused(result, f"{comb_trace} changed while router vandal ran: {evil} appeared")
    assert one_line("its results are withheld") in one_line(result.stderr) and not out.exists()
    assert_refused(run("validate", comb_trace), f"{evil} is not a readable Parquet file")

    repaired = run("validate", comb_trace, "--repair")
    assert repaired.exit_code == 0, repaired.output
    kept = comb_trace / "_quarantine" / "steps" / evil.name
    assert one_line(f"moved {evil} to {kept}") in one_line(repaired.stdout)
    assert kept.read_bytes() == b"not parquet"
    assert run("replay", comb_trace, "--router", "small-only").exit_code == 0


# ---------------------------------------------------------------- 4. unreachable object stores


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_an_unreachable_object_store_is_one_line_within_the_timeout(scheme):
    uri = f"{scheme}://bucket/trace?endpoint_override=127.0.0.1:{closed_port()}&scheme=http"
    command = [sys.executable, "-m", "cli", "replay", uri, "--router", "small-only", "--timeout", "2"]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - started
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {uri}"), result.stderr
    assert "--timeout" in lines[0] or "connect" in lines[0].lower()
    assert seconds < 30, seconds  # the start of Python and the CLI, plus the 2 s


# ---------------------------------------------------------------- 5, 6. endpoint URLs


@pytest.fixture(scope="module")
def api_server():
    from endpoint_server import ApiServer, ServerState

    from tracegen.models import load_tokenizer, resolve_model

    with ApiServer(ServerState(tokenizer=load_tokenizer(resolve_model("toy-large", "large")))) as server:
        yield server


def test_a_key_in_an_endpoint_url_is_refused_and_never_written(api_server, comb_trace, tmp_path):
    keyed = api_server.url.replace("http://", f"http://user:{KEY}@")
    out = tmp_path / "keyed"
    gen = ["gen", "--model", "toy-small", "--large", "toy-large", "--dataset", "toy", "--limit", "1"]
    result = run(*gen, "--backend", "fake", "--max-steps", "2", "--out", out, "--api", f"small:url={keyed}")
    assert_refused(result, "--api small: the url carries a user name or key (http://***@127.0.0.1")
    assert "key-env=" in one_line(result.stderr)
    before = snapshot(comb_trace)
    verifier = run("score", comb_trace, "--scorer", "api-verifier", "--model", f"url={keyed},model=toy-large")
    assert_refused(verifier, "the url carries a user name or key")
    assert snapshot(comb_trace) == before
    for output in (result.output, verifier.output):
        assert KEY not in output
    written = [path for path in out.rglob("*") if path.is_file()] if out.exists() else []
    assert not [path for path in written if KEY.encode() in path.read_bytes()]


@pytest.mark.parametrize("url", ["", "file:///etc/passwd", "ftp://127.0.0.1/v1", "http:///v1"])
def test_a_url_that_is_not_http_is_refused_at_once(tmp_path, url):
    gen = ["gen", "--model", "toy-small", "--large", "toy-large", "--dataset", "toy", "--limit", "1"]
    started = time.perf_counter()
    result = run(*gen, "--backend", "fake", "--out", tmp_path / "t", "--api", f"small:url={url},model=toy-small")
    assert_refused(result, f"--api small: url must be an http:// or https:// address with a host, got {url!r}")
    assert time.perf_counter() - started < 10
    assert not (tmp_path / "t").exists()


# ---------------------------------------------------------------- 8. file:// URLs


def test_validate_info_and_sql_take_file_urls_and_say_when_they_cannot(comb_trace):
    url = f"file://{comb_trace}"
    assert "ok " in run("validate", url).stdout
    assert one_line(f"trace {comb_trace}") in one_line(run("info", url).stdout)
    assert "│ 54 │" in run("sql", url, "SELECT count(*) AS n FROM steps").stdout
    for command in (["validate"], ["info"], ["sql"]):
        args = [*command, "s3://bucket/trace", *(["SELECT 1"] if command == ["sql"] else [])]
        assert_refused(run(*args), f"trace {command[0]} reads a local or mounted trace (a path or file:// URL)")

    part = sorted((comb_trace / "steps").glob("part-*"))[-1]
    part.unlink()
    assert_refused(run("replay", url, "--router", "small-only"), f"or `trace validate {url} --repair` to forget")
    assert_refused(run("validate", url), f"or `trace validate {comb_trace} --repair` to forget the part")
    assert "forgot steps/" in run("validate", url, "--repair").stdout


# ---------------------------------------------------------------- 9. trace sql's memory


def test_trace_sql_out_of_memory_names_its_own_remedies(comb_trace):
    query = "SELECT list(x) AS xs FROM range(20000000) t(x)"
    result = run("sql", comb_trace, query, "--memory-limit", "20MB")
    assert_refused(result, "Out of Memory Error")
    assert one_line("raise --memory-limit (20MB)") in one_line(result.stderr) and "SET " not in result.stderr
    assert_refused(run("sql", comb_trace, "SELECT 1", "--memory-limit", "lots"), "--memory-limit must be")
    assert run("sql", comb_trace, "SELECT count(*) FROM steps", "--memory-limit", "1GB").exit_code == 0
