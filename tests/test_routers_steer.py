"""STEER on hand-built traces: per-step-index Gaussian mixtures fitted on the train split, the
unconfidence rule (P(low | c) > tau and c below the high component's mean) on synthetic two-cluster and
one-cluster data, switch mode with escalate=after (default) and escalate=replace, step mode, outcomes and
costs worked out by hand (small step 10 TFLOPs, large step 80)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.mixture import GaussianMixture
from test_routers_baselines import LARGE_STEP, SMALL_STEP, full_tree, manifest, sized
from tracebuild import build_trace, comb_steps

from replay.costs import make_cost_model
from replay.data import ReplayData
from replay.routers import make_router
from replay.run import replay
from tracestore.errors import TraceError
from tracestore.store import open_trace

CONFIDENT, UNSURE = 15.0, 5.0


def train_steps(n: int = 20) -> list[dict]:
    """Comb trees whose small steps are confident (15 +- 1.4) in even problems, unsure (5 +- 1.4) in odd ones."""
    steps = []
    for i in range(n):
        for step in comb_steps(f"train{i}", 3):
            if step["path"][-1] == "s":
                step["conf_max_logit_math"] = (CONFIDENT if i % 2 == 0 else UNSURE) + 0.3 * (i % 10) - 1.35
            steps.append(step)
    return steps


def split_data(tmp_path, test_steps: list[dict]) -> tuple[ReplayData, ReplayData]:
    root = build_trace(tmp_path / "t", sized(train_steps() + test_steps), manifest=manifest())
    data = ReplayData.from_trace(open_trace(root))
    ids = data.problems["problem_id"].to_list()
    return (
        data.subset([i for i in ids if i.startswith("train")]),
        data.subset([i for i in ids if not i.startswith("train")]),
    )


def outcome(train, test, **params):
    router = make_router("steer", **params).fit(train)
    result = replay(test, router, make_cost_model("flops", test.manifest))
    return {row["problem_id"]: row for row in result.outcomes.iter_rows(named=True)}


def with_confidence(steps, confidence: dict[str, float]):
    for step in steps:
        if step["path"] in confidence:
            step["conf_max_logit_math"] = confidence[step["path"]]
    return steps


def test_switch_mode_keeps_the_unsure_step_and_escalates_after_it(tmp_path):
    right = lambda p: p in ("sLL", "ssL")  # noqa: E731
    test = with_confidence(comb_steps("q0", 3, correct=right), {"s": CONFIDENT, "ss": UNSURE, "sss": CONFIDENT})
    test += with_confidence(comb_steps("q1", 3, correct=lambda p: p == "sss"), {"s": 15, "ss": 15, "sss": 15})
    train, evaluation = split_data(tmp_path, test)
    rows = outcome(train, evaluation, tau=0.5, mode="switch")
    q0 = rows["q0"]
    # escalate=after (default): s kept; ss unsure but kept (paid as a small step); the large model writes ssL.
    assert (q0["path"], q0["correct"], q0["n_small"], q0["n_large"], q0["n_discarded"]) == ("ssL", True, 2, 1, 0)
    assert (q0["cost_small"], q0["cost_large"], q0["cost_discarded"]) == (2 * SMALL_STEP, LARGE_STEP, 0)
    assert q0["cost"] == 2 * SMALL_STEP + LARGE_STEP
    q1 = rows["q1"]
    assert (q1["path"], q1["correct"], q1["cost"], q1["n_discarded"]) == ("sss", True, 3 * SMALL_STEP, 0)


def test_switch_mode_with_escalate_replace_rewrites_the_unsure_step(tmp_path):
    right = lambda p: p in ("sLL", "ssL")  # noqa: E731
    test = with_confidence(comb_steps("q0", 3, correct=right), {"s": CONFIDENT, "ss": UNSURE, "sss": CONFIDENT})
    train, evaluation = split_data(tmp_path, test)
    q0 = outcome(train, evaluation, tau=0.5, mode="switch", escalate="replace")["q0"]
    # s kept; ss drafted, unsure -> discarded (10 paid), large writes sL and then sLL without drafts.
    assert (q0["path"], q0["correct"], q0["n_small"], q0["n_large"], q0["n_discarded"]) == ("sLL", True, 1, 2, 1)
    assert (q0["cost_small"], q0["cost_large"], q0["cost_discarded"]) == (SMALL_STEP, 2 * LARGE_STEP, SMALL_STEP)
    assert q0["cost"] == SMALL_STEP + SMALL_STEP + 2 * LARGE_STEP


def test_an_unsure_final_small_step_ends_the_walk_under_after_and_is_rewritten_under_replace(tmp_path):
    steps = with_confidence(comb_steps("q0", 3, correct=lambda p: p == "ssL"), {"s": 15, "ss": 15, "sss": UNSURE})
    train, evaluation = split_data(tmp_path, steps)
    after = outcome(train, evaluation, tau=0.5)["q0"]
    # the solution is finished: nothing left to escalate
    assert (after["path"], after["correct"], after["n_small"], after["n_large"], after["n_discarded"]) == (
        "sss",
        False,
        3,
        0,
        0,
    )
    replaced = outcome(train, evaluation, tau=0.5, escalate="replace")["q0"]
    assert (replaced["path"], replaced["correct"], replaced["n_small"], replaced["n_discarded"]) == ("ssL", True, 2, 1)
    assert replaced["cost"] == 3 * SMALL_STEP + LARGE_STEP


def test_step_mode_returns_to_the_small_model_after_one_large_step(tmp_path):
    steps = with_confidence(full_tree("q0", 3, lambda p: p == "sLs"), {"s": 15, "ss": 5, "sLs": 15})
    train, evaluation = split_data(tmp_path, steps)
    for escalate in ("after", "replace"):  # step mode always discards the unsure draft; escalate is not read
        row = outcome(train, evaluation, tau=0.5, mode="step", escalate=escalate)["q0"]
        assert (row["path"], row["correct"], row["n_small"], row["n_large"], row["n_discarded"]) == (
            "sLs",
            True,
            2,
            1,
            1,
        )
        assert row["cost"] == 3 * SMALL_STEP + LARGE_STEP


def test_tau_moves_the_escalation_point(tmp_path):
    # Between the clusters: posterior of the low component is near 1 at 5, near 0 at 15, ~mid at 10.
    steps = with_confidence(comb_steps("q0", 3), {"s": 10.0, "ss": 15.0, "sss": 15.0})
    train, evaluation = split_data(tmp_path, steps)
    router = make_router("steer").fit(train)
    posterior = router.low_posterior(np.array([0]), np.array([10.0]))[0]
    assert 0 < posterior < 1
    below = outcome(train, evaluation, tau=posterior - 1e-6)["q0"]
    above = outcome(train, evaluation, tau=posterior + 1e-6)["q0"]
    assert below["path"] == "sLL" and below["n_discarded"] == 0
    assert above["path"] == "sss" and above["n_discarded"] == 0
    replaced = outcome(train, evaluation, tau=posterior - 1e-6, escalate="replace")["q0"]
    assert replaced["path"] == "LLL" and replaced["n_discarded"] == 1


def test_mixtures_are_fitted_per_step_index_on_small_train_steps(tmp_path):
    train, _ = split_data(tmp_path, comb_steps("q0", 3))
    router = make_router("steer", seed=3).fit(train)
    assert sorted(router.mixtures_) == [0, 1, 2]
    small = train.steps.filter((train.steps["model"] == "small") & (train.steps["depth"] == 1))
    reference = GaussianMixture(n_components=2, random_state=3).fit(
        small["conf_max_logit_math"].to_numpy().astype(float).reshape(-1, 1)
    )
    values = np.array([5.0, 9.0, 11.0, 15.0])
    low = int(np.argmin(reference.means_.ravel()))
    np.testing.assert_allclose(
        router.low_posterior(np.ones(4, dtype=int), values), reference.predict_proba(values.reshape(-1, 1))[:, low]
    )
    # deeper step indices than any fitted one use the deepest mixture
    np.testing.assert_allclose(
        router.low_posterior(np.array([7]), values[:1]), router.low_posterior(np.array([2]), values[:1])
    )


def test_too_few_train_confidences_is_an_error(tmp_path):
    train, _ = split_data(tmp_path, comb_steps("q0", 3))
    with pytest.raises(TraceError, match="min_samples=50"):
        make_router("steer", min_samples=50).fit(train)
    with pytest.raises(TraceError, match="mode must be one of switch, step"):
        make_router("steer", mode="sometimes").fit(train)
    with pytest.raises(TraceError, match="escalate must be one of after, replace"):
        make_router("steer", escalate="before").fit(train)
    with pytest.raises(TraceError, match="tau must be a finite number in"):
        make_router("steer", tau=1.5).fit(train)


def test_a_draft_without_math_tokens_is_kept(tmp_path):
    steps = with_confidence(comb_steps("q0", 3), {"s": None, "ss": 10.0})
    train, evaluation = split_data(tmp_path, steps)
    # tau=0 escalates every step below the high component's mean with a positive posterior: ss, not s
    row = outcome(train, evaluation, tau=0.0)["q0"]
    assert (row["path"], row["n_small"], row["n_large"], row["n_discarded"]) == ("ssL", 2, 1, 0)
    row = outcome(train, evaluation, tau=0.0, escalate="replace")["q0"]
    assert (row["path"], row["n_small"], row["n_discarded"]) == ("sLL", 1, 1)


def test_unsure_step_whose_large_continuation_is_not_cached_is_a_miss(tmp_path):
    steps = with_confidence(comb_steps("q0", 3), {"s": 5.0})
    cost = None
    for escalate, dropped, node in (("after", "sL", "s"), ("replace", "L", "")):
        kept = [s for s in steps if not s["path"].startswith(dropped)]
        train, evaluation = split_data(tmp_path / escalate, kept)
        cost = make_cost_model("flops", evaluation.manifest)
        result = replay(evaluation, make_router("steer", tau=0.5, escalate=escalate).fit(train), cost)
        assert result.outcomes["misses"].to_list() == [1]
        assert result.misses.select("path", "model", "scorer").rows() == [(node, "large", None)]


@pytest.mark.parametrize("mode, escalate", [("switch", "after"), ("switch", "replace"), ("step", "after")])
def test_sweep_equals_single_replays(tmp_path, mode, escalate):
    rng = np.random.default_rng(0)
    test = []
    for i in range(12):
        test += full_tree(f"q{i}", 3, lambda p, i=i: (p.count("L") + i) % 3 > 0)
    for step in test:
        step["conf_max_logit_math"] = float(rng.uniform(4, 16))
    train, evaluation = split_data(tmp_path, test)
    taus = np.round(np.linspace(0, 1, 11), 2)
    router = make_router("steer", mode=mode, escalate=escalate).fit(train)
    cost = make_cost_model("flops", evaluation.manifest)
    swept = replay(evaluation, router, cost, {"tau": taus}).outcomes
    paths = set()
    for config, tau in enumerate(taus):
        single = make_router("steer", mode=mode, escalate=escalate, tau=float(tau))
        single = replay(evaluation, single.fit(train), cost).outcomes
        assert swept.filter(swept["config"] == config).drop("config", "params").equals(single.drop("config", "params"))
        paths |= set(single["path"].to_list())
    assert len(paths) >= 3  # the sweep really changes routes (switch-after has only sss, ssL and sLL)


# ---------------------------------------------------------------------- the unconfidence rule


def one_step_trace(tmp_path, train_confidences, test_confidences):
    """One-step solutions (step index 0 only): a train problem per train confidence, a test problem per test one;
    every escalated path is right, every small one wrong."""
    steps = []
    for prefix, values in (("train", train_confidences), ("q", test_confidences)):
        for i, value in enumerate(values):
            tree = comb_steps(f"{prefix}{i:03d}", 2, correct=lambda p: "L" in p)
            steps += with_confidence(tree, {"s": float(value), "ss": CONFIDENT + 0.01 * (i % 7)})
    root = build_trace(tmp_path / "t", sized(steps), manifest=manifest())
    data = ReplayData.from_trace(open_trace(root))
    ids = data.problems["problem_id"].to_list()
    return data.subset([i for i in ids if i.startswith("train")]), data.subset([i for i in ids if i.startswith("q")])


def by_formula(router, depth, c):
    """P(low | c) = w_low N(c; m_low, v_low) / sum_k w_k N(c; m_k, v_k), from the fitted mixture's parameters."""
    mixture, low = router.mixtures_[depth], router.low_component_[depth]
    weights, means, sds = mixture.weights_, mixture.means_.ravel(), np.sqrt(mixture.covariances_.ravel())
    density = weights * norm.pdf(c, means, sds)
    return density[low] / density.sum(), means[1 - low]


