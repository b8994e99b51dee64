"""The query-level cascade: P(T) from the ptrue scorer or the final step, the P(IK) probe on prompt
hidden states, K > 2 models; outcomes and costs worked out by hand.

Two-step solutions; small step 10 TFLOPs, large step 80, so a small chain costs 20, a large one 160.
P(True) asks the model that wrote the answer ("self"); under flops a call costs the one token it generates
(1 TFLOP on the small model; its 40-token context is not counted).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from test_routers_baselines import manifest, sized
from tracebuild import build_trace, comb_steps, default_manifest

from replay.costs import make_cost_model
from replay.data import ReplayData
from replay.routers import make_router
from replay.run import replay
from tracestore.errors import TraceError
from tracestore.store import open_trace

SMALL_CHAIN, LARGE_CHAIN, PTRUE_CALL = 20.0, 160.0, 1.0
N_TRAIN = 60  # the probe is fitted 80/10/10: enough for a non-empty validation and test part


def ptrue(problem: str, path: str, value: float) -> dict:
    return {
        "step_id": f"{problem}/0/{path}",
        "scorer": "ptrue",
        "value": value,
        "detail": None,
        "n_tokens_processed": 40,
    }


def problem_steps(problem: str, small_right: bool, logprob_mean: float) -> list[dict]:
    steps = sized(comb_steps(problem, 2, correct=lambda path: path == "LL" or (path == "ss" and small_right)))
    for step in steps:
        if step["path"] == "ss":
            step["logprob_mean"] = logprob_mean
    return steps


def hidden(problem: str, knows: bool, jitter: float) -> dict:
    vector = [1.0 + jitter, 0.0, 0.5, -jitter] if knows else [0.0, 1.0 + jitter, -0.5, jitter]
    return {"problem_id": problem, "model": "small", "layer": -1, "where": "prompt_last", "vector": vector}


@pytest.fixture
def trace(tmp_path):
    """q0: small right, P(T) 0.9; q1: small wrong, P(T) 0.2. Train problems t0..t59 for the probe: the
    small model is right on even ones, whose hidden states point one way, wrong on odd ones."""
    steps = problem_steps("q0", True, -0.1) + problem_steps("q1", False, -2.0)
    scores = [ptrue("q0", "ss", 0.9), ptrue("q1", "ss", 0.2)]
    states = [hidden("q0", True, 0.05), hidden("q1", False, 0.05)]
    for i in range(N_TRAIN):
        steps += problem_steps(f"t{i}", i % 2 == 0, -0.5)
        states.append(hidden(f"t{i}", i % 2 == 0, 0.01 * i))
    root = build_trace(
        tmp_path / "t",
        steps,
        manifest={**manifest(), "scorers": {"ptrue": {"model": "self", "generated_tokens": 1}}},
        scores=scores,
        hidden=states,
    )
    data = ReplayData.from_trace(open_trace(root))
    ids = data.problems["problem_id"].to_list()
    return data.subset([i for i in ids if i.startswith("t")]), data.subset(["q0", "q1"])


def outcomes(trace, cost="flops", sweep=None, **params):
    train, test = trace
    router = make_router("cascade", **{"p_true": "ptrue", **params}).fit(train)  # this tree holds P(True) scores
    result = replay(test, router, make_cost_model(cost, test.manifest), sweep)
    return {row["problem_id"]: row for row in result.outcomes.iter_rows(named=True)}, result


def test_ptrue_keeps_a_confident_small_answer_and_escalates_the_rest(trace):
    rows, _ = outcomes(trace, pik=False, t_true=0.5)  # P(T) 0.9 is stored as float32 0.8999
    q0, q1 = rows["q0"], rows["q1"]
    assert (q0["path"], q0["correct"], q0["cost"], q0["cost_scorer"]) == (
        "ss",
        True,
        SMALL_CHAIN + PTRUE_CALL,
        PTRUE_CALL,
    )
    # q1: the small chain and its P(True) call are paid, then the large chain answers; the small chain's two
    # steps were thrown away, so they count as discarded, not as kept small steps.
    assert (q1["path"], q1["correct"], q1["n_small"], q1["n_large"], q1["n_discarded"]) == ("LL", True, 0, 2, 2)
    assert q1["cost"] == SMALL_CHAIN + PTRUE_CALL + LARGE_CHAIN
    assert (q1["cost_small"], q1["cost_discarded"], q1["cost_large"]) == (0.0, SMALL_CHAIN, LARGE_CHAIN)
    assert (q0["n_small"], q0["n_discarded"], q0["cost_small"]) == (2, 0, SMALL_CHAIN)


def test_first_token_confidence_is_read_from_its_scorer(tmp_path):
    """p_true=first_token reads the first_token scores as p_true=ptrue reads P(True)'s."""
    steps = problem_steps("q0", True, -0.1) + problem_steps("q1", False, -2.0)
    scores = [{**ptrue("q0", "ss", 0.95), "scorer": "first_token"}, {**ptrue("q1", "ss", 0.3), "scorer": "first_token"}]
    described = {"first_token": {"model": "self", "generated_tokens": 1}}
    root = build_trace(tmp_path / "t", steps, manifest={**manifest(), "scorers": described}, scores=scores)
    data = ReplayData.from_trace(open_trace(root))
    router = make_router("cascade", pik=False, p_true="first_token").fit(data)
    assert router.scorer == "first_token"
    rows = {
        r["problem_id"]: r for r in replay(data, router, make_cost_model("flops", data.manifest)).outcomes.to_dicts()
    }
    assert (rows["q0"]["path"], rows["q1"]["path"]) == ("ss", "LL")  # 0.95 >= t_true 0.9 > 0.3
    assert rows["q0"]["cost_scorer"] == PTRUE_CALL  # one generated token on the small model


