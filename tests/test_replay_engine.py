"""The replay engine: tree index, misses (never an invented step), worlds, splits, sweeps, summaries, and the
one-way draft rules (escalate=after keeps the triggering step, escalate=replace discards it)."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from test_routers_baselines import manifest, run, sized
from tracebuild import build_trace, comb_steps, default_problem, step_and_tokens

from replay.costs import make_cost_model
from replay.data import ReplayData
from replay.params import params_text, parse_param, parse_sweep
from replay.results import miss_list, write_outcomes
from replay.routers import make_router
from replay.routers.base import DraftRouter
from replay.run import replay, replay_trace
from replay.splits import SplitSpec, assign_splits
from replay.walk import DraftRule
from tracestore.errors import TraceError
from tracestore.store import open_trace


def frames(step_fields: list[dict]) -> ReplayData:
    """ReplayData straight from step dicts, bypassing the store's checks (to feed the engine bad trees)."""
    steps = pl.DataFrame([step_and_tokens(fields)[0] for fields in step_fields])
    problems = pl.DataFrame([default_problem(pid) for pid in dict.fromkeys(steps["problem_id"])])
    return ReplayData(manifest(), steps, problems)


def test_a_missing_step_is_a_miss_and_never_invented(tmp_path):
    steps = [s for s in sized(comb_steps("p0", 3)) if s["path"] != "ss"] + sized(comb_steps("p1", 3))
    result = run(build_trace(tmp_path / "t", steps, manifest=manifest()), make_router("small-only"))
    rows = {row["problem_id"]: row for row in result.outcomes.iter_rows(named=True)}
    assert (rows["p0"]["misses"], rows["p0"]["path"], rows["p0"]["correct"], rows["p0"]["answer"]) == (
        1,
        "s",
        None,
        None,
    )
    assert (rows["p0"]["n_small"], rows["p0"]["cost"]) == (1, 10.0)  # the one step it did take
    assert (rows["p1"]["misses"], rows["p1"]["path"], rows["p1"]["correct"]) == (0, "sss", False)
    assert miss_list(result) == [
        {"problem_id": "p0", "world": 0, "path": "s", "model": "small", "scorer": None, "n_configs": 1}
    ]
    summary = result.summary().row(0, named=True)
    assert (summary["n"], summary["misses"], summary["accuracy"], summary["cost"]) == (2, 1, 0.0, 30.0)


def test_a_problem_without_steps_misses_at_its_root():
    data = frames(comb_steps("p0", 2))
    data = ReplayData(data.manifest, data.steps, pl.concat([data.problems, pl.DataFrame([default_problem("empty")])]))
    result = replay(data, make_router("large-only").fit(data), make_cost_model("flops", data.manifest))
    assert result.misses.select("problem_id", "path", "model").rows() == [("empty", "", "large")]


def test_misses_are_listed_once_with_the_configurations_that_needed_them(tmp_path):
    root = build_trace(tmp_path / "t", sized(comb_steps("p0", 2)), manifest=manifest())
    result = run(root, make_router("random", seed=0), sweep={"p": np.array([0.0, 0.5, 1.0])})
    needed = {(m["path"], m["model"]): m["n_configs"] for m in miss_list(result)}
    by_config = result.outcomes.select("config", "misses").rows()
    assert sum(misses for _, misses in by_config) == sum(needed.values())
    assert by_config[0] == (0, 0) and by_config[2] == (2, 0)  # p=0 and p=1 stay on the comb


def test_every_world_is_replayed_and_worlds_can_be_chosen(tmp_path):
    steps = sized(comb_steps("p0", 2, world=0, correct=lambda p: True))
    steps += sized(comb_steps("p0", 2, world=1, correct=lambda p: False))
    root = build_trace(tmp_path / "t", steps, manifest=manifest())
    result = run(root, make_router("small-only"))
    assert result.outcomes.select("world", "correct").sort("world").rows() == [(0, True), (1, False)]
    only = run(root, make_router("small-only"), worlds=[1])
    assert only.outcomes.select("world", "correct").rows() == [(1, False)]
    with pytest.raises(TraceError, match=r"has no world\(s\) 7; it has 0, 1"):
        run(root, make_router("small-only"), worlds=[7])


