"""`trace train steer`: the per-step-index mixtures saved as JSON equal the router's own fit, replaying
with them equals refitting, the report can draw them, and bad files are named.

The trace: 80 problems, 3-step comb trees; small steps are confident (~15) in even problems and unsure
(~5) in odd ones.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from tracebuild import build_trace, comb_steps
from typer.testing import CliRunner

from analysis.report import read_steer_mixtures
from cli import app
from replay.artifacts import load_train_split
from replay.params import parse_sweep
from replay.routers import make_router
from replay.run import replay_trace
from replay.splits import DEFAULT_FRACTIONS, assign_splits
from tracestore.errors import TraceError

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [*map(str, args)])


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    rng = np.random.default_rng(0)
    steps = []
    for i in range(80):
        unsure = i % 2 == 1
        for step in comb_steps(f"q{i:02d}", 3, correct=lambda path, unsure=unsure: "L" in path or not unsure):
            step["conf_max_logit_math"] = float(rng.normal(5.0 if unsure else 15.0, 1.0))
            steps.append(step)
    return build_trace(tmp_path_factory.mktemp("steer") / "trace", steps)


@pytest.fixture(scope="module")
def saved(trace, tmp_path_factory):
    out = tmp_path_factory.mktemp("gmm") / "steer.json"
    result = cli("train", "steer", trace, "--seed", 2, "--out", out)
    assert result.exit_code == 0, result.output
    return out, result.stdout


def test_saved_mixtures_are_the_routers_fit(trace, saved):
    path, stdout = saved
    assert "Low mean" in stdout
    train = load_train_split(trace, 0, DEFAULT_FRACTIONS)
    fitted = make_router("steer", seed=2).fit(train)
    content = json.loads(path.read_text())
    assert content["train_problem_ids"] == sorted(train.problems["problem_id"].to_list())
    assert [entry["depth"] for entry in content["mixtures"]] == [0, 1, 2]
    for entry in content["mixtures"]:
        mixture = fitted.mixtures_[entry["depth"]]
        assert entry["weights"] == mixture.weights_.tolist()
        assert entry["means"] == mixture.means_.ravel().tolist()
        assert entry["variances"] == mixture.covariances_.ravel().tolist()
        assert entry["low_component"] == fitted.low_component_[entry["depth"]]
        assert entry["means"][entry["low_component"]] == pytest.approx(5.0, abs=0.6)
        assert (
            entry["n"]
            == train.steps.filter((train.steps["model"] == "small") & (train.steps["depth"] == entry["depth"])).height
        )
    signal, mixtures = read_steer_mixtures(path)[:2]  # the report draws them
    assert signal == "conf_max_logit_math" and [m.depth for m in mixtures] == [0, 1, 2]


def test_replaying_with_the_file_equals_refitting(trace, saved):
    path, _ = saved
    sweep = dict([parse_sweep("tau=0:1:0.1")])
    for mode in ("switch", "step"):
        loaded = replay_trace(trace, make_router("steer", gmms=str(path), mode=mode), sweep=sweep).outcomes
        refit = replay_trace(trace, make_router("steer", seed=2, mode=mode), sweep=sweep).outcomes
        assert loaded.drop("params", "fitted_on").equals(refit.drop("params", "fitted_on"))
        assert loaded["path"].n_unique() > 1
    result = cli("replay", trace, "--router", "steer", "--param", f"gmms={path}", "--sweep", "tau=0:1:0.5")
    assert result.exit_code == 0, result.output


def test_bad_mixture_files_are_named(trace, saved, tmp_path):
    path, _ = saved
    train = load_train_split(trace, 0, DEFAULT_FRACTIONS)

    def fit(file):
        return make_router("steer", gmms=str(file)).fit(train)

    with pytest.raises(TraceError, match="does not exist"):
        fit(tmp_path / "none.json")
    (tmp_path / "text.json").write_text("{not json")
    with pytest.raises(TraceError, match="is not JSON"):
        fit(tmp_path / "text.json")
    (tmp_path / "other.json").write_text(json.dumps({"mixtures": []}))
    with pytest.raises(TraceError, match="not a trace steer file"):
        fit(tmp_path / "other.json")
    content = json.loads(path.read_text())
    content["mixtures"][1]["variances"] = [1.0, -1.0]
    (tmp_path / "negative.json").write_text(json.dumps(content))
    with pytest.raises(TraceError, match="mixture 1 needs .* positive variances"):
        fit(tmp_path / "negative.json")
    other = tmp_path / "other-split.json"
    assert cli("train", "steer", trace, "--split-fractions", "0.9,0.05,0.05", "--out", other).exit_code == 0
    result = cli("replay", trace, "--router", "steer", "--param", f"gmms={other}")  # its train rows are test here
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.output
    ids = [f"q{i:02d}" for i in range(80)]
    test = {i for i, split in zip(ids, assign_splits(ids, 0, DEFAULT_FRACTIONS)) if split == "test"}
    fitted = set(json.loads(other.read_text())["train_problem_ids"])
    assert f"{len(test & fitted)} of the {len(test)} problems of split test" in result.stderr
    assert "--allow-overlap" in result.stderr
    result = cli("replay", trace, "--router", "steer", "--param", f"gmms={other}", "--allow-overlap")
    assert result.exit_code == 0 and "were among those the router was fitted on" in result.stdout, result.output
    for args, message in (
        ([tmp_path / "nope"], "does not exist"),
        ([trace, "--min-samples", 1000], "min_samples=1000"),
        ([trace, "--out", tmp_path / "no" / "s.json"], "does not exist"),
    ):
        result = cli("train", "steer", *args, *([] if "--out" in args else ["--out", tmp_path / "s.json"]))
        assert result.exit_code == 1 and message in result.stderr, (args, result.output)
        assert len(result.stderr.strip().splitlines()) == 1
