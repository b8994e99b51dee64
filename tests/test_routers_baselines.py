"""small-only, large-only, random and oracle on hand-built traces, outcomes and costs worked out by hand.

Manifest: small has 0.5e12 parameters (1 TFLOP per generated token under `flops`), large 2e12 (4 TFLOPs
per token). Small steps generate 10 tokens (10 TFLOPs), large steps 20 (80 TFLOPs).
"""

from __future__ import annotations

import numpy as np
import pytest
from tracebuild import build_trace, comb_steps, default_manifest

from replay.results import miss_list
from replay.routers import make_router
from replay.run import replay_trace
from replay.splits import SplitSpec, hash_uniform

SMALL_STEP, LARGE_STEP = 10.0, 80.0


def manifest():
    return default_manifest(
        models=[
            {"role": "small", "name": "s", "revision": "t", "n_params": 0.5e12, "n_layer": 2, "d_model": 64},
            {"role": "large", "name": "l", "revision": "t", "n_params": 2e12, "n_layer": 3, "d_model": 128},
        ]
    )


def sized(steps):
    for step in steps:
        step["n_gen_tokens"] = 10 if step["path"][-1] == "s" else 20
    return steps


def run(root, router, **kwargs):
    """Replay on every problem, with the router fitted on every problem."""
    return replay_trace(root, router, split="all", splits=SplitSpec(fractions=(1.0, 0.0, 0.0)), **kwargs)


def only_row(result):
    assert result.outcomes.height == 1
    return result.outcomes.row(0, named=True)


@pytest.fixture
def comb(tmp_path):
    right = {"ssL", "sLL"}
    return build_trace(
        tmp_path / "t", sized(comb_steps("p0", 3, correct=lambda path: path in right)), manifest=manifest()
    )


def test_small_only_and_large_only_walk_their_chains(comb):
    small = only_row(run(comb, make_router("small-only")))
    assert (small["path"], small["correct"], small["cost"]) == ("sss", False, 3 * SMALL_STEP)
    assert (small["n_small"], small["n_large"], small["misses"]) == (3, 0, 0)
    assert small["cost_small"] == 3 * SMALL_STEP and small["cost_large"] == 0
    large = only_row(run(comb, make_router("large-only")))
    assert (large["path"], large["correct"], large["cost"]) == ("LLL", False, 3 * LARGE_STEP)
    assert (large["n_small"], large["n_large"]) == (0, 3)


def test_oracle_takes_the_cheapest_correct_path(comb):
    row = only_row(run(comb, make_router("oracle")))
    # ssL = 10 + 10 + 80 = 100 beats sLL = 10 + 160 = 170.
    assert (row["path"], row["correct"], row["cost"], row["n_small"], row["n_large"]) == ("ssL", True, 100.0, 2, 1)


def test_oracle_without_a_correct_path_takes_the_cheapest(tmp_path):
    root = build_trace(tmp_path / "t", sized(comb_steps("p0", 3, correct=lambda path: False)), manifest=manifest())
    row = only_row(run(root, make_router("oracle")))
    assert (row["path"], row["correct"], row["cost"]) == ("sss", False, 30.0)


def test_oracle_never_uses_a_path_with_an_uncached_step(tmp_path):
    # sLL is correct and cheaper than LLL, but its middle step sL is not cached.
    steps = [s for s in comb_steps("p0", 3, correct=lambda path: path in ("sLL", "LLL")) if s["path"] != "sL"]
    root = build_trace(tmp_path / "t", sized(steps), manifest=manifest())
    row = only_row(run(root, make_router("oracle")))
    assert (row["path"], row["correct"], row["cost"]) == ("LLL", True, 240.0)


def test_oracle_without_any_complete_path_is_a_miss_where_the_small_chain_breaks(tmp_path):
    steps = [s for s in comb_steps("p0", 3) if s["path"] in ("s", "ss", "L", "LL")]
    root = build_trace(tmp_path / "t", sized(steps), manifest=manifest())
    result = run(root, make_router("oracle"))
    row = only_row(result)
    assert row["misses"] == 1 and row["correct"] is None
    assert miss_list(result) == [
        {"problem_id": "p0", "world": 0, "path": "ss", "model": "small", "scorer": None, "n_configs": 1}
    ]


def full_tree(problem_id: str, depth: int, correct) -> list[dict]:
    """Every small/large path up to `depth`; paths of length `depth` are final."""
    paths = [""]
    steps = []
    for level in range(1, depth + 1):
        paths = [p + c for p in paths for c in "sL"]
        steps += [
            {
                "problem_id": problem_id,
                "path": p,
                "is_final": level == depth,
                "correct": correct(p) if level == depth else None,
            }
            for p in paths
        ]
    return sized(steps)


def test_random_draws_each_node_from_a_seeded_hash(tmp_path):
    root = build_trace(tmp_path / "t", full_tree("p0", 3, lambda path: path.count("L") >= 2), manifest=manifest())
    for seed in (0, 1, 2, 3):
        # The path, worked out node by node: large where the node's uniform draw is below p.
        path = ""
        for _ in range(3):
            path += "L" if hash_uniform([f"p0/0/{path}"], seed)[0] < 0.5 else "s"
        row = only_row(run(root, make_router("random", p=0.5, seed=seed)))
        n_large = path.count("L")
        assert (row["path"], row["correct"]) == (path, n_large >= 2)
        assert row["cost"] == n_large * LARGE_STEP + (3 - n_large) * SMALL_STEP


def test_random_extremes_equal_the_single_model_baselines(comb):
    assert only_row(run(comb, make_router("random", p=0.0)))["path"] == "sss"
    assert only_row(run(comb, make_router("random", p=1.0)))["path"] == "LLL"


def test_random_off_the_comb_is_a_miss_not_an_invented_step(tmp_path):
    root = build_trace(tmp_path / "t", sized(comb_steps("p0", 3)), manifest=manifest())
    seed = next(s for s in range(100) if hash_uniform(["p0/0/"], s)[0] < 0.5 and hash_uniform(["p0/0/L"], s)[0] >= 0.5)
    result = run(root, make_router("random", p=0.5, seed=seed))
    row = only_row(result)
    assert (row["misses"], row["path"], row["correct"]) == (1, "L", None)
    assert row["cost"] == LARGE_STEP  # what it did generate before the miss is still counted per walk
    assert [(m["path"], m["model"]) for m in miss_list(result)] == [("L", "small")]
    summary = result.summary().row(0, named=True)
    assert summary["misses"] == 1 and summary["accuracy"] is None and summary["cost"] is None


def test_sweep_of_p_equals_single_replays(tmp_path):
    steps = []
    for i in range(8):
        steps += full_tree(f"p{i}", 3, lambda path: path.count("L") >= 1)
    root = build_trace(tmp_path / "t", steps, manifest=manifest())
    values = np.array([0.0, 0.3, 0.6, 1.0])
    swept = run(root, make_router("random", seed=5), sweep={"p": values}).outcomes
    for config, p in enumerate(values):
        single = run(root, make_router("random", p=float(p), seed=5)).outcomes
        mine = swept.filter(swept["config"] == config)
        assert mine.drop("config", "params").equals(single.drop("config", "params"))