def test_summary_accuracy_cost_and_large_share(comb_trace):
    # conftest comb: 3 problems x 2 worlds, 3 steps of 4 tokens; all-small chain right only for p0.
    # tracebuild manifest: small 1e5 parameters, large 8e5 -> 8e-7 and 6.4e-6 TFLOPs per 4-token step.
    small = run(comb_trace, make_router("small-only")).summary().row(0, named=True)
    assert small["accuracy"] == pytest.approx(1 / 3)
    assert small["cost"] == pytest.approx(3 * 8e-7)
    assert small["a_over_c"] == pytest.approx(100 * (1 / 3) / (3 * 8e-7))  # % per TFLOP
    assert small["large_share"] == 0.0
    oracle = run(comb_trace, make_router("oracle")).summary().row(0, named=True)
    # p0: sss; p1, p2: ssL (cheapest escalated path) in both worlds.
    assert oracle["accuracy"] == 1.0
    assert oracle["cost"] == pytest.approx((2 * 3 * 8e-7 + 4 * (2 * 8e-7 + 6.4e-6)) / 6)
    assert oracle["large_share"] == pytest.approx(4 / 18)


def test_replay_trace_fits_on_train_and_records_the_split(comb_trace):
    router = make_router("small-only")
    result = replay_trace(comb_trace, router, split="all", splits=SplitSpec(3, (0.34, 0.33, 0.33)))
    expected = dict(zip(["p0", "p1", "p2"], assign_splits(["p0", "p1", "p2"], 3, (0.34, 0.33, 0.33))))
    assert {pid: split for pid, split in result.outcomes.select("problem_id", "split").rows()} == expected
    assert router.n_train_problems_ == list(expected.values()).count("train")
    assert json.loads(result.outcomes["splits"][0]) == {"seed": 3, "fractions": [0.34, 0.33, 0.33], "by": None}
    test_only = replay_trace(
        comb_trace, make_router("small-only"), split="test", splits=SplitSpec(3, (0.34, 0.33, 0.33))
    )
    assert set(test_only.outcomes["split"]) <= {"test"}
    with pytest.raises(TraceError, match="unknown split 'dev'"):
        replay_trace(comb_trace, make_router("small-only"), split="dev")


def test_outcome_columns_and_parquet_round_trip(comb_trace, tmp_path):
    result = run(comb_trace, make_router("random"), sweep={"p": np.array([0.2, 0.8])}, cost="flops+prefill")
    outcomes = result.outcomes
    assert outcomes.height == 3 * 2 * 2  # problems x worlds x configurations
    for column in (
        "router",
        "params",
        "config",
        "split",
        "problem_id",
        "world",
        "path",
        "answer",
        "correct",
        "cost",
        "cost_small",
        "cost_large",
        "cost_prefill",
        "cost_discarded",
        "cost_scorer",
        "n_small",
        "n_large",
        "n_discarded",
        "misses",
        "cost_model",
        "cost_unit",
    ):
        assert column in outcomes.columns
    parts = outcomes["cost_small"] + outcomes["cost_large"] + outcomes["cost_prefill"] + outcomes["cost_discarded"]
    np.testing.assert_allclose(outcomes["cost"].to_numpy(), (parts + outcomes["cost_scorer"]).to_numpy())
    path = tmp_path / "out.parquet"
    write_outcomes(outcomes, path)
    assert pl.read_parquet(path).equals(outcomes)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_unfitted_router_and_bad_sweeps_are_errors(comb_trace):
    data = ReplayData.from_trace(open_trace(comb_trace))
    cost = make_cost_model("flops", data.manifest)
    with pytest.raises(TraceError, match="not fitted"):
        replay(data, make_router("steer"), cost)
    with pytest.raises(TraceError, match="cannot sweep seed; sweepable: p"):
        replay(data, make_router("random").fit(data), cost, {"seed": np.array([1.0])})
    with pytest.raises(TraceError, match="cannot sweep tau; sweepable: none"):
        replay(data, make_router("oracle").fit(data), cost, {"tau": np.array([1.0])})


