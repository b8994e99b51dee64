"""Per-step routers (replay.stepwise) walk exactly like the vectorised routers they restate: the same
outcomes, costs and misses over whole sweeps, on a demo-sized trace (200 problems, full depth-3 trees,
random signals, 2% of the PRM scores and 1% of the steps left out so that walks miss)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from tracebuild import build_trace, default_manifest, random_trees

from replay import api
from replay.routers import ROUTERS
from replay.routers.base import DraftRouter
from replay.stepwise import step_router
from tracestore.errors import TraceError

PRM = {"prm": {"model": "prm-test", "n_params": 1e9, "generated_tokens": 0}}
# the per-step RSD of the examples, loaded as `trace replay --router FILE.py:Class` loads a router of your own
StepRsd = ROUTERS.get(f"{Path(__file__).resolve().parents[1] / 'examples' / 'step_rsd.py'}:StepRsd")


@pytest.fixture(scope="module")
def demo_trace(tmp_path_factory):
    steps, scores = random_trees(200, 3, seed=1, unscored=0.02, uncached=0.01)
    root = tmp_path_factory.mktemp("demo") / "trace"
    return build_trace(root, steps, scores=scores, manifest=default_manifest(scorers=PRM))


@step_router(scorer="prm")
def rsd_function(node, tau=0.7):
    return node.draft.score >= tau


def same_walks(a, b, swept: str) -> None:
    """Identical outcomes and misses; the params column differs only by parameters other than ``swept``."""
    assert a.outcomes.height == b.outcomes.height > 0
    assert a.outcomes.drop("router", "params").equals(b.outcomes.drop("router", "params"))
    value = pl.col("params").str.json_path_match(f"$.{swept}")
    assert a.outcomes.select(value).equals(b.outcomes.select(value))
    assert a.misses.equals(b.misses)


@pytest.mark.parametrize("cost", ["flops", "flops+prefill"])
def test_per_step_rsd_equals_the_built_in_rsd_over_a_full_tau_sweep(demo_trace, cost):
    sweep = {"tau": "0:1:0.01"}
    built_in = api.replay(demo_trace, "rsd", sweep=sweep, split="all", cost=cost)
    # the fixture makes both kinds of miss, and the sweep really moves accuracy and cost
    assert built_in.misses["scorer"].is_null().any() and built_in.misses["scorer"].is_not_null().any()
    summary = built_in.summary()
    assert summary["accuracy"].n_unique() > 20 and summary["cost"].n_unique() > 20
    for per_step in (StepRsd, rsd_function):
        same_walks(built_in, api.replay(demo_trace, per_step, sweep=sweep, split="all", cost=cost), "tau")


def test_one_way_per_step_routers_equal_their_vectorised_form(demo_trace):
    """escalate=replace and escalate=after (the triggering draft kept, final drafts unjudged)."""

    for escalate in ("replace", "after"):

        class Vectorised(DraftRouter):
            name = f"vectorised-{escalate}"
            sweepable = ("theta",)
            one_way = True

            def __init__(self, theta=-2.0):
                self.theta = theta

            def draft_signal(self, data):
                return data.steps["logprob_min"].to_numpy()

            def accept(self, signal, params):
                return signal >= params["theta"]

        Vectorised.escalate = escalate

        @step_router(one_way=True, escalate=escalate)
        def per_step(node, theta=-2.0):
            return node.draft.logprob_min >= theta

        sweep = {"theta": "-4:0:0.1"}
        vectorised = api.replay(demo_trace, Vectorised, sweep=sweep, split="all")
        assert vectorised.outcomes["path"].n_unique() >= 4  # every escalation point is reached
        same_walks(vectorised, api.replay(demo_trace, per_step, sweep=sweep, split="all"), "theta")


def test_a_node_holds_the_kept_steps_of_its_path_and_the_draft(tmp_path):
    """Two problems, full depth-3 trees: the router sees the steps kept so far (large rewrites included) and
    decides from their history; the walk worked out by hand."""
    steps, _ = random_trees(2, 3, seed=3)
    root = build_trace(tmp_path / "t", steps)
    seen = []

    @step_router
    def history(node, limit=1):
        kept = [step.path for step in node.steps]
        assert kept == [node.path[: i + 1] for i in range(len(node.path))]  # root first, the whole path
        assert node.draft.parent_path == node.path and node.draft.model == "small" and node.depth == len(kept)
        seen.append((node.problem_id, node.path))
        assert isinstance(limit, int)  # an int parameter stays one although the engine sweeps floats
        return sum(step.model == "small" for step in node.steps) < limit  # at most `limit` small steps kept

    result = api.replay(root, history, split="all")
    # limit 1: s kept; at "s" the draft "ss" is rejected -> sL; at "sL" the draft "sLs" is rejected -> sLL
    assert result.outcomes["path"].to_list() == ["sLL", "sLL"]
    assert sorted(seen) == [(p, path) for p in ("q000", "q001") for path in ("", "s", "sL")]
    outcome = result.outcomes.row(0, named=True)
    assert (outcome["n_small"], outcome["n_large"], outcome["n_discarded"]) == (1, 2, 2)
    two = api.replay(root, history, params={"limit": "2"}, split="all")
    assert two.outcomes["path"].to_list() == ["ssL", "ssL"]
    swept = api.replay(root, history, sweep={"limit": [1, 2, 3]}, split="all")
    assert swept.outcomes["path"].to_list() == ["sLL", "sLL", "ssL", "ssL", "sss", "sss"]


def test_per_step_mistakes_are_one_message_naming_the_router(demo_trace):
    def failing(decide, **options):
        return api.replay(demo_trace, step_router(decide, **options), split="all")

    with pytest.raises(TraceError, match=r"test_stepwise.py:.*returns_a_number: decide returned 0.5 for draft"):

        def returns_a_number(node):
            return 0.5

        failing(returns_a_number)
    with pytest.raises(TraceError, match=r"decide failed \(line \d+\) on draft 'q000/0/s': ZeroDivisionError"):

        def divides(node):
            return 1 / 0 > 0

        failing(divides)
    with pytest.raises(TraceError, match="declares no scorer, so its drafts have no score"):
        failing(lambda node: node.draft.score > 0.5)
    with pytest.raises(TraceError, match="a step has no signal 'correct' .a router cannot read whether"):
        failing(lambda node: node.draft.correct)
    with pytest.raises(TypeError, match="must take the node as its first argument"):
        step_router(lambda draft: True)
    with pytest.raises(TypeError, match="parameter tau needs a default value"):
        step_router(lambda node, tau: True)


def test_sweepable_parameters_and_the_estimator_contract():
    router = api.router(rsd_function, tau="0.4")
    assert router.tau == 0.4 and router.get_params() == {"tau": 0.4}
    assert type(router).sweepable == ("tau",) and type(router).name == "rsd-function"
    assert StepRsd.sweepable == ("tau",)  # numeric parameters; the scorer name is not swept
    with pytest.raises(TraceError, match="router step-rsd cannot sweep scorer"):
        api.replay("unused", StepRsd, sweep={"scorer": [1.0]})
    assert {"rsd-function", "step-rsd"}.isdisjoint(ROUTERS.names())  # only built-in routers are registered


def test_slow_per_step_replays_suggest_the_vectorised_form(demo_trace, monkeypatch):
    result = api.replay(demo_trace, StepRsd, split="all")
    assert api.slow_sweep_hint(StepRsd(), result, 1.0) is None
    monkeypatch.setattr(api, "SLOW_SECONDS", 0.5)
    hint = api.slow_sweep_hint(StepRsd(), result, 1.0)
    assert "step-rsd is a per-step router: 1 configuration(s) took 1.0s" in hint and "vectorised DraftRouter" in hint
    assert api.slow_sweep_hint(ROUTERS.get("rsd")(), result, 100.0) is None


def test_outcome_frames_are_polars(demo_trace):
    result = api.replay(demo_trace, StepRsd, sweep=["tau=0.2,0.8"], split="all")
    instance = api.replay(api.open_trace(demo_trace), StepRsd(tau=0.2), sweep={"tau": [0.2, 0.8]}, split="all")
    assert instance.outcomes.equals(result.outcomes)  # an opened trace and a router instance: the same replay
    with pytest.raises(TraceError, match="params apply to a router given by name or class"):
        api.replay(demo_trace, StepRsd(), params={"tau": "0.5"})
    assert isinstance(result.outcomes, pl.DataFrame) and isinstance(result.summary(), pl.DataFrame)
    assert result.summary()["params"].to_list() == ['{"scorer": "prm", "tau": 0.2}', '{"scorer": "prm", "tau": 0.8}']
    assert np.isfinite(result.summary()["cost"].to_numpy()).all()
