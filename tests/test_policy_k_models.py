"""The CMDP policy's K-model action space (roles m0, m1, m2 on tracebuild trees): continue with the current
model or escalate to any larger one, one-way. A hand-set network replays to hand-computed paths and costs in both
decision processes; a second escalation off the comb is reported as a miss and grown by closure (toy models,
transformers); a trained policy escalates where m0 fails, to m2 where only m2 is right (for 4 of 5 seeds); the K
walk with two models is the two-model walk; the errors of a wrong model set."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_k_models import ROLES, sized, three_models
from test_routers_baselines import run
from test_routers_policy import hand_made_policy, zeroed_network
from tracebuild import build_trace, comb_steps

from replay.data import ReplayData
from replay.policy_walk import deployed_action, walk_k_models
from replay.results import miss_list
from replay.routers import make_router
from replay.routers.policy import load_policy, save_policy
from replay.run import replay_trace
from replay.splits import SplitSpec
from replay.walk import Costs
from tracestore.errors import TraceError
from tracestore.store import open_trace

NAMES = [f"toy-{role}" for role in ROLES]
# m0 writes 10 TFLOPs a step, m1 30, m2 80 (test_k_models' sizes)


def hand_k_policy(path, kappa=0.5, escalate="after", names=NAMES, scale=10.0):
    """Input (c, one-hot of m0, m1, m2) with c = (conf - 10) / 10; hidden unit j = tanh(tanh(input j)); logits
    continue 0, escalate to m1 -10 u, escalate to m2 -20 (u + 0.3), u = tanh(tanh(c))."""
    network = zeroed_network(n_actions=3)
    network.layers[0][0, 0] = 1.0
    network.layers[1][0, 0] = 1.0
    network.layers[2][0, 1] = -10.0
    network.layers[2][0, 2] = -20.0
    network.layers[2][-1, 2] = -6.0
    save_policy(
        path,
        network,
        ["conf_max_logit_math"],
        [10.0],
        [scale],
        kappa=kappa,
        hidden=4,
        escalate=escalate,
        roles=list(ROLES),
        role_models=list(names),
    )
    return str(path)


def by_hand(conf: float, at_m1: bool) -> list[float]:
    """pi(continue, escalate to m1, escalate to m2 | conf) of ``hand_k_policy``; at m1 escalating to m1 is not an
    action."""
    u = math.tanh(math.tanh((conf - 10.0) / 10.0))
    logits = [0.0, -10.0 * u, -20.0 * (u + 0.3)]
    weights = [math.exp(x) for x in logits]
    if at_m1:
        weights[1] = 0.0
    return [w / sum(weights) for w in weights]


def four_step_problem(problem_id: str, confidence: dict[str, float], right=lambda path: True) -> list[dict]:
    steps = sized(comb_steps(problem_id, 4, chars="012", correct=right))
    for step in steps:
        step["conf_max_logit_math"] = confidence.get(step["path"], 15.0)
    return steps


@pytest.fixture
def comb4(tmp_path):
    """p0: m0 unsure at "00" -> m1, sure on. p1: m0 very unsure at "0" -> m2. p2: m0 unsure at "00" -> m1, m1
    unsure at "001" -> m2, whose step at "001" the comb lacks. p3: sure throughout."""
    steps = four_step_problem("p0", {"00": 5.0})
    steps += four_step_problem("p1", {"0": 0.0})
    steps += four_step_problem("p2", {"00": 5.0, "001": 5.0})
    steps += four_step_problem("p3", {})
    return build_trace(tmp_path / "t", steps, manifest=three_models())


def test_the_hand_set_probabilities_and_the_deployed_choice(comb4, tmp_path):
    router = make_router("policy", path=hand_k_policy(tmp_path / "pi.pt"))
    data = ReplayData.from_trace(open_trace(comb4))
    router.fit(data)
    probability = router.action_probabilities(data)
    for row in range(data.steps.height):
        step = data.steps.row(row, named=True)
        if step["model"] == "m2":
            assert np.isnan(probability[row]).all()
        else:
            expected = by_hand(step["conf_max_logit_math"], step["model"] == "m1")
            np.testing.assert_allclose(probability[row], expected, rtol=1e-5, atol=1e-7)
    # conf 0 at m0: pi = (0.001, 0.396, 0.603) -> m2; conf 5: (0.011, 0.834, 0.155) -> m1; conf 15: continue
    p = np.array([by_hand(0.0, False), by_hand(5.0, False), by_hand(15.0, False), by_hand(5.0, True)])
    allowed = np.array([[True, True, True]] * 3 + [[True, False, True]])
    assert deployed_action(p, allowed, np.full(4, 0.5)).tolist() == [2, 1, 0, 2]
    assert deployed_action(p, allowed, np.full(4, 0.3)).tolist() == [2, 1, 0, 2]  # both pass: the larger
    assert deployed_action(p, allowed, np.full(4, 0.95)).tolist() == [0, 0, 0, 0]  # none passes: continue


def test_after_walks_the_hand_computed_paths(comb4, tmp_path):
    outcomes = run(comb4, make_router("policy", path=hand_k_policy(tmp_path / "pi.pt"))).outcomes.sort("problem_id")
    rows = {row["problem_id"]: row for row in outcomes.iter_rows(named=True)}
    # p0: "0" sure -> "00" unsure -> m1 writes "001" (sure) and "0011"
    assert (rows["p0"]["path"], rows["p0"]["cost"], rows["p0"]["misses"]) == ("0011", 2 * 10.0 + 2 * 30.0, 0)
    assert (rows["p0"]["n_m0"], rows["p0"]["n_m1"], rows["p0"]["n_m2"]) == (2, 2, 0)
    # p1: "0" very unsure -> m2 from "0" directly
    assert (rows["p1"]["path"], rows["p1"]["cost"], rows["p1"]["n_m1"]) == ("0222", 10.0 + 3 * 80.0, 0)
    # p2: m0 -> m1 at "00", m1 -> m2 at "001": the comb lacks m2's step there, a miss at node "001" by m2
    assert (rows["p2"]["misses"], rows["p2"]["path"], rows["p2"]["correct"]) == (1, "001", None)
    assert rows["p3"]["path"] == "0000" and rows["p3"]["cost"] == 40.0
    result = replay_trace(comb4, make_router("policy", path=hand_k_policy(tmp_path / "pi.pt")), split="all")
    (miss,) = miss_list(result)
    assert (miss["problem_id"], miss["path"], miss["model"], miss["scorer"]) == ("p2", "001", "m2", None)


def test_replace_walks_the_hand_computed_paths(comb4, tmp_path):
    router = make_router("policy", path=hand_k_policy(tmp_path / "pi.pt", escalate="replace"), escalate="replace")
    rows = {row["problem_id"]: row for row in run(comb4, router).outcomes.iter_rows(named=True)}
    # p1: m0's draft "0" (conf 0) is discarded, m2 writes from the root
    assert (rows["p1"]["path"], rows["p1"]["n_discarded"], rows["p1"]["cost"]) == ("2222", 1, 10.0 + 4 * 80.0)
    # p0: "0" kept, draft "00" (conf 5) discarded, m1 drafts at "0": "01" (conf 15) kept, then m1 on
    assert (rows["p0"]["path"], rows["p0"]["n_discarded"], rows["p0"]["cost"]) == ("0111", 1, 10.0 + 10.0 + 90.0)
    assert rows["p0"]["cost_discarded"] == 10.0
    assert rows["p3"]["path"] == "0000"


def test_escalation_is_one_way_and_kappa_sweeps(comb4, tmp_path):
    policy = hand_k_policy(tmp_path / "pi.pt")
    kappas = np.linspace(0, 1, 11)
    swept = run(comb4, make_router("policy", path=policy), sweep={"kappa": kappas}).outcomes
    for path in swept["path"].to_list():
        assert list(path) == sorted(path), path  # never back to a smaller model
    for config, kappa in enumerate(kappas):
        single = run(comb4, make_router("policy", path=policy, kappa=float(kappa))).outcomes
        assert swept.filter(swept["config"] == config).drop("config").equals(single.drop("config"))
    # kappa 0: every action passes, the largest model at the first decision
    assert set(swept.filter(swept["config"] == 0)["path"].to_list()) == {"0222"}


def test_the_k_walk_with_two_models_is_the_two_model_walk(comb4, tmp_path):
    """Two models in play through the K walk (m0 -> m2, the two-logit hand policy): the same walk as DraftRule's."""
    data = ReplayData.from_trace(open_trace(comb4))
    for escalate in ("after", "replace"):
        path = hand_made_policy(tmp_path / f"{escalate}.pt", escalate=escalate)
        router = make_router("policy", path=path, escalate=escalate).fit(data)
        costs = Costs(data, None)
        starts = data.roots["node"].to_numpy()
        kappa = np.full(len(starts), 0.5)
        two_model = router.walk(data, costs, starts, {"kappa": kappa})
        p = router.draft_signal(data)
        probability = np.stack([1 - p, p], axis=1)
        generic = walk_k_models(data, costs, starts, kappa, probability, ["m0", "m2"], escalate)
        for name, value in vars(two_model).items():
            np.testing.assert_array_equal(getattr(generic, name), value, err_msg=f"{escalate} {name}")