def test_parse_sweep():
    name, values = parse_sweep("tau=0:1:0.25")
    assert name == "tau" and values.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    _, fine = parse_sweep("tau=0:1:0.01")
    assert len(fine) == 101 and fine[-1] == 1.0 and fine[37] == 0.37
    assert parse_sweep("kappa=0.3,0.5")[1].tolist() == [0.3, 0.5]
    for bad in ("tau", "tau=1:0:0.1", "tau=0:1:0", "tau=a:b:c", "tau=0:1", "=0:1:0.1"):
        with pytest.raises(TraceError, match="--sweep must look like|--param must look like"):
            parse_sweep(bad)


def test_params_text_is_what_param_takes():
    params = {"tau": 0.5, "p": 1.0, "mode": "step", "pik": False, "seed": 3}
    assert params_text(params) == "tau=0.5, p=1, mode=step, pik=false, seed=3"
    assert params_text({"t_true": 0.9, "pik": True}, separator=" ") == "t_true=0.9 pik=true"
    typed = dict(parse_param(text) for text in params_text({"pik": False, "t_true": 0.9}).split(", "))
    router = make_router("cascade", **typed)
    assert router.pik is False and router.t_true == 0.9


def test_broken_trees_are_named():
    ungraded = comb_steps("p0", 2)
    ungraded[1]["correct"] = None  # "ss" is final
    with pytest.raises(TraceError, match="step 'p0/0/ss' is final but has no graded"):
        frames(ungraded).tree
    twice = comb_steps("p0", 2) + [{"path": "sL", "model": "small", "step_id": "p0/0/sX"}]
    with pytest.raises(TraceError, match="continue the same node with the same model"):
        frames(twice).tree
    stranger = comb_steps("p0", 2) + [{"path": "sL", "model": "medium", "step_id": "p0/0/sM"}]
    with pytest.raises(TraceError, match="model role.* medium"):
        frames(stranger).tree


def test_router_registry_errors():
    with pytest.raises(TraceError, match="unknown router 'nope'; choose one of cascade, large-only, only, oracle"):
        make_router("nope")
    with pytest.raises(TraceError, match="router rsd has no parameter temperature; its parameters: tau, scorer"):
        make_router("rsd", temperature=1)
    with pytest.raises(TraceError, match="parameter tau must be a number, got 'high'"):
        make_router("steer", tau="high")
    with pytest.raises(TraceError, match="parameter pik must be true or false"):
        make_router("cascade", pik="maybe")
    assert make_router("steer", tau="0.3", min_samples="4", mode="step").get_params() == {
        "tau": 0.3,
        "mode": "step",
        "escalate": "after",
        "min_samples": 4,
        "seed": 0,
        "gmms": "",
        "draft": "",
        "target": "",
        "models": "",
    }
    assert make_router("cascade", pik="false").pik is False
    assert repr(make_router("random", p=0.25)) == "RandomRouter(p=0.25, seed=0)"


class _Judged(DraftRouter):
    """A one-way draft router judging each small step by a fixed per-path signal and a prm score (no registry)."""

    scorer = "prm"
    one_way = True

    def __init__(self, escalate="after", reject=()):
        self.escalate = escalate
        self.reject = reject

    def draft_signal(self, data):
        return np.where(data.steps["path"].is_in(list(self.reject)).to_numpy(), 1.0, 0.0)

    def accept(self, signal, params):
        return signal < 0.5


