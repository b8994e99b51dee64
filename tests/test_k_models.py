"""Traces of three models (roles m0, m1, m2) built by tracebuild: the comb's paths, schema versions, costs per
role, each model alone, the oracle, the cascade over every ordered subset, draft/target roles of the draft
routers, STEER's escalation to the next larger model, a policy escalating from m0 directly to m2, and the
cascade table listing every chain.

Three-step solutions; m0 writes 10 tokens a step at 0.5 TFLOPs/token (10 TFLOPs a step), m1 15 tokens at 1
(30 TFLOPs), m2 20 tokens at 2 (80 TFLOPs).
"""

from __future__ import annotations

import itertools

import pytest
from test_routers_baselines import run
from test_routers_policy import hand_made_policy
from tracebuild import build_trace, comb_steps, default_manifest, toy_gen_options

from replay.routers import make_router
from tracegen.expand import Comb, Full, frontier, make_strategy
from tracegen.gen import parse_models
from tracestore.errors import TraceError
from tracestore.schema import model_roles, read_manifest, role_of_char
from tracestore.store import open_trace

ROLES = ("m0", "m1", "m2")
N_PARAMS = {"m0": 0.5e12, "m1": 1e12, "m2": 2e12}
VOCABULARY = 128  # rows of each model's (tied) embedding matrix, d_model wide
TOKENS = {"0": 10, "1": 15, "2": 20}
STEP = {"0": 10.0, "1": 30.0, "2": 80.0}  # TFLOPs of one step: 2 * n_params * tokens / 1e12
RIGHT = {"111", "222", "002", "022", "012"}  # "012" is not in the comb: only its prefix "01" is


def three_models():
    return default_manifest(
        models=[
            {
                "role": role,
                "name": f"toy-{role}",
                "revision": "t",
                "n_params": n,
                "n_params_non_embedding": n - VOCABULARY * 64,
                "n_layer": 2 + i,
                "d_model": 64,
            }
            for i, (role, n) in enumerate(N_PARAMS.items())
        ]
    )


def sized(steps):
    for step in steps:
        step["n_gen_tokens"] = TOKENS[step["path"][-1]]
    return steps


def cost_of(path: str) -> float:
    return sum(STEP[char] for char in path)


@pytest.fixture
def comb3(tmp_path):
    steps = sized(comb_steps("p0", 3, chars="012", correct=lambda path: path in RIGHT))
    for step in steps:  # m0 is unsure of its second step; everything else is confident
        step["conf_max_logit_math"] = 5.0 if step["path"] == "00" else 15.0
    return build_trace(tmp_path / "t", steps, manifest=three_models())


def grow(strategy, n_steps: int) -> set[str]:
    """Every path the strategy grows for one problem whose solutions all take ``n_steps`` steps."""
    steps: dict[str, bool] = {}
    while requests := frontier({("p0", 0): steps}, strategy, max_steps=10):
        for request in requests:
            steps[request.path] = len(request.path) == n_steps
    return set(steps)


def test_comb_of_three_models_is_each_chain_plus_every_larger_completion():
    grown = grow(Comb(ROLES), 3)
    assert grown == {step["path"] for step in comb_steps("p0", 3, chars="012")}
    assert {"0", "00", "000", "1", "11", "111", "2", "22", "222"} <= grown
    assert {"01", "011", "02", "002", "12", "122", "001"} <= grown
    assert not {"10", "012", "010", "21"} & grown  # one-way, and at most one switch from the root's chains
    # two models: the comb it always was
    assert grow(Comb(model_roles(2)), 3) == {step["path"] for step in comb_steps("p0", 3)}


def test_full_depth_over_three_models():
    grown = grow(Full(1, ROLES), 3)
    at_depth_2 = {path for path in grown if len(path) == 2}
    assert at_depth_2 == {a + b for a in "012" for b in "012"}  # every choice up to depth 1 (9 nodes)
    assert {path for path in grown if len(path) == 3} == {path + path[-1] for path in at_depth_2}
    assert make_strategy("full", 1, ROLES) == Full(1, ROLES)


