"""`trace train policy`: the decision process read off a comb trace (escalate=after and replace), costs in the
replay cost model's units, the thresholded policy S, V-trace targets toward it, the constraint under it, the CPO
step and the kappa rule checked by hand; learning on a comb trace with a clear signal (each property for at least
4 of 5 seeds); same seed, same bytes, also in another interpreter whose threads and BLAS, numpy and torch kernels
differ; the policy replayed on held-out problems meets its coverage target; training that ends off its target
says so, in the file too, and the report marks it; bad input gives one clear line.

The signal trace: 400 problems, 3-step comb trees; small steps write 10 tokens, large 20. In 40% of them the
small model goes wrong at one step b (1 or 2) and its step b-1 is unconfident (conf_max_logit_math ~ 6,
otherwise ~ 12): a warning one step ahead, what a policy that escalates *after* a step can act on. The large
model is right from the root and from every node up to the warning step, wrong after the bad step.
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score
from test_routers_policy import hand_made_policy
from tracebuild import build_trace, comb_steps, default_manifest
from typer.testing import CliRunner

from cli import app
from replay.artifacts import load_train_split
from replay.costs import Price
from replay.data import ReplayData
from replay.policy_training.episodes import comb_episodes, expected_miss, rollout
from replay.policy_training.results import training_flags
from replay.policy_training.update import (
    cpo_multipliers,
    kappa_step_size,
    kappa_update,
    target_ratios,
    threshold_miscoverage,
    thresholded,
    vtrace,
)
from replay.routers import make_router
from replay.routers.policy import load_policy
from replay.run import replay_trace
from replay.splits import DEFAULT_FRACTIONS, assign_splits
from replay.train_policy import Hyperparameters, train_policy
from tracestore.errors import TraceError
from tracestore.store import open_trace

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
ALPHA = 0.1
STEPS = 80
SEEDS = range(5)
HIDDEN = 16  # the learning tests train narrow networks: five trainings in seconds
UNSURE, SURE = 6.0, 12.0
SMALL_FLOPS, LARGE_FLOPS = 2 * 100_000 * 10 / 1e12, 2 * 800_000 * 20 / 1e12  # TFLOPs of a small / large step
API_PRICES = (("small", Price(0.1, 0.05, 0.2)), ("large", Price(1.0, 0.5, 2.0)))  # USD per 1M tokens


def cli(*args):
    return runner.invoke(app, [*map(str, args)])


def signal_steps(n_problems=400, n_steps=3, p_bad=0.4, seed=0):
    rng = np.random.default_rng(seed)
    steps = []
    for i in range(n_problems):
        bad = int(rng.integers(1, n_steps)) if rng.random() < p_bad else None

        def correct(path, bad=bad):
            small_prefix = path.index("L") if "L" in path else len(path)
            return bad is None or bad >= small_prefix

        for step in comb_steps(f"p{i:03d}", n_steps, correct=correct):
            small = step["path"][-1] == "s"
            unsure = small and bad is not None and bad - 1 == len(step["path"]) - 1
            step["n_gen_tokens"] = 10 if small else 20
            step["conf_max_logit_math"] = float(rng.normal(UNSURE if unsure else SURE, 0.8))
            steps.append(step)
    return steps


@pytest.fixture(scope="module")
def signal_trace(tmp_path_factory):
    return build_trace(tmp_path_factory.mktemp("signal") / "trace", signal_steps())


@pytest.fixture(scope="module")
def trained(signal_trace, tmp_path_factory):
    """The policy file trained with each of SEEDS (escalate after, cost flops), once for the module."""
    paths = []
    for seed in SEEDS:
        out = tmp_path_factory.mktemp(f"policy-{seed}") / "policy.pt"
        train_policy(signal_trace, out, Hyperparameters(alpha=ALPHA, steps=STEPS, seed=seed, hidden=HIDDEN))
        paths.append(out)
    return paths


def most_seeds(passed: list[bool]) -> None:
    """A property of training holds for all seeds but at most one."""
    assert sum(passed) >= len(passed) - 1, passed


# ---------------------------------------------------------------------- by hand on a 3-step comb tree


@pytest.fixture
def three_step(tmp_path):
    """sss and ssL wrong, sLL and LLL right; small steps write 10 tokens, large 20 (60 for the large model
    alone); verifier scores (all pass) for the small steps, none for the large ones."""
    steps = comb_steps("p0", 3, correct=lambda path: path in ("sLL", "LLL"))
    for step in steps:
        step["n_gen_tokens"] = 10 if step["path"][-1] == "s" else 20
    scores = [
        {"step_id": f"p0/0/{path}", "scorer": "verifier", "value": 1.0, "detail": None, "n_tokens_processed": 5}
        for path in ("s", "ss", "sss")
    ]
    return steps, scores


def episodes_of(root, **hp):
    data = ReplayData.from_trace(open_trace(root))
    return comb_episodes(data, Hyperparameters(**hp))


def test_episodes_after_decide_after_each_non_final_small_step(tmp_path, three_step):
    steps, _ = three_step
    root = build_trace(tmp_path / "t", steps)
    episodes = episodes_of(root)  # defaults: escalate after, cost flops
    data = ReplayData.from_trace(open_trace(root))
    paths = data.steps["path"].to_list()
    # two decisions: after s, after ss; the final sss ends the episode without one
    assert episodes.length.tolist() == [2]
    assert [paths[row] for row in episodes.observed[0]] == ["s", "ss"]
    # costs in TFLOPs divided by the large model alone's (3 large steps): the first small step is paid up front
    scale = 3 * LARGE_FLOPS
    assert (episodes.cost_scale, episodes.cost_unit) == (pytest.approx(scale), "TFLOPs")
    assert episodes.base_cost[0] == pytest.approx(SMALL_FLOPS / scale)
    np.testing.assert_allclose(episodes.keep_cost[0], [SMALL_FLOPS / scale] * 2)  # ss, then sss
    np.testing.assert_allclose(episodes.escalate_cost[0], [2 / 3, 1 / 3])  # sL + sLL, then ssL
    assert episodes.escalate_correct[0].tolist() == [True, False]  # sLL right, ssL wrong
    assert (episodes.small_correct[0], episodes.large_right[0], episodes.has_verifier) == (False, True, False)
    np.testing.assert_allclose(episodes.large_alone_cost, [1.0])
    assert episodes.best_coverage() == 1.0
    # the large-token option: small steps cost nothing
    tokens = episodes_of(build_trace(tmp_path / "k", steps), cost="tokens")
    np.testing.assert_allclose(tokens.keep_cost[0], [0, 0])
    np.testing.assert_allclose(tokens.escalate_cost[0], [40 / 60, 20 / 60])
    assert tokens.cost_scale == 60.0


def test_episodes_replace_decide_on_every_small_draft(tmp_path, three_step):
    steps, _ = three_step
    episodes = episodes_of(build_trace(tmp_path / "t", steps), escalate="replace")
    assert episodes.length.tolist() == [3]
    scale = 3 * LARGE_FLOPS
    assert episodes.base_cost[0] == 0
    np.testing.assert_allclose(episodes.keep_cost[0], [SMALL_FLOPS / scale] * 3)
    # escalating at draft t: the discarded draft and the large model's 3 - t steps
    np.testing.assert_allclose(
        episodes.escalate_cost[0], [(SMALL_FLOPS + (3 - t) * LARGE_FLOPS) / scale for t in range(3)]
    )
    assert episodes.escalate_correct[0].tolist() == [True, True, False]  # LLL, sLL, ssL


def test_api_cost_is_the_replay_cost_models(tmp_path, three_step):
    steps, _ = three_step
    prices = API_PRICES
    episodes = episodes_of(build_trace(tmp_path / "t", steps), cost="api", prices=prices)
    assert episodes.cost_unit == "US cents"

    def cents(path):  # in US cents; n_prompt_tokens = 20 + 4 (depth), none cached, as tracebuild writes them
        price = dict(prices)["large" if path[-1] == "L" else "small"]
        prompt, out = 20 + 4 * (len(path) - 1), 10 if path[-1] == "s" else 20
        return 100 * (price.input * prompt + price.output * out) / 1e6

    scale = cents("L") + cents("LL") + cents("LLL")
    assert episodes.cost_scale == pytest.approx(scale)
    assert episodes.base_cost[0] == pytest.approx(cents("s") / scale)
    np.testing.assert_allclose(episodes.keep_cost[0], [cents("ss") / scale, cents("sss") / scale])
    np.testing.assert_allclose(episodes.escalate_cost[0], [(cents("sL") + cents("sLL")) / scale, cents("ssL") / scale])


def test_rollouts_end_at_the_first_escalation(tmp_path, three_step):
    steps, _ = three_step
    episodes = episodes_of(build_trace(tmp_path / "t", steps), cost="tokens")
    batch = rollout(episodes, np.array([0, 0, 0]), np.array([[True, True], [False, False], [False, True]]))
    assert batch.mask.astype(int).tolist() == [[1, 0], [1, 1], [1, 1]]
    assert batch.action.tolist() == [[1, 0], [0, 0], [0, 1]]
    assert batch.reward.tolist() == [[1, 0], [0, 0], [0, 0]]  # sLL right; sss and ssL wrong
    np.testing.assert_allclose(batch.cost, [[2 / 3, 0], [0, 0], [0, 1 / 3]])
    np.testing.assert_allclose(batch.total_cost, [2 / 3, 0, 1 / 3])
    assert batch.correct.tolist() == [True, False, False]
    assert batch.covered.tolist() == [True, False, False]


def test_an_episode_whose_first_small_step_is_final_has_no_decision(tmp_path):
    steps = comb_steps("p0", 1, correct=lambda path: path == "s") + comb_steps("p1", 2)
    episodes = episodes_of(build_trace(tmp_path / "t", steps), cost="tokens")
    assert episodes.length.tolist() == [0, 1]
    batch = rollout(episodes, np.array([0, 1]), np.array([[True], [True]]))
    assert batch.mask.astype(int).tolist() == [[0], [1]]
    assert batch.reward.tolist() == [[0], [1]]  # p0 has no decision to reward; p1's sL is right
    assert batch.correct.tolist() == [True, True]
    np.testing.assert_allclose(expected_miss(episodes, np.array([[1.0], [0.0]])), [0.0, 1.0])  # p1: ss wrong


def test_verifier_scores_count_towards_coverage(tmp_path, three_step):
    steps, scores = three_step
    episodes = episodes_of(build_trace(tmp_path / "t", steps, scores=scores))
    assert episodes.has_verifier
    # every small step passes the verifier: the wrong all-small chain still counts as covered
    assert episodes.small_success[0] and not episodes.small_correct[0]
    # escalating after ss keeps s, ss (verified) and the unscored large step ssL: not verified, and wrong
    assert episodes.escalate_success[0].tolist() == [True, False]
    batch = rollout(episodes, np.array([0, 0]), np.array([[False, False], [False, True]]))
    assert batch.covered.tolist() == [True, False]


def test_expected_miss_by_hand(tmp_path, three_step):
    steps, scores = three_step
    episodes = episodes_of(build_trace(tmp_path / "t", steps))
    # after: escalate first after s (p 1/2, sLL right), after ss (1/4, ssL wrong), never (1/4, sss wrong)
    np.testing.assert_allclose(expected_miss(episodes, np.full((1, 2), 0.5)), [1 / 4 + 1 / 4])
    np.testing.assert_allclose(expected_miss(episodes, np.array([[0.0, 1.0]])), [1.0])
    np.testing.assert_allclose(expected_miss(episodes, np.array([[1.0, 0.3]])), [0.0])
    verified = episodes_of(build_trace(tmp_path / "v", steps, scores=scores))
    np.testing.assert_allclose(expected_miss(verified, np.full((1, 2), 0.5)), [1 / 4])  # sss is verified
    replace = episodes_of(build_trace(tmp_path / "r", steps), escalate="replace")
    # replace: at draft 0 (1/2, LLL right), 1 (1/4, sLL right), 2 (1/8, ssL wrong), never (1/8, sss wrong)
    np.testing.assert_allclose(expected_miss(replace, np.full((1, 3), 0.5)), [1 / 8 + 1 / 8])


# ---------------------------------------------------------------------- the thresholded policy and V-trace


def test_thresholded_policy_by_hand():
    p = np.array([0.1, 0.2, 0.5, 0.6, 0.75, 0.95])
    # kappa 0.2: escalate in iff p >= 0.2, continue in iff 1 - p >= 0.2; both -> 1/2
    np.testing.assert_array_equal(thresholded(p, 0.2), [0.0, 0.5, 0.5, 0.5, 0.5, 1.0])
    # kappa 0.7 > 1/2: at most one action passes; none -> continue (eq. 6)
    np.testing.assert_array_equal(thresholded(p, 0.7), [0.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    np.testing.assert_array_equal(thresholded(p, 0.0), [0.5] * 6)


def test_vtrace_targets_toward_the_thresholded_policy_by_hand(tmp_path):
    """Three episodes of the 3-step comb under replace (3 decisions), sss/sLL wrong, ssL/LLL right, kappa 0.2,
    the behaviour policy = pi:
    A continues, continues, escalates (ssL): pi(escalate) 0.1, 0.6, 0.9 -> S(taken) 1 (only continue passes),
      1/2 (both pass), 1 (only escalate passes); ratios 1/0.9, 0.5/0.4 = 1.25, 1/0.9.
    B escalates at once (LLL): pi 0.22, both pass: S 1/2, ratio 0.5/0.22 = 2.27 -> rho clipped to 2, c to 1.
    C continues where only escalate passes (pi 0.85: ratio 0, the trace is cut), then escalates (sLL) at pi 0.5:
      both pass, ratio 0.5/0.5 = 1."""
    steps = comb_steps("p0", 3, correct=lambda path: path in ("ssL", "LLL"))
    episodes = episodes_of(build_trace(tmp_path / "t", steps), escalate="replace", cost="tokens")
    escalate = np.array([[False, False, True], [True, False, False], [False, True, False]])
    batch = rollout(episodes, np.array([0, 0, 0]), escalate)
    assert batch.mask.astype(int).tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch.reward.tolist() == [[0, 0, 1], [1, 0, 0], [0, 0, 0]]
    p = np.array([[0.1, 0.6, 0.9], [0.22, 0.5, 0.5], [0.85, 0.5, 0.5]])
    mu = np.where(batch.action == 1, p, 1 - p)
    ratios = target_ratios(p, mu, batch.action, kappa=0.2)
    np.testing.assert_allclose(ratios[batch.mask], [1 / 0.9, 1.25, 1 / 0.9, 0.5 / 0.22, 0.0, 1.0])
    values = np.array([[0.5, 0.6, 0.2], [0.3, 9.0, 9.0], [0.4, 0.7, 9.0]])
    targets, advantages = vtrace(batch.reward, values, ratios, batch.mask.astype(float), rho_bar=2.0, c_bar=1.0)
    # A: delta_2 = (1/0.9)(1 - 0.2) = 0.8889 -> v_2 = 1.0889; delta_1 = 1.25 (0.2 - 0.6) = -0.5 -> v_1 = 0.6 - 0.5
    #    + 0.8889 = 0.9889; delta_0 = (1/0.9)(0.6 - 0.5) = 0.1111 -> v_0 = 0.5 + 0.1111 + (0.9889 - 0.6) = 1.0
    d2, d1, d0 = (1 / 0.9) * 0.8, -0.5, (1 / 0.9) * 0.1
    a2 = 0.2 + d2
    a1 = 0.6 + d1 + d2
    a0 = 0.5 + d0 + (a1 - 0.6)
    # B: rho = 2: v_0 = 0.3 + 2 (1 - 0.3) = 1.7.  C: rho_0 = c_0 = 0 -> v_0 = V_0; v_1 = 0.7 + (0 - 0.7) = 0
    np.testing.assert_allclose(targets, [[a0, a1, a2], [1.7, 0, 0], [0.4, 0.0, 0]], atol=1e-12)
    assert a0 == pytest.approx(1.0)
    # advantages r_t + v_{t+1} - V(o_t), no rho factor
    np.testing.assert_allclose(
        advantages, [[a1 - 0.5, a2 - 0.6, 1 - 0.2], [1 - 0.3, 0, 0], [0.0 - 0.4, -0.7, 0]], atol=1e-12
    )


def test_vtrace_three_decisions_cut_by_c_and_discounted():
    rewards = np.array([[0.0, 0.0, 1.0], [0.0, 0.5, 0.0]])
    values = np.array([[0.5, 0.4, 0.8], [0.2, 0.1, 7.0]])
    ratios = np.array([[0.5, 3.0, 1.5], [1.0, 1.0, 1.0]])
    mask = np.array([[1.0, 1, 1], [1, 1, 0]])
    targets, advantages = vtrace(rewards, values, ratios, mask, gamma=0.9, rho_bar=2.0, c_bar=1.0)
    # episode 0: delta_2 = 1.5 (1 - 0.8) = 0.3; delta_1 = 2 (0.9 * 0.8 - 0.4) = 0.64; delta_0 = 0.5 (0.9 * 0.4 - 0.5)
    d2, d1, d0 = 0.3, 0.64, 0.5 * (0.36 - 0.5)
    v2, v1 = 0.8 + d2, 0.4 + d1 + 0.9 * 1.0 * d2
    v0 = 0.5 + d0 + 0.9 * 0.5 * (v1 - 0.4)
    np.testing.assert_allclose(targets[0], [v0, v1, v2])
    np.testing.assert_allclose(advantages[0], [0.9 * v1 - 0.5, 0.9 * v2 - 0.4, 1 - 0.8])
    # episode 1 ends after two decisions: on-policy, the targets are the discounted returns
    np.testing.assert_allclose(targets[1], [0.9 * 0.5, 0.5, 0.0])


# ---------------------------------------------------------------------- the constraint under the thresholded policy


def enumerable_trace(tmp_path):
    """Eight 3-step combs whose small steps' confidences put the hand-made policy's pi(escalate) near 0 (15), near 1
    (5) or at exactly 1/2 (10), and whose outcomes differ per problem."""
    confidences = [(15, 15), (5, 15), (15, 5), (5, 5), (15, 15), (10, 15), (15, 10), (5, 15)]
    right = [{"sss"}, {"sLL"}, {"ssL", "LLL"}, set(), {"LLL"}, {"sLL", "LLL"}, {"ssL", "LLL"}, {"ssL", "LLL"}]
    steps = []
    for i, ((first, second), good) in enumerate(zip(confidences, right)):
        tree = comb_steps(f"p{i}", 3, correct=lambda path, good=good: path in good)
        for step in tree:
            step["conf_max_logit_math"] = {"s": first, "ss": second}.get(step["path"], 15.0)
        steps += tree
    return build_trace(tmp_path / "t", steps)


def test_the_constraint_under_the_thresholded_policy_matches_a_direct_count(tmp_path):
    root = enumerable_trace(tmp_path)
    policy = hand_made_policy(tmp_path / "pi.pt")
    data = ReplayData.from_trace(open_trace(root))
    episodes = comb_episodes(data, Hyperparameters(cost="tokens"))
    router = make_router("policy", path=policy).fit(data)
    p_rows = router.escalate_probability(data.steps, data.problems)
    p = np.where(episodes.valid, p_rows[np.maximum(episodes.observed, 0)], 0.0)
    large = replay_trace(root, make_router("large-only"), split="all").outcomes["correct"].to_numpy()
    for kappa in (0.7, 0.9):  # kappa > 1/2: no ties, S is the deployed rule
        replayed = replay_trace(root, make_router("policy", path=policy, kappa=kappa), split="all").outcomes
        uncovered = (large & ~replayed["correct"].to_numpy()).mean()
        assert threshold_miscoverage(episodes, p, kappa) == pytest.approx(uncovered)
    # kappa 0.3: pi = 1/2 exactly at p5's s and p6's ss, where both actions pass and S takes each with 1/2.
    # By hand: p0 sss right; p1 escalates after s (sLL right); p2 escalates after ss (ssL right); p3 after s (sLL
    # wrong, large alone wrong: covered); p4 sss wrong, large right: missed; p5 1/2 sLL (right) + 1/2 continue to
    # sss (wrong): 1/2 missed; p6 continue after s, then 1/2 ssL (right) + 1/2 sss (wrong): 1/2 missed; p7 after
    # s: sLL wrong, large right: missed.
    assert threshold_miscoverage(episodes, p, 0.3) == pytest.approx((1 + 0.5 + 0.5 + 1) / 8)
    # deployed (eq. 6) breaks the ties toward escalation: p5 (sLL) and p6 (ssL) covered
    replayed = replay_trace(root, make_router("policy", path=policy, kappa=0.3), split="all").outcomes
    assert (large & ~replayed["correct"].to_numpy()).mean() == pytest.approx(2 / 8)


# ---------------------------------------------------------------------- kappa


def test_kappa_rule_by_hand():
    assert kappa_update(0.5, coverage=1.0, alpha=0.02, eta=0.1) == pytest.approx(0.502)  # covered: slowly up
    assert kappa_update(0.5, coverage=0.8, alpha=0.02, eta=0.1) == pytest.approx(0.482)  # one miss in 5: down
    assert kappa_update(0.999, coverage=1.0, alpha=0.02, eta=0.1) == 1.0
    assert kappa_update(0.01, coverage=0.0, alpha=0.02, eta=0.1) == 0.0
    assert kappa_update(0.3, coverage=0.98, alpha=0.02, eta=0.1) == pytest.approx(0.3)  # on target: stays
    hp = Hyperparameters(eta=0.1, eta_decay=0.6)
    assert [kappa_step_size(hp, k) for k in (1, 2, 3)] == pytest.approx([0.1, 0.1 / 2**0.6, 0.1 / 3**0.6])


def kappa_trace(tmp_path, kind_of_train, kind_of_rest):
    """Problems whose coverage does not depend on the policy: "covered" (the large model alone is wrong), "missed"
    (the large model alone is right and every path after the first small step wrong), "verified" (like missed, but
    every step passes the verifier). Train problems get ``kind_of_train``, the others ``kind_of_rest``."""
    ids = [f"k{i:02d}" for i in range(30)]
    splits = assign_splits(ids, 0, DEFAULT_FRACTIONS)
    steps, scores = [], []
    for pid, split in zip(ids, splits):
        kind = kind_of_train if split == "train" else kind_of_rest
        tree = comb_steps(pid, 3, correct=lambda path, kind=kind: kind != "covered" and path == "LLL")
        steps += tree
        if kind == "verified":
            scores += [
                {
                    "step_id": f"{pid}/0/{s['path']}",
                    "scorer": "verifier",
                    "value": 1.0,
                    "detail": None,
                    "n_tokens_processed": 5,
                }
                for s in tree
            ]
    return build_trace(tmp_path / f"{kind_of_train}-{kind_of_rest}", steps, scores=scores or None)


@pytest.mark.parametrize(
    "train_kind, rest_kind, sign", [("covered", "missed", 1), ("missed", "covered", -1), ("verified", "missed", 1)]
)
def test_kappa_follows_eq_5_for_three_steps(tmp_path, train_kind, rest_kind, sign):
    """kappa_0 = 0.5, eta = 0.1, alpha = 0.02; only train episodes feed it, whatever the others are.
    Covered every step: kappa_k = kappa_{k-1} + 0.1 x 0.02 -> 0.502, 0.504, 0.506.
    Missed every step: kappa_k = kappa_{k-1} - 0.1 x 0.98 -> 0.402, 0.304, 0.206."""
    root = kappa_trace(tmp_path, train_kind, rest_kind)
    hp = Hyperparameters(steps=3, alpha=0.02, eta=0.1, kappa=0.5, cost="tokens")
    result = train_policy(root, tmp_path / "p.pt", hp)
    expected = [0.502, 0.504, 0.506] if sign > 0 else [0.402, 0.304, 0.206]
    assert result.log["kappa"].to_list() == pytest.approx(expected, abs=1e-12)
    assert result.log["eta"].to_list() == [0.1] * 3
    assert result.log["coverage"].to_list() == [1.0 if sign > 0 else 0.0] * 3
    assert result.log["verifier"].to_list() == [train_kind == "verified"] * 3
    assert result.kappa == pytest.approx(expected[-1])
    # with decaying steps eta_k = 0.1 / k^0.6: 0.1, 0.0659754, 0.0517282
    decayed = train_policy(root, tmp_path / "d.pt", Hyperparameters(**{**vars(hp), "eta_decay": 0.6}))
    steps = [0.1, 0.1 / 2**0.6, 0.1 / 3**0.6]
    change = [e * 0.02 if sign > 0 else -e * 0.98 for e in steps]
    assert decayed.log["kappa"].to_list() == pytest.approx(list(np.cumsum([0.5, *change])[1:]), abs=1e-12)


def test_cpo_step_solves_the_trust_region_problem():
    """x from the multipliers maximises g.x subject to x'Hx/2 <= delta and b.x + c <= 0: x = H^-1 (g - nu b) / lam
    makes the Lagrangian stationary, so feasibility, lam, nu >= 0 and complementary slackness prove it optimal
    (the problem is convex)."""
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(200):
        root = rng.normal(size=(3, 3))
        hessian = root @ root.T + 0.5 * np.eye(3)
        g, b, c, delta = rng.normal(size=3), rng.normal(size=3), 0.3 * rng.normal(), 0.05
        inverse = np.linalg.inv(hessian)
        lam, nu, case = cpo_multipliers(g @ inverse @ g, g @ inverse @ b, b @ inverse @ b, c, delta)
        seen.add(case)
        assert lam >= 0 and nu >= 0
        if case == "recovery":  # nothing feasible: the step that lowers b.x most within the region
            x = -nu * inverse @ b
            assert x @ hessian @ x / 2 == pytest.approx(delta) and b @ x + c > 0
            continue
        x = (inverse @ g - nu * inverse @ b) / lam
        assert x @ hessian @ x / 2 <= delta * (1 + 1e-9) and b @ x + c <= 1e-9
        assert lam * (x @ hessian @ x / 2 - delta) == pytest.approx(0, abs=1e-9)
        assert nu * (b @ x + c) == pytest.approx(0, abs=1e-9)
    assert seen == {"cpo", "trpo", "recovery"}


# ---------------------------------------------------------------------- learning


def test_the_command_says_what_it_wrote(signal_trace, tmp_path):
    out = tmp_path / "policy.pt"
    result = cli("train", "policy", signal_trace, "--alpha", ALPHA, "--steps", 5, "--out", out)
    assert result.exit_code == 0, result.output
    said = " ".join(result.stdout.split())
    assert "no verifier scores" in said and "coverage" in said and "TFLOPs per query" in said
    assert f"policy file SHA-256 {hashlib.sha256(out.read_bytes()).hexdigest()}" in said
    train = load_train_split(signal_trace, 0, DEFAULT_FRACTIONS)
    _, saved = load_policy(out)
    assert saved["alpha"] == ALPHA and saved["features"] == ["conf_max_logit_math", "depth", "is_final", "n_gen_tokens"]
    assert (saved["escalate"], saved["cost_model"], saved["cost_unit"], saved["hidden"]) == (
        "after",
        "flops",
        "TFLOPs",
        64,
    )
    assert saved["train_problem_ids"] == sorted(train.problems["problem_id"].to_list())
    assert (out.parent / "policy.log.parquet").is_file()


def test_learns_to_escalate_after_a_low_confidence_step(trained, signal_trace):
    """It ranks unconfident steps above confident ones at every step index, hardly ever escalates after a
    confident step, and escalates after enough unconfident ones for its coverage target: each bad step that is
    not escalated ahead of is a miss, so at least 1 - alpha / (share of problems with a bad step) of them (less a
    margin: the target holds on the train split only up to kappa's noise)."""
    train = load_train_split(signal_trace, 0, DEFAULT_FRACTIONS)
    data = ReplayData.from_trace(open_trace(signal_trace))
    small = data.steps.filter((pl.col("model") == "small") & ~pl.col("is_final"))  # the steps decided after
    unsure = (small["conf_max_logit_math"] < (UNSURE + SURE) / 2).to_numpy()
    depth = small["depth"].to_numpy()
    needed = 1 - ALPHA * data.problems.height / unsure.sum()  # one unconfident step per problem with a bad step
    ranks, confident, unconfident = [], [], []
    for path in trained:
        router = make_router("policy", path=str(path)).fit(train)
        p_escalate = router.escalate_probability(small, data.problems)
        escalates = p_escalate >= router.kappa_
        ranks.append(all(roc_auc_score(unsure[depth == d], p_escalate[depth == d]) > 0.95 for d in np.unique(depth)))
        confident.append(escalates[~unsure].mean() < 0.02)
        unconfident.append(escalates[unsure].mean() > needed - 0.15)
    most_seeds(ranks)
    most_seeds(confident)
    most_seeds(unconfident)


def test_training_log_records_every_step_and_follows_the_kappa_rule(trained):
    taken, critics_learn = [], []
    for path in trained:
        log = pl.read_parquet(path.with_name("policy.log.parquet"))
        assert log["step"].to_list() == list(range(1, STEPS + 1))
        for column in (
            "reward",
            "cost",
            "coverage",
            "rollout_coverage",
            "kappa",
            "eta",
            "success_critic_loss",
            "cost_critic_loss",
            "kl",
            "miscoverage",
            "constraint",
            "nu",
            "lam",
            "case",
            "line_search",
            "alpha",
            "verifier",
        ):
            assert column in log.columns
        assert (log["kl"] <= 0.01 + 1e-9).all() and not log["verifier"].any()
        np.testing.assert_allclose(log["constraint"], log["miscoverage"] - ALPHA)
        kappas = [0.5, *log["kappa"].to_list()]
        for before, after, coverage, eta in zip(kappas, kappas[1:], log["coverage"].to_list(), log["eta"].to_list()):
            assert after == pytest.approx(kappa_update(before, coverage, ALPHA, eta))
        assert (log["eta"] == 0.1).all()
        assert load_policy(path)[1]["kappa"] == log["kappa"][-1]
        taken.append((log["line_search"] >= 0).mean() > 0.3)  # the line search accepts a good share of CPO steps
        # the critics learn: their loss over the last 30 steps is below that of the first 10
        critics_learn.append(log["cost_critic_loss"][-30:].mean() < log["cost_critic_loss"][:10].mean())
    most_seeds(taken)
    most_seeds(critics_learn)


def test_replayed_policy_meets_the_coverage_target_on_held_out_problems(trained, signal_trace, tmp_path):
    large = cli(
        "replay", signal_trace, "--router", "large-only", "--split", "test", "--out", tmp_path / "large.parquet"
    )
    assert large.exit_code == 0, large.output
    large_outcomes = pl.read_parquet(tmp_path / "large.parquet")
    large_right = large_outcomes.select("problem_id", large_right="correct")
    covers, cheap = [], []
    for seed, path in zip(SEEDS, trained):
        out = tmp_path / f"policy-{seed}.parquet"
        result = cli(
            "replay", signal_trace, "--router", "policy", "--param", f"path={path}", "--split", "test", "--out", out
        )
        assert result.exit_code == 0, result.output
        outcomes = pl.read_parquet(out)
        covered = outcomes.join(large_right, on="problem_id").select(pl.col("correct") | ~pl.col("large_right"))
        n, k = covered.height, int(covered.to_series().sum())
        assert n > 50 and outcomes["misses"].sum() == 0
        covers.append(binomtest(k, n).proportion_ci(confidence_level=0.95).high >= 1 - ALPHA)
        cheap.append(outcomes["cost"].mean() < 0.5 * large_outcomes["cost"].mean())  # much cheaper than large alone
    most_seeds(covers)
    most_seeds(cheap)


@pytest.mark.parametrize("cost, prices", [("flops", ()), ("flops+prefill", ()), ("api", API_PRICES)])
def test_the_trained_cost_is_the_cost_replay_reports(signal_trace, tmp_path, cost, prices):
    """The policy optimises the number `trace replay` shows: its cost on the train episodes, in the cost model's
    units, equals the replay's mean cost on the train split."""
    result = train_policy(signal_trace, tmp_path / "p.pt", Hyperparameters(steps=10, cost=cost, prices=prices))
    router = make_router("policy", path=str(tmp_path / "p.pt"))
    outcomes = replay_trace(
        signal_trace, router, split="train", cost=cost, prices=dict(prices) or None, allow_overlap=True
    ).outcomes
    assert result.cost_unit == outcomes["cost_unit"][0]
    assert result.train_cost == pytest.approx(outcomes["cost"].mean(), rel=1e-9)
    assert result.train_accuracy == pytest.approx(outcomes["correct"].mean())


def test_replace_policies_train_and_replay_with_their_mode(signal_trace, tmp_path):
    result = train_policy(signal_trace, tmp_path / "r.pt", Hyperparameters(steps=10, escalate="replace"))
    assert result.escalate == "replace" and load_policy(tmp_path / "r.pt")[1]["escalate"] == "replace"
    router = make_router("policy", path=str(tmp_path / "r.pt"), escalate="replace")
    outcomes = replay_trace(signal_trace, router, split="train", allow_overlap=True).outcomes
    assert result.train_cost == pytest.approx(outcomes["cost"].mean(), rel=1e-9)
    with pytest.raises(TraceError, match="trained for escalate=replace"):
        replay_trace(signal_trace, make_router("policy", path=str(tmp_path / "r.pt")))


def test_same_seed_same_bytes(signal_trace, tmp_path):
    files = []
    for run, seed in (("a", 3), ("b", 3), ("c", 4)):
        (tmp_path / run).mkdir()
        result = train_policy(signal_trace, tmp_path / run / "policy.pt", Hyperparameters(steps=15, seed=seed))
        files.append((result.policy_path.read_bytes(), result.log_path.read_bytes()))
        assert result.sha256 == hashlib.sha256(files[-1][0]).hexdigest()
    assert files[0] == files[1]
    assert files[0][0] != files[2][0]


KERNELS = """
import hashlib, sys
import numpy as np, torch
a = np.random.default_rng(0).normal(size=(64, 64))
t = torch.from_numpy(a)
usual = [a @ a, torch.log_softmax(t, 1).numpy(), (t.float() @ t.float()).numpy(), np.tanh(a)]
print("kernels", hashlib.sha256(b"".join(x.tobytes() for x in usual)).hexdigest())
from cli import app
app(sys.argv[1:])
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the variants are x86 kernels")
def test_the_same_bytes_with_other_threads_and_kernels(signal_trace, tmp_path):
    """Two fresh interpreters train the same policy: one with one thread, the other with two and other kernels
    for BLAS (OpenBLAS's Prescott, MKL's compatible path), torch (no AVX2) and numpy (no AVX2, FMA or AVX-512),
    under which the usual matrix products, softmaxes and tanh give other bits on an AVX2 CPU. The trainer prints
    the same SHA-256 in both, that of the file."""
    environments = {
        "one": {"OMP_NUM_THREADS": "1"},
        "other": {
            "OMP_NUM_THREADS": "2",
            "OPENBLAS_CORETYPE": "Prescott",
            "MKL_CBWR": "COMPATIBLE",
            "ATEN_CPU_CAPABILITY": "default",
            "NPY_DISABLE_CPU_FEATURES": "AVX512F AVX2 FMA3",
        },
    }
    printed, kernels = {}, {}
    for name, variables in environments.items():
        env = {**os.environ, **variables, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        out = tmp_path / name / "policy.pt"
        out.parent.mkdir()
        args = ["train", "policy", str(signal_trace), "--steps", "8", "--alpha", str(ALPHA), "--out", str(out)]
        done = subprocess.run(
            [sys.executable, "-c", KERNELS, *args], env=env, cwd=tmp_path, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
        kernels[name] = re.search(r"kernels (\w+)", done.stdout).group(1)
        printed[name] = re.search(r"policy file SHA-256 (\w+)", done.stdout).group(1)
        assert printed[name] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert kernels["one"] != kernels["other"]  # the environments do differ
    assert printed["one"] == printed["other"]


# ---------------------------------------------------------------------- bad input


def test_training_that_ends_off_target_says_so_and_the_report_marks_it(tmp_path):
    """A wrong first small step the large model cannot recover from: no escalate=after policy covers it, and the
    misses drive kappa to 0. The trainer says both, the policy file records them, the report marks its row."""
    steps = []
    for i in range(20):
        steps += comb_steps(f"p{i}", 3, correct=lambda path, i=i: path == "LLL" or (i % 2 == 0 and "L" in path))
    root = build_trace(tmp_path / "t", steps)
    everything = ("--split-fractions", "1,0,0")
    policy = tmp_path / "p.pt"
    result = cli("train", "policy", root, "--steps", 3, "--eta", 1, *everything, "--out", policy)
    assert result.exit_code == 0, result.output
    said = " ".join(result.stdout.split())
    assert "no policy reaches coverage 0.98 on the train split with escalate=after: at most 0.5000" in said
    assert "kappa ended at 0, the edge of its range: the policy escalates at every decision" in said
    assert math.isclose(episodes_of(root, cost="tokens").best_coverage(), 0.5)
    assert episodes_of(root, cost="tokens", escalate="replace").best_coverage() == 1.0
    _, saved = load_policy(policy)
    assert saved["kappa"] == 0 and saved["flags"] == ["target_unreachable", "coverage_below_target", "kappa_at_0"]

    replayed = cli(
        "replay",
        root,
        "--router",
        "policy",
        "--param",
        f"path={policy}",
        *everything,
        "--split",
        "all",
        "--out",
        tmp_path / "policy.parquet",
    )
    assert replayed.exit_code == 0, replayed.output
    reported = cli(
        "report",
        root,
        tmp_path / "policy.parquet",
        "--split",
        "all",
        "--pick-split",
        "reported",
        "--allow-overlap",  # the policy was trained on every problem
        "--out",
        tmp_path / "report",
    )
    assert reported.exit_code == 0, reported.output
    page = (tmp_path / "report" / "report.md").read_text()
    assert "| policy ‡ |" in page and "| small-only |" in page
    assert "‡ policy ‡: the policy file says its training ended off target: no policy reaches the coverage" in page


def test_training_flags_by_hand():
    assert training_flags(0.4, coverage=0.95, best_coverage=1.0, alpha=0.1) == []
    assert training_flags(1.0, coverage=0.85, best_coverage=0.95, alpha=0.1) == ["coverage_below_target", "kappa_at_1"]
    assert training_flags(0.0, coverage=0.8, best_coverage=0.85, alpha=0.1) == [
        "target_unreachable",
        "coverage_below_target",
        "kappa_at_0",
    ]


def test_bad_input_is_one_line_and_exit_1(comb_trace, signal_trace, tmp_path):
    models = [{"role": f"m{i}", "name": f"m{i}", "revision": "t", "n_params": 10 ** (5 + i)} for i in range(3)]
    three = build_trace(
        tmp_path / "three", [{"path": "0", "is_final": True, "correct": True}], manifest=default_manifest(models=models)
    )
    not_comb = build_trace(tmp_path / "notcomb", [s for s in signal_steps(20) if s["path"] != "sL"])
    cases = [
        ([tmp_path / "nope"], "does not exist"),
        ([signal_trace, "--alpha", 0], "--alpha must lie strictly between 0 and 1"),
        ([signal_trace, "--alpha", 1.5], "--alpha must lie strictly between 0 and 1"),
        ([signal_trace, "--steps", 0], "--steps must be positive"),
        ([signal_trace, "--cost", "watts"], "--cost must be one of flops, flops+prefill, kaplan, api, latency, tokens"),
        ([signal_trace, "--price", "large=1/1/1"], "--price applies to --cost api only"),
        ([signal_trace, "--cost", "api", "--price", "large=1"], "--price must look like ROLE=MODEL"),
        ([signal_trace, "--escalate", "before"], "--escalate must be one of after, replace"),
        ([signal_trace, "--eta-decay", -1], "--eta-decay must not be negative"),
        ([signal_trace, "--features", "mood"], "unknown policy feature(s) mood"),
        ([signal_trace, "--split-fractions", "1,1,1"], "split fractions"),
        ([signal_trace, "--out", tmp_path / "no" / "p.pt"], "does not exist"),
        ([three, "--split-fractions", "1,0,0"], "lacks the m2 model's step at node"),  # a K-model trace needs its comb
        ([not_comb, "--split-fractions", "1,0,0"], "needs a comb trace"),
    ]
    for args, message in cases:
        defaults = {"--out": tmp_path / "p.pt", "--steps": 2}
        extra = [item for option, value in defaults.items() if option not in args for item in (option, value)]
        result = cli("train", "policy", *args, *extra)
        assert result.exit_code == 1, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "p.pt").exists()
    with pytest.raises(TraceError, match="lacks the large model's step at node 'p00[0-9]/0/s'"):
        train_policy(not_comb, tmp_path / "p.pt", Hyperparameters(steps=1, split_fractions=(1.0, 0.0, 0.0)))