def judged_trace(tmp_path, scored):
    base = manifest()
    root = build_trace(
        tmp_path / "t",
        sized(comb_steps("p0", 3, correct=lambda path: path in ("ssL", "sLL"))),
        # a hand-built scorer writing 5 tokens a call on its own 0.5e12-parameter model: 5 TFLOPs a call
        manifest={**base, "scorers": {"prm": {"n_params": 0.5e12, "generated_tokens": 5}}},
        scores=[
            {"step_id": f"p0/0/{path}", "scorer": "prm", "value": 0.5, "detail": None, "n_tokens_processed": 5}
            for path in scored
        ],
    )
    return ReplayData.from_trace(open_trace(root))


def test_one_way_escalate_after_keeps_the_trigger_and_replace_discards_it(tmp_path):
    data = judged_trace(tmp_path, ["s", "ss", "sss"])
    cost = make_cost_model("flops", data.manifest)
    after = replay(data, _Judged("after", reject=["ss"]).fit(data), cost).outcomes.row(0, named=True)
    # s judged and kept, ss judged, rejected and kept; the large model writes ssL, unjudged
    assert (after["path"], after["correct"], after["n_small"], after["n_large"], after["n_discarded"]) == (
        "ssL",
        True,
        2,
        1,
        0,
    )
    assert (after["cost_small"], after["cost_large"], after["cost_discarded"], after["cost_scorer"]) == (20, 80, 0, 10)
    replaced = replay(data, _Judged("replace", reject=["ss"]).fit(data), cost).outcomes.row(0, named=True)
    assert (replaced["path"], replaced["n_small"], replaced["n_large"], replaced["n_discarded"]) == ("sLL", 1, 2, 1)
    assert (replaced["cost_small"], replaced["cost_large"], replaced["cost_discarded"], replaced["cost_scorer"]) == (
        10,
        160,
        10,
        10,
    )


def test_under_escalate_after_a_final_small_step_is_kept_unjudged(tmp_path):
    data = judged_trace(tmp_path, ["s", "ss"])  # the final sss has no score
    cost = make_cost_model("flops", data.manifest)
    after = replay(data, _Judged("after", reject=["sss"]).fit(data), cost)
    row = after.outcomes.row(0, named=True)
    assert (row["path"], row["misses"], row["n_small"], row["n_discarded"], row["cost_scorer"]) == ("sss", 0, 3, 0, 10)
    # replace judges the final draft too: it needs the missing score
    replaced = replay(data, _Judged("replace", reject=["sss"]).fit(data), cost)
    assert replaced.misses.select("path", "model", "scorer").rows() == [("ss", "small", "prm")]


def test_draft_rule_checks_its_escalate_mode():
    signal = np.zeros(1)
    with pytest.raises(ValueError, match="escalate must be one of after, replace"):
        DraftRule(signal, lambda s, p: s < 1, one_way=True, escalate="later")
    with pytest.raises(ValueError, match="needs a one-way rule"):
        DraftRule(signal, lambda s, p: s < 1, one_way=False, escalate="after")


def test_a_scorer_listed_without_any_scores_is_refused_but_a_partly_scored_trace_misses(tmp_path):
    base = manifest()
    steps = sized(comb_steps("p0", 3))
    listed = {**base, "scorers": {"prm": {"n_params": 0.5e12, "generated_tokens": 5}}}
    lost = build_trace(tmp_path / "lost", steps, manifest=listed)
    with pytest.raises(TraceError, match="holds none, although trace.json lists the scorer"):
        replay_trace(lost, make_router("rsd"), split="all")
    judged_trace(tmp_path, scored=["s"])  # at tmp_path / "t": the first draft scored, the next ones not
    result = replay_trace(tmp_path / "t", make_router("rsd", tau=0.0), split="all")
    assert result.misses.select("path", "model", "scorer").rows() == [("s", "small", "prm")]