def test_roles_and_path_characters_up_to_ten_models():
    assert model_roles(2) == ("small", "large")
    assert model_roles(8) == tuple(f"m{i}" for i in range(8))
    assert [role_of_char(c) for c in "sL07"] == ["small", "large", "m0", "m7"]
    with pytest.raises(TraceError, match="2 to 10 models"):
        model_roles(11)


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ("toy-small", "at least two"),
        ("toy-small,,toy-large", "at least two"),
        ("toy-small,toy-small", "names a model twice"),
        (",".join(f"m{i}" for i in range(11)), "2 to 10 models"),
    ],
)
def test_models_option_errors(models, message):
    with pytest.raises(TraceError, match=message):
        parse_models(None, None, models)


def test_models_option_and_the_two_model_shorthand():
    assert parse_models(None, None, "a, b,c") == ["a", "b", "c"]
    assert parse_models("a", "c", None) == ["a", "c"]
    with pytest.raises(TraceError, match="not both"):
        parse_models("a", None, "a,b,c")
    with pytest.raises(TraceError, match="name the models"):
        parse_models("a", None, None)


def test_a_three_model_trace_is_schema_version_2_and_a_two_model_one_stays_1(comb3, tmp_path):
    assert read_manifest(comb3)["schema_version"] == 2
    assert open_trace(comb3).manifest.roles == list(ROLES)
    two = build_trace(tmp_path / "two", comb_steps("p0", 2))
    assert read_manifest(two)["schema_version"] == 1


def test_each_model_alone_and_its_cost(comb3):
    for role, char in zip(ROLES, "012"):
        row = run(comb3, make_router("only", model=role)).outcomes.row(0, named=True)
        assert (row["path"], row["correct"], row["cost"]) == (char * 3, char != "0", 3 * STEP[char])
        assert row[f"n_{role}"] == 3 and row[f"cost_{role}"] == 3 * STEP[char]
    assert run(comb3, make_router("small-only")).outcomes["path"].to_list() == ["000"]
    assert run(comb3, make_router("large-only")).outcomes["path"].to_list() == ["222"]
    with pytest.raises(TraceError, match="needs a 'm5' model"):
        run(comb3, make_router("only", model="m5"))
    with pytest.raises(TraceError, match="needs --param model"):
        run(comb3, make_router("only"))


def test_kaplan_cost_reads_every_roles_shape(comb3):
    row = run(comb3, make_router("only", model="m1"), cost="kaplan").outcomes.row(0, named=True)
    flops = run(comb3, make_router("only", model="m1")).outcomes.row(0, named=True)
    assert flops["cost"] == 90.0
    # m1's chain "111": 15 tokens a step after 20, 24 and 28 prompt tokens (tracebuild); per token Kaplan's
    # 2N with N the non-embedding parameters (1e12 - 128 * 64) plus the attention term 2 * n_layer (3) * n_ctx * 64
    n = N_PARAMS["m1"] - VOCABULARY * 64
    by_hand = sum(2 * n + 2 * 3 * (context + t) * 64 for context in (20, 24, 28) for t in range(15))
    assert row["cost"] == pytest.approx(by_hand / 1e12, rel=1e-12)


def test_oracle_over_three_models(comb3):
    row = run(comb3, make_router("oracle")).outcomes.row(0, named=True)
    # the correct comb paths: 111 (90), 222 (240), 002 (100), 022 (180); 011 (70) is wrong
    assert (row["path"], row["correct"], row["cost"]) == ("111", True, 90.0)


