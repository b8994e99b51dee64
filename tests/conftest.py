"""Shared fixtures. Hand-made traces come from tests/tracebuild.py (importable as `tracebuild`)."""

from __future__ import annotations

import shutil

import pytest
from tracebuild import build_trace, comb_steps, default_manifest


def small_wrong_large_right(path: str) -> bool:
    return "L" in path


@pytest.fixture(scope="session")
def comb_template(tmp_path_factory):
    steps = []
    for problem in ("p0", "p1", "p2"):
        for world in (0, 1):
            correct = (lambda path: True) if problem == "p0" else small_wrong_large_right
            steps += comb_steps(problem, 3, world=world, correct=correct)
    root = tmp_path_factory.mktemp("template") / "comb"
    return build_trace(root, steps, manifest=default_manifest(n_problems=3), parts=2)


@pytest.fixture
def comb_trace(comb_template, tmp_path):
    """A fresh copy of a comb trace: 3 problems x 2 worlds, 3-step solutions; the all-small chain is right
    only for p0, every escalated path is right; steps in 2 part files. Tests may corrupt it."""
    return shutil.copytree(comb_template, tmp_path / "comb")
