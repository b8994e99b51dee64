"""`--cost latency`: seconds per query from a latency profile, worked out by hand on a built tree, and the bad
profiles it refuses (one line each, no number from a default).

The tree (prompt 20 tokens; SpecReason at tau=5, the judge running on the large model, one generated token per
call): the small model drafts "s" (judge 8: kept), drafts "ss" (judge 2: discarded), the large model writes "sL"
(a switch: it has seen nothing, so it prefills the whole 26-token prefix), the small model drafts "sLs" (judge 9:
kept, final; it prefills only the large step's 5 new tokens).
"""

from __future__ import annotations

import json
import math

import pytest
from tracebuild import build_trace, default_manifest
from typer.testing import CliRunner

from cli import app
from replay.latency import PROFILE_FORMAT
from replay.routers import make_router
from replay.run import replay_trace
from tracestore.errors import TraceError

SMALL = {"overhead_s": 0.01, "prefill_s_per_token": 0.001, "decode_s_per_token": 0.02}
LARGE = {"overhead_s": 0.05, "prefill_s_per_token": 0.002, "decode_s_per_token": 0.1}
# (path, n_prompt_tokens, n_new_prefill_tokens, n_gen_tokens, judge verdict, judge n_tokens_processed)
STEPS = [
    ("s", 20, 20, 6, 8, 40),
    ("ss", 26, 1, 5, 2, 50),
    ("sL", 26, 26, 4, None, None),
    ("sLs", 30, 5, 3, 9, 60),
]


def request(coefficients: dict, prefill: float, decode: float) -> float:
    return (
        coefficients["overhead_s"]
        + coefficients["prefill_s_per_token"] * prefill
        + coefficients["decode_s_per_token"] * decode
    )


def profile_document(entries: dict | None = None, prefix_caching: bool = True) -> dict:
    entries = entries if entries is not None else {"small": SMALL, "large": LARGE}
    names = {"small": "toy-small", "large": "toy-large"}
    return {
        "format": PROFILE_FORMAT,
        "version": 1,
        "hardware": {"summary": "test machine"},
        "engine": {"name": "test", "version": "0", "prefix_caching": prefix_caching},
        "batch_size": 1,
        "entries": {name: {"model": names.get(name, name), **values} for name, values in entries.items()},
    }


def write_profile(path, document: dict):
    path.write_text(json.dumps(document))
    return path


@pytest.fixture
def tree(tmp_path):
    steps, scores = [], []
    for path, n_prompt, n_new, n_gen, verdict, processed in STEPS:
        steps.append(
            {
                "path": path,
                "n_prompt_tokens": n_prompt,
                "n_new_prefill_tokens": n_new,
                "n_gen_tokens": n_gen,
                "is_final": path == "sLs",
                "correct": True if path == "sLs" else None,
            }
        )
        if verdict is not None:
            detail = [float(d == verdict) for d in range(10)]
            scores.append(
                {
                    "step_id": f"p0/0/{path}",
                    "scorer": "judge",
                    "value": float(verdict),
                    "detail": detail,
                    "n_tokens_processed": processed,
                }
            )
    steps.append({"path": "L", "is_final": True, "correct": True})  # for large-only
    manifest = default_manifest(scorers={"judge": {"model": "large", "generated_tokens": 1}})
    return build_trace(tmp_path / "t", steps, manifest=manifest, scores=scores)


def specreason_row(root, profile, **kwargs):
    result = replay_trace(
        root, make_router("specreason", tau=5), split="all", cost="latency", latency_profile=profile, **kwargs
    )
    return result.outcomes.row(0, named=True)


def test_specreason_latency_by_hand(tree, tmp_path):
    profile = write_profile(tmp_path / "p.json", profile_document())
    row = specreason_row(tree, profile)
    kept_small = request(SMALL, 20, 6) + request(SMALL, 5, 3)  # "s" and "sLs"
    discarded = request(SMALL, 1, 5)  # "ss", thrown away
    switch = request(LARGE, 26, 4)  # "sL": the large model prefills all 26 tokens it has not seen
    judge = sum(request(LARGE, processed - 1, 1) for processed in (40, 50, 60))  # three verdicts, one token each
    assert row["correct"] and row["n_discarded"] == 1 and row["n_large"] == 1
    assert row["cost_discarded"] == pytest.approx(discarded)
    assert row["cost_scorer"] == pytest.approx(judge)
    assert row["cost"] == pytest.approx(kept_small + discarded + switch + judge)
    assert row["cost"] == pytest.approx(1.582)  # the sum written out: 0.15 + 0.075 + 0.111 + 0.502 + 0.744
    assert row["cost_unit"] == "seconds" and "serial seconds" in row["cost_convention"]
    assert "test machine" in row["cost_convention"]
    summary = replay_trace(
        tree, make_router("specreason", tau=5), split="all", cost="latency", latency_profile=profile
    ).summary()
    assert summary["a_over_c"][0] == pytest.approx(100 * 1.0 / 1.582)  # accuracy in % per second


def test_an_engine_without_prefix_caching_prefills_the_whole_prompt(tree, tmp_path):
    profile = write_profile(tmp_path / "p.json", profile_document(prefix_caching=False))
    row = specreason_row(tree, profile)
    steps = request(SMALL, 20, 6) + request(SMALL, 26, 5) + request(LARGE, 26, 4) + request(SMALL, 30, 3)
    judge = sum(request(LARGE, processed - 1, 1) for processed in (40, 50, 60))
    assert row["cost"] == pytest.approx(steps + judge)


