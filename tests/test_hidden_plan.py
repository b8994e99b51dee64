"""The prompt hidden states `trace gen` stores: --hidden-layers for every model, plus what the routers of
--routers read (the cascade's P(IK) probe: layer 24 of a model deeper than that, else its last), said before
anything runs, with a warning where a router will read a model that cannot have them."""

from __future__ import annotations

from pathlib import Path

import pytest
from tracebuild import toy_gen_options

from replay.routers import make_router
from tracegen.closure import RouterSpec, load_router_specs
from tracegen.gen import run_gen
from tracegen.hidden import plan_hidden
from tracestore.errors import TraceError
from tracestore.store import open_trace

QWEN_DEPTH = {"small": 28, "large": 28}  # Qwen2.5-Math-1.5B and -7B both have 28 blocks
TOY_DEPTH = {"small": 2, "large": 3}
STUDY_ROUTERS = Path(__file__).resolve().parents[1] / "scripts" / "study_routers.toml"


def test_the_cascade_reads_layer_24_of_a_deep_model_and_the_last_of_a_shallow_one():
    cascade = make_router("cascade")
    assert list(cascade.hidden_layers(["small", "large"], QWEN_DEPTH)) == ["small"]  # the last model has no probe
    ((layer, why),) = cascade.hidden_layers(["small", "large"], QWEN_DEPTH)["small"].items()
    assert layer == 24 and "the paper's layer 24 (28 blocks)" in why
    assert cascade.hidden_layers(["small", "large"], TOY_DEPTH) == {
        "small": {-1: "cascade P(IK): the last layer (2 blocks, not more than the paper's 24)"}
    }
    chain = make_router("cascade", models="m0,m1,m3")
    depth = {"m0": 28, "m1": 24, "m2": 28, "m3": 80}
    assert {role: list(layers) for role, layers in chain.hidden_layers(["m0", "m1", "m2", "m3"], depth).items()} == {
        "m0": [24],
        "m1": [-1],
    }
    assert make_router("cascade", pik="false").hidden_layers(["small", "large"], QWEN_DEPTH) == {}
    assert list(make_router("cascade", layer="12").hidden_layers(["small", "large"], QWEN_DEPTH)["small"]) == [12]
    assert make_router("rsd").hidden_layers(["small", "large"], QWEN_DEPTH) == {}


def test_the_study_routers_file_stores_layer_24_of_the_small_model():
    plan = plan_hidden((), load_router_specs(STUDY_ROUTERS), ("small", "large"), QWEN_DEPTH)
    assert plan.layers == {"small": (24,), "large": ()}
    assert len(plan.reasons) == 1 and plan.reasons[0].startswith("small: layer 24, cascade P(IK): the paper's layer 24")
    assert plan.warnings == []


def test_given_layers_and_router_layers_together():
    specs = [RouterSpec("cascade", {}), RouterSpec("cascade", {"models": "small,large", "layer": "5"})]
    plan = plan_hidden((-1,), specs, ("small", "large"), QWEN_DEPTH)
    assert plan.layers == {"small": (-1, 24, 5), "large": (-1,)}
    assert plan.reasons[0] == "every model: layer(s) -1 (--hidden-layers)"
    with pytest.raises(TraceError, match="hidden layer 30 is out of range for the small model: it has 28 blocks"):
        plan_hidden((30,), [], ("small", "large"), QWEN_DEPTH)


def test_a_router_reading_a_model_without_hidden_states_is_warned_about():
    # the small model served by an API: no checkpoint, no hidden states
    plan = plan_hidden((), [RouterSpec("cascade", {})], ("small", "large"), {"large": 28})
    assert plan.layers == {"large": ()}
    assert plan.warnings == [
        "router cascade reads the prompt hidden states of model small, which an API endpoint serves (no hidden "
        "states): replay it without them (cascade: pik=false)"
    ]
    plan = plan_hidden((), [RouterSpec("cascade", {"where": "question_last"})], ("small", "large"), QWEN_DEPTH)
    assert plan.warnings == ["router cascade reads hidden states at where=question_last; gen stores prompt_last only"]


ROUTER = """
from replay.routers.small_only import SmallOnly


class ReadsLayerOne(SmallOnly):
    name = "reads-layer-one"

    def hidden_layers(self, roles, n_layers):
        return {roles[0]: {1: "a router of your own"}}
"""


def test_gen_stores_what_the_routers_file_asks_for_and_says_why(tmp_path):
    (tmp_path / "mine.py").write_text(ROUTER)
    (tmp_path / "routers.toml").write_text('[[router]]\nname = "mine.py:ReadsLayerOne"\n')
    specs = tuple(load_router_specs(tmp_path / "routers.toml"))
    out = tmp_path / "trace"
    said = []

    def progress(stage, **info):
        if stage == "hidden-plan":
            said.extend(info["plan"].reasons)

    options = toy_gen_options(out, limit=3, seed=0, max_steps=2, expand="closure", routers=specs, hidden_layers=(-1,))
    run_gen(options, progress=progress)
    assert said == [
        "every model: layer(s) -1 (--hidden-layers)",
        "small: layer 1, a router of your own (router " + specs[0].name + " in --routers)",
    ]
    trace = open_trace(out)
    rows = trace.scan("hidden").select("model", "layer").collect()
    assert sorted(set(rows.iter_rows())) == [("large", -1), ("small", -1), ("small", 1)]
    assert rows.height == 3 * 3  # three problems
    assert trace.manifest.hidden_layers_by_model == {"small": [-1, 1], "large": [-1]}
    assert trace.manifest["hidden"]["normed"] == {"small": {"-1": True, "1": False}, "large": {"-1": True}}
    assert run_gen(options).hidden_rows == 0  # resumed: nothing missing
