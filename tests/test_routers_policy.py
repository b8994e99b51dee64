"""The policy router with a hand-made policy file: pi(escalate | o) worked out by hand, one-way escalation
iff pi >= kappa (escalate=after keeps the step that triggers it, escalate=replace rewrites it), kappa from
the file or a parameter, and the errors of a bad file."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
import torch
from test_routers_baselines import LARGE_STEP, SMALL_STEP, manifest, run, sized
from tracebuild import build_trace, comb_steps

from replay.data import ReplayData
from replay.mlp import MLP
from replay.routers import make_router
from replay.routers.policy import load_policy, policy_inputs, raw_features, save_policy
from tracestore.errors import TraceError
from tracestore.store import open_trace

STEEPNESS = 10.0


def zeroed_network(n_actions: int = 2, n_features: int = 1) -> MLP:
    """A policy network with 4 hidden units, every weight and bias zero: the tests set the few they need, before
    its first use (``layers[i][j, k]``: from input j of layer i to its output k; row -1 holds the biases)."""
    widths = [policy_inputs(n_features, n_actions), 4, 4, n_actions]
    return MLP([np.zeros((n + 1, m)) for n, m in zip(widths, widths[1:])])


def hand_made_policy(path, kappa=0.5, escalate="after"):
    """pi(escalate | o) = sigmoid(-10 * tanh(tanh((conf - 10) / 1))): ~1 for conf 5, 0.5 at 10, ~0 at 15."""
    network = zeroed_network()
    network.layers[0][0, 0] = 1.0
    network.layers[1][0, 0] = 1.0
    network.layers[2][0, 1] = -STEEPNESS
    save_policy(path, network, ["conf_max_logit_math"], [10.0], [1.0], kappa=kappa, hidden=4, escalate=escalate)
    return str(path)


def load(root):
    return ReplayData.from_trace(open_trace(root))


def by_hand(confidence: float) -> float:
    return 1 / (1 + math.exp(STEEPNESS * math.tanh(math.tanh(confidence - 10.0))))


@pytest.fixture
def trace(tmp_path):
    steps = sized(comb_steps("p0", 3, correct=lambda path: path in ("sLL", "ssL")))
    for step in steps:
        step["conf_max_logit_math"] = {"s": 15.0, "ss": 5.0, "sss": 15.0}.get(step["path"], 10.0)
    return build_trace(tmp_path / "t", steps, manifest=manifest())


def test_escalation_probability_is_the_networks(tmp_path, trace):
    router = make_router("policy", path=hand_made_policy(tmp_path / "pi.pt")).fit(load(trace))
    confidences = [5.0, 9.5, 10.0, 10.5, 15.0]
    steps = pl.DataFrame({"problem_id": ["p0"] * 5, "conf_max_logit_math": confidences})
    got = router.escalate_probability(steps, pl.DataFrame({"problem_id": ["p0"], "meta": ["{}"]}))
    np.testing.assert_allclose(got, [by_hand(c) for c in confidences], rtol=1e-12)
    assert router.kappa_ == 0.5


def test_version_1_files_load_and_are_evaluated_in_float64(tmp_path, trace):
    """A file written before float64 training (version 1: float32 weights) replays with the same network,
    evaluated as a version 2 file is; a later version is refused by name."""
    _, saved = load_policy(hand_made_policy(tmp_path / "pi.pt"))
    saved["version"] = 1
    saved["state_dict"] = {name: value.float() for name, value in saved["state_dict"].items()}
    torch.save(saved, tmp_path / "v1.pt")
    steps = pl.DataFrame({"problem_id": ["p0"] * 3, "conf_max_logit_math": [5.0, 9.75, 15.0]})
    problems = pl.DataFrame({"problem_id": ["p0"], "meta": ["{}"]})
    v1, v2 = (make_router("policy", path=str(tmp_path / name)).fit(load(trace)) for name in ("v1.pt", "pi.pt"))
    # the hand-made weights (1, -10) are float32 numbers: the same network, the same bits
    np.testing.assert_array_equal(v1.escalate_probability(steps, problems), v2.escalate_probability(steps, problems))
    saved["version"] = 3
    torch.save(saved, tmp_path / "v3.pt")
    with pytest.raises(TraceError, match="has policy version 3; this trace reads 1 or 2"):
        make_router("policy", path=str(tmp_path / "v3.pt")).fit(load(trace))


def test_escalates_after_the_step_where_pi_reaches_kappa(tmp_path, trace):
    policy = hand_made_policy(tmp_path / "pi.pt")
    row = run(trace, make_router("policy", path=policy)).outcomes.row(0, named=True)
    # s: pi(15) ~ 0, kept. ss: pi(5) = 0.9995 >= 0.5 -> kept (paid as a small step); the large model writes ssL.
    assert (row["path"], row["correct"], row["n_small"], row["n_large"], row["n_discarded"]) == ("ssL", True, 2, 1, 0)
    assert (row["cost_small"], row["cost_large"], row["cost_discarded"]) == (2 * SMALL_STEP, LARGE_STEP, 0)
    assert row["cost"] == 2 * SMALL_STEP + LARGE_STEP
    # kappa above pi(5): nothing escalates
    row = run(trace, make_router("policy", path=policy, kappa=0.9999)).outcomes.row(0, named=True)
    assert (row["path"], row["cost"]) == ("sss", 3 * SMALL_STEP)
    params = json.loads(row["params"])
    assert params["kappa"] == 0.9999 and params["escalate"] == "after"


def test_escalate_replace_discards_the_step_where_pi_reaches_kappa(tmp_path, trace):
    policy = hand_made_policy(tmp_path / "pi.pt", escalate="replace")
    row = run(trace, make_router("policy", path=policy, escalate="replace")).outcomes.row(0, named=True)
    # s kept. ss: pi(5) >= 0.5 -> discarded (10 paid), the large model writes sL and sLL.
    assert (row["path"], row["correct"], row["n_small"], row["n_large"], row["n_discarded"]) == ("sLL", True, 1, 2, 1)
    assert (row["cost_small"], row["cost_large"], row["cost_discarded"]) == (SMALL_STEP, 2 * LARGE_STEP, SMALL_STEP)
    assert row["cost"] == 2 * SMALL_STEP + 2 * LARGE_STEP


def test_a_final_small_step_is_never_escalated_under_after(tmp_path):
    steps = sized(comb_steps("p0", 3, correct=lambda path: path == "ssL"))
    for step in steps:
        step["conf_max_logit_math"] = {"s": 15.0, "ss": 15.0, "sss": 5.0}.get(step["path"], 10.0)
    root = build_trace(tmp_path / "t", steps, manifest=manifest())
    after = run(root, make_router("policy", path=hand_made_policy(tmp_path / "a.pt"))).outcomes.row(0, named=True)
    assert (after["path"], after["correct"], after["n_small"], after["n_discarded"]) == ("sss", False, 3, 0)
    policy = hand_made_policy(tmp_path / "r.pt", escalate="replace")
    replaced = run(root, make_router("policy", path=policy, escalate="replace")).outcomes.row(0, named=True)
    assert (replaced["path"], replaced["correct"], replaced["n_small"], replaced["n_discarded"]) == ("ssL", True, 2, 1)
    assert replaced["cost"] == 3 * SMALL_STEP + LARGE_STEP


def test_escalate_iff_pi_at_least_kappa(tmp_path):
    steps = sized(comb_steps("p0", 2))
    for step in steps:
        step["conf_max_logit_math"] = 10.0  # pi = 0.5 exactly
    root = build_trace(tmp_path / "t", steps, manifest=manifest())
    for escalate, escalated in (("after", "sL"), ("replace", "LL")):
        policy = hand_made_policy(tmp_path / f"{escalate}.pt", escalate=escalate)
        paths = [
            run(root, make_router("policy", path=policy, kappa=kappa, escalate=escalate)).outcomes["path"].to_list()
            for kappa in (0.5, 0.5000001)
        ]
        assert paths == [[escalated], ["ss"]]


def test_the_escalate_mode_must_be_the_one_the_policy_was_trained_for(tmp_path, trace):
    data = load(trace)
    with pytest.raises(TraceError, match="trained for escalate=after .* --param escalate=after"):
        make_router("policy", path=hand_made_policy(tmp_path / "a.pt"), escalate="replace").fit(data)
    # a file from before the option existed was trained by the replace process
    network, saved = load_policy(hand_made_policy(tmp_path / "old.pt"))
    del saved["escalate"]
    torch.save(saved, tmp_path / "old.pt")
    with pytest.raises(TraceError, match="trained for escalate=replace"):
        make_router("policy", path=str(tmp_path / "old.pt")).fit(data)
    make_router("policy", path=str(tmp_path / "old.pt"), escalate="replace").fit(data)
    with pytest.raises(TraceError, match="escalate must be one of after, replace"):
        make_router("policy", path=str(tmp_path / "old.pt"), escalate="never").fit(data)


@pytest.mark.parametrize("escalate", ["after", "replace"])
def test_kappa_sweep_equals_single_replays(tmp_path, escalate):
    rng = np.random.default_rng(2)
    steps = []
    for i in range(10):
        tree = sized(comb_steps(f"p{i}", 3, correct=lambda path, i=i: (path.count("L") + i) % 2 == 0))
        for step in tree:
            step["conf_max_logit_math"] = float(rng.uniform(7, 13))
        steps += tree
    root = build_trace(tmp_path / "t", steps, manifest=manifest())
    policy = hand_made_policy(tmp_path / "pi.pt", escalate=escalate)
    kappas = np.array([0.0, 0.2, 0.5, 0.8, 1.0])
    swept = run(root, make_router("policy", path=policy, escalate=escalate), sweep={"kappa": kappas}).outcomes
    paths = set()
    for config, kappa in enumerate(kappas):
        single = run(root, make_router("policy", path=policy, kappa=float(kappa), escalate=escalate)).outcomes
        assert swept.filter(swept["config"] == config).drop("config").equals(single.drop("config"))
        paths |= set(single["path"].to_list())
    assert len(paths) == (3 if escalate == "after" else 4)  # every one-way path of a 3-step comb


def test_difficulty_feature_reads_the_level_from_meta():
    steps = pl.DataFrame({"problem_id": ["a", "b", "c"], "depth": [0, 1, 2]})
    problems = pl.DataFrame(
        {"problem_id": ["a", "b", "c"], "meta": [json.dumps({"level": "Level 3"}), json.dumps({"level": 2}), "{}"]}
    )
    features = raw_features(steps, problems, ["difficulty", "depth"])
    np.testing.assert_array_equal(features[:, 1], [0, 1, 2])
    np.testing.assert_array_equal(features[:2, 0], [3.0, 2.0])
    assert np.isnan(features[2, 0])
    with pytest.raises(TraceError, match="unknown policy feature"):
        raw_features(steps, problems, ["mood"])


def test_bad_policy_files_are_named(tmp_path, trace):
    data = load(trace)
    with pytest.raises(TraceError, match="needs --param path"):
        make_router("policy").fit(data)
    with pytest.raises(TraceError, match="does not exist"):
        make_router("policy", path=str(tmp_path / "none.pt")).fit(data)
    (tmp_path / "junk.pt").write_bytes(b"not a policy")
    with pytest.raises(TraceError, match="not a readable policy file"):
        make_router("policy", path=str(tmp_path / "junk.pt")).fit(data)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(TraceError, match="not a trace policy file"):
        make_router("policy", path=str(tmp_path / "other.pt")).fit(data)
    save_policy(tmp_path / "wrong.pt", zeroed_network(n_features=3), ["depth"], [0.0], [1.0], kappa=0.5, hidden=4)
    with pytest.raises(TraceError, match=r"state_dict does not fit a 1-feature network .*0.weight: \(4, 3\), expected"):
        make_router("policy", path=str(tmp_path / "wrong.pt")).fit(data)
    with pytest.raises(TraceError, match="kappa must be a number"):
        make_router("policy", path=hand_made_policy(tmp_path / "pi.pt"), kappa="high")