def test_two_clusters_a_confidence_above_the_confident_cluster_never_escalates(tmp_path):
    # unsure steps spread wide (2..10), confident ones narrow around 15: the wide low component's density
    # dominates far above 15, so P(low | c) is ~1 there; the rule keeps those steps.
    low = np.linspace(2, 10, 20)
    high = 15 + 0.15 * norm.ppf((np.arange(20) + 0.5) / 20)
    test = [2.0, 6.0, 14.0, 15.0, 15.2, 16.0, 17.0]
    train, evaluation = one_step_trace(tmp_path, np.concatenate([low, high]), test)
    router = make_router("steer", tau=0.5).fit(train)
    means = router.mixtures_[0].means_.ravel()
    assert means[router.low_component_[0]] == pytest.approx(6.0, abs=0.1)
    assert means[1 - router.low_component_[0]] == pytest.approx(15.0, abs=0.05)
    depths, c = np.zeros(len(test), dtype=int), np.array(test)
    posterior = router.low_posterior(depths, c)
    for value, p in zip(test, posterior):
        expected, high_mean = by_formula(router, 0, value)
        assert p == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert posterior[-2:].min() > 0.99  # the odd overlap: far above the confident cluster, "low" wins
    assert router.unconfident(depths, c, 0.5).tolist() == [True, True, True, False, False, False, False]
    rows = outcome(train, evaluation, tau=0.5)
    paths = [rows[f"q{i:03d}"]["path"] for i in range(len(test))]
    assert paths == ["sL", "sL", "sL", "ss", "ss", "ss", "ss"]


