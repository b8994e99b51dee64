"""`trace train pik`: P(IK) probes fitted on the train split with their L2 penalty chosen on the calibration split,
their metrics on the test split, a small trace giving a weaker probe (never an error), and the cascade router
replaying with the saved probes instead of fitting its own.

The trace: 300 problems, 2-step comb trees; the small model's solution is right exactly on the problems
whose (noisy) prompt hidden state at layer 3 points one way.
"""

from __future__ import annotations

import numpy as np
import pytest
from tracebuild import build_trace, comb_steps
from typer.testing import CliRunner

from cli import app
from replay.artifacts import load_split_data, load_train_split
from replay.pik import L2_GRID, ConstantProbe, load_probes, new_probe
from replay.routers import make_router
from replay.splits import DEFAULT_FRACTIONS, SplitSpec
from tracestore.errors import TraceError

runner = CliRunner()
LAYER = 3


def cli(*args):
    return runner.invoke(app, [*map(str, args)])


def probe_trace(root, n_problems=300, everyone_right=False, seed=0):
    rng = np.random.default_rng(seed)
    steps, hidden = [], []
    for i in range(n_problems):
        knows = everyone_right or rng.random() < 0.5
        problem = f"q{i:03d}"
        steps += comb_steps(problem, 2, correct=lambda path, knows=knows: "L" in path or knows)
        direction = np.array([1.0, -1.0, 0.5, 0, 0, 0, 0, 0]) * (1 if knows else -1)
        hidden.append(
            {
                "problem_id": problem,
                "model": "small",
                "layer": LAYER,
                "where": "prompt_last",
                "vector": (direction + rng.normal(0, 0.6, 8)).tolist(),
            }
        )
    return build_trace(root, steps, hidden=hidden)


def small_chain_correct(data, problem_ids):
    """Whether the all-small solution of each problem is correct, read from its final step ("ss")."""
    finals = data.steps.filter(data.steps["path"] == "ss")
    correct = dict(zip(finals["problem_id"].to_list(), finals["correct"].to_list()))
    return [correct[i] for i in problem_ids]


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    return probe_trace(tmp_path_factory.mktemp("pik") / "trace")


