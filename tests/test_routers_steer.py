"""STEER on hand-built traces: per-step-index Gaussian mixtures fitted on the train split, switch and
step modes, outcomes and costs worked out by hand (small step 10 TFLOPs, large step 80)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.mixture import GaussianMixture
from test_routers_baselines import LARGE_STEP, SMALL_STEP, full_tree, manifest, sized
from tracebuild import build_trace, comb_steps

from replay.costs import make_cost_model
from replay.engine import ReplayData, replay
from replay.errors import TraceError
from replay.routers import make_router
from replay.store import open_trace

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


def test_switch_mode_escalates_at_the_first_unsure_draft_and_stays(tmp_path):
    test = with_confidence(comb_steps("q0", 3, correct=lambda p: p == "sLL"), {"s": CONFIDENT, "ss": UNSURE})
    test += with_confidence(comb_steps("q1", 3, correct=lambda p: p == "sss"), {"s": 15, "ss": 15, "sss": 15})
    train, evaluation = split_data(tmp_path, test)
    rows = outcome(train, evaluation, tau=0.5, mode="switch")
    q0 = rows["q0"]
    # s kept; ss drafted, unsure -> discarded (10 paid), large writes sL and then sLL without drafts.
    assert (q0["path"], q0["correct"], q0["n_small"], q0["n_large"], q0["n_discarded"]) == ("sLL", True, 1, 2, 1)
    assert q0["cost_discarded"] == SMALL_STEP
    assert q0["cost"] == SMALL_STEP + SMALL_STEP + 2 * LARGE_STEP
    q1 = rows["q1"]
    assert (q1["path"], q1["correct"], q1["cost"], q1["n_discarded"]) == ("sss", True, 3 * SMALL_STEP, 0)


def test_step_mode_returns_to_the_small_model_after_one_large_step(tmp_path):
    steps = with_confidence(full_tree("q0", 3, lambda p: p == "sLs"), {"s": 15, "ss": 5, "sLs": 15})
    train, evaluation = split_data(tmp_path, steps)
    row = outcome(train, evaluation, tau=0.5, mode="step")["q0"]
    assert (row["path"], row["correct"], row["n_small"], row["n_large"], row["n_discarded"]) == ("sLs", True, 2, 1, 1)
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
    assert below["path"] == "LLL" and below["n_discarded"] == 1
    assert above["path"] == "sss" and above["n_discarded"] == 0


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


def test_a_draft_without_math_tokens_is_kept(tmp_path):
    steps = with_confidence(comb_steps("q0", 2), {"s": None, "ss": 15.0})
    train, evaluation = split_data(tmp_path, steps)
    row = outcome(train, evaluation, tau=0.0)["q0"]  # tau=0 escalates every draft that has a confidence
    assert (row["path"], row["n_small"], row["n_discarded"]) == ("sL", 1, 1)


def test_unsure_draft_whose_large_rewrite_is_not_cached_is_a_miss(tmp_path):
    steps = [s for s in with_confidence(comb_steps("q0", 3), {"s": 5.0}) if not s["path"].startswith("L")]
    train, evaluation = split_data(tmp_path, steps)
    result = replay(evaluation, make_router("steer", tau=0.5).fit(train), make_cost_model("flops", evaluation.manifest))
    assert result.outcomes["misses"].to_list() == [1]
    assert result.misses.select("path", "model", "scorer").rows() == [("", "large", None)]


@pytest.mark.parametrize("mode", ["switch", "step"])
def test_sweep_equals_single_replays(tmp_path, mode):
    rng = np.random.default_rng(0)
    test = []
    for i in range(12):
        test += full_tree(f"q{i}", 3, lambda p, i=i: (p.count("L") + i) % 3 > 0)
    for step in test:
        step["conf_max_logit_math"] = float(rng.uniform(4, 16))
    train, evaluation = split_data(tmp_path, test)
    taus = np.round(np.linspace(0, 1, 11), 2)
    router = make_router("steer", mode=mode).fit(train)
    cost = make_cost_model("flops", evaluation.manifest)
    swept = replay(evaluation, router, cost, {"tau": taus}).outcomes
    paths = set()
    for config, tau in enumerate(taus):
        single = replay(evaluation, make_router("steer", mode=mode, tau=float(tau)).fit(train), cost).outcomes
        assert swept.filter(swept["config"] == config).drop("config", "params").equals(single.drop("config", "params"))
        paths |= set(single["path"].to_list())
    assert len(paths) > 3  # the sweep really changes routes