def test_policy_files_record_the_model_set_and_old_files_still_load(comb4, tmp_path):
    _, saved = load_policy(hand_k_policy(tmp_path / "pi.pt"))
    assert saved["roles"] == list(ROLES) and saved["role_models"] == NAMES
    _, old = load_policy(hand_made_policy(tmp_path / "old.pt"))  # no roles: draft -> target, as before
    assert "roles" not in old
    row = run(comb4, make_router("policy", path=hand_made_policy(tmp_path / "old.pt"))).outcomes.row(0, named=True)
    assert row["path"] == "0022"  # p0: escalates at "00" straight to the largest model


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"target": "m1"}, "leave out --param target=m1"),
        ({"draft": "m1"}, "leave out --param draft=m1"),
        ({"names": ["toy-m0", "toy-x", "toy-m2"]}, "trained for the models m0=toy-m0, m1=toy-x"),
    ],
)
def test_a_policy_for_another_model_set_is_refused(comb4, tmp_path, params, message):
    names = params.pop("names", NAMES)
    path = hand_k_policy(tmp_path / "pi.pt", names=names)
    with pytest.raises(TraceError, match=message):
        run(comb4, make_router("policy", path=path, **params))


def test_train_policy_errors_name_the_roles(comb4, tmp_path):
    from typer.testing import CliRunner

    from cli import app

    cases = (
        (["--draft", "m2", "--target", "m1"], "target m1 must be a larger model than draft m2"),
        (["--target", "m7"], "target='m7' is not one of the trace's models (m0, m1, m2)"),
        (["--models", "m2,m0"], "models needs two or more of m0, m1, m2, smallest first"),
        (["--models", "m0,m2", "--target", "m2"], "not both"),
    )
    for options, message in cases:
        result = CliRunner().invoke(app, ["train", "policy", str(comb4), "--out", str(tmp_path / "pi.pt"), *options])
        assert result.exit_code == 1 and message in " ".join(result.output.split()), result.output
        assert not (tmp_path / "pi.pt").exists()


