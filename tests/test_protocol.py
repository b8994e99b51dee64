"""Train here, evaluate there: a router fitted on one trace (a fitted file, or `trace replay --fit-on`) replays on
another trace of the same setting; a trace of another setting is refused naming the field; rows the fit saw are
refused unless --allow-overlap; `--split-by` takes the splits from a problems column or a file of ids.

The traces: comb trees of toy problems, 3 steps; the small model's confidence is low on the problems it gets
wrong. "train" and "test" hold different problems of the same setting.
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from tracebuild import build_trace, comb_steps, default_manifest, default_problem
from typer.testing import CliRunner

from cli import app
from replay.routers import make_router
from replay.run import fit_router, replay_trace
from replay.splits import SplitSpec
from tracestore.errors import TraceError

runner = CliRunner()
EVERY_PROBLEM = SplitSpec(fractions=(1.0, 0.0, 0.0))


def cli(*args):
    return runner.invoke(app, [*map(str, args)])


def study_trace(root, prefix: str, n_problems: int, seed: int, manifest=None, labels=None):
    """A comb trace of problems ``prefix``0.. (``labels``: each problem's split column, default test)."""
    rng = np.random.default_rng(seed)
    steps, problems = [], []
    for i in range(n_problems):
        problem = f"{prefix}{i:03d}"
        knows = rng.random() < 0.6
        for step in comb_steps(problem, 3, correct=lambda path, knows=knows: "L" in path or knows):
            step["conf_max_logit_math"] = float(rng.normal(12.0 if knows else 6.0, 1.0))
            steps.append(step)
        problems.append({**default_problem(problem), "split": labels[i] if labels else "test"})
    return build_trace(root, steps, problems=problems, manifest=manifest or default_manifest())


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    folder = tmp_path_factory.mktemp("protocol")
    train = study_trace(folder / "train", "a", 60, seed=0)
    test = study_trace(folder / "test", "b", 40, seed=1, manifest=default_manifest(dataset={"name": "toy-test"}))
    return folder, train, test


def test_a_fitted_file_and_fit_on_replay_on_another_trace_of_the_setting(traces):
    folder, train, test = traces
    gmms = folder / "steer.json"
    result = cli("train", "steer", train, "--split-fractions", "1,0,0", "--min-samples", 5, "--out", gmms)
    assert result.exit_code == 0, result.output
    fitted_on = json.loads(gmms.read_text())["fitted_on"]
    assert fitted_on["trace"] == str(train) and len(fitted_on["problem_ids"]) == 60
    loaded = replay_trace(
        test, make_router("steer", gmms=str(gmms), min_samples=5), split="all", sweep={"tau": [0.0, 0.5, 1.0]}
    )
    assert not loaded.outcomes["fit_overlap"].any() and loaded.outcomes["misses"].sum() == 0
    (record,) = json.loads(loaded.outcomes["fitted_on"][0])
    assert (record["trace"], record["n_problems"], record["file"]) == (str(train), 60, str(gmms))
    assert json.loads(loaded.outcomes["replayed_on"][0])["trace"] == str(test)
    refit = replay_trace(
        test,
        fit_router(make_router("steer", min_samples=5), train, EVERY_PROBLEM),
        split="all",
        sweep={"tau": [0.0, 0.5, 1.0]},
    )
    assert refit.outcomes.drop("params", "fitted_on").equals(loaded.outcomes.drop("params", "fitted_on"))
    # the command line: --fit-on, and the escalations follow the confidences the train trace taught
    out = folder / "fit-on.parquet"
    result = cli(
        "replay", test, "--split", "all", "--router", "steer", "--param", "min_samples=5", "--fit-on", train,
        "--split-fractions", "1,0,0", "--sweep", "tau=0:1:0.5", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"fitted: STEER mixtures on {train} split train (60 problems)" in " ".join(result.stdout.split())
    walked = ["config", "problem_id", "path", "correct", "cost"]
    assert pl.read_parquet(out).select(walked).equals(loaded.outcomes.select(walked))


def test_a_trace_of_another_setting_is_refused_naming_the_field(traces, tmp_path):
    folder, train, _ = traces
    sampling = {**default_manifest()["sampling"], "temperature": 1.0}
    hotter = study_trace(tmp_path / "hot", "c", 10, seed=2, manifest=default_manifest(sampling=sampling))
    router = fit_router(make_router("steer", min_samples=5), train, EVERY_PROBLEM)
    with pytest.raises(TraceError, match=r"sampling.temperature = 0.7, but .* has sampling.temperature = 1.0"):
        replay_trace(hotter, router, split="all")
    result = cli(
        "replay", hotter, "--split", "all", "--router", "steer", "--fit-on", train, "--split-fractions", "1,0,0"
    )
    assert result.exit_code == 1 and "sampling.temperature" in result.output and "Traceback" not in result.output


def test_rows_the_fit_saw_are_refused_unless_allowed(traces):
    _, train, _ = traces
    gmms_router = fit_router(make_router("steer", min_samples=5), train, EVERY_PROBLEM)
    with pytest.raises(TraceError, match=r"^(\d+) of the \1 problems of split test .* pass --allow-overlap"):
        replay_trace(train, gmms_router, split="test", splits=SplitSpec(fractions=(0.5, 0.1, 0.4)))
    allowed = replay_trace(train, gmms_router, split="test", allow_overlap=True)
    assert allowed.outcomes["fit_overlap"].all()
    # fitted here on train, replayed on test: nothing overlaps
    fresh = replay_trace(train, make_router("steer", min_samples=5), split="test")
    assert not fresh.outcomes["fit_overlap"].any() and set(fresh.outcomes["split"]) == {"test"}


def test_split_by_a_problems_column_and_by_a_file_of_ids(tmp_path):
    labels = ["train"] * 30 + ["test"] * 20
    root = study_trace(tmp_path / "t", "p", 50, seed=3, labels=labels)
    spec = SplitSpec(fractions=(0.8, 0.2, 0.0), by="split")
    result = replay_trace(root, make_router("steer", min_samples=5), split="all", splits=spec)
    split_of = dict(result.outcomes.select("problem_id", "split").unique().rows())
    assert {pid for pid, split in split_of.items() if split == "test"} == {f"p{i:03d}" for i in range(30, 50)}
    train_labelled = [split_of[f"p{i:03d}"] for i in range(30)]
    assert set(train_labelled) == {"train", "calibration"} and train_labelled.count("calibration") < 15
    assert json.loads(result.outcomes["splits"][0])["by"] == "split"
    ids = tmp_path / "ids.txt"
    ids.write_text("problem_id,split\n" + "".join(f"p{i:03d},{'test' if i % 2 else 'train'}\n" for i in range(50)))
    by_file = replay_trace(root, make_router("small-only"), split="test", splits=SplitSpec(by=str(ids)))
    assert set(by_file.outcomes["problem_id"]) == {f"p{i:03d}" for i in range(1, 50, 2)}
    ids.write_text("p001 test\nx1 test\nx2 train\nx3 train\nx4 test\n")
    result = cli("replay", root, "--router", "small-only", "--split-by", ids)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "names 4 problem id(s) not in the trace (first: x1, x2, x3)" in " ".join(result.output.split())
    result = cli("replay", root, "--router", "small-only", "--split-by", "difficulty")
    assert result.exit_code == 1 and "no problems column of that name" in " ".join(result.output.split())


def report_table(markdown: str) -> dict[str, list[str]]:
    section = markdown.split("## Routers at their operating points", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if not set(line) <= set("|-: ")]
    return {row[0]: row[1:] for row in rows}


def test_fit_on_train_pick_on_calibration_report_on_test(traces, tmp_path):
    _, train, test = traces
    halves = ("--split-fractions", "0.5,0.5,0")
    gmms = tmp_path / "steer.json"
    assert cli("train", "steer", train, *halves, "--min-samples", 5, "--out", gmms).exit_code == 0
    steer = ("--router", "steer", "--param", f"gmms={gmms}", "--sweep", "tau=0:1:0.25")
    calibration, reported = tmp_path / "cal-steer.parquet", tmp_path / "steer.parquet"
    for trace, split, out in ((train, "calibration", calibration), (test, "all", reported)):
        result = cli("replay", trace, *steer, *halves, "--split", split, "--out", out)
        assert result.exit_code == 0, result.output
    random = tmp_path / "random.parquet"
    assert cli("replay", test, "--router", "random", "--param", "p=1", "--split", "all", "--out", random).exit_code == 0
    out = tmp_path / "report"
    args = ("report", test, reported, random, "--split", "all", "--pick-on", calibration, "--bootstrap", 200)
    result = cli(*args, "--out", out)
    assert result.exit_code == 0, result.output
    markdown = (out / "report.md").read_text()
    flat = " ".join(markdown.split())
    assert f"steer: fitted: STEER mixtures on {train} split train" in flat
    assert f"point picked on {calibration} (replayed on {train})" in flat
    table = report_table(markdown)
    tau = float(table["steer"][0].split("=")[1])
    picked = pl.read_parquet(calibration).filter(pl.col("params").str.contains(f'"tau": {tau}'))
    assert float(table["steer"][2].split()[0]) == pytest.approx(100 * picked["correct"].mean(), abs=0.05)
    n_calibration = picked["problem_id"].n_unique()
    assert n_calibration < 50 and f"picked on as few as {n_calibration} problems" in flat
    # random with p=1 escalates after the first small step: every walk right, at more cost than steer's pick
    assert float(table["random"][1].split()[0]) <= float(table["steer"][1].split()[0])
    assert table["random"][0] == "p=1 (dominated: steer as accurate and cheaper)"
    assert "dominated" not in table["steer"][0]
    # the calibration results of another setting are refused, naming the field
    sampling = {**default_manifest()["sampling"], "top_p": 0.9}
    other = study_trace(tmp_path / "other", "c", 10, seed=4, manifest=default_manifest(sampling=sampling))
    elsewhere = tmp_path / "elsewhere.parquet"
    assert cli("replay", other, *steer, "--split", "all", "--allow-overlap", "--out", elsewhere).exit_code == 1
    result = cli("replay", other, "--router", "small-only", "--split", "all", "--out", elsewhere)
    assert result.exit_code == 0, result.output
    result = cli("report", test, random, "--split", "all", "--pick-on", elsewhere, "--out", tmp_path / "r2")
    assert result.exit_code == 1 and "sampling.top_p" in result.output


def test_reported_rows_a_fit_saw_are_refused(traces, tmp_path):
    _, train, _ = traces
    results = tmp_path / "steer.parquet"
    args = ("--router", "steer", "--param", "min_samples=5", "--sweep", "tau=0:1:0.5", "--split", "all")
    assert cli("replay", train, *args, "--out", results).exit_code == 0
    report = ("report", train, results, "--split", "all", "--pick-split", "reported")
    result = cli(*report, "--out", tmp_path / "r")
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    n_train = json.loads(pl.read_parquet(results)["fitted_on"][0])[0]["n_problems"]
    assert f"{n_train} of the 60 problems reported for steer are among those it was fitted on" in message
    assert "--allow-overlap" in message
    assert cli(*report, "--allow-overlap", "--out", tmp_path / "r").exit_code == 0
