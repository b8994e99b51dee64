"""The acceptance run on the real engine: `trace gen --model toy-small --large toy-large --dataset toy` with vLLM.

Starts vLLM engines (slow): run with `pytest -m vllm`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from test_gen import toy_models  # noqa: F401  (fixture: trained toy models, or random-weight stand-ins)

from tracegen.expand import Comb, frontier
from tracestore.store import open_trace
from tracestore.validate import validate

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 100
MAX_STEPS = 8


@pytest.fixture(scope="module")
def vllm_trace(toy_models, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:  # noqa: F811
    out = tmp_path_factory.mktemp("gen-vllm") / "toy"
    command = [
        sys.executable,
        "-m",
        "cli",
        "gen",
        "--model",
        toy_models[0],
        "--large",
        toy_models[1],
        "--dataset",
        "toy",
        "--limit",
        str(LIMIT),
        "--max-steps",
        str(MAX_STEPS),
        "--max-step-tokens",
        "48",
        "--hidden-layers",
        "-1",
        "--backend",
        "vllm",
        "--out",
        str(out),
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result


def test_acceptance_run_validates(vllm_trace):
    out, result = vllm_trace
    counts = validate(out)
    assert counts["problems"] == LIMIT and counts["steps"] > 2 * LIMIT
    assert "done" in result.stdout


def test_trees_are_complete_combs(vllm_trace):
    out, _ = vllm_trace
    steps = open_trace(out).scan("steps").collect()
    trees = {(p, 0): {} for p in steps["problem_id"].unique()}
    for row in steps.iter_rows(named=True):
        trees[(row["problem_id"], row["world"])][row["path"]] = row["is_final"]
    assert len(trees) == LIMIT
    assert frontier(trees, Comb(), max_steps=MAX_STEPS) == []


def test_engine_signals_and_prefix_cache(vllm_trace):
    out, _ = vllm_trace
    trace = open_trace(out)
    assert trace.manifest["engine"]["name"] == "vllm"
    assert trace.manifest["engine"]["logprobs_mode"] == "raw_logits"
    steps = trace.scan("steps").collect()
    # every child prompt starts with its parent's prompt, so deeper steps hit vLLM's prefix cache
    deep = steps.filter(pl.col("depth") >= 1)
    assert deep.height and deep["n_cached_tokens"].sum() > 0.5 * deep["n_prompt_tokens"].sum()
    assert (steps["n_cached_tokens"] <= steps["n_prompt_tokens"]).all()
    assert (steps["logprob_mean"] <= 0).all() and (steps["logprob_min"] <= steps["logprob_mean"] + 1e-6).all()
    tokens = trace.scan("tokens").collect()
    lengths = tokens.select(pl.col("topk_ids").list.eval(pl.element().list.len()).list.unique().alias("k"))
    assert lengths["k"].to_list() == [[5]] * tokens.height


def test_final_steps_are_graded(vllm_trace):
    out, _ = vllm_trace
    steps = open_trace(out).scan("steps").collect()
    finals = steps.filter(pl.col("is_final"))
    assert finals.height > 0
    assert finals["correct"].null_count() == 0
    assert steps.filter(~pl.col("is_final"))["correct"].null_count() == steps.filter(~pl.col("is_final")).height


def test_policy_meets_coverage_on_the_toy_trace_across_seeds(vllm_trace, tmp_path):
    """The CMDP policy trained on the toy trace's train split, replayed on its test split: for each of 5 seeds
    (alpha 0.1) and for alpha 0.02, coverage (correct, or the large model alone wrong) within the 95% binomial
    interval of the target, and no misses (the comb holds every escalation).

    The runs train and replay with escalate=replace. On the toy world the large model cannot repair a wrong first
    small step, and escalate=after (the default) always keeps the first small step, so no escalate=after policy
    reaches these targets here: the best any can do on the train split is checked to lie below 0.9 (if the toy
    models change so that it does not, move this test to the default)."""
    from scipy.stats import binomtest

    from replay.artifacts import load_train_split
    from replay.routers import make_router
    from replay.run import replay_trace
    from replay.splits import DEFAULT_FRACTIONS
    from replay.train_policy import Hyperparameters, comb_episodes, train_policy
    from tracegen.scoring import run_score

    out, _ = vllm_trace
    run_score(out, "verifier")
    train = load_train_split(out, 0, DEFAULT_FRACTIONS)
    assert comb_episodes(train, Hyperparameters(escalate="after")).best_coverage() < 0.9
    large = replay_trace(out, make_router("large-only")).outcomes.select("problem_id", "world", large="correct")
    for alpha, seed in [(0.1, s) for s in range(5)] + [(0.02, 0)]:
        policy = tmp_path / f"policy-{alpha}-{seed}.pt"
        train_policy(out, policy, Hyperparameters(alpha=alpha, steps=300, seed=seed, escalate="replace"))
        outcomes = replay_trace(out, make_router("policy", path=str(policy), escalate="replace")).outcomes
        assert outcomes["misses"].sum() == 0
        covered = outcomes.join(large, on=["problem_id", "world"]).select(pl.col("correct") | ~pl.col("large"))
        k, n = int(covered.to_series().sum()), covered.height
        assert binomtest(k, n).proportion_ci(confidence_level=0.95).high >= 1 - alpha, (alpha, seed, k, n)
