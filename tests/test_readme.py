"""The README's examples, run as written on a small trace with PRM scores (``DIR`` replaced by its folder), each
checked against numbers computed here from the trace and the results files.

Not run here: the demo (scripts/demo.sh, whose numbers the README quotes), the Ray and API examples (they need
GPUs, a cluster or an API key); their commands share the code paths the other tests cover.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from pathlib import Path

import polars as pl
import pytest
from tracebuild import build_trace, default_manifest, random_trees
from typer.testing import CliRunner

from cli import app

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
N_PROBLEMS, DEPTH = 60, 4
runner = CliRunner()


def code_block(language: str, containing: str) -> str:
    """The README's one code block in ``language`` that contains ``containing``."""
    blocks = [b for b in re.findall(rf"```{language}\n(.*?)```", README, flags=re.S) if containing in b]
    assert len(blocks) == 1, (language, containing, len(blocks))
    return blocks[0]


def commands(block: str) -> list[str]:
    """The block's shell commands, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def run(line: str, trace: Path) -> str:
    """One README command line with DIR as ``trace``: `trace ...` through the CLI, `mkdir -p` as such."""
    argv = shlex.split(line.replace("DIR", str(trace)))
    if argv[:2] == ["mkdir", "-p"]:
        for folder in argv[2:]:
            Path(folder).mkdir(parents=True, exist_ok=True)
        return ""
    assert argv[0] == "trace", line
    result = runner.invoke(app, argv[1:], env={"COLUMNS": "200"})
    assert result.exit_code == 0, (line, result.output)
    return result.stdout


@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> Path:
    steps, scores = random_trees(N_PROBLEMS, DEPTH, seed=5)
    root = tmp_path_factory.mktemp("readme") / "DIR-trace"
    return build_trace(root, steps, scores=scores, manifest=default_manifest(n_problems=N_PROBLEMS))


@pytest.fixture(scope="module")
def own_router_run(trace, tmp_path_factory):
    """The 'Your own router' commands in a folder of their own (examples/ linked in, as from the repository)."""
    folder = tmp_path_factory.mktemp("own-router")
    (folder / "examples").symlink_to(ROOT / "examples")
    with contextlib.chdir(folder):
        printed = {line: run(line, trace) for line in commands(code_block("bash", "MinLogprob --sweep"))}
    return folder, printed


def table_cells(printed: str) -> list[list[str]]:
    """Body rows of a printed rich table, one line each (the tests print 200 columns wide)."""
    return [
        [cell.strip() for cell in line.strip().strip("│").split("│")]
        for line in printed.splitlines()
        if line.count("│") >= 3
    ]


def per_config(path: Path) -> dict[str, float]:
    """Accuracy (%) of each configuration of a results file, by its swept parameter as printed (name=value)."""
    frame = pl.read_parquet(path)
    accuracy = {}
    for (params,), rows in frame.group_by("params"):
        swept = {k: v for k, v in json.loads(params).items() if k in ("theta", "tau")}
        text = " ".join(f"{k}={v:g}" for k, v in swept.items())
        accuracy[text] = 100 * rows["correct"].drop_nulls().cast(pl.Float64).mean()
    return accuracy


def test_own_router_commands_print_the_results_files_numbers(own_router_run):
    folder, printed = own_router_run
    replays = [line for line in printed if line.startswith("trace replay")]
    assert len(replays) == 3
    for line in replays:
        out = folder / shlex.split(line)[shlex.split(line).index("--out") + 1]
        expected = per_config(out)
        rows = table_cells(printed[line])
        assert len(rows) >= 17  # 17 or 21 configurations (41, evenly thinned to 21)
        for params, accuracy, *_ in rows:
            assert float(accuracy.rstrip("*")) == pytest.approx(expected[params], abs=0.05), (line, params)
    report = (folder / "report" / "report.md").read_text()
    assert "## Summary" in report and all(name in report for name in ("min-logprob", "steer", "rsd"))


def test_python_example_gives_the_page_the_commands_give(trace, own_router_run, tmp_path, monkeypatch):
    folder, _ = own_router_run
    monkeypatch.chdir(folder)
    source = (
        code_block("python", 'api.replay("DIR"').replace('"DIR"', repr(str(trace))).replace("report-py/", str(tmp_path))
    )
    printed = io.StringIO()
    namespace: dict = {}
    with contextlib.redirect_stdout(printed):
        exec(compile(source, "README.md", "exec"), namespace)
    text = printed.getvalue()
    assert "shape: (17, " in text  # print(mine.summary()): one row per theta of -4:0:0.25
    assert f"shape: (5, {len(namespace['mine'].outcomes.columns)})" in text  # print(mine.outcomes.head())
    summary = namespace["mine"].summary()
    expected = per_config(folder / "results" / "min-logprob.parquet")
    for theta, accuracy in zip(summary["params"], summary["accuracy"]):
        assert 100 * accuracy == pytest.approx(expected[f"theta={json.loads(theta)['theta']:g}"])

    def section(markdown: str, title: str) -> str:
        return markdown.split(f"## {title}", 1)[1].split("\n## ", 1)[0]

    cli_page = (folder / "report" / "report.md").read_text()
    for title in ("Summary", "Significance against large-only"):
        assert section(namespace["page"].markdown, title) == section(cli_page, title)
    assert (tmp_path / "index.html").is_file()


# ---------------------------------------------------------------------- the SQL examples


def sql_rows(trace: Path, query: str, *files: str) -> list[list[str]]:
    args = ["sql", str(trace), query, *(x for name in files for x in ("--file", name))]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, (query, result.output)
    return table_cells(result.stdout)


def sql_queries() -> list[str]:
    return [query.strip() for query in code_block("sql", "small_steps_before_escalation").split("\n\n")]


def steps_of(trace: Path) -> pl.DataFrame:
    from tracestore.store import open_trace

    return open_trace(trace).scan("steps").collect()


def escalation_point(path: str) -> str:
    return "null" if "L" not in path else str(path.index("L"))


def test_sql_accuracy_and_tokens_by_escalation_point(trace):
    queries = sql_queries()
    assert len(queries) == 4
    steps = steps_of(trace)
    finals = steps.filter(pl.col("is_final"))
    by_point: dict[str, list] = {}
    for row in finals.iter_rows(named=True):
        by_point.setdefault(escalation_point(row["path"]), []).append(row)
    accuracy = sql_rows(trace, queries[0])
    assert [row[0] for row in accuracy] == sorted(by_point, key=lambda k: -1 if k == "null" else int(k))
    for point, trees, value in accuracy:
        rows = by_point[point]
        assert int(trees) == len(rows)
        assert float(value) == pytest.approx(sum(r["correct"] for r in rows) / len(rows), rel=1e-5)

    tokens = {(r["problem_id"], r["world"], r["path"]): r for r in steps.iter_rows(named=True)}
    for point, small, large in sql_rows(trace, queries[1]):
        rows = by_point[point]
        spent = {"small": 0, "large": 0}
        for final in rows:
            for end in range(1, len(final["path"]) + 1):
                step = tokens[(final["problem_id"], final["world"], final["path"][:end])]
                spent[step["model"]] += step["n_gen_tokens"]
        assert float(small) == pytest.approx(spent["small"] / len(rows), rel=1e-5)
        assert float(large) == pytest.approx(spent["large"] / len(rows), rel=1e-5)


def test_sql_steer_signal_by_depth(trace):
    steps = steps_of(trace)
    chain = steps.filter(pl.col("path").str.contains("^s+$"))
    right = {
        (r["problem_id"], r["world"]): r["correct"] for r in chain.filter(pl.col("is_final")).iter_rows(named=True)
    }
    printed = sql_rows(trace, sql_queries()[2])
    expected = {}
    for row in chain.iter_rows(named=True):
        key = (str(row["depth"]), str(right[(row["problem_id"], row["world"])]))  # printed as Python writes it
        expected.setdefault(key, []).append(row["conf_max_logit_math"])
    assert sorted((depth, correct) for depth, correct, *_ in printed) == sorted(expected)
    for depth, correct, count, mean in printed:
        values = expected[(depth, correct)]
        assert int(count) == len(values) and float(mean) == pytest.approx(sum(values) / len(values), rel=1e-5)


def test_sql_large_only_row_by_hand_matches_the_report(trace, own_router_run, tmp_path):
    large_only = tmp_path / "large-only.parquet"
    run(f"trace replay DIR --split all --router large-only --out {large_only}", trace)
    query = sql_queries()[3]
    assert "--file large_only=" in query  # the example names the file it reads
    [[problems, accuracy, tflops]] = sql_rows(trace, query, f"large_only={large_only}")
    results = pl.read_parquet(large_only).filter(pl.col("split") == "test")  # the report's rows
    assert int(problems) == results["problem_id"].n_unique()
    assert float(accuracy) == pytest.approx(results["correct"].cast(pl.Float64).mean(), rel=1e-5)
    steps = steps_of(trace).filter(
        pl.col("path").str.contains("^L+$") & pl.col("problem_id").is_in(results["problem_id"].unique().implode())
    )
    assert float(tflops) == pytest.approx(2 * 657408 * steps["n_gen_tokens"].sum() / int(problems) / 1e12, rel=1e-5)
    # and the report's large-only row (test split by default) has that accuracy
    folder, _ = own_router_run
    table = (folder / "report" / "report.md").read_text().split("## Routers at their operating points", 1)[1]
    row = next(line for line in table.splitlines() if line.startswith("| large-only"))
    assert float(row.split("|")[3].split()[0]) == pytest.approx(100 * float(accuracy), abs=0.05)
