"""`trace report` through the real CLI, on results that `trace replay` wrote for a hand-built comb trace.

Every number the tests expect is recomputed here from the results Parquet or the trace's steps, not
read from the report's own code.
"""

from __future__ import annotations

import json
import math
import re
import struct
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image
from tracebuild import build_trace, comb_steps, default_manifest
from typer.testing import CliRunner

from analysis.stats import bootstrap_counts
from cli import app
from tracestore.store import open_trace

runner = CliRunner()
N_PROBLEMS, N_WORLDS, N_STEPS = 30, 2, 3
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def routing_steps(n_problems: int = N_PROBLEMS, flip: bool = False) -> list[dict]:
    """Comb trees where a small step is sometimes 'bad' (low confidence, and the answer built on it is
    wrong) and the large model is right in 90% of (problem, world) trees. ``flip`` grades every final
    step the other way (a different trace with the same tree shapes)."""
    steps = []
    for i in range(n_problems):
        for world in range(N_WORLDS):
            rng = np.random.default_rng(1000 * i + world)
            bad = rng.random(N_STEPS) < 0.3
            large_right = rng.random() < 0.9

            def correct(path, bad=bad, large_right=large_right):
                right = not bad[: path.count("s")].any() and ("L" not in path or large_right)
                return right != flip

            for step in comb_steps(f"q{i:02d}", N_STEPS, world=world, correct=correct):
                if step["path"].endswith("s"):
                    depth = len(step["path"]) - 1
                    step["conf_max_logit_math"] = float(rng.normal(3.0, 0.7) if bad[depth] else rng.normal(8.0, 1.0))
                steps.append(step)
    return steps


def invoke(*args):
    return runner.invoke(app, [str(arg) for arg in args])


# report and choose on every row of the results, the train rows STEER was fitted on too
EVERY_ROW = ("--split", "all", "--pick-split", "reported", "--allow-overlap")
API = ("--cost", "api", "--price", "small=0", "--price", "large=gpt-4.1-mini")


