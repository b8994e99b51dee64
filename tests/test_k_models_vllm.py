"""A three-model comb on the real engine: `trace gen --models toy-small,toy-medium,toy-large --dataset toy` with
vLLM for a few toy problems, validated, complete, and replayed over all three models.

Runs on the session's shared vLLM engines of the three toy models (tests/conftest.py; slow): run with
`pytest -m vllm`.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from tracebuild import toy_gen_options

from replay.routers import make_router
from replay.run import replay_trace
from replay.splits import SplitSpec
from tracegen.expand import Comb, frontier
from tracegen.gen import run_gen
from tracestore.store import open_trace
from tracestore.validate import validate

pytestmark = pytest.mark.vllm

LIMIT = 6
MAX_STEPS = 6
ROLES = ("m0", "m1", "m2")


@pytest.fixture(scope="module")
def comb3(vllm_small, vllm_medium, vllm_large, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen3-vllm") / "toy3"
    options = toy_gen_options(out, middle=("toy-medium",), limit=LIMIT, max_steps=MAX_STEPS, seed=0, backend="vllm")
    run_gen(options, backends=dict(zip(ROLES, (vllm_small, vllm_medium, vllm_large))))
    return out


def test_three_model_comb_validates_and_is_complete(comb3):
    counts = validate(comb3)
    assert counts["problems"] == LIMIT
    trace = open_trace(comb3)
    assert trace.manifest["schema_version"] == 2
    models = trace.manifest.models
    assert list(models) == list(ROLES)
    assert [models[role]["name"] for role in ROLES] == ["toy-small", "toy-medium", "toy-large"]
    sizes = [models[role]["n_params"] for role in ROLES]
    assert sizes == sorted(sizes) and all(models[role]["n_layer"] and models[role]["d_model"] for role in ROLES)
    steps = trace.scan("steps").collect()
    assert set(steps["model"].unique()) == set(ROLES)
    trees = {(problem, 0): {} for problem in steps["problem_id"].unique()}
    for row in steps.iter_rows(named=True):
        trees[(row["problem_id"], row["world"])][row["path"]] = row["is_final"]
    assert len(trees) == LIMIT
    assert frontier(trees, Comb(ROLES), max_steps=MAX_STEPS) == []
    # every switch is to a larger model, and at most one per path
    switches = steps.select(pl.col("path").str.extract_all(r"(.)").list.unique(maintain_order=True).alias("chars"))
    assert all(len(chars) <= 2 and chars == sorted(chars) for chars in switches["chars"].to_list())


def test_every_chain_and_model_replays_without_misses(comb3):
    for role in ROLES:
        outcomes = replay_trace(comb3, make_router("only", model=role), split="all").outcomes
        assert outcomes["misses"].sum() == 0 and (outcomes[f"n_{role}"] > 0).all()
    for chain in ("m0,m1", "m0,m2", "m1,m2", "m0,m1,m2"):
        router = make_router("cascade", models=chain, pik=False, p_true="final_min", t_true=0.5)
        assert replay_trace(comb3, router, split="all").outcomes["misses"].sum() == 0
    for target in ("m1", "m2"):
        router = make_router("steer", mode="switch", target=target, min_samples=2)
        outcomes = replay_trace(comb3, router, split="all", splits=SplitSpec(fractions=(1.0, 0.0, 0.0))).outcomes
        assert outcomes["misses"].sum() == 0
        other = {"m1": "n_m2", "m2": "n_m1"}[target]
        assert (outcomes[other] == 0).all()
