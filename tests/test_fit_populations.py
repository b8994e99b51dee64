"""What each fitted thing learns from, and that growing a trace for other routers does not move it.

A comb trace (each problem's all-small chain and the large completion from every node on it) is fitted; then the
same trace, at the same place, also holds the steps that closure over other routers grows after a large step
("Ls", "Lss", "sLs", with confidences of their own). STEER's mixtures (`trace train steer`), the P(IK) probes
(`trace train pik`) and the policy (`trace train policy`) must come out byte for byte the same, although the
grown steps change the small model's step population at every depth (which STEER used to fit on).
"""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl
from tracebuild import build_trace, comb_steps

from replay.artifacts import load_train_split
from replay.routers import make_router
from replay.routers.steer import own_chain_steps
from replay.train_pik import train_pik
from replay.train_policy import Hyperparameters, train_policy
from replay.train_steer import train_steer

N_PROBLEMS, N_STEPS, LAYER = 60, 3, 3
GROWN = ("Ls", "Lss", "sLs", "LsL")  # steps closure adds after a large step (RSD's, SpecReason's, random's walks)


def trace_steps(grown: bool, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(steps, hidden) of the comb trace, with the grown steps when ``grown``; every value but the grown steps'
    is drawn the same in both."""
    rng = np.random.default_rng(seed)
    grown_rng = np.random.default_rng(seed + 1)
    steps, hidden = [], []
    for i in range(N_PROBLEMS):
        problem = f"q{i:03d}"
        knows = rng.random() < 0.5
        for step in comb_steps(problem, N_STEPS, correct=lambda path, knows=knows: "L" in path or knows):
            step["conf_max_logit_math"] = float(rng.normal(12.0 if knows else 7.0, 1.5))
            steps.append(step)
        hidden.append(
            {
                "problem_id": problem,
                "model": "small",
                "layer": LAYER,
                "where": "prompt_last",
                "vector": (np.array([1.0, -1.0, 0.5, 0.0]) * (1 if knows else -1) + rng.normal(0, 0.6, 4)).tolist(),
            }
        )
        if grown:
            for path in GROWN:  # the small steps closure grows are much less confident than the comb's
                final = len(path) == N_STEPS
                steps.append(
                    {
                        "problem_id": problem,
                        "path": path,
                        "is_final": final,
                        "correct": (grown_rng.random() < 0.5) if final else None,
                        "conf_max_logit_math": float(grown_rng.normal(2.0, 1.0)),
                    }
                )
    return steps, hidden


def fitted_files(root, folder) -> dict[str, bytes]:
    """Every fitted file of the trace at ``root``, written into ``folder``, by name."""
    folder.mkdir()
    train_steer(root, folder / "steer.json", min_samples=5)
    train_pik(root, folder / "pik.joblib", ["small"], layer=LAYER)
    train_policy(root, folder / "policy.pt", Hyperparameters(steps=5, hidden=8, batch=4))
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_growing_the_trace_for_other_routers_leaves_every_fit_byte_identical(tmp_path):
    root = tmp_path / "trace"
    steps, hidden = trace_steps(grown=False)
    build_trace(root, steps, hidden=hidden)
    comb = fitted_files(root, tmp_path / "comb")
    small_steps_before = load_train_split(root, 0, (0.5, 0.1, 0.4)).steps.filter(pl.col("model") == "small")
    steer_before = make_router("steer", min_samples=5).fit(load_train_split(root, 0, (0.5, 0.1, 0.4)))

    shutil.rmtree(root)  # the same trace, grown: every comb row as before, and the grown steps
    grown_steps, grown_hidden = trace_steps(grown=True)
    build_trace(root, grown_steps, hidden=grown_hidden)
    grown = fitted_files(root, tmp_path / "grown")

    train = load_train_split(root, 0, (0.5, 0.1, 0.4))
    small_steps = train.steps.filter(pl.col("model") == "small")
    assert small_steps.height > small_steps_before.height  # the population every small step would give moved
    assert own_chain_steps(train.steps, "small").height == small_steps_before.height
    assert list(grown) == ["pik.joblib", "policy.log.parquet", "policy.pt", "steer.json"]
    for name, content in comb.items():
        assert grown[name] == content, f"{name} moved when the trace grew for other routers"
    steer_after = make_router("steer", min_samples=5).fit(train)  # the router fitting itself: the same mixtures
    for depth, mixture in steer_before.by_role_["small"].mixtures.items():
        refitted = steer_after.by_role_["small"].mixtures[depth]
        assert refitted.means_.tolist() == mixture.means_.tolist()
        assert refitted.covariances_.tolist() == mixture.covariances_.tolist()