@pytest.fixture(scope="module")
def probe(trace, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "pik.joblib"
    result = cli("train", "pik", trace, "--model", "small", "--layer", LAYER, "--out", out)
    assert result.exit_code == 0, result.output
    return out, result.stdout


def split_rows(split):
    """(hidden states, whether the small solution is right) of every problem of a split, in id order."""
    ids = split.problems["problem_id"].to_list()
    hidden = {row["problem_id"]: row["vector"] for row in split.hidden.collect().iter_rows(named=True)}
    return np.array([hidden[i] for i in ids], dtype=np.float64), np.array(small_chain_correct(split, ids))


def test_probe_is_fitted_on_train_chosen_on_calibration_and_scored_on_test(trace, probe):
    path, stdout = probe
    assert "AUROC" in stdout and "small" in stdout
    saved = load_probes(path)
    assert (saved["layers"], saved["where"], list(saved["probes"])) == ({"small": LAYER}, "prompt_last", ["small"])
    splits = load_split_data(trace, SplitSpec())
    assert saved["fitted_on"]["problem_ids"] == sorted(splits.train.problems["problem_id"].to_list())
    assert saved["fitted_on"]["split"]["name"] == "train" and saved["fitted_on"]["trace"] == str(trace)
    metrics = saved["metrics"]["small"]
    assert (metrics["n_fit"], metrics["n_calibration"], metrics["n_test"]) == tuple(
        part.problems.height for part in (splits.train, splits.calibration, splits.test)
    )
    x_train, y_train = split_rows(splits.train)
    x_calibration, y_calibration = split_rows(splits.calibration)
    losses = []
    for l2 in L2_GRID:  # the penalty kept is the one with the lowest calibration log loss
        p = new_probe(0, l2).fit(x_train, y_train).predict_proba(x_calibration)[:, 1]
        losses.append(-np.mean(np.where(y_calibration, np.log(p), np.log(1 - p))))
    assert metrics["l2"] == L2_GRID[int(np.argmin(losses))]
    assert metrics["calibration_log_loss"] == pytest.approx(min(losses))
    x_test, y_test = split_rows(splits.test)
    predicted = saved["probes"]["small"].predict_proba(x_test)[:, 1] >= 0.5
    assert metrics["test_accuracy"] == pytest.approx((predicted == y_test).mean())
    assert metrics["test_auroc"] > 0.9 and metrics["test_accuracy"] > 0.8


def test_a_small_trace_gives_a_weaker_probe_never_an_error(tmp_path):
    small = probe_trace(tmp_path / "small", n_problems=30, seed=1)
    for fractions, calibration_rows in (("0.5,0.1,0.4", True), ("1,0,0", False)):
        out = tmp_path / f"pik-{fractions}.joblib"
        result = cli("train", "pik", small, "--layer", LAYER, "--split-fractions", fractions, "--out", out)
        assert result.exit_code == 0, result.output
        metrics = load_probes(out)["metrics"]["small"]
        assert metrics["n_fit"] + metrics["n_calibration"] + metrics["n_test"] == 30
        assert (metrics["n_calibration"] > 0) == calibration_rows
        if not calibration_rows:
            assert metrics["l2"] == L2_GRID[0] and np.isnan(metrics["test_accuracy"])
            assert "no calibration rows" in result.stdout
    # every train solution right: the probe is that rate, and a cascade replays with it
    everyone = probe_trace(tmp_path / "everyone", n_problems=30, everyone_right=True)
    out = tmp_path / "everyone.joblib"
    result = cli("train", "pik", everyone, "--layer", LAYER, "--out", out)
    assert result.exit_code == 0 and "every train solution of model small is right" in result.stdout, result.output
    probe = load_probes(out)["probes"]["small"]
    assert isinstance(probe, ConstantProbe) and probe.predict_proba(np.zeros((2, 8)))[:, 1].tolist() == [1.0, 1.0]


def test_cascade_replays_with_the_saved_probe(trace, probe, tmp_path):
    path, _ = probe
    train = load_train_split(trace, 0, DEFAULT_FRACTIONS)
    router = make_router("cascade", probe=str(path), p_true="final_mean").fit(train)
    saved = load_probes(path)
    assert router.probes_["small"] is not saved["probes"]["small"]  # loaded again, not shared
    assert router.layers_ == {"small": LAYER}
    x = np.random.default_rng(0).normal(size=(4, 8))
    np.testing.assert_array_equal(router.probes_["small"].predict_proba(x), saved["probes"]["small"].predict_proba(x))
    result = cli("replay", trace, "--router", "cascade", "--param", f"probe={path}", "--param", "p_true=final_mean")
    assert result.exit_code == 0, result.output
    # without the file the cascade fits its own probe at layer auto: -1 for this 2-layer model, not stored here
    result = cli("replay", trace, "--router", "cascade", "--param", "p_true=final_mean")
    assert result.exit_code == 1 and "at layer -1" in result.stderr


def test_bad_input_is_one_clear_line(trace, probe, tmp_path):
    path, _ = probe
    cases = [
        ([trace, "--model", "medium"], "--model must name models of the trace (small, large)"),
        ([trace, "--layer", 5], "hidden state of model small at layer 5"),
        ([tmp_path / "none"], "does not exist"),
        ([trace, "--out", tmp_path / "no" / "p.joblib"], "does not exist"),
    ]
    for args, message in cases:
        extra = [] if "--out" in args else ["--out", tmp_path / "p.joblib"]
        extra += [] if "--layer" in args else ["--layer", LAYER]
        result = cli("train", "pik", *args, *extra)
        assert result.exit_code == 1, (args, result.output)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
    train = load_train_split(trace, 0, DEFAULT_FRACTIONS)
    with pytest.raises(TraceError, match="read model small at layer 3, not 5"):
        make_router("cascade", probe=str(path), layer=5).fit(train)
    other = tmp_path / "other.joblib"
    result = cli("train", "pik", trace, "--layer", LAYER, "--split-fractions", "0.9,0.05,0.05", "--out", other)
    assert result.exit_code == 0, result.output
    result = cli("replay", trace, "--router", "cascade", "--param", f"probe={other}", "--param", "p_true=final_mean")
    assert result.exit_code == 1 and "--allow-overlap" in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    (tmp_path / "junk.joblib").write_bytes(b"junk")
    with pytest.raises(TraceError, match="not a readable P\\(IK\\) probe file"):
        make_router("cascade", probe=str(tmp_path / "junk.joblib")).fit(train)
    with pytest.raises(TraceError, match="does not exist"):
        make_router("cascade", probe=str(tmp_path / "missing.joblib")).fit(train)
