"""`trace replay` through the real CLI: table and Parquet on a good trace; one error line on bad input."""

from __future__ import annotations

import polars as pl
from typer.testing import CliRunner

from cli import app

runner = CliRunner()


def replay(*args):
    return runner.invoke(app, ["replay", *map(str, args)])


def test_replay_prints_the_table_and_writes_one_row_per_problem_world_configuration(comb_trace, tmp_path):
    out = tmp_path / "out.parquet"
    result = replay(comb_trace, "--router", "random", "--sweep", "p=0:1:0.5", "--split", "all", "--out", out)
    assert result.exit_code == 0, result.output
    assert "random" in result.stdout and "p=0.5" in result.stdout and "Large steps" in result.stdout
    outcomes = pl.read_parquet(out)
    assert outcomes.height == 3 * 2 * 3
    assert outcomes.group_by("config").agg(pl.col("params").first()).sort("config")["params"].to_list() == [
        '{"p": 0.0, "seed": 0}',
        '{"p": 0.5, "seed": 0}',
        '{"p": 1.0, "seed": 0}',
    ]
    large = outcomes.filter(pl.col("config") == 2)
    assert large["n_small"].sum() == 0 and large["correct"].all()


def test_replay_reports_misses(comb_trace):
    result = replay(comb_trace, "--router", "random", "--param", "p=0.5", "--param", "seed=1", "--split", "all")
    assert result.exit_code == 0, result.output
    assert "missed" in result.stdout and "step by small" in result.stdout


def test_bad_input_is_one_line_and_exit_1(comb_trace, tmp_path):
    cases = [
        (["--router", "nope"], "unknown router 'nope'"),
        (["--router", "steer", "--param", "tau"], "--param must look like name=value"),
        (["--router", "steer", "--param", "speed=1"], "router steer has no parameter speed"),
        (["--router", "steer", "--sweep", "tau=1:0:0.1"], "--sweep must look like"),
        (["--router", "small-only", "--split", "dev"], "unknown split 'dev'"),
        (["--router", "small-only", "--cost", "watts"], "unknown cost model 'watts'"),
        (["--router", "small-only", "--split-fractions", "1,1,1"], "split fractions"),
        (["--router", "small-only", "--out", tmp_path / "no" / "x.parquet"], "does not exist"),
    ]
    for args, message in cases:
        result = replay(comb_trace, *args)
        assert result.exit_code == 1, (args, result.output)
        assert message in " ".join(result.stderr.split()), (args, result.stderr)
        assert "Traceback" not in result.output
    missing = replay(tmp_path / "nowhere", "--router", "small-only")
    assert missing.exit_code == 1 and "does not exist" in " ".join(missing.stderr.split())
