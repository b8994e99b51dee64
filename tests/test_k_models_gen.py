"""Three toy models (toy-small, toy-medium, toy-large) grown and scored with the fake backend (seeded toy steps, no
model; the vLLM run: test_k_models_vllm.py): the judge asked of the
middle model (`trace score --scorer judge@m1`), SpecReason with target=m1 reading it (refused before it exists),
and closure growing what chained STEER (m0 -> m1 -> m2) and SpecReason m0 -> m1 miss on the comb; and, on
tracebuild trees, the judge roles `trace score` refuses."""

from __future__ import annotations

import shutil
from functools import partial

import polars as pl
import pytest
from test_k_models import three_models
from tracebuild import build_trace, comb_steps, toy_gen_options
from typer.testing import CliRunner

from cli import app
from replay.results import miss_list
from replay.routers import make_router
from replay.run import replay_trace
from tracegen.closure import RouterSpec
from tracegen.gen import run_gen
from tracegen.scorers import make_scorer
from tracegen.scoring import run_score
from tracestore.errors import TraceError
from tracestore.store import open_trace
from tracestore.validate import validate

SPECS = (
    RouterSpec("specreason", {"target": "m1", "tau": "6"}),
    RouterSpec("steer", {"mode": "switch", "min_samples": "2", "tau": "0"}),
)


options = partial(toy_gen_options, middle=("toy-medium",), limit=8, seed=11, backend="fake")


@pytest.fixture(scope="module")
def comb3(tmp_path_factory):
    out = tmp_path_factory.mktemp("k3-hf") / "trace"
    run_gen(options(out))
    return out


def test_the_judge_of_the_middle_model_and_specreason_reading_it(comb3, tmp_path):
    root = tmp_path / "scored"
    shutil.copytree(comb3, root)
    with pytest.raises(TraceError, match=r"judge@m1 scores \(the m1 model's own verdicts\).*--scorer judge@m1"):
        replay_trace(root, make_router("specreason", target="m1"), split="all")
    run_score(root, "judge@m1", backend="fake")
    run_score(root, "judge", backend="fake")
    trace = open_trace(root)
    assert trace.manifest.scorers["judge@m1"]["model"] == "m1" and trace.manifest.scorers["judge"]["model"] == "m2"
    steps = trace.scan("steps").select("step_id", "model").collect()
    scores = trace.scan("scores").collect().join(steps, on="step_id")
    by_m1 = scores.filter(pl.col("scorer") == "judge@m1")
    assert set(by_m1["model"]) == {"m0"} and by_m1.height == steps.filter(pl.col("model") == "m0").height
    by_m2 = scores.filter(pl.col("scorer") == "judge")
    assert set(by_m2["model"]) == {"m0", "m1"}
    both = by_m1.join(by_m2, on="step_id", suffix="_m2")
    assert both.height == by_m1.height and (both["value"] != both["value_m2"]).any()  # two models' verdicts
    # SpecReason m0 -> m1 keeps m0's first step exactly where judge@m1 rates it at least tau
    first = dict(by_m1.filter(pl.col("step_id").str.ends_with("/0/0")).select("step_id", "value").iter_rows())
    tau = sorted(first.values())[len(first) // 2]
    outcomes = replay_trace(root, make_router("specreason", target="m1", tau=tau), split="all").outcomes
    kept = {f"{row['problem_id']}/0/0": row["path"][0] == "0" for row in outcomes.iter_rows(named=True)}
    assert kept == {step_id: value >= tau for step_id, value in first.items()}
    assert len(set(kept.values())) == 2
    validate(root)


def test_closure_grows_what_chained_steer_and_specreason_to_m1_miss(comb3, tmp_path):
    root = tmp_path / "closure"
    shutil.copytree(comb3, root)
    steer = SPECS[1]
    before = replay_trace(root, steer.router(), sweep=steer.sweep_values(), split="all")
    lacking = miss_list(before)
    assert lacking and {m["model"] for m in lacking} == {"m2"}  # m2 from nodes of m1's completions
    summary = run_gen(options(root, expand="closure", routers=SPECS))
    assert summary.new_steps > 0 and summary.closure.remaining_misses == 0
    for spec in SPECS:
        assert replay_trace(root, spec.router(), sweep=spec.sweep_values(), split="all").outcomes["misses"].sum() == 0
    paths = open_trace(root).scan("steps").select("path").collect()["path"]
    assert paths.str.contains("^0+1+2").any()  # off the comb: m0, then m1, then m2
    validate(root)


@pytest.mark.parametrize(
    "scorer, message",
    [
        ("ptrue@m1", "scorer ptrue cannot be asked of one model role (ptrue@m1); only judge can"),
        ("judge@m0", "judge@m0: 'm0' is not one of the trace's models that judge a smaller one (m1, m2)"),
        ("judge@m7", "'m7' is not one of the trace's models"),
    ],
)
def test_judge_roles_that_cannot_be_asked_are_refused_in_one_line(tmp_path, scorer, message):
    root = build_trace(tmp_path / "t", comb_steps("p0", 2, chars="012"), manifest=three_models())
    result = CliRunner().invoke(app, ["score", str(root), "--scorer", scorer, "--backend", "fake"])
    assert result.exit_code != 0 and message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output and not open_trace(root).manifest.scorers


def test_the_judge_of_the_largest_model_is_the_plain_judge(tmp_path):
    two = build_trace(tmp_path / "two", comb_steps("p0", 2))
    manifest = open_trace(two).manifest
    assert make_scorer("judge@large", manifest).signal == "judge"
    assert (
        make_scorer("judge@m2", open_trace(build_trace(tmp_path / "k", [], manifest=three_models())).manifest).signal
        == "judge"
    )
    with pytest.raises(TraceError, match="do not also give --model"):
        make_scorer("judge@large", manifest, model="toy-large")