def test_final_step_probability_needs_no_scorer(trace):
    rows, _ = outcomes(trace, pik=False, p_true="final_mean", t_true=0.5)  # exp(-0.1) = 0.90, exp(-2) = 0.14
    assert (rows["q0"]["path"], rows["q0"]["cost"]) == ("ss", SMALL_CHAIN)
    assert (rows["q1"]["path"], rows["q1"]["cost"]) == ("LL", SMALL_CHAIN + LARGE_CHAIN)
    rows, _ = outcomes(trace, pik=False, p_true="final_mean", t_true=0.95)
    assert rows["q0"]["path"] == "LL"


def test_pik_probe_skips_the_small_model_before_it_writes(trace):
    rows, _ = outcomes(trace, pik=True, t_ik=0.5, t_true=0.5)
    q0, q1 = rows["q0"], rows["q1"]
    assert (q0["path"], q0["cost"]) == ("ss", SMALL_CHAIN + PTRUE_CALL)
    # q1 looks like the train problems the small model gets wrong: it never writes; under flops its
    # prompt prefill is free, so only the large chain is paid.
    assert (q1["path"], q1["n_small"], q1["n_large"], q1["cost"]) == ("LL", 0, 2, LARGE_CHAIN)
    train, _ = trace
    router = make_router("cascade").fit(train)
    assert set(router.probes_) == {"small"}


def test_a_skipped_model_pays_its_prompt_prefill(trace):
    rows, _ = outcomes(trace, cost="flops+prefill", pik=True, t_ik=0.5, t_true=0.5)
    # prefill: 20 prompt tokens for a root step (tracebuild), 24 for a depth-1 step; small 1, large 4 TFLOPs/token
    large_chain = LARGE_CHAIN + 4 * (20 + 24)
    assert rows["q1"]["cost"] == 20.0 + large_chain
    assert rows["q1"]["cost_prefill"] == 20.0 + 4 * (20 + 24)