def test_the_default_profile_is_the_traces_own_latency_json(tree, tmp_path):
    write_profile(tree / "latency.json", profile_document())
    assert specreason_row(tree, None)["cost"] == pytest.approx(1.582)


def test_a_profile_of_other_models_names_the_role(tree, tmp_path):
    document = profile_document()
    document["entries"]["large"]["model"] = "qwen2.5-math-7b"
    with pytest.raises(TraceError, match="measured for large = qwen2.5-math-7b, but this trace's large is toy-large"):
        specreason_row(tree, write_profile(tmp_path / "p.json", document))


def test_a_profile_without_a_model_the_router_uses_is_refused(tree, tmp_path):
    profile = write_profile(tmp_path / "p.json", profile_document({"small": SMALL}))
    small = replay_trace(tree, make_router("small-only"), split="all", cost="latency", latency_profile=profile)
    assert small.outcomes["misses"][0] == 1  # the tree has no all-small chain; the small model is profiled
    with pytest.raises(TraceError, match="no entry for large .toy-large., which router large-only uses"):
        replay_trace(tree, make_router("large-only"), split="all", cost="latency", latency_profile=profile)
    with pytest.raises(TraceError, match="no entry for scorer judge .it runs on large."):
        specreason_row(tree, profile)


@pytest.mark.parametrize("bad", [-0.5, math.nan, "fast"])
def test_a_negative_or_nan_coefficient_is_refused(tree, tmp_path, bad):
    document = profile_document()
    document["entries"]["small"]["decode_s_per_token"] = bad
    text = json.dumps(document)  # NaN is written as JSON's NaN literal, which Python reads back
    (tmp_path / "p.json").write_text(text)
    with pytest.raises(TraceError, match="small.decode_s_per_token is .*; it must be a finite number >= 0"):
        specreason_row(tree, tmp_path / "p.json")


def test_an_api_role_without_stored_timings_says_so(tmp_path):
    models = default_manifest()["models"]
    models[1] = {**models[1], "served_by": "openai"}
    root = build_trace(
        tmp_path / "t",
        [{"path": "L", "is_final": True, "correct": True, "gen_seconds": None}],
        manifest=default_manifest(models=models),
    )
    profile = write_profile(tmp_path / "p.json", profile_document({"small": SMALL}))
    with pytest.raises(TraceError, match="no entry for large .served by an API.*--timings"):
        replay_trace(root, make_router("large-only"), split="all", cost="latency", latency_profile=profile)


def test_the_command_line_gives_one_line_errors(tree, tmp_path):
    runner = CliRunner()
    no_profile = runner.invoke(app, ["replay", str(tree), "--router", "large-only", "--cost", "latency"])
    assert no_profile.exit_code == 1 and "needs a latency profile" in no_profile.output
    assert "Traceback" not in no_profile.output
    profile = write_profile(tmp_path / "p.json", profile_document())
    wrong_cost = runner.invoke(
        app, ["replay", str(tree), "--router", "large-only", "--latency-profile", str(profile), "--split", "all"]
    )
    assert wrong_cost.exit_code == 1 and "--latency-profile applies to --cost latency" in wrong_cost.output
    fine = runner.invoke(
        app,
        ["replay", str(tree), "--router", "specreason", "--param", "tau=5", "--split", "all", "--cost", "latency"]
        + ["--latency-profile", str(profile)],
        env={"COLUMNS": "200"},
    )
    assert fine.exit_code == 0, fine.output
    shown = " ".join(fine.output.split())
    assert "Cost s" in shown and "1.58" in shown, shown  # seconds per query, three significant digits


def test_the_policy_trains_on_latency(tmp_path):
    """The CMDP policy minimises seconds: its per-step costs are the latency model's, its scale the large chain's
    mean latency (every step of a comb chain writes 4 tokens; prompts 20 + 4 per depth, all new)."""
    from tracebuild import comb_steps

    from replay.data import ReplayData
    from replay.policy_training.episodes import comb_episodes
    from replay.train_policy import Hyperparameters, train_policy
    from tracestore.store import open_trace

    steps = [step for index in range(12) for step in comb_steps(f"p{index}", 3)]
    root = build_trace(tmp_path / "t", steps, manifest=default_manifest())
    profile = write_profile(tmp_path / "p.json", profile_document())
    data = ReplayData.from_trace(open_trace(root))
    episodes = comb_episodes(data, Hyperparameters(cost="latency", latency_profile=str(profile)))
    assert episodes.cost_unit == "seconds"
    large_chain = sum(request(LARGE, 20 + 4 * depth, 4) for depth in range(3))
    assert episodes.cost_scale == pytest.approx(large_chain)
    assert episodes.base_cost[0] == pytest.approx(request(SMALL, 20, 4) / large_chain)
    write_profile(root / "latency.json", profile_document())  # the default profile
    result = train_policy(root, tmp_path / "policy.pt", Hyperparameters(steps=2, cost="latency"))
    assert result.cost_unit == "seconds" and result.train_cost > 0
    lacking = write_profile(tmp_path / "small.json", profile_document({"small": SMALL}))
    with pytest.raises(TraceError, match="no entry for large"):
        train_policy(root, tmp_path / "p2.pt", Hyperparameters(steps=2, cost="latency", latency_profile=str(lacking)))
    with pytest.raises(TraceError, match="--latency-profile applies to --cost latency"):
        train_policy(root, tmp_path / "p3.pt", Hyperparameters(steps=2, latency_profile=str(profile)))
