"""`trace train policy`: the decision process read off a comb trace, V-trace targets, the CPO step and the
kappa rule checked by hand; learning on a comb trace with a clear signal; same seed, same bytes; the policy
replayed on held-out problems meets its coverage target; bad input gives one clear line.

The signal trace: 400 problems, 3-step comb trees. In 40% of them one small step (at a random index) is
unconfident (conf_max_logit_math ~ 6, otherwise ~ 12) and breaks the small chain's answer; the large model
is right from the root and from every node before the bad step. Small steps write 10 tokens, large 20.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score
from tracebuild import build_trace, comb_steps, default_manifest
from typer.testing import CliRunner

from cli import app
from replay.artifacts import load_train_split
from replay.engine import ReplayData
from replay.errors import TraceError
from replay.routers import make_router
from replay.routers.policy import load_policy
from replay.splits import DEFAULT_FRACTIONS
from replay.store import open_trace
from replay.train_policy import (
    Hyperparameters,
    comb_episodes,
    cpo_multipliers,
    expected_miss,
    kappa_update,
    rollout,
    train_policy,
    vtrace,
)

runner = CliRunner()
ALPHA = 0.1
STEPS = 150
UNSURE, SURE = 6.0, 12.0


def cli(*args):
    return runner.invoke(app, [*map(str, args)])


def signal_steps(n_problems=400, n_steps=3, p_bad=0.4, seed=0):
    rng = np.random.default_rng(seed)
    steps = []
    for i in range(n_problems):
        bad = int(rng.integers(0, n_steps)) if rng.random() < p_bad else None

        def correct(path, bad=bad):
            small_prefix = path.index("L") if "L" in path else len(path)
            return bad is None or bad >= small_prefix

        for step in comb_steps(f"p{i:03d}", n_steps, correct=correct):
            small = step["path"][-1] == "s"
            unsure = small and bad == len(step["path"]) - 1
            step["n_gen_tokens"] = 10 if small else 20
            step["conf_max_logit_math"] = float(rng.normal(UNSURE if unsure else SURE, 0.8))
            steps.append(step)
    return steps


@pytest.fixture(scope="module")
def signal_trace(tmp_path_factory):
    return build_trace(tmp_path_factory.mktemp("signal") / "trace", signal_steps())


@pytest.fixture(scope="module")
def trained(signal_trace, tmp_path_factory):
    """The policy trained through the CLI, once for the module."""
    out = tmp_path_factory.mktemp("policy") / "policy.pt"
    result = cli("train", "policy", signal_trace, "--alpha", ALPHA, "--steps", STEPS, "--seed", 0, "--out", out)
    assert result.exit_code == 0, result.output
    return out, result.stdout


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


def test_episodes_read_every_decision_off_the_comb(tmp_path, three_step):
    steps, _ = three_step
    episodes = episodes_of(build_trace(tmp_path / "t", steps))
    assert episodes.length.tolist() == [3]
    # escalating at draft t: the large model writes 3 - t steps of 20 tokens, out of 60 for the large model alone
    np.testing.assert_allclose(episodes.escalate_cost[0], [1.0, 2 / 3, 1 / 3])
    np.testing.assert_array_equal(episodes.keep_cost[0], [0, 0, 0])
    assert episodes.escalate_correct[0].tolist() == [True, True, False]
    assert (episodes.small_correct[0], episodes.large_right[0], episodes.has_verifier) == (False, True, False)
    # keeping draft t costs its FLOPs under --cost flops: 2 * 1e5 params * 10 tokens; large steps 2 * 8e5 * 20
    flops = episodes_of(build_trace(tmp_path / "f", steps), cost="flops")
    small, large = 2 * 100_000 * 10, 2 * 800_000 * 20
    np.testing.assert_allclose(flops.keep_cost[0], [small / (3 * large)] * 3)
    np.testing.assert_allclose(flops.escalate_cost[0], [(small + (3 - t) * large) / (3 * large) for t in range(3)])


def test_rollouts_end_at_the_first_escalation(tmp_path, three_step):
    steps, _ = three_step
    episodes = episodes_of(build_trace(tmp_path / "t", steps))
    batch = rollout(episodes, np.array([0, 0, 0]), np.array([[False, True, True], [False] * 3, [False, False, True]]))
    assert batch.mask.astype(int).tolist() == [[1, 1, 0], [1, 1, 1], [1, 1, 1]]
    assert batch.action.tolist() == [[0, 1, 0], [0, 0, 0], [0, 0, 1]]
    assert batch.reward.tolist() == [[0, 1, 0], [0, 0, 0], [0, 0, 0]]
    np.testing.assert_allclose(batch.cost, [[0, 2 / 3, 0], [0, 0, 0], [0, 0, 1 / 3]])
    assert batch.correct.tolist() == [True, False, False]
    assert batch.covered.tolist() == [True, False, False]


def test_verifier_scores_count_towards_coverage(tmp_path, three_step):
    steps, scores = three_step
    episodes = episodes_of(build_trace(tmp_path / "t", steps, scores=scores))
    assert episodes.has_verifier
    # every small step passes the verifier: the wrong all-small chain still counts as covered
    assert episodes.small_success[0] and not episodes.small_correct[0]
    # escalating at draft 2 keeps s and ss (verified) and the unscored large step ssL: not verified
    assert episodes.escalate_success[0].tolist() == [True, True, False]
    batch = rollout(episodes, np.array([0, 0]), np.array([[False] * 3, [False, False, True]]))
    assert batch.covered.tolist() == [True, False]


def test_expected_miss_by_hand(tmp_path, three_step):
    steps, scores = three_step
    episodes = episodes_of(build_trace(tmp_path / "t", steps))
    # escalate first at 0 (p 1/2, LLL right), at 1 (1/4, sLL right), at 2 (1/8, ssL wrong), never (1/8, sss wrong)
    np.testing.assert_allclose(expected_miss(episodes, np.full((1, 3), 0.5)), [1 / 8 + 1 / 8])
    np.testing.assert_allclose(expected_miss(episodes, np.array([[0.0, 0.0, 1.0]])), [1.0])
    np.testing.assert_allclose(expected_miss(episodes, np.array([[0.0, 1.0, 0.3]])), [0.0])
    verified = episodes_of(build_trace(tmp_path / "v", steps, scores=scores))
    np.testing.assert_allclose(expected_miss(verified, np.full((1, 3), 0.5)), [1 / 8])  # sss is verified


def test_vtrace_targets_by_hand(tmp_path, three_step):
    steps, _ = three_step
    episodes = episodes_of(build_trace(tmp_path / "t", steps))
    # escalate at draft 1 (sLL, right): reward 1 and cost 2/3 at the second decision
    batch = rollout(episodes, np.array([0]), np.array([[False, True, False]]))
    mask = batch.mask.astype(float)
    ratios = np.array([[0.5, 3.0, 1.0]])  # rho = (0.5, 2 after the clip), c = (0.5, 1)
    targets, advantages = vtrace(batch.reward, np.array([[0.5, 0.4, 9.0]]), ratios, mask, rho_bar=2.0, c_bar=1.0)
    # delta_1 = 2 (1 + 0 - 0.4) = 1.2 -> v_1 = 1.6; delta_0 = 0.5 (0.4 - 0.5) = -0.05 -> v_0 = 0.5 - 0.05 + 0.5 * 1.2
    np.testing.assert_allclose(targets, [[1.05, 1.6, 0.0]])
    np.testing.assert_allclose(advantages, [[0.5 * (1.6 - 0.5), 2 * (1 - 0.4), 0.0]])
    targets, _ = vtrace(batch.cost, np.array([[0.3, 0.2, 0.0]]), ratios, mask, rho_bar=2.0, c_bar=1.0)
    # delta_1 = 2 (2/3 - 0.2); v_0 = 0.3 + 0.5 (0.2 - 0.3) + 0.5 delta_1
    np.testing.assert_allclose(targets[0, :2], [0.3 - 0.05 + 0.5 * 2 * (2 / 3 - 0.2), 0.2 + 2 * (2 / 3 - 0.2)])


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
    np.testing.assert_allclose(advantages[0], [0.5 * (0.9 * v1 - 0.5), 2 * (0.9 * v2 - 0.4), 1.5 * (1 - 0.8)])
    # episode 1 ends after two decisions: on-policy, the targets are the discounted returns
    np.testing.assert_allclose(targets[1], [0.9 * 0.5, 0.5, 0.0])


def test_kappa_rule_by_hand():
    assert kappa_update(0.5, coverage=1.0, alpha=0.02, eta=0.1) == pytest.approx(0.502)  # covered: slowly up
    assert kappa_update(0.5, coverage=0.8, alpha=0.02, eta=0.1) == pytest.approx(0.482)  # one miss in 5: down
    assert kappa_update(0.999, coverage=1.0, alpha=0.02, eta=0.1) == 1.0
    assert kappa_update(0.01, coverage=0.0, alpha=0.02, eta=0.1) == 0.0
    assert kappa_update(0.3, coverage=0.98, alpha=0.02, eta=0.1) == pytest.approx(0.3)  # on target: stays


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


def test_learns_to_escalate_on_low_confidence(trained, signal_trace):
    path, stdout = trained
    assert "no verifier scores" in stdout and "coverage" in stdout
    train = load_train_split(signal_trace, 0, DEFAULT_FRACTIONS)
    router = make_router("policy", path=str(path)).fit(train)
    network, saved = load_policy(path)
    assert saved["alpha"] == ALPHA and saved["features"] == ["conf_max_logit_math", "depth", "is_final", "n_gen_tokens"]
    assert saved["train_problem_ids"] == sorted(train.problems["problem_id"].to_list())
    data = ReplayData.from_trace(open_trace(signal_trace))
    small = data.steps.filter(pl.col("model") == "small")
    p_escalate = router.escalate_probability(small, data.problems)
    escalates = p_escalate >= router.kappa_
    unsure = (small["conf_max_logit_math"] < (UNSURE + SURE) / 2).to_numpy()
    depth = small["depth"].to_numpy()
    # ranked within each step index: depth is a feature, and escalating at depth 0 is priced differently
    for d in np.unique(depth):
        assert roc_auc_score(unsure[depth == d], p_escalate[depth == d]) > 0.95, f"step index {d}"
    assert escalates[~unsure].mean() < 0.02
    # escalating at the first step costs as much as the large model alone: the alpha budget of misses goes there
    later = depth > 0
    assert escalates[unsure & later].mean() > 0.8


def test_training_log_records_every_step_and_follows_the_kappa_rule(trained):
    path, _ = trained
    log = pl.read_parquet(path.with_name("policy.log.parquet"))
    assert log["step"].to_list() == list(range(1, STEPS + 1))
    for column in (
        "reward",
        "cost",
        "coverage",
        "rollout_coverage",
        "kappa",
        "success_critic_loss",
        "cost_critic_loss",
        "kl",
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
    kappas = [0.5, *log["kappa"].to_list()]
    for before, after, coverage in zip(kappas, kappas[1:], log["coverage"].to_list()):
        assert after == pytest.approx(kappa_update(before, coverage, ALPHA, 0.1))
    assert load_policy(path)[1]["kappa"] == log["kappa"][-1]
    assert (log["line_search"] >= 0).mean() > 0.5  # most CPO steps are taken
    # the critics learn: their loss over the last 30 steps is below that of the first 10
    assert log["cost_critic_loss"][-30:].mean() < log["cost_critic_loss"][:10].mean()


def test_replayed_policy_meets_the_coverage_target_on_held_out_problems(trained, signal_trace, tmp_path):
    path, _ = trained
    out = tmp_path / "policy.parquet"
    result = cli(
        "replay", signal_trace, "--router", "policy", "--param", f"path={path}", "--split", "test", "--out", out
    )
    assert result.exit_code == 0, result.output
    outcomes = pl.read_parquet(out)
    large = cli(
        "replay", signal_trace, "--router", "large-only", "--split", "test", "--out", tmp_path / "large.parquet"
    )
    assert large.exit_code == 0, large.output
    large_right = pl.read_parquet(tmp_path / "large.parquet").select("problem_id", large_right="correct")
    covered = outcomes.join(large_right, on="problem_id").select(pl.col("correct") | ~pl.col("large_right"))
    n, k = covered.height, int(covered.to_series().sum())
    assert n > 50 and outcomes["misses"].sum() == 0
    assert binomtest(k, n).proportion_ci(confidence_level=0.95).high >= 1 - ALPHA
    # and it is much cheaper than the large model alone
    assert outcomes["cost"].mean() < 0.5 * pl.read_parquet(tmp_path / "large.parquet")["cost"].mean()


def test_same_seed_same_bytes(signal_trace, tmp_path):
    threads = torch.get_num_threads()
    files = []
    for run, seed in (("a", 3), ("b", 3), ("c", 4)):
        (tmp_path / run).mkdir()
        result = train_policy(signal_trace, tmp_path / run / "policy.pt", Hyperparameters(steps=15, seed=seed))
        files.append((result.policy_path.read_bytes(), result.log_path.read_bytes()))
    assert files[0] == files[1]
    assert files[0][0] != files[2][0]
    assert torch.get_num_threads() == threads  # training restores the thread count it changes


# ---------------------------------------------------------------------- bad input


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
        ([signal_trace, "--cost", "watts"], "--cost must be one of tokens, flops"),
        ([signal_trace, "--features", "mood"], "unknown policy feature(s) mood"),
        ([signal_trace, "--split-fractions", "1,1,1"], "split fractions"),
        ([signal_trace, "--out", tmp_path / "no" / "p.pt"], "does not exist"),
        ([three, "--split-fractions", "1,0,0"], "needs a small and a large model"),
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