def replay_to(trace, out, *args):
    result = invoke("replay", trace, *args, "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 30-problem, 2-world comb trace and the results of trace replay on it."""
    base = tmp_path_factory.mktemp("report")
    trace = build_trace(
        base / "trace", routing_steps(), manifest=default_manifest(n_problems=N_PROBLEMS, worlds=N_WORLDS)
    )
    return {
        "base": base,
        "trace": trace,
        # the bad step itself is the unconfident one here: only a router that rewrites it can repair it
        "steer": replay_to(
            trace,
            base / "steer.parquet",
            "--router",
            "steer",
            "--param",
            "escalate=replace",
            "--sweep",
            "tau=0:1:0.1",
            "--split",
            "all",
        ),
        "random": replay_to(
            trace, base / "random.parquet", "--router", "random", "--sweep", "p=0:1:0.25", "--split", "all"
        ),
        "oracle": replay_to(trace, base / "oracle.parquet", "--router", "oracle", "--split", "all"),
    }


@pytest.fixture(scope="module")
def main_report(inputs):
    out = inputs["base"] / "main-report"
    result = invoke(
        "report",
        inputs["trace"],
        inputs["steer"],
        inputs["random"],
        inputs["oracle"],
        "--out",
        out,
        "--bootstrap",
        200,
        "--seed",
        7,
        *EVERY_ROW,
    )
    assert result.exit_code == 0, result.output
    return out


# ---------------------------------------------------------------------- reading the report back


class ImageSources(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []
        self.generator = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.sources.append(attrs["src"])
        if tag == "meta" and attrs.get("name") == "generator":
            self.generator = attrs.get("content")


def page_images(folder: Path) -> list[str]:
    parser = ImageSources()
    parser.feed((folder / "index.html").read_text())
    assert parser.generator == "trace report"
    return parser.sources


def check_png(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size == (width, height)
        pixels = np.asarray(image.convert("L"))
    assert width >= 600 and height >= 300 and len(data) > 10_000, (path, width, height, len(data))
    assert pixels.std() > 10  # not a blank canvas
    return width, height


def md_tables(markdown: str) -> list[list[list[str]]]:
    """Every Markdown table as rows of cells (header row first, separator row dropped)."""
    tables, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|-: "):
                current.append([cell.strip() for cell in line.strip("|").split(" | ")])
        elif current:
            tables.append(current)
            current = []
    return tables


def table_after(markdown: str, heading: str, index: int = 0) -> dict[str, list[str]]:
    section = markdown.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    table = md_tables(section)[index]
    return {row[0]: row[1:] for row in table}


def number(cell: str) -> float:
    return float(cell.split()[0].rstrip("%"))


def interval(cell: str) -> tuple[float, float]:
    low, high = cell.split("[", 1)[1].rstrip("]").split(", ")
    return float(low), float(high)


# ---------------------------------------------------------------------- independent expectations


def trace_steps(trace) -> pl.DataFrame:
    return open_trace(trace).scan("steps").collect()


def single_model(trace, char: str) -> pl.DataFrame:
    """(problem_id, world, correct) of one model's solution alone from the root."""
    return trace_steps(trace).filter(pl.col("path") == char * N_STEPS).select("problem_id", "world", "correct")


def per_config(results: Path) -> pl.DataFrame:
    frame = pl.read_parquet(results)
    return (
        frame.group_by("config")
        .agg(
            tau=pl.col("params").first(),
            misses=pl.col("misses").sum(),
            accuracy=pl.col("correct").drop_nulls().cast(pl.Float64).mean(),
            cost=pl.col("cost").filter(pl.col("misses") == 0).mean(),
        )
        .with_columns(a_over_c=100 * pl.col("accuracy") / pl.col("cost"))  # % per cost unit
        .sort("config")
    )


def chosen_by_ac(results: Path, floor: float) -> int:
    configs = per_config(results).filter((pl.col("misses") == 0) & (pl.col("accuracy") >= floor - 1e-12))
    best = max(configs.iter_rows(named=True), key=lambda r: (r["a_over_c"], r["accuracy"], -r["cost"], -r["config"]))
    return best["config"]


def tau_of(results: Path, config: int) -> float:
    return json.loads(pl.read_parquet(results).filter(pl.col("config") == config)["params"][0])["tau"]


# ---------------------------------------------------------------------- tests


def test_page_references_valid_pngs_and_the_markdown_twin_matches(main_report):
    sources = page_images(main_report)
    assert sources == ["pareto.png", "escalation.png"]
    for source in sources:
        assert not Path(source).is_absolute()
        check_png(main_report / source)
    markdown = (main_report / "report.md").read_text()
    assert [line for line in markdown.splitlines() if line.startswith("![")] == [
        "![Accuracy against mean cost per query](pareto.png)",
        "![Share of large-model steps by step index](escalation.png)",
    ]
    html = (main_report / "index.html").read_text()
    assert "<table>" in html and "Routers at their operating points" in html
    assert sorted(p.name for p in main_report.iterdir()) == ["escalation.png", "index.html", "pareto.png", "report.md"]


def per_tflops(markdown: str) -> float:
    """How many of the main table's cost units make one TFLOP (its header names the unit chosen for the data)."""
    header = md_tables(markdown.split("## Routers at their operating points", 1)[1])[0][0]
    unit = re.search(r"Cost \((\w*)FLOPs per query\)", " ".join(header)).group(1)
    return {"T": 1.0, "G": 1e3, "M": 1e6, "k": 1e9, "": 1e12}[unit]


def test_table_numbers_come_from_the_results_and_the_trace(inputs, main_report):
    markdown = (main_report / "report.md").read_text()
    table = table_after(markdown, "Routers at their operating points")
    scale = per_tflops(markdown)

    large = single_model(inputs["trace"], "L")
    small = single_model(inputs["trace"], "s")
    large_accuracy = large["correct"].mean()
    assert number(table["large-only"][1]) == pytest.approx(100 * large_accuracy, abs=0.05)
    assert number(table["small-only"][1]) == pytest.approx(100 * small["correct"].mean(), abs=0.05)
    assert table["large-only"][5].startswith("100.0") and table["small-only"][5].startswith("0.0")
    assert number(table["large-only"][4]) == 1.0  # A/C as a multiple of large-only's

    chosen = chosen_by_ac(inputs["steer"], large_accuracy - 0.02)
    configs = per_config(inputs["steer"]).filter(pl.col("config") == chosen).row(0, named=True)
    large_cost = per_config(replay_to(inputs["trace"], inputs["base"] / "large.parquet", "--router", "large-only",
                                      "--split", "all"))["cost"][0]  # fmt: skip
    assert table["steer"][0] == f"tau={tau_of(inputs['steer'], chosen):g}"
    assert number(table["steer"][1]) == pytest.approx(100 * configs["accuracy"], abs=0.05)
    assert table["steer"][2] == table["steer"][1]  # picked on the reported rows: the same accuracy there
    assert number(table["steer"][3]) == pytest.approx(scale * configs["cost"], rel=5e-3)  # three significant digits
    assert number(table["large-only"][3]) == pytest.approx(scale * large_cost, rel=5e-3)
    assert number(table["steer"][4]) == pytest.approx(
        configs["a_over_c"] / (100 * large_accuracy / large_cost), rel=5e-3
    )
    assert table["steer"][6] == "0"
    # the random sweep's middle configurations miss (the comb lacks mixed paths): never chosen
    random_pick = (
        per_config(inputs["random"])
        .filter(pl.col("config") == chosen_by_ac(inputs["random"], large_accuracy - 0.02))
        .row(0, named=True)
    )
    assert random_pick["misses"] == 0 and json.loads(random_pick["tau"])["p"] in (0.0, 1.0)
    assert (
        "highest A/C at or above the floor; 11 of 11 configurations without misses; "
        "grid tau 0 to 1 in steps of 0.1 (11 values) (steer.parquet)"
    ) in markdown
    assert f"large-only accuracy {100 * large_accuracy:.1f}% minus 2 points" in markdown

    # rows: within the floor by cost, then the rest by cost (no router here missed at its operating point)
    accuracy = {router: number(cells[1]) for router, cells in table.items() if router != "Router"}
    cost = {router: number(table[router][3]) for router in accuracy}
    within = sorted((r for r in accuracy if accuracy[r] >= 100 * large_accuracy - 2 - 1e-9), key=cost.get)
    below = sorted((r for r in accuracy if r not in within), key=cost.get)
    assert list(table)[1:] == within + below and "small-only" in below and "large-only" in within


def test_bootstrap_interval_resamples_problems_with_their_worlds(inputs, main_report):
    markdown = (main_report / "report.md").read_text()
    row = table_after(markdown, "Routers at their operating points")["steer"]
    chosen = chosen_by_ac(inputs["steer"], single_model(inputs["trace"], "L")["correct"].mean() - 0.02)
    outcomes = pl.read_parquet(inputs["steer"]).filter(pl.col("config") == chosen)
    problems = sorted(outcomes["problem_id"].unique().to_list())
    by_problem = {pid: outcomes.filter(pl.col("problem_id") == pid) for pid in problems}
    accuracies = []
    for counts in bootstrap_counts(len(problems), 200, seed=7):
        drawn = pl.concat([by_problem[pid] for pid, n in zip(problems, counts) for _ in range(int(n))])
        accuracies.append(drawn["correct"].cast(pl.Float64).mean())
    low, high = np.percentile(accuracies, [2.5, 97.5])
    assert interval(row[1]) == pytest.approx((round(100 * low, 1), round(100 * high, 1)), abs=0.051)
    assert interval(row[1])[0] < number(row[1]) < interval(row[1])[1]


def test_significance_against_large_only_takes_the_problem_as_the_unit_with_two_worlds(inputs, main_report):
    markdown = (main_report / "report.md").read_text()
    table = table_after(markdown, "Significance against large-only (paired permutation over problems)")
    large = single_model(inputs["trace"], "L").rename({"correct": "large"})
    small = single_model(inputs["trace"], "s").join(large, on=["problem_id", "world"])
    b = int((small["correct"] & ~small["large"]).sum())
    c = int((~small["correct"] & small["large"]).sum())
    pairs, only_small, only_large, test, statistic, p_value, significant = table["small-only"]
    assert (int(pairs), int(only_small), int(only_large)) == (N_PROBLEMS * N_WORLDS, b, c)
    assert test == f"paired permutation over {N_PROBLEMS} problems"
    by_problem = small.group_by("problem_id").agg((pl.col("correct").mean() - pl.col("large").mean()).alias("d"))
    assert float(statistic) == pytest.approx(by_problem["d"].mean(), rel=5e-3)  # three significant digits
    assert 0 < float(p_value) <= 1 and significant == ("yes" if float(p_value) < 0.05 else "no")
    assert "large-only" not in table and set(table) == {"Router", "small-only", "steer", "random", "oracle"}


def test_mcnemar_against_large_only_is_paired_on_problem_and_world_with_one_world(inputs, tmp_path):
    trace = inputs["trace"]
    small = replay_to(trace, tmp_path / "small.parquet", "--router", "small-only", "--split", "all", "--worlds", "0")
    result = invoke("report", trace, small, "--out", tmp_path / "r", "--bootstrap", 20, *EVERY_ROW)
    assert result.exit_code == 0, result.output
    table = table_after((tmp_path / "r" / "report.md").read_text(), "Significance against large-only (McNemar)")
    large = single_model(trace, "L").rename({"correct": "large"}).filter(pl.col("world") == 0)
    small = single_model(trace, "s").join(large, on=["problem_id", "world"])
    b = int((small["correct"] & ~small["large"]).sum())
    c = int((~small["correct"] & small["large"]).sum())
    pairs, only_small, only_large, test, statistic, p_value, significant = table["small-only"]
    assert (int(pairs), int(only_small), int(only_large)) == (N_PROBLEMS, b, c)
    if b + c < 25:
        expected = min(1.0, 2 * sum(math.comb(b + c, i) for i in range(min(b, c) + 1)) / 2 ** (b + c))
        assert test == "exact binomial"
    else:
        chi_square = (abs(b - c) - 1) ** 2 / (b + c)
        expected = math.erfc(math.sqrt(chi_square / 2))
        assert test.startswith("chi-square") and float(statistic) == pytest.approx(chi_square, rel=5e-3)
    assert float(p_value) == pytest.approx(expected, rel=5e-3)  # three significant digits
    assert significant == ("yes" if expected < 0.05 else "no")


def test_escalation_shares_by_step_index_come_from_the_walks_paths(inputs, main_report):
    markdown = (main_report / "report.md").read_text()
    table = table_after(markdown, "Where escalations happen")
    assert table["Router"] == ["Finished walks", "Walks with a large step", "Median first index", "0", "1", "2"]
    assert {"steer", "random", "oracle"} == set(table) - {"Router"}
    oracle = pl.read_parquet(inputs["oracle"])
    paths = oracle.filter(pl.col("misses") == 0)["path"].to_list()
    for depth in range(N_STEPS):
        reaching = [path for path in paths if len(path) > depth]
        share = sum(path[depth] == "L" for path in reaching) / len(reaching)
        assert table["oracle"][3 + depth] == f"{100 * share:.1f} ({len(reaching)})"
    escalated = [path.index("L") for path in paths if "L" in path]
    assert table["oracle"][:2] == [str(len(paths)), f"{len(escalated)} ({100 * len(escalated) / len(paths):.1f}%)"]
    assert table["oracle"][2] == f"{float(np.median(escalated)):g}"


def test_rerun_gives_identical_files(inputs, main_report, tmp_path):
    again = tmp_path / "again"
    for out in (again, main_report):
        result = invoke(
            "report",
            inputs["trace"],
            inputs["steer"],
            inputs["random"],
            inputs["oracle"],
            "--out",
            out,
            "--bootstrap",
            200,
            "--seed",
            7,
        )
        assert result.exit_code == 0, result.output
    for name in ("report.md", "index.html", "pareto.png", "escalation.png"):
        assert (again / name).read_bytes() == (main_report / name).read_bytes(), name
    other_seed = tmp_path / "other-seed"
    assert (
        invoke(
            "report", inputs["trace"], inputs["steer"], "--out", other_seed, "--bootstrap", 200, "--seed", 8
        ).exit_code
        == 0
    )
    assert (other_seed / "report.md").read_text() != (again / "report.md").read_text()


def write_policy_log(path: Path) -> Path:
    step = np.arange(0, 200, 2)
    coverage = 0.9 + 0.08 * (1 - np.exp(-step / 40))
    kappa = 0.5 + 0.3 * np.exp(-step / 60)
    pl.DataFrame(
        {
            "step": step,
            "coverage": coverage,
            "kappa": kappa,
            "alpha": np.full(step.size, 0.05),
            "reward_loss": np.linspace(1, 0.1, step.size),
        }
    ).write_parquet(path)
    return path


TRAIN_IDS = [f"q{i:02d}" for i in range(0, N_PROBLEMS, 2)]
STEER_MIXTURES = {
    "format": "trace-steer",
    "version": 1,
    "signal": "conf_max_logit_math",
    "train_problem_ids": TRAIN_IDS,
    "mixtures": [
        {"depth": 0, "n": 30, "weights": [0.3, 0.7], "means": [3.0, 8.0], "variances": [0.49, 1.0], "low_component": 0},
        {
            "depth": 1,
            "n": 30,
            "weights": [0.75, 0.25],
            "means": [8.1, 2.9],
            "variances": [1.1, 0.5],
            "low_component": 1,
        },
        {
            "depth": 2,
            "n": 30,
            "weights": [0.35, 0.65],
            "means": [3.2, 7.9],
            "variances": [0.6, 0.9],
            "low_component": 0,
        },
    ],
}


def test_policy_and_steer_sections_appear_only_when_given(inputs, tmp_path):
    log = write_policy_log(tmp_path / "policy.pt.log.parquet")
    mixtures = tmp_path / "steer.json"
    mixtures.write_text(json.dumps(STEER_MIXTURES))
    out = tmp_path / "report"
    result = invoke(
        "report",
        inputs["trace"],
        inputs["steer"],
        "--out",
        out,
        "--bootstrap",
        50,
        "--policy-log",
        log,
        "--steer-gmm",
        mixtures,
    )
    assert result.exit_code == 0, result.output
    assert page_images(out) == ["pareto.png", "escalation.png", "policy_training.png", "steer_mixtures.png"]
    for name in ("policy_training.png", "steer_mixtures.png"):
        check_png(out / name)
    markdown = (out / "report.md").read_text()
    policy = table_after(markdown, "Policy training")["policy.pt.log.parquet"]  # no policy router: the file's name
    assert policy[:3] == ["`policy.pt.log.parquet`", "100 (steps 0-198)", "0.95 (alpha 0.05, from the log)"]
    assert float(policy[-1]) == pytest.approx(0.5 + 0.3 * math.exp(-198 / 60), abs=1e-4)
    steer_table = table_after(markdown, "STEER confidence mixtures")
    small_at = (
        trace_steps(inputs["trace"])
        .filter((pl.col("model") == "small") & pl.col("problem_id").is_in(TRAIN_IDS))
        .group_by("depth")
        .len()
    )
    for depth, expected in [
        (0, (3.0, 0.7, 0.3, 8.0, 1.0)),
        (1, (2.9, math.sqrt(0.5), 0.25, 8.1, math.sqrt(1.1))),
        (2, (3.2, math.sqrt(0.6), 0.35, 7.9, math.sqrt(0.9))),
    ]:
        n, *numbers, note = steer_table[str(depth)]
        assert note == ""  # 30 samples, no collapsed component: no warning
        assert int(n) == small_at.filter(pl.col("depth") == depth)["len"][0] == 30
        assert [float(x) for x in numbers] == pytest.approx(expected, abs=1e-3)
    assert "of the 15 train problems the file lists" in markdown

    # the same folder again without them: their sections and figures go, a file of the user's stays
    (out / "notes.txt").write_text("mine")
    assert (
        invoke("report", inputs["trace"], inputs["steer"], "--out", out, "--bootstrap", 50, *EVERY_ROW).exit_code == 0
    )
    assert "## Policy training" not in (out / "report.md").read_text()
    assert "## STEER" not in (out / "report.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == [
        "escalation.png",
        "index.html",
        "notes.txt",
        "pareto.png",
        "report.md",
    ]


def test_policy_alpha_defaults_to_the_seed_value_or_the_option(inputs, tmp_path):
    log = tmp_path / "p.log.parquet"
    pl.DataFrame({"step": [0, 1, 2], "coverage": [0.9, 0.95, 0.97], "kappa": [0.5, 0.45, 0.42]}).write_parquet(log)
    for extra, expected in [((), "alpha 0.02, the policy seed's default"), (("--alpha", 0.1), "alpha 0.1, given")]:
        out = tmp_path / f"r{len(extra)}"
        result = invoke(
            "report", inputs["trace"], inputs["steer"], "--out", out, "--bootstrap", 20, "--policy-log", log, *extra
        )
        assert result.exit_code == 0, result.output
        assert expected in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "options, expected",
    [
        (["--pick", "cheapest"], "cheapest"),
        (["--pick", "accuracy"], "accuracy"),
        (["--accuracy-floor", "0.5"], "floor"),
        (["--at", "steer:tau=0.3"], "pinned"),
    ],
)
def test_pick_rules_choose_the_documented_configuration(inputs, tmp_path, options, expected):
    out = tmp_path / "r"
    result = invoke("report", inputs["trace"], inputs["steer"], "--out", out, "--bootstrap", 20, *EVERY_ROW, *options)
    assert result.exit_code == 0, result.output
    markdown = (out / "report.md").read_text()
    configs = per_config(inputs["steer"]).with_columns(
        tau=pl.col("tau").map_elements(lambda text: json.loads(text)["tau"], return_dtype=pl.Float64)
    )
    large_accuracy = single_model(inputs["trace"], "L")["correct"].mean()
    meeting = configs.filter(pl.col("accuracy") >= large_accuracy - 0.02 - 1e-12)
    if expected == "cheapest":
        row = min(meeting.iter_rows(named=True), key=lambda r: (r["cost"], -r["accuracy"], r["config"]))
    elif expected == "accuracy":
        row = min(configs.iter_rows(named=True), key=lambda r: (-r["accuracy"], r["cost"], r["config"]))
    elif expected == "floor":
        row = configs.filter(pl.col("config") == chosen_by_ac(inputs["steer"], 0.5)).row(0, named=True)
        assert "accuracy at least the floor (50.0% accuracy)" in markdown
    else:
        row = configs.filter((pl.col("tau") - 0.3).abs() < 1e-9).row(0, named=True)
        assert "pinned with --at steer:tau=0.3" in markdown
    assert table_after(markdown, "Routers at their operating points")["steer"][0] == f"tau={row['tau']:g}"


def test_by_default_operating_points_are_chosen_on_calibration_and_reported_on_test(inputs, tmp_path):
    out = tmp_path / "r"
    result = invoke(
        "report", inputs["trace"], inputs["steer"], "--out", out, "--bootstrap", 20, "--accuracy-floor", "large"
    )
    assert result.exit_code == 0, result.output
    markdown = (out / "report.md").read_text()
    outcomes = pl.read_parquet(inputs["steer"])
    test_rows = outcomes.filter((pl.col("split") == "test") & (pl.col("config") == 0))
    assert f"Evaluated on split test: {test_rows['problem_id'].n_unique()} problems, {test_rows.height} " in markdown
    assert "chosen on rows of split calibration, not the reported ones" in " ".join(markdown.split())
    calibration = outcomes.filter(pl.col("split") == "calibration")
    large = single_model(inputs["trace"], "L").join(calibration.select("problem_id").unique(), on="problem_id")
    by_config = (
        calibration.group_by("config")
        .agg(accuracy=pl.col("correct").cast(pl.Float64).mean(), cost=pl.col("cost").mean())
        .filter(pl.col("accuracy") >= large["correct"].mean() - 1e-12)
        .with_columns(a_over_c=100 * pl.col("accuracy") / pl.col("cost"))  # % per cost unit
    )
    best = max(by_config.iter_rows(named=True), key=lambda r: (r["a_over_c"], r["accuracy"], -r["cost"], -r["config"]))
    steer_row = table_after(markdown, "Routers at their operating points")["steer"]
    assert steer_row[0] == f"tau={tau_of(inputs['steer'], best['config']):g}"
    chosen_test = outcomes.filter((pl.col("split") == "test") & (pl.col("config") == best["config"]))
    assert number(steer_row[1]) == pytest.approx(100 * chosen_test["correct"].cast(pl.Float64).mean(), abs=0.05)


def test_api_costs_need_the_baselines_as_results_files(inputs, tmp_path):
    trace = inputs["trace"]
    steer = replay_to(trace, tmp_path / "steer-api.parquet", "--router", "steer", *API, "--split", "all")
    out = tmp_path / "r"
    refused = invoke("report", trace, steer, "--out", out)
    assert refused.exit_code == 1 and "whose prices they do not record" in " ".join(refused.stderr.split())
    assert not out.exists()
    small = replay_to(trace, tmp_path / "small-api.parquet", "--router", "small-only", *API, "--split", "all")
    large = replay_to(trace, tmp_path / "large-api.parquet", "--router", "large-only", *API, "--split", "all")
    result = invoke("report", trace, steer, small, large, "--out", out, "--bootstrap", 20, *EVERY_ROW)
    assert result.exit_code == 0, result.output
    markdown = (out / "report.md").read_text()
    assert (
        "Cost (US cents per query)" in markdown
        and "- large-only: its only configuration (large-api.parquet)" in markdown
    )
    assert "Every router has a single configuration" in markdown
    large_cost = pl.read_parquet(large)["cost"].mean()
    assert number(table_after(markdown, "Routers at their operating points")["large-only"][3]) == pytest.approx(
        large_cost, rel=1e-3
    )


def test_an_unrelated_folder_is_never_overwritten(inputs, tmp_path):
    unrelated = tmp_path / "data"
    unrelated.mkdir()
    (unrelated / "report.md").write_text("someone's notes")
    result = invoke("report", inputs["trace"], inputs["steer"], "--out", unrelated)
    assert result.exit_code == 1 and "not a trace report" in " ".join(result.stderr.split())
    assert [p.name for p in unrelated.iterdir()] == ["report.md"]
    assert (unrelated / "report.md").read_text() == "someone's notes"
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    result = invoke("report", inputs["trace"], inputs["steer"], "--out", a_file)
    assert result.exit_code == 1 and "is not a folder" in result.stderr and a_file.read_text() == "x"


def test_bad_input_is_one_line_exit_1_and_nothing_written(inputs, tmp_path):
    trace = inputs["trace"]
    not_parquet = tmp_path / "notes.parquet"
    not_parquet.write_text("hello")
    steps_part = open_trace(trace).files("steps")[0]
    other = build_trace(tmp_path / "other", routing_steps(flip=True), manifest=default_manifest())
    fewer = build_trace(tmp_path / "fewer", routing_steps(n_problems=5), manifest=default_manifest())
    world0 = replay_to(trace, tmp_path / "world0.parquet", "--router", "oracle", "--split", "all", "--worlds", "0")
    text_grades = tmp_path / "text-grades.parquet"
    pl.read_parquet(inputs["steer"]).with_columns(pl.col("correct").cast(pl.String)).write_parquet(text_grades)
    empty = tmp_path / "empty.parquet"
    pl.read_parquet(inputs["steer"]).head(0).write_parquet(empty)
    bad_log = tmp_path / "bad.log.parquet"
    pl.DataFrame({"step": [1, 2], "loss": [0.5, 0.4]}).write_parquet(bad_log)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text(
        json.dumps(
            {
                **STEER_MIXTURES,
                "mixtures": [{"depth": 0, "weights": [1.0], "means": [3.0], "variances": [1.0], "low_component": 0}],
            }
        )
    )
    not_steer = tmp_path / "not-steer.json"
    not_steer.write_text(json.dumps({"mixtures": []}))
    steer = inputs["steer"]
    cases = [
        ([trace, tmp_path / "absent.parquet"], "does not exist"),
        ([tmp_path / "no-trace", steer], "does not exist"),
        ([trace, not_parquet], "is not a readable Parquet file"),
        ([trace, steps_part], "is not a trace replay result: it lacks column(s) router, params, config"),
        ([trace, text_grades], "is not a trace replay result: column correct holds String, not booleans"),
        ([trace, empty], "holds no outcomes"),
        ([other, steer], "results from a different trace?"),
        ([fewer, steer], "is not in trace"),
        ([trace, steer, world0], "does not cover the same 60 (problem, world) walks"),
        ([trace, steer, "--policy-log", bad_log], "is not a policy training log: it lacks column(s) coverage, kappa"),
        ([trace, steer, "--policy-log", tmp_path / "none.log.parquet"], "does not exist"),
        ([trace, steer, "--steer-gmm", bad_json], "mixture 0 needs depth, low_component (0 or 1) and two weights"),
        ([trace, steer, "--steer-gmm", not_steer], "is not a STEER mixture file (no format 'trace-steer'"),
        ([trace, steer, "--steer-gmm", not_parquet], "is not JSON"),
        ([trace, steer, "--pick", "best"], "--pick must be one of ac, cheapest, accuracy"),
        ([trace, steer, "--accuracy-floor", "1.5"], "--accuracy-floor must be"),
        ([trace, steer, "--at", "steer:tau=0.33"], "0 configurations of steer match"),
        ([trace, steer, "--at", "stir:tau=0.3"], "no router is called 'stir'"),
        ([trace, steer, "--at", "steer"], "--at must look like"),
        ([trace, steer, "--split", "dev"], "unknown split 'dev'"),
    ]
    out = tmp_path / "out"
    for args, message in cases:
        result = invoke("report", *args, "--out", out)
        assert result.exit_code == 1, (args, result.output)
        assert message in " ".join(result.stderr.split()), (args, result.stderr)
        assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) <= 3, result.stderr
        assert not out.exists(), args
    # a failed run leaves an earlier report as it was
    assert invoke("report", trace, steer, "--out", out, "--bootstrap", 20, *EVERY_ROW).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert invoke("report", trace, not_parquet, "--out", out).exit_code == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_steer_section_reads_the_file_the_steer_router_saves(inputs, tmp_path):
    from replay.artifacts import load_train_split
    from replay.routers.steer import Steer

    train = load_train_split(inputs["trace"], 0, (0.5, 0.1, 0.4))
    router = Steer(min_samples=5).fit(train)
    saved = tmp_path / "steer.json"
    router.save(saved)
    out = tmp_path / "r"
    result = invoke(
        "report", inputs["trace"], inputs["steer"], "--out", out, "--bootstrap", 20, "--steer-gmm", saved, *EVERY_ROW
    )
    assert result.exit_code == 0, result.output
    check_png(out / "steer_mixtures.png")
    table = table_after((out / "report.md").read_text(), "STEER confidence mixtures")
    assert [int(key) for key in table if key != "Step index"] == sorted(router.mixtures_)
    for depth, mixture in router.mixtures_.items():
        low = router.low_component_[depth]
        n, low_mean, _, low_weight, high_mean, _, _ = table[str(depth)]
        assert int(n) == router.n_samples_[depth]  # the histogram holds exactly the confidences it was fitted on
        assert float(low_mean) == pytest.approx(mixture.means_[low, 0], rel=1e-3)
        assert float(high_mean) == pytest.approx(mixture.means_[1 - low, 0], rel=1e-3)
        assert float(low_weight) == pytest.approx(mixture.weights_[low], abs=1e-3)


@pytest.mark.parametrize(
    "costs, log",
    [([1.0, 5.0], False), ([1.0, 20.0], True), ([0.0, 20.0], False), ([2.0, np.nan, 30.0], True), ([], False)],
)
def test_pareto_cost_axis_turns_logarithmic_past_a_factor_ten(costs, log):
    from analysis.plots import wants_log_cost_axis

    assert wants_log_cost_axis(np.array(costs, dtype=float)) is log


def test_choosing_on_the_reported_rows_is_labelled_and_test_only_results_are_refused(inputs, tmp_path):
    out = tmp_path / "r"
    labelled = invoke("report", inputs["trace"], inputs["steer"], "--out", out, "--bootstrap", 20, *EVERY_ROW)
    assert labelled.exit_code == 0, labelled.output
    assert "the reported rows themselves (which flatters threshold routers)" in (out / "report.md").read_text()
    test_only = replay_to(inputs["trace"], tmp_path / "test.parquet", "--router", "steer", "--sweep", "tau=0:1:0.5")
    refused = invoke("report", inputs["trace"], test_only, "--out", tmp_path / "r2")
    message = " ".join(refused.stderr.split())
    assert refused.exit_code == 1 and "hold no problems of split 'calibration': replay with --split all" in message
    assert not (tmp_path / "r2").exists()


def test_the_seeds_tables_come_from_the_report_numbers(inputs, tmp_path):
    trace = inputs["trace"]
    cascade = replay_to(
        trace,
        tmp_path / "cascade.parquet",
        "--router",
        "cascade",
        "--param",
        "pik=false",
        "--param",
        "p_true=final_min",
        "--sweep",
        "t_true=0:1:0.5",
        "--split",
        "all",
    )
    out = tmp_path / "r"
    result = invoke(
        "report",
        trace,
        inputs["steer"],
        inputs["oracle"],
        cascade,
        "--out",
        out,
        "--bootstrap",
        20,
        "--table",
        "cmdp",
        "--table",
        "cascade",
        *EVERY_ROW,
    )
    assert result.exit_code == 0, result.output
    markdown = (out / "report.md").read_text()
    main = table_after(markdown, "Routers at their operating points")
    scale = per_tflops(markdown)

    cmdp = pl.read_csv(out / "table_cmdp.csv")
    assert cmdp["method"].to_list() == ["small-only", "large-only", "steer", "oracle", "cascade"]  # the seed's order
    for row in cmdp.iter_rows(named=True):
        assert row["accuracy_pct"] == pytest.approx(number(main[row["method"]][1]), abs=0.05)
        assert row["cost_tflops"] == pytest.approx(number(main[row["method"]][3]) / scale, rel=5e-3)
        assert row["a_over_c"] == pytest.approx(100 * row["accuracy_pct"] / 100 / row["cost_tflops"], rel=1e-6)
    assert (out / "table_cmdp.md").read_text().startswith("## The CMDP seed's layout")

    table = pl.read_csv(out / "table_cascade.csv")
    large, small = (single_model(trace, char) for char in ("L", "s"))
    assert table.row(0, named=True)["accuracy_pct"] == pytest.approx(100 * small["correct"].mean())
    assert table.row(1, named=True)["pd_points"] is None  # a model alone has no M_k to compare with ("–")
    outcomes = pl.read_parquet(cascade)
    chosen = table.filter(pl.col("kind") == "without P(IK)").row(0, named=True)
    t_true = float(re.search(r"t_true=([0-9.]+)", chosen["operating_point"]).group(1))
    config = outcomes.filter(pl.col("params").str.contains(f'"t_true": {t_true}'))
    accuracy, cost = config["correct"].cast(pl.Float64).mean(), config["cost"].mean()
    large_only_cost = per_config(
        replay_to(trace, tmp_path / "large.parquet", "--router", "large-only", "--split", "all")
    )["cost"][0]
    assert number(main["large-only"][3]) / scale == pytest.approx(large_only_cost, rel=5e-3)
    assert chosen["chain"] == "small → large"
    assert chosen["pd_points"] == pytest.approx(100 * (accuracy - large["correct"].mean()))
    assert chosen["reduced_cost_pct"] == pytest.approx(100 * (1 - cost / large_only_cost), rel=1e-3)
    # eq. (6): 2·N of the model whose answer each walk kept, against 2·N_large for every walk
    sizes = open_trace(trace).manifest.n_params
    answered_small = config["path"].str.ends_with("s").sum()
    cc = answered_small * sizes["small"] + (config.height - answered_small) * sizes["large"]
    assert chosen["reduced_cc_pct"] == pytest.approx(100 * (1 - cc / (config.height * sizes["large"])))
    sensitivity = table.filter(pl.col("kind").str.ends_with("P(T) sensitivity"))
    assert sensitivity.height == 2  # the other two t_true values of the sweep
    assert "## The cascade seed's layout" in markdown


def test_every_figure_names_its_series_once_each_with_a_distinct_look(inputs, tmp_path):
    from analysis.report import report

    built = report(
        inputs["trace"], [inputs["steer"], inputs["random"], inputs["oracle"]], out=tmp_path / "r", bootstrap=20,
        split="all", pick_split="reported", allow_overlap=True,
    )  # fmt: skip
    assert page_images(tmp_path / "r") == list(built.figure_series) == ["pareto.png", "escalation.png"]
    for name in built.figure_series:
        check_png(tmp_path / "r" / name)
    expected = {
        "pareto.png": ["oracle", "steer", "large-only", "random", "small-only"],  # the table's order
        "escalation.png": ["oracle", "steer", "random"],
    }
    table = table_after(built.markdown, "Routers at their operating points")
    assert list(table)[1:] == expected["pareto.png"]
    for name, series in built.figure_series.items():
        assert [label for label, _, _ in series] == expected[name], name
        looks = [(colour, marker) for _, colour, marker in series]
        assert len(set(looks)) == len(looks), (name, series)
    # print(report) is a line, not the figures' bytes
    text = repr(built)
    assert len(text) < 300 and "pareto.png" in text and "PNG" not in text


def test_series_styles_never_repeat_a_colour_and_marker_within_a_figure():
    from analysis.plots import series_styles

    kinds = ["small", "large"] + ["router"] * 40
    styles = series_styles(kinds)
    assert len({(style.color, style.marker) for style in styles}) == len(kinds)


def test_a_steer_fit_on_few_samples_or_a_collapsed_component_is_flagged(inputs, tmp_path):
    mixtures = json.loads(json.dumps(STEER_MIXTURES))
    low = mixtures["mixtures"][1]["low_component"]
    mixtures["mixtures"][1]["variances"][low] = 1e-6  # a spike of sd 0.001 at step index 1
    path = tmp_path / "steer.json"
    path.write_text(json.dumps(mixtures))
    out = tmp_path / "r"
    result = invoke(
        "report", inputs["trace"], inputs["steer"], "--out", out, "--bootstrap", 20, "--steer-gmm", path, *EVERY_ROW
    )
    assert result.exit_code == 0, result.output
    markdown = (out / "report.md").read_text()
    notes = {depth: cells[-1] for depth, cells in table_after(markdown, "STEER confidence mixtures").items()}
    assert notes["0"] == "" and notes["2"] == ""  # 30 samples each, no spike
    assert notes["1"].startswith("⚠") and "low-confidence component collapsed (sd 0.00100)" in notes["1"]
    assert "**Warning:** the mixture of step index 1 is doubtful" in markdown
    # fewer than 30 confidences: the train problems listed are the first 5 only (each step index: 5 small steps)
    mixtures = json.loads(json.dumps(STEER_MIXTURES))
    mixtures["train_problem_ids"] = TRAIN_IDS[:5]
    path.write_text(json.dumps(mixtures))
    result = invoke(
        "report", inputs["trace"], inputs["steer"], "--out", out, "--bootstrap", 20, "--steer-gmm", path, *EVERY_ROW
    )
    assert result.exit_code == 0, result.output
    table = table_after((out / "report.md").read_text(), "STEER confidence mixtures")
    for depth, cells in table.items():
        if depth != "Step index":
            assert int(cells[0]) < 30 and f"{cells[0]} samples (fewer than 30)" in cells[-1]


def test_every_policy_gets_its_training_curve(inputs, tmp_path):
    from types import SimpleNamespace

    from analysis.report import report
    from analysis.training_sections import find_policy_logs

    # the log beside each replayed policy file is found and labelled by its router; a missing one is named
    write_policy_log(tmp_path / "after.log.parquet")
    runs = [
        SimpleNamespace(router="policy", params={0: {"path": str(tmp_path / name)}}, label=label)
        for name, label in [("after.pt", "policy (escalate=after)"), ("replace.pt", "policy (escalate=replace)")]
    ]
    logs, unmatched = find_policy_logs((), [*runs, SimpleNamespace(router="steer", params={0: {}}, label="s")], None)
    assert [(log.label, log.path.name) for log in logs] == [("policy (escalate=after)", "after.log.parquet")]
    assert unmatched == [f"policy (escalate=replace) (looked for {(tmp_path / 'replace.log.parquet').resolve()})"]

    # two logs: two curves, each its own look, and a row each
    logs = [write_policy_log(tmp_path / f"{name}.log.parquet") for name in ("first", "second")]
    built = report(
        inputs["trace"],
        [inputs["steer"]],
        policy_log=logs,
        bootstrap=20,
        split="all",
        pick_split="reported",
        allow_overlap=True,
    )
    series = built.figure_series["policy_training.png"]
    assert [label for label, _, _ in series] == ["first.log.parquet", "second.log.parquet"]
    assert len({(colour, marker) for _, colour, marker in series}) == 2
    assert list(table_after(built.markdown, "Policy training"))[1:] == ["first.log.parquet", "second.log.parquet"]


def test_a_label_leaves_out_a_parameter_its_configuration_ignores(inputs, tmp_path):
    from analysis.report import report
    from replay import api

    # escalate matters to steer in mode=switch only: in mode=step the label does not name it
    step = api.replay(inputs["trace"], "steer", params={"mode": "step", "tau": "0.5"}, split="all")
    switch = api.replay(
        inputs["trace"], "steer", params={"mode": "switch", "escalate": "replace", "tau": "0.5"}, split="all"
    )
    built = report(
        inputs["trace"], [step, switch], bootstrap=20, split="all", pick_split="reported", allow_overlap=True
    )
    labels = set(table_after(built.markdown, "Routers at their operating points")) - {"Router"}
    assert {"steer (mode=step)", "steer (escalate=replace, mode=switch)"} <= {label.rstrip(" *") for label in labels}


def test_the_seeds_layouts_mark_a_router_whose_walks_missed(inputs):
    import io

    from analysis.report import report
    from replay import api

    runs = [
        api.replay(inputs["trace"], "steer", params={"mode": mode, "tau": "0.5"}, split="all")
        for mode in ("step", "switch")
    ]
    built = report(
        inputs["trace"], runs, bootstrap=20, split="all", pick_split="reported", allow_overlap=True, tables=["cmdp"]
    )
    cmdp = pl.read_csv(io.BytesIO(built.tables["table_cmdp.csv"]))
    missed = {run.outcomes["params"][0]: run.outcomes["misses"].sum() > 0 for run in runs}
    assert any(missed.values()) and not all(missed.values())  # one run missed, the other did not
    marked = {label for label in cmdp["method"] if label.endswith(" *")}
    assert len(marked) == 1 and "some walks missed" in built.tables["table_cmdp.md"].decode()
    assert [label for label in cmdp["method"] if label.startswith("steer")] and len(cmdp) >= 4
