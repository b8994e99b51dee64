"""`trace report` with a latency profile: a Latency section (mean, p50, p95 seconds per query, accuracy against
latency) and a Time column in the seeds' tables, worked out by hand on comb trees whose every query is alike
(steps of 4 tokens, prompts of 20 + 4 per depth, all new to the model writing)."""

from __future__ import annotations

import json

import polars as pl
import pytest
from test_latency_cost import LARGE, SMALL, profile_document, request
from tracebuild import build_trace, comb_steps, default_manifest
from typer.testing import CliRunner

from cli import app

N_STEPS = 3
SMALL_CHAIN = sum(request(SMALL, 20 + 4 * depth, 4) for depth in range(N_STEPS))
LARGE_CHAIN = sum(request(LARGE, 20 + 4 * depth, 4) for depth in range(N_STEPS))


def invoke(*args):
    return CliRunner().invoke(app, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    base = tmp_path_factory.mktemp("latency-report")
    steps = [step for index in range(10) for step in comb_steps(f"q{index}", N_STEPS)]
    root = build_trace(base / "trace", steps, manifest=default_manifest())
    cascade = base / "cascade.parquet"
    replayed = invoke(
        "replay", root, "--router", "cascade", "--param", "pik=false", "--param", "p_true=final_min",
        "--sweep", "t_true=0:1:0.5", "--split", "all", "--out", cascade,
    )  # fmt: skip
    assert replayed.exit_code == 0, replayed.output
    return root, cascade


def report(trace, cascade, out, *extra):
    result = invoke(
        "report", trace, cascade, "--out", out, "--bootstrap", 10, "--table", "cmdp", "--table", "cascade",
        "--split", "all", "--pick-split", "reported", *extra,
    )  # fmt: skip
    return result


def test_time_columns_and_latency_section_by_hand(trace, tmp_path):
    root, cascade = trace
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(profile_document()))
    result = report(root, cascade, tmp_path / "r", "--latency-profile", profile)
    assert result.exit_code == 0, result.output
    cmdp = pl.read_csv(tmp_path / "r" / "table_cmdp.csv")
    times = dict(zip(cmdp["method"], cmdp["time_s"]))
    assert times["small-only"] == pytest.approx(SMALL_CHAIN) and times["large-only"] == pytest.approx(LARGE_CHAIN)
    # P(T) = exp(logprob_min) = exp(-0.5) = 0.61: t_true 0 and 0.5 keep the small answer, 1 also runs the large chain
    table = pl.read_csv(tmp_path / "r" / "table_cascade.csv")
    by_point = {
        row["operating_point"]: row["time_s"] for row in table.iter_rows(named=True) if row["kind"] != "not replayed"
    }
    assert by_point["t_true=1"] == pytest.approx(SMALL_CHAIN + LARGE_CHAIN)
    assert by_point["t_true=0.5"] == pytest.approx(SMALL_CHAIN) and by_point["t_true=0"] == pytest.approx(SMALL_CHAIN)
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert "Time (s)" in (tmp_path / "r" / "table_cmdp.md").read_text()
    section = markdown[markdown.index("## Latency") :]
    assert "| Mean (s) | p50 (s) | p95 (s) |" in section and "profile.json" in section
    large_row = next(line for line in section.splitlines() if line.startswith("| large-only"))
    assert f"| {LARGE_CHAIN:.4g} | {LARGE_CHAIN:.4g} | {LARGE_CHAIN:.4g} |" in large_row
    assert (tmp_path / "r" / "latency.png").read_bytes().startswith(b"\x89PNG")


def test_without_a_profile_there_is_no_time(trace, tmp_path):
    root, cascade = trace
    result = report(root, cascade, tmp_path / "r")
    assert result.exit_code == 0, result.output
    assert "time_s" not in pl.read_csv(tmp_path / "r" / "table_cmdp.csv").columns
    assert "## Latency" not in (tmp_path / "r" / "report.md").read_text()
    assert not (tmp_path / "r" / "latency.png").exists()


def test_a_bad_profile_is_one_line(trace, tmp_path):
    root, cascade = trace
    document = profile_document()
    document["entries"]["large"]["overhead_s"] = -1
    profile = tmp_path / "bad.json"
    profile.write_text(json.dumps(document))
    result = report(root, cascade, tmp_path / "r", "--latency-profile", profile)
    assert result.exit_code == 1 and "large.overhead_s is -1" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()