def test_one_cluster_splits_and_only_its_lower_side_escalates(tmp_path):
    cluster = 12 + 0.5 * norm.ppf((np.arange(40) + 0.5) / 40)
    test = [9.0, 11.0, 11.5, 12.0, 12.5, 13.0, 15.0]
    train, evaluation = one_step_trace(tmp_path, cluster, test)
    router = make_router("steer").fit(train)
    means = np.sort(router.mixtures_[0].means_.ravel())
    assert 11 < means[0] < 12 < means[1] < 13  # the mixture splits the one cluster
    depths, c = np.zeros(len(test), dtype=int), np.array(test)
    for tau in (0.0, 0.25, 0.5, 0.75, 0.99):
        expected = []
        for value in test:
            p, high_mean = by_formula(router, 0, value)
            expected.append(bool(p > tau and value < high_mean))
        assert router.unconfident(depths, c, tau).tolist() == expected
        assert not router.unconfident(depths, c, tau)[c >= means[1]].any()
        rows = outcome(train, evaluation, tau=tau)
        assert [rows[f"q{i:03d}"]["path"] == "sL" for i in range(len(test))] == expected
    assert router.unconfident(depths, c, 0.5).tolist()[:2] == [True, True]


def test_a_step_index_without_its_own_mixture_uses_the_largest_fitted_index_below(tmp_path):
    steps = train_steps()
    for step in steps:  # step index 1: only 5 confidences (below min_samples=10), index 2 keeps all 20
        if step["path"] == "ss" and int(step["problem_id"][5:]) >= 5:
            step["conf_max_logit_math"] = None
    root = build_trace(tmp_path / "t", sized(steps), manifest=manifest())
    train = ReplayData.from_trace(open_trace(root))
    router = make_router("steer").fit(train)
    assert sorted(router.mixtures_) == [0, 2]
    values = np.array([5.0, 9.0, 10.0, 11.0, 15.0])
    at = lambda depth: router.low_posterior(np.full(len(values), depth), values)  # noqa: E731
    np.testing.assert_array_equal(at(1), at(0))
    np.testing.assert_array_equal(at(5), at(2))
    np.testing.assert_array_equal(router.high_mean(np.array([1, 3])), router.high_mean(np.array([0, 2])))


def test_a_mixture_file_must_name_the_lower_mean_component_low(tmp_path):
    train, _ = split_data(tmp_path, comb_steps("q0", 3))
    router = make_router("steer").fit(train)
    path = tmp_path / "steer.json"
    router.save(path)
    saved = json.loads(path.read_text())
    saved["mixtures"][0]["low_component"] = 1 - saved["mixtures"][0]["low_component"]
    path.write_text(json.dumps(saved))
    with pytest.raises(TraceError, match="low_component .* has the higher mean"):
        make_router("steer", gmms=str(path)).fit(train)
