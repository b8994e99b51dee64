"""`trace train pik`: P(IK) probes fitted 80/10/10 inside the train split, their test metrics, and the
cascade router replaying with the saved probes instead of fitting its own.

The trace: 300 problems, 2-step comb trees; the small model's solution is right exactly on the problems
whose (noisy) prompt hidden state at layer 3 points one way.
"""

from __future__ import annotations

import numpy as np
import pytest
from tracebuild import build_trace, comb_steps
from typer.testing import CliRunner

from cli import app
from replay.artifacts import load_train_split
from replay.pik import load_probes, probe_parts
from replay.routers import make_router
from replay.splits import DEFAULT_FRACTIONS
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


def test_probe_metrics_are_those_of_its_test_part(trace, probe):
    path, stdout = probe
    assert "AUROC" in stdout and "small" in stdout
    saved = load_probes(path)
    assert (saved["layers"], saved["where"], list(saved["probes"])) == ({"small": LAYER}, "prompt_last", ["small"])
    train = load_train_split(trace, 0, DEFAULT_FRACTIONS)
    ids = train.problems["problem_id"].to_list()
    part = dict(zip(ids, probe_parts(ids, 0)))
    assert saved["train_problem_ids"] == sorted(i for i in ids if part[i] == "fit")
    test_ids = [i for i in ids if part[i] == "test"]
    metrics = saved["metrics"]["small"]
    assert metrics["n_test"] == len(test_ids) > 5
    hidden = {row["problem_id"]: row["vector"] for row in train.hidden.collect().iter_rows(named=True)}
    features = np.array([hidden[i] for i in test_ids], dtype=np.float64)
    labels = np.array(small_chain_correct(train, test_ids))
    predicted = saved["probes"]["small"].predict_proba(features)[:, 1] >= 0.5
    assert metrics["test_accuracy"] == pytest.approx((predicted == labels).mean())
    assert metrics["test_auroc"] > 0.9 and metrics["test_accuracy"] > 0.8
    assert metrics["l2"] in (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


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
    everyone = probe_trace(tmp_path / "everyone", n_problems=60, everyone_right=True)
    cases = [
        ([trace, "--model", "medium"], "--model must name models of the trace (small, large)"),
        ([trace, "--layer", 5], "hidden state of model small at layer 5"),
        ([everyone], "are all correct"),
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
    with pytest.raises(TraceError, match="outside this replay's train split"):
        make_router("cascade", probe=str(other)).fit(train)
    (tmp_path / "junk.joblib").write_bytes(b"junk")
    with pytest.raises(TraceError, match="not a readable P\\(IK\\) probe file"):
        make_router("cascade", probe=str(tmp_path / "junk.joblib")).fit(train)
    with pytest.raises(TraceError, match="does not exist"):
        make_router("cascade", probe=str(tmp_path / "missing.joblib")).fit(train)
