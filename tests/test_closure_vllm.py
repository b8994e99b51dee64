"""Closure, online runs and scorers through the real vLLM engine on the toy world (slow: `pytest -m vllm`).

The session's shared engines of toy-small and toy-large (a generator and an exact scorer per model; tests/conftest.py)
serve every run of this module.
"""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from tracebuild import toy_gen_options

from replay.run import replay_trace
from tracegen.closure import RouterSpec
from tracegen.gen import run_gen
from tracegen.scoring import open_scorer, run_score, score_pending
from tracestore.repair import repair
from tracestore.store import open_trace
from tracestore.validate import validate

pytestmark = pytest.mark.vllm

SPECS = (RouterSpec("specreason", {"tau": "7"}), RouterSpec("random", {"p": "0.6"}))
OUTCOME = [
    "problem_id",
    "world",
    "path",
    "answer",
    "correct",
    "cost",
    "cost_prefill",
    "cost_discarded",
    "cost_scorer",
    "n_small",
    "n_large",
    "n_discarded",
    "misses",
]


options = partial(toy_gen_options, limit=4, seed=13, backend="vllm")


@pytest.fixture(scope="module")
def closure_trace(vllm_engines, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("closure-vllm") / "trace"
    run_gen(options(out, expand="closure", routers=SPECS), backends=vllm_engines)
    return out


@pytest.mark.parametrize("spec", SPECS)
def test_online_run_through_vllm_matches_the_replay(vllm_engines, closure_trace, tmp_path, spec):
    online = tmp_path / "online"
    run_gen(options(online, expand="online", routers=(spec,)), backends=vllm_engines)
    validate(online)
    ran, replayed = (
        replay_trace(root, spec.router(), split="all", cost="flops+prefill").outcomes.select(OUTCOME)
        for root in (online, closure_trace)
    )
    assert ran["misses"].sum() == 0 and replayed["misses"].sum() == 0
    assert ran.equals(replayed)


def test_vllm_scorers_agree_with_transformers(vllm_engines, closure_trace, tmp_path):
    assert open_trace(closure_trace).manifest["scorers"]["judge"]["model"] == "large"  # scored by closure, on vLLM
    scorer = open_scorer(closure_trace, "ptrue", backend="vllm", engines=vllm_engines)
    assert score_pending(closure_trace, scorer).new > 0
    validate(closure_trace)
    copy = shutil.copytree(closure_trace, tmp_path / "copy")
    shutil.rmtree(copy / "scores")
    repair(copy)  # the copy forgets the score parts its writers recorded, so they can be grown again
    for name in ("judge", "ptrue"):
        run_score(copy, name, backend="hf")
        ours, theirs = (
            open_trace(root).scan("scores").filter(pl.col("scorer") == name).sort("step_id").collect()
            for root in (closure_trace, copy)
        )
        assert ours["step_id"].to_list() == theirs["step_id"].to_list()
        np.testing.assert_allclose(ours["value"].to_numpy(), theirs["value"].to_numpy(), atol=1e-4)
        assert (ours["n_tokens_processed"] == theirs["n_tokens_processed"]).all()