def test_threshold_sweep_equals_single_replays(trace):
    train, test = trace
    router = make_router("cascade", p_true="ptrue").fit(train)
    cost = make_cost_model("flops", test.manifest)
    swept = replay(test, router, cost, {"t_ik": np.array([0.0, 0.5, 1.0]), "t_true": np.array([0.1, 0.5])})
    assert swept.outcomes["config"].n_unique() == 6
    for config, params in enumerate(swept.summary()["params"].to_list()):
        single = copy.copy(router)  # the probes do not depend on the thresholds: fit once
        single.t_ik, single.t_true = json.loads(params)["t_ik"], json.loads(params)["t_true"]
        mine = swept.outcomes.filter(swept.outcomes["config"] == config)
        assert mine.drop("config").equals(replay(test, single, cost).outcomes.drop("config"))
    assert swept.outcomes["path"].n_unique() == 2


def test_missing_ptrue_score_is_a_scorer_miss(tmp_path):
    steps = problem_steps("q0", True, -0.1)
    scorers = {"ptrue": {"model": "self", "generated_tokens": 1}}
    root = build_trace(tmp_path / "t", steps, manifest={**manifest(), "scorers": scorers})
    data = ReplayData.from_trace(open_trace(root))
    router = make_router("cascade", pik=False, p_true="ptrue").fit(data)
    result = replay(data, router, make_cost_model("flops", data.manifest))
    assert result.outcomes["misses"].to_list() == [1]
    assert result.misses.select("path", "model", "scorer").rows() == [("s", "small", "ptrue")]


def test_probe_errors_name_the_problem(trace, tmp_path):
    train, _ = trace
    only_right = train.subset(["t0", "t2", "t4"])  # a weaker probe, not an error: P(IK) = their rate, 1
    probe = make_router("cascade").fit(only_right).probes_["small"]
    assert probe.predict_proba(np.zeros((2, 4)))[:, 1].tolist() == [1.0, 1.0]
    with pytest.raises(TraceError, match="no complete small solution .*pik=false"):
        make_router("cascade").fit(train.subset([]))
    steps = problem_steps("a", True, -0.1) + problem_steps("b", False, -0.1)
    root = build_trace(tmp_path / "nohidden", steps, manifest=manifest())
    data = ReplayData.from_trace(open_trace(root))
    with pytest.raises(TraceError, match="hidden state of model small at layer -1.*problem 'a'"):
        make_router("cascade").fit(data)
    with pytest.raises(TraceError, match="got 'small,medium'"):
        make_router("cascade", models="small,medium").fit(data)


def test_three_models_in_order_of_size(tmp_path):
    models = [
        {"role": f"m{i}", "name": f"m{i}", "revision": "t", "n_params": n} for i, n in enumerate((0.5e12, 1e12, 2e12))
    ]
    steps = []
    for path in ("0", "00", "1", "11", "2", "22"):
        final = len(path) == 2
        steps.append(
            {
                "path": path,
                "n_gen_tokens": 10,
                "is_final": final,
                "correct": path == "11" if final else None,
                "logprob_mean": {"00": -3.0, "11": -0.05, "22": -0.01}.get(path, -0.1),
            }
        )
    root = build_trace(tmp_path / "t", steps, manifest=default_manifest(models=models))
    data = ReplayData.from_trace(open_trace(root))
    router = make_router("cascade", pik=False, p_true="final_mean", t_true=0.9).fit(data)
    row = replay(data, router, make_cost_model("flops", data.manifest)).outcomes.row(0, named=True)
    # m0 (1 TFLOP/token) is unsure (exp(-3) = 0.05): its two steps are paid and discarded; m1 (2 TFLOPs/token)
    # is sure (0.95): kept.
    assert (row["path"], row["correct"], row["n_m0"], row["n_m1"], row["n_m2"]) == ("11", True, 0, 2, 0)
    assert (row["n_discarded"], row["cost_discarded"], row["cost_m1"]) == (2, 20.0, 40.0)
    assert row["cost"] == 20.0 + 40.0
