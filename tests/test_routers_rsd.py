"""RSD and SpecReason on a hand-built depth-2 tree, outcomes and costs worked out by hand.

Small step 10 TFLOPs, large step 80. Under the default flops (the seeds' convention: generated tokens only)
a PRM call costs nothing (a value head generates no token) and a judge call one token of the large model
(4 TFLOPs). Under flops+prefill a call costs its context: PRM 1e12 parameters (2 TFLOPs per token) x 30
tokens = 60 TFLOPs; judge 4 TFLOPs x 31 tokens = 124 TFLOPs.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_routers_baselines import LARGE_STEP, SMALL_STEP, full_tree, manifest, run
from tracebuild import build_trace

from replay.routers import make_router
from tracestore.errors import TraceError

PRM_CALL, JUDGE_CALL = 0.0, 4.0
PRM_CALL_PREFILL, JUDGE_CALL_PREFILL = 60.0, 124.0


def scored_manifest():
    return {
        **manifest(),
        "scorers": {
            "prm": {"model": "prm-test", "n_params": 1e12, "generated_tokens": 0},
            "judge": {"model": "large", "generated_tokens": 1},
        },
    }


def prm(path: str, value: float, problem: str = "p0") -> dict:
    return {"step_id": f"{problem}/0/{path}", "scorer": "prm", "value": value, "detail": None, "n_tokens_processed": 30}


def judge(path: str, greedy: int, probabilities: dict[int, float], problem: str = "p0") -> dict:
    detail = [probabilities.get(d, 0.0) for d in range(10)]
    return {
        "step_id": f"{problem}/0/{path}",
        "scorer": "judge",
        "value": float(greedy),
        "detail": detail,
        "n_tokens_processed": 31,
    }


@pytest.fixture
def tree(tmp_path):
    """Full depth-2 tree; only sL and LL are right. PRM: s 0.9, ss 0.3, Ls 0.8."""
    steps = full_tree("p0", 2, lambda path: path in ("sL", "LL"))
    scores = [
        prm("s", 0.9),
        prm("ss", 0.3),
        prm("Ls", 0.8),
        judge("s", 8, {8: 1.0}),
        judge("ss", 6, {6: 0.5, 9: 0.5}),
        judge("Ls", 2, {2: 1.0}),
    ]
    return build_trace(tmp_path / "t", steps, manifest=scored_manifest(), scores=scores)


def row_of(result):
    assert result.outcomes.height == 1
    return result.outcomes.row(0, named=True)


def test_rsd_keeps_good_drafts_and_lets_the_large_model_write_rejected_steps(tree):
    row = row_of(run(tree, make_router("rsd", tau=0.7)))
    # s: 0.9 kept. ss: 0.3 rejected (10 paid) -> large writes sL (final, right). Two PRM calls.
    assert (row["path"], row["correct"], row["n_small"], row["n_large"], row["n_discarded"]) == ("sL", True, 1, 1, 1)
    assert row["cost_discarded"] == SMALL_STEP
    assert row["cost_scorer"] == 2 * PRM_CALL
    assert row["cost"] == SMALL_STEP + SMALL_STEP + LARGE_STEP + 2 * PRM_CALL
    with_prefill = row_of(run(tree, make_router("rsd", tau=0.7), cost="flops+prefill"))
    assert with_prefill["cost_scorer"] == 2 * PRM_CALL_PREFILL


def test_rsd_returns_to_the_small_model_after_a_rejection(tree):
    row = row_of(run(tree, make_router("rsd", tau=0.85)))
    # s: 0.9 kept; ss: 0.3 rejected -> sL. Same as tau 0.7.
    assert row["path"] == "sL"
    row = row_of(run(tree, make_router("rsd", tau=0.95)))
    # s: 0.9 rejected -> L; then the small model drafts again: Ls 0.8 rejected -> LL.
    assert (row["path"], row["n_small"], row["n_large"], row["n_discarded"]) == ("LL", 0, 2, 2)
    assert row["cost"] == 2 * SMALL_STEP + 2 * LARGE_STEP + 2 * PRM_CALL
    row = row_of(run(tree, make_router("rsd", tau=0.2)))
    assert (row["path"], row["correct"], row["cost"]) == ("ss", False, 2 * SMALL_STEP + 2 * PRM_CALL)


def test_a_missing_prm_score_is_a_scorer_miss(tmp_path):
    steps = full_tree("p0", 2, lambda path: True)
    root = build_trace(tmp_path / "t", steps, manifest=scored_manifest(), scores=[prm("s", 0.9)])
    result = run(root, make_router("rsd", tau=0.5))
    assert row_of(result)["misses"] == 1
    assert result.misses.select("path", "model", "scorer").rows() == [("s", "small", "prm")]


def test_specreason_greedy_and_expected_scores(tree):
    # greedy: s 8 >= 7 kept; ss greedy 6 < 7 rejected -> sL.
    row = row_of(run(tree, make_router("specreason")))
    assert (row["path"], row["n_discarded"], row["cost_scorer"]) == ("sL", 1, 2 * JUDGE_CALL)
    assert row["cost"] == 2 * SMALL_STEP + LARGE_STEP + 2 * JUDGE_CALL
    with_prefill = row_of(run(tree, make_router("specreason"), cost="flops+prefill"))
    assert with_prefill["cost_scorer"] == 2 * JUDGE_CALL_PREFILL
    # expected: ss = 0.5*6 + 0.5*9 = 7.5 >= 7 kept -> ss (wrong).
    row = row_of(run(tree, make_router("specreason", score="expected")))
    assert (row["path"], row["correct"], row["n_discarded"]) == ("ss", False, 0)
    assert row["cost"] == 2 * SMALL_STEP + 2 * JUDGE_CALL
    # expected, tau 7.6: ss rejected again
    assert row_of(run(tree, make_router("specreason", score="expected", tau=7.6)))["path"] == "sL"


def test_expected_score_needs_the_digit_probabilities(tmp_path):
    steps = full_tree("p0", 1, lambda path: True)
    bad = judge("s", 8, {8: 1.0}) | {"detail": [1.0, 0.0]}
    root = build_trace(tmp_path / "t", steps, manifest=scored_manifest(), scores=[bad])
    with pytest.raises(TraceError, match="ten digit probabilities"):
        run(root, make_router("specreason", score="expected"))
    assert row_of(run(root, make_router("specreason")))["path"] == "s"  # greedy reads only the value


def test_scorer_without_a_parameter_count_is_an_error(tmp_path):
    steps = full_tree("p0", 1, lambda path: True)
    root = build_trace(tmp_path / "t", steps, manifest=manifest(), scores=[prm("s", 0.9)])
    assert row_of(run(root, make_router("rsd")))["cost_scorer"] == 0  # flops: a PRM generates nothing
    with pytest.raises(TraceError, match="parameter count of scorer 'prm'"):
        run(root, make_router("rsd"), cost="flops+prefill")


@pytest.mark.parametrize(
    "router,params,taus",
    [
        ("rsd", {}, [0.0, 0.25, 0.5, 0.75, 1.0]),
        ("specreason", {}, [0.0, 3.0, 5.0, 7.0, 9.0]),
        ("specreason", {"score": "expected"}, [0.0, 3.5, 5.5, 7.5, 9.0]),
    ],
)
def test_sweep_equals_single_replays(tmp_path, router, params, taus):
    rng = np.random.default_rng(1)
    steps, scores = [], []
    for i in range(10):
        tree = full_tree(f"p{i}", 3, lambda p, i=i: (p.count("L") + i) % 2 == 0)
        steps += tree
        for step in tree:
            if step["path"][-1] == "s":
                probabilities = rng.dirichlet(np.ones(10))
                scores += [
                    prm(step["path"], float(rng.uniform()), f"p{i}"),
                    judge(step["path"], int(probabilities.argmax()), dict(enumerate(probabilities)), f"p{i}"),
                ]
    root = build_trace(tmp_path / "t", steps, manifest=scored_manifest(), scores=scores)
    swept = run(root, make_router(router, **params), sweep={"tau": np.array(taus)}).outcomes
    paths = set()
    for config, tau in enumerate(taus):
        single = run(root, make_router(router, tau=tau, **params)).outcomes
        assert swept.filter(swept["config"] == config).drop("config", "params").equals(single.drop("config", "params"))
        paths |= set(single["path"].to_list())
    assert len(paths) > 3