def test_cascade_over_every_ordered_subset(tmp_path):
    steps = sized(comb_steps("p0", 2, chars="012", correct=lambda path: path in ("11", "22")))
    for step in steps:  # m0 is unsure of its answer, m1 and m2 sure
        step["logprob_mean"] = {"00": -3.0, "11": -0.05, "22": -0.01}.get(step["path"], -0.1)
    root = build_trace(tmp_path / "t", steps, manifest=three_models())
    expected = {  # chain -> (path kept, cost): m0 is passed over after paying its chain
        ("m0", "m1"): ("11", 20.0 + 60.0),
        ("m0", "m2"): ("22", 20.0 + 160.0),
        ("m1", "m2"): ("11", 60.0),
        ("m0", "m1", "m2"): ("11", 20.0 + 60.0),
    }
    for size in (2, 3):
        for chain in itertools.combinations(ROLES, size):
            router = make_router("cascade", models=",".join(chain), pik=False, p_true="final_mean", t_true=0.9)
            row = run(root, router).outcomes.row(0, named=True)
            assert (row["path"], row["cost"]) == expected[chain], chain
    with pytest.raises(TraceError, match="smallest first"):
        run(root, make_router("cascade", models="m2,m0", pik=False, p_true="final_mean"))


def test_steer_escalates_to_the_next_larger_model(tmp_path):
    steps = []
    for k in range(8):  # m0's second step is unsure (5) on even problems, sure (15) on odd ones
        problem = sized(comb_steps(f"p{k}", 3, chars="012", correct=lambda path: path in RIGHT))
        for step in problem:  # equal values elsewhere: no step is below its mixture's high mean
            step["conf_max_logit_math"] = 5.0 + 0.1 * k if step["path"] == "00" and k % 2 == 0 else 15.0
        steps += problem
    root = build_trace(tmp_path / "t", steps, manifest=three_models())
    outcomes = run(root, make_router("steer", tau=0.5, min_samples=4)).outcomes
    paths = dict(outcomes.select("problem_id", "path").iter_rows())
    # an unconfident m0 step is kept and m1, the next larger model, writes the rest
    assert paths == {f"p{k}": "001" if k % 2 == 0 else "000" for k in range(8)}
    row = run(root, make_router("steer", tau=0.5, min_samples=4, target="m2")).outcomes.row(0, named=True)
    assert (row["path"], row["correct"], row["cost"]) == ("002", True, 2 * 10.0 + 80.0)


def test_draft_and_target_roles_of_rsd(comb3, tmp_path):
    steps = sized(comb_steps("p0", 3, chars="012", correct=lambda path: path in RIGHT))
    scores = [  # the PRM rejects m1's first step only
        {"step_id": f"p0/0/{s['path']}", "scorer": "prm", "value": 0.1 if s["path"] == "1" else 0.9}
        | {"detail": None, "n_tokens_processed": 0}
        for s in steps
        if s["path"][-1] != "2"
    ]
    root = build_trace(tmp_path / "rsd", steps, manifest=three_models(), scores=scores)
    row = run(root, make_router("rsd", draft="m1", target="m2")).outcomes.row(0, named=True)
    # "1" is rejected and rewritten by m2 ("2", which the comb has); from "2" m1 cannot draft (not in the comb)
    assert (row["misses"], row["n_discarded"], row["path"]) == (1, 1, "2")
    row = run(root, make_router("rsd")).outcomes.row(0, named=True)  # draft m0 -> target m2: all accepted
    assert (row["path"], row["n_discarded"]) == ("000", 0)
    for bad, message in (({"draft": "m2", "target": "m1"}, "larger model"), ({"draft": "m7"}, "not one of")):
        with pytest.raises(TraceError, match=message):
            run(root, make_router("rsd", **bad))


def test_policy_escalates_from_m0_directly_to_m2(comb3, tmp_path):
    policy = hand_made_policy(tmp_path / "pi.pt")  # pi(escalate) ~ 1 at confidence 5, ~ 0 at 15
    row = run(comb3, make_router("policy", path=policy)).outcomes.row(0, named=True)
    assert (row["path"], row["correct"], row["n_m0"], row["n_m1"], row["n_m2"]) == ("002", True, 2, 0, 1)
    assert row["cost"] == 2 * 10.0 + 80.0
    row = run(comb3, make_router("policy", path=policy, target="m1")).outcomes.row(0, named=True)
    assert row["path"] == "001"


