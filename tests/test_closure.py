"""`trace gen --expand closure` and online runs on the toy world (the fake backend: seeded toy steps, no model;
the runs through vLLM: test_closure_vllm.py): closure leaves every listed configuration without misses, and a
router run online gives the replay's steps, answers and costs."""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from tracebuild import build_trace, comb_steps, toy_gen_options
from typer.testing import CliRunner

from cli import app
from replay.run import replay_trace
from tracegen.closure import RouterSpec, load_router_specs
from tracegen.gen import run_gen
from tracestore.errors import TraceError
from tracestore.store import open_trace
from tracestore.validate import validate

N_PROBLEMS = 5
ROUTERS = """
[[router]]
name = "random"
sweep = ["p=0.3,0.6"]

[[router]]
name = "specreason"
sweep = "tau=5:9:2"
"""
OUTCOME = [
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
]


options = partial(toy_gen_options, limit=N_PROBLEMS, seed=11, backend="fake")


@pytest.fixture(scope="module")
def closure_trace(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("closure")
    (folder / "routers.toml").write_text(ROUTERS)
    out = folder / "trace"
    run_gen(options(out, expand="closure", routers=tuple(load_router_specs(folder / "routers.toml"))))
    return out


def test_closure_leaves_no_misses_and_a_rerun_adds_nothing(closure_trace):
    for spec in load_router_specs_from_text(closure_trace.parent):
        result = replay_trace(closure_trace, spec.router(), sweep=spec.sweep_values(), split="all")
        assert result.outcomes["misses"].sum() == 0, spec
    comb_only = replay_trace(closure_trace, RouterSpec("small-only").router(), split="all")
    assert comb_only.outcomes["misses"].sum() == 0
    steps = open_trace(closure_trace).scan("steps").collect()
    assert steps.filter(pl.col("path").str.contains("Ls")).height > 0, "closure should add steps beyond the comb"
    validate(closure_trace)
    expansions = json.loads((closure_trace / "trace.json").read_text())["expansions"]
    assert expansions[-1]["strategy"] == "closure"
    assert [r["router"] for r in expansions[-1]["routers"]] == ["random", "specreason"]
    again = run_gen(
        options(closure_trace, expand="closure", routers=tuple(load_router_specs_from_text(closure_trace.parent)))
    )
    assert again.new_steps == 0 and again.closure.remaining_misses == 0
    assert again.up_to_date  # decided before any engine started


def test_closure_grows_what_a_router_of_your_own_misses(tmp_path):
    """The example router shipped with the docs, named by file in a study file: the comb lacks the steps its
    rejections lead to (small drafts after a large step); closure generates them until none is missing."""
    shutil.copy(Path(__file__).resolve().parents[1] / "examples/min_logprob.py", tmp_path / "my_router.py")
    (tmp_path / "routers.toml").write_text('[[router]]\nname = "my_router.py:MinLogprob"\nsweep = ["theta=-2,-0.5"]\n')
    (spec,) = load_router_specs(tmp_path / "routers.toml")
    trace = tmp_path / "trace"
    run_gen(options(trace, limit=3, max_steps=4))
    before = replay_trace(trace, spec.router(), sweep=spec.sweep_values(), split="all")
    assert before.outcomes["misses"].sum() > 0
    summary = run_gen(options(trace, limit=3, max_steps=4, expand="closure", routers=(spec,)))
    assert summary.new_steps > 0 and summary.closure.remaining_misses == 0
    after = replay_trace(trace, spec.router(), sweep=spec.sweep_values(), split="all")
    assert after.outcomes["misses"].sum() == 0
    assert open_trace(trace).scan("steps").collect()["path"].str.contains("Ls").any()  # off the comb
    assert json.loads((trace / "trace.json").read_text())["expansions"][-1]["routers"][0]["router"] == spec.name


def load_router_specs_from_text(folder: Path) -> list[RouterSpec]:
    return load_router_specs(folder / "routers.toml")


@pytest.mark.parametrize("spec", [RouterSpec("specreason", {"tau": "7"}), RouterSpec("random", {"p": "0.6"})])
def test_online_run_matches_the_replay_on_the_closure_trace(closure_trace, tmp_path, spec):
    online = tmp_path / "online"
    run_gen(options(online, expand="online", routers=(spec,)))
    validate(online)
    for cost in ("flops", "flops+prefill"):
        ran, replayed = (
            replay_trace(root, spec.router(), split="all", cost=cost).outcomes.select(OUTCOME)
            for root in (online, closure_trace)
        )
        assert ran["misses"].sum() == 0
        assert ran.equals(replayed), cost
    # the online trace holds exactly the steps the router took, identical to the cached ones
    online_steps = _steps_with_tokens(online).sort("step_id")
    cached = (
        _steps_with_tokens(closure_trace).join(online_steps.select("step_id"), on="step_id", how="semi").sort("step_id")
    )
    assert online_steps.drop("logprobs").equals(cached.drop("logprobs"))
    # on a real engine batch rows are padded differently online, so float rounding may differ (the tokens may not)
    np.testing.assert_allclose(
        online_steps["logprobs"].explode().to_numpy(), cached["logprobs"].explode().to_numpy(), atol=1e-4
    )


def _steps_with_tokens(root: Path) -> pl.DataFrame:
    trace = open_trace(root)
    return (
        trace.scan("steps")
        .select("step_id", "text", "answer", "correct", "n_gen_tokens", "n_new_prefill_tokens")
        .join(trace.scan("tokens").select("step_id", "token_ids", "logprobs"), on="step_id")
        .collect()
    )


def test_budget_stops_closure_and_says_so(tmp_path):
    (tmp_path / "routers.toml").write_text(ROUTERS)
    result = CliRunner().invoke(
        app,
        [
            "gen",
            "--model",
            "toy-small",
            "--large",
            "toy-large",
            "--dataset",
            "toy",
            "--limit",
            "2",
            "--max-steps",
            "4",
            "--max-step-tokens",
            "48",
            "--backend",
            "fake",
            "--expand",
            "closure",
            "--routers",
            str(tmp_path / "routers.toml"),
            "--budget-tokens",
            "1",
            "--out",
            str(tmp_path / "t"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "router misses left: --budget-tokens spent" in result.output


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "does not exist"),
        ("[[router]\nname = 'x'", "is not valid TOML"),
        ("[other]\nname = 'rsd'", "one or more \\[\\[router\\]\\] tables"),
        ("[[router]]\nparams = {tau = 1}", "name is missing"),
        ("[[router]]\nname = 'rsd'\ncolour = 'red'", "unknown key\\(s\\) colour"),
        ("[[router]]\nname = 'nope'", "router 1: unknown router 'nope'"),
        ("[[router]]\nname = 'rsd'\n[[router]]\nname = 'rsd'\nparams = {tau_x = 1}", "router 2: .*tau_x"),
        ("[[router]]\nname = 'rsd'\nsweep = 'mode=0:1:0.5'", "cannot sweep mode"),
        (
            "[[router]]\nname = 'rsd'\nparams = {tau = 5}",
            "router 1: .*tau must be a finite number in \\[0, 1\\], got 5.0",
        ),
        ("[[router]]\nname = 'rsd'\nsweep = ['tau=0:1:0.5', 'tau=0.7']", "router 1: --sweep tau is given twice"),
        ("[[router]]\nname = 'random'\nsweep = ['p=0:1:0.001', 'seed=0:20:1']", "cannot sweep seed"),
        (
            "[[router]]\nname = 'cascade'\nsweep = ['t_true=0:1:0.001', 't_ik=0:1:0.01']",
            "1001 x 101 = 101,101 configurations \\(at least [0-9.]+ GB\\); at most 20,000",
        ),
    ],
)
def test_router_file_errors(tmp_path, text, message):
    path = tmp_path / "routers.toml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(TraceError, match=message):
        load_router_specs(path)


def test_closure_option_errors(tmp_path):
    with pytest.raises(TraceError, match="--expand closure needs --routers"):
        run_gen(options(tmp_path / "a", expand="closure"))
    with pytest.raises(TraceError, match="--routers applies to --expand closure or online only"):
        run_gen(options(tmp_path / "b", routers=(RouterSpec("random"),)))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_router_needing_an_unscored_scorer_names_the_command(closure_trace, tmp_path):
    result = CliRunner().invoke(app, ["replay", str(closure_trace), "--router", "rsd"])
    assert result.exit_code == 1
    assert f"run `trace score {closure_trace} --scorer prm` first" in " ".join(result.output.split())


def test_the_demo_router_file_is_valid():
    specs = load_router_specs(Path(__file__).resolve().parents[1] / "data/toy/routers.toml")
    assert {spec.name for spec in specs} == {"rsd", "specreason", "steer", "random", "cascade"}
    assert next(spec for spec in specs if spec.name == "cascade").params == {"p_true": "final_min"}
    steer = [spec.params for spec in specs if spec.name == "steer"]
    assert steer == [{"mode": "step"}, {"mode": "switch"}, {"mode": "switch", "escalate": "replace"}]


def test_a_comb_holds_every_path_of_the_demo_files_one_way_routers(tmp_path):
    """STEER in switch mode, escalate after (the default) and replace, over the demo file's sweeps: zero misses on
    a comb trace, so closure never has to grow anything for them."""
    rng = np.random.default_rng(0)
    steps = []
    for i in range(40):
        tree = comb_steps(f"p{i:02d}", 4, correct=lambda path, i=i: (path.count("L") + i) % 3 > 0)
        for step in tree:
            step["conf_max_logit_math"] = float(rng.normal(10.0 if rng.random() < 0.7 else 6.0, 1.0))
        steps += tree
    root = build_trace(tmp_path / "comb", steps)
    specs = load_router_specs(Path(__file__).resolve().parents[1] / "data/toy/routers.toml")
    one_way = [spec for spec in specs if spec.name == "steer" and spec.params["mode"] == "switch"]
    assert len(one_way) == 2
    for spec in one_way:
        result = replay_trace(root, spec.router(), sweep=spec.sweep_values(), split="all")
        assert result.outcomes["misses"].sum() == 0, spec
        assert result.outcomes["path"].n_unique() >= 4  # the sweep really walks different escalation points
