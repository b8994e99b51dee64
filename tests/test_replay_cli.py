"""`trace replay` through the real CLI: table and Parquet on a good trace; one error line on bad input."""

from __future__ import annotations

import polars as pl
import tomllib
from typer.testing import CliRunner

from cli import app

runner = CliRunner()


def replay(*args):
    return runner.invoke(app, ["replay", *map(str, args)])


def test_replay_prints_the_table_and_writes_one_row_per_problem_world_configuration(comb_trace, tmp_path):
    out = tmp_path / "out.parquet"
    result = replay(comb_trace, "--router", "random", "--sweep", "p=0:1:0.5", "--split", "all", "--out", out)
    assert result.exit_code == 0, result.output
    assert "random" in result.stdout and "p=0.5" in result.stdout and "Large %" in result.stdout
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


def table_rows(stdout: str) -> list[list[str]]:
    """The body rows of the printed table as cells; a cell wrapped over several lines is joined again."""
    rows = []
    for line in stdout.splitlines():
        if line.count("│") < 3:
            continue
        cells = [cell.strip() for cell in line.strip().strip("│").split("│")]
        if rows and not any(cells[1:]):  # a wrapped first cell goes on
            rows[-1][0] += " " + cells[0]
        else:
            rows.append(cells)
    return rows


GRID_ROUTER = """
from replay.stepwise import step_router


@step_router
def band(node, depth=0.0, width=0.0):  # the large model rewrites the steps at indices depth .. depth + width - 1
    return not depth <= node.draft.depth < depth + width
"""


def test_a_grid_prints_its_frontier_first_fits_the_terminal_and_marks_misses(comb_trace, tmp_path):
    (tmp_path / "band.py").write_text(GRID_ROUTER)
    router = f"{tmp_path / 'band.py'}:band"
    # on the comb, a band that ends before the last step (a large step between small ones) misses
    grid = (comb_trace, "--router", router, "--sweep", "depth=0,1,2", "--sweep", "width=0,1,3", "--split", "all")
    configs = [f"depth={d} width={w}" for d in (0, 1, 2) for w in (0, 1, 3)]  # sweep order
    for columns in (60, 100):
        every = runner.invoke(app, ["replay", *map(str, grid), "--all"], env={"COLUMNS": str(columns)})
        assert every.exit_code == 0, every.output
        drawn = [line for line in every.stdout.splitlines() if set(line) & set("│┃━─")]  # the table's own lines
        assert max(map(len, drawn)) <= columns and "…" not in every.stdout, every.stdout
        rows = table_rows(every.stdout)
        assert sorted(row[0] for row in rows) == sorted(configs)
        complete = [row for row in rows if row[-1] == "0"]
        missed = [row for row in rows if row[-1] != "0"]
        assert missed and complete and rows == complete + missed  # misses last, never ranked above complete ones
        assert all(row[1].endswith("*") for row in missed) and not any(row[1].endswith("*") for row in complete)
        # the frontier first, by cost: complete configurations no other complete one matches or beats for no more
        # cost (of equal ones, the first in sweep order)
        point = {row[0]: (float(row[2]), float(row[1])) for row in complete}
        ordered = sorted(point, key=configs.index)
        frontier = [
            name
            for name in ordered
            if not any(
                point[other][0] <= point[name][0]
                and point[other][1] >= point[name][1]
                and (point[other] != point[name] or ordered.index(other) < ordered.index(name))
                for other in ordered
                if other != name
            )
        ]
        frontier.sort(key=lambda name: point[name][0])
        assert 2 <= len(frontier) < len(complete)
        assert [row[0] for row in rows[: len(frontier)]] == frontier
        default = runner.invoke(app, ["replay", *map(str, grid)], env={"COLUMNS": str(columns)})
        assert [row[0] for row in table_rows(default.stdout)] == frontier
        assert f"{len(frontier)} of 9 configurations shown" in " ".join(default.stdout.split())
        assert "--all shows every one" in " ".join(default.stdout.split())
    # the miss message says how to grow the missing steps, with the routers file to write
    assert "trace gen --expand closure --routers closure.toml" in " ".join(every.stdout.split())
    spec = tomllib.loads(every.stdout[every.stdout.index("[[router]]") :])["router"]
    assert spec == [{"name": router, "sweep": ["depth=0,1,2", "width=0,1,3"]}]