def test_policy_trains_on_a_three_model_comb(tmp_path):
    from replay.train_policy import Hyperparameters, train_policy

    steps = []
    for k in range(30):  # m0 right when its first step is confident, m2 always right
        sure = k % 2 == 0
        problem = sized(comb_steps(f"p{k}", 3, chars="012", correct=lambda p, sure=sure: p[0] != "0" or sure))
        for step in problem:
            step["conf_max_logit_math"] = 15.0 if sure or step["path"][-1] != "0" else 5.0
        steps += problem
    root = build_trace(tmp_path / "t", steps, manifest=three_models())
    out = tmp_path / "pi.pt"
    train_policy(root, out, Hyperparameters(steps=5, features=("conf_max_logit_math",)))
    row = run(root, make_router("policy", path=str(out), kappa=0.0)).outcomes
    assert set(row["path"].str.slice(2).to_list()) == {"2"}  # kappa 0: escalates at the first decision, to m2


def test_cascade_table_lists_every_chain(comb3, tmp_path):
    from analysis.report import build_report
    from analysis.report_inputs import ALL_ROWS, REPORTED_ROWS, ReportOptions
    from replay.results import write_outcomes

    results = tmp_path / "cascade.parquet"
    router = make_router("cascade", models="m0,m2", pik=False, p_true="final_mean")
    write_outcomes(run(comb3, router).outcomes, results)
    options = ReportOptions(tables=("cascade",), split=ALL_ROWS, pick_split=REPORTED_ROWS, bootstrap=10)
    report = build_report(comb3, [results], options)
    table = report.tables["table_cascade.md"].decode()
    for role in ROLES:
        assert f"| {role} | single model |" in table
    for chain in ("m0 → m1", "m0 → m1 → m2", "m1 → m2"):
        assert f"| {chain} | not replayed | trace replay --router cascade --param models=" in table
    assert "| m0 → m2 | without P(IK) |" in table


@pytest.fixture(scope="module")
def gen3(tmp_path_factory):
    """A 3-model comb of toy-small, toy-medium and toy-large grown by `trace gen` with the fake backend (seeded toy
    steps, no model; the run through vLLM: test_k_models_vllm.py)."""
    from tracegen.gen import run_gen

    out = tmp_path_factory.mktemp("k-models") / "trace"
    options = toy_gen_options(
        out, middle=("toy-medium",), limit=2, seed=0, max_steps=3, max_step_tokens=24, backend="fake"
    )
    summary = run_gen(options)
    return out, options, summary


def test_gen_grows_a_complete_three_model_comb(gen3):
    from tracegen.gen import run_gen
    from tracestore.validate import validate

    out, options, summary = gen3
    assert validate(out)["problems"] == 2 and summary.new_steps > 0
    trace = open_trace(out)
    manifest = trace.manifest
    assert manifest["schema_version"] == 2 and manifest.roles == list(ROLES)
    assert [manifest.model(role)["n_layer"] for role in ROLES] == [2, 3, 3]
    assert [manifest.model(role)["d_model"] for role in ROLES] == [64, 64, 128]
    sizes = [manifest.model(role)["n_params"] for role in ROLES]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3
    assert set(manifest["model_paths"]) == set(ROLES)
    steps = trace.scan("steps").collect()
    trees = {(problem, 0): {} for problem in steps["problem_id"].unique()}
    for row in steps.iter_rows(named=True):
        trees[(row["problem_id"], 0)][row["path"]] = row["is_final"]
        assert row["model"] == role_of_char(row["path"][-1])
    assert frontier(trees, Comb(ROLES), max_steps=3) == []
    assert all(Comb(ROLES).contains(path) for tree in trees.values() for path in tree)
    for tree in trees.values():
        assert {"0", "1", "2"} <= set(tree)  # every model's chain starts at the root
    assert run_gen(options).new_steps == 0  # resumes: nothing left to grow