def test_a_subset_of_models_trains_the_two_action_policy(tmp_path):
    from replay.train_policy import Hyperparameters, train_policy

    root = choice_trace(tmp_path / "t", 12)
    hp = Hyperparameters(steps=3, features=("conf_max_logit_math",), kappa=0.0)
    train_policy(root, tmp_path / "pi.pt", hp, models="m0,m2")
    network, saved = load_policy(tmp_path / "pi.pt")
    assert saved["roles"] == ["m0", "m2"] and network.layers[-1].shape[1] == 2 and network.layers[0].shape[0] == 1 + 1
    router = make_router("policy", path=str(tmp_path / "pi.pt"), kappa=0.0)
    paths = replay_trace(root, router, split="all").outcomes["path"].to_list()
    assert set(paths) == {"022"}  # kappa 0: escalates at the first decision, to m2 (m1 is not in play)
    with pytest.raises(TraceError, match="leave out --param target=m1"):
        replay_trace(root, make_router("policy", path=str(tmp_path / "pi.pt"), target="m1"), split="all")


def choice_trace(root, n_problems: int = 60):
    """Three kinds of problems, told apart by m0's confidence in its first step: sure (15): m0 is right; unsure
    (5): m0 is wrong from its first step on, m1 right from there; lost (0): only m2 is right."""
    steps = []
    for k in range(n_problems):
        kind = ("sure", "unsure", "lost")[k % 3]
        first = {"sure": 15.0, "unsure": 5.0, "lost": 0.0}[kind]

        def right(path, kind=kind):
            return {"sure": path == "000", "unsure": path[1] != "0", "lost": path[-1] == "2"}[kind]

        problem = sized(comb_steps(f"p{k:03d}", 3, chars="012", correct=right))
        for step in problem:
            step["conf_max_logit_math"] = first if step["path"] == "0" else 15.0
        steps += problem
    return build_trace(root, steps, manifest=three_models())


def test_the_trained_policy_escalates_where_m0_fails_to_the_model_that_suffices(tmp_path):
    """For at least 4 of 5 seeds (16 hidden units): every problem is covered, no escalation leaves the comb, the
    sure ones stay with m0, the unsure ones escalate after m0's first step, the lost ones to m2 (only m2 is right
    there); and at m0's first step pi prefers m1 over m2 more where m1 suffices (unsure) than where only m2 is
    right (lost). (Whether pi(m1) passes kappa on the unsure problems within 100 steps depends on the seed: the
    two confidences lie close.)"""
    from replay.routers.policy import normalise, policy_probabilities, with_role
    from replay.train_policy import Hyperparameters, train_policy

    root = choice_trace(tmp_path / "t")
    everything = (1.0, 0.0, 0.0)  # every problem trains and is replayed
    passed = {name: [] for name in ("covered", "no miss", "sure", "unsure", "lost", "prefers m1")}
    for seed in range(5):
        out = tmp_path / f"pi-{seed}.pt"
        hp = Hyperparameters(
            steps=100,
            seed=seed,
            hidden=16,  # narrow: five trainings in seconds
            alpha=0.05,
            eta_decay=0.6,
            features=("conf_max_logit_math",),
            split_fractions=everything,
        )
        result = train_policy(root, out, hp)
        network, saved = load_policy(out)
        assert saved["roles"] == list(ROLES) and result.best_coverage == 1.0
        outcomes = replay_trace(
            root, make_router("policy", path=str(out)), split="all", splits=SplitSpec(fractions=everything)
        ).outcomes
        outcomes = outcomes.sort("problem_id")
        kinds = np.array([("sure", "unsure", "lost")[k % 3] for k in range(outcomes.height)])
        path = np.array(outcomes["path"].to_list())
        passed["covered"].append(result.train_coverage >= 0.95)
        passed["no miss"].append(outcomes["misses"].sum() == 0)  # a second escalation leaves the comb
        passed["sure"].append(set(path[kinds == "sure"]) == {"000"})
        passed["unsure"].append(set(path[kinds == "unsure"]) <= {"011", "022"})
        passed["lost"].append(set(path[kinds == "lost"]) == {"022"})
        first_steps = normalise(
            np.array([[5.0], [0.0]]), np.array(saved["feature_mean"]), np.array(saved["feature_std"])
        )
        (_, unsure_m1, unsure_m2), (_, lost_m1, lost_m2) = policy_probabilities(
            network, with_role(first_steps, np.array([0, 0]), 3)
        )
        passed["prefers m1"].append(unsure_m1 / unsure_m2 > lost_m1 / lost_m2)
    for name, seeds in passed.items():
        assert sum(seeds) >= 4, (name, seeds)


def test_a_k_model_policy_trains_the_same_bytes_twice(tmp_path):
    from replay.train_policy import Hyperparameters, train_policy

    root = choice_trace(tmp_path / "t", 12)
    hp = Hyperparameters(steps=5, features=("conf_max_logit_math",), escalate="replace")
    train_policy(root, tmp_path / "a.pt", hp)
    train_policy(root, tmp_path / "b.pt", hp)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    assert (tmp_path / "a.log.parquet").read_bytes() == (tmp_path / "b.log.parquet").read_bytes()


def two_escalations_policy(path, names):
    """Escalates at every decision it can: from m0 to m1 (pi 0.997), from m1 to m2 (pi 0.998): its logits read
    the one-hot of the current model only."""
    network = zeroed_network(n_actions=3)
    for j in range(4):
        network.layers[0][j, j] = 1.0
        network.layers[1][j, j] = 1.0
    network.layers[2][1, 1] = 10.0  # escalate to m1 when on m0
    network.layers[2][2, 2] = 10.0  # escalate to m2 when on m1
    save_policy(
        path,
        network,
        ["conf_max_logit_math"],
        [0.0],
        [1.0],
        kappa=0.5,
        hidden=4,
        roles=list(ROLES),
        role_models=list(names),
    )
    return str(path)


def test_closure_grows_the_second_escalation_on_the_toy_models(tmp_path):
    """m0 -> m1 -> m2 leaves the comb: the replay reports m2's steps after m1's as misses, and closure grows them
    (three toy models, transformers backend) until the policy replays without a miss."""
    from test_closure import options

    from tracegen.closure import load_router_specs
    from tracegen.gen import run_gen

    policy = two_escalations_policy(tmp_path / "pi.pt", ["toy-small", "toy-medium", "toy-large"])
    (tmp_path / "routers.toml").write_text(f'[[router]]\nname = "policy"\nparams = {{ path = "{policy}" }}\n')
    (spec,) = load_router_specs(tmp_path / "routers.toml")
    trace = tmp_path / "trace"
    three = dict(limit=3, max_steps=4, middle=("toy-medium",))
    run_gen(options(trace, **three))
    before = replay_trace(trace, spec.router(), split="all")
    misses = miss_list(before)
    assert misses and {miss["model"] for miss in misses} == {"m2"}
    for miss in misses:  # after m0's first step and m1's next: the node "01" (or deeper on m1's chain)
        assert miss["path"][0] == "0" and set(miss["path"][1:]) == {"1"}, miss
    summary = run_gen(options(trace, expand="closure", routers=(spec,), **three))
    assert summary.new_steps > 0 and summary.closure.remaining_misses == 0
    after = replay_trace(trace, spec.router(), split="all").outcomes
    assert after["misses"].sum() == 0
    grown = [path for path in after["path"].to_list() if "1" in path and "2" in path]
    assert grown and all(path.startswith("01") and list(path) == sorted(path) for path in grown)
