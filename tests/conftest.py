"""Shared fixtures. Hand-made traces come from tests/tracebuild.py (importable as `tracebuild`); the vLLM engines of
the toy models (`-m vllm`) are started once per session and shared by every module that asks for them."""

from __future__ import annotations

import os
import shutil
import time

import pytest
from tracebuild import build_trace, comb_steps, default_manifest

# The toy models are tiny: torch's intra-op threads cost them more in synchronisation than they gain, and beside
# other processes (CLI subprocesses, Ray workers, vLLM engines) they spin against each other, many times slower.
# One thread per process, for this one and every subprocess it starts (set before anything imports torch).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# pytest-xdist's workers inherit COLUMNS=80, which rich's console (made at import) would keep as a fixed width
# and ignore the widths that tests give through CliRunner's env.
os.environ.pop("COLUMNS", None)
# vLLM engines in the test process (and in the CLI subprocesses the tests start) instead of two processes of their
# own each, which would re-import vLLM and torch: a toy model's engine starts in about 2 s instead of about 30.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

TOY_ROLES = {"small": "m0", "medium": "m1", "large": "m2"}  # each toy model's role in a three-model trace
VLLM_STARTS: list[str] = []  # what this session's shared fixtures started, for the summary line
# The order of the -m vllm modules (others: 2). A vLLM engine on a CPU holds about 2 GiB (1 of them its KV cache,
# VLLM_CPU_KVCACHE_SPACE), so first come the modules that start engines of their own (the CLI acceptance run's
# four, then `vllm serve`'s one beside the shared toy-large), before the shared engines hold memory, and last those
# that also need toy-medium's: at most six engines at once (three models, a generator and an exact scorer each).
VLLM_MODULE_ORDER = {"test_gen_vllm.py": 0, "test_api_vllm.py": 1, "test_k_models_vllm.py": 3, "test_toy_models.py": 3}


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


def start_vllm(size: str):
    """The vLLM backend (a generator and an exact scorer) of toy-SIZE, with its share of a GPU's memory as one of
    the three toy models (on a CPU each engine gets a KV cache of VLLM_CPU_KVCACHE_SPACE GiB)."""
    from data.toy import MODEL_ALIASES
    from tracegen.backends import engine_kwargs_for, load_backend

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    started = time.perf_counter()
    backend = load_backend(
        "vllm",
        str(MODEL_ALIASES[f"toy-{size}"]),
        **engine_kwargs_for("vllm", TOY_ROLES[size], {}, tuple(TOY_ROLES.values())),
    )
    VLLM_STARTS.append(f"toy-{size} ({time.perf_counter() - started:.0f} s)")
    return backend


@pytest.fixture(scope="session")
def vllm_small():
    backend = start_vllm("small")
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def vllm_medium():
    backend = start_vllm("medium")
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def vllm_large():
    backend = start_vllm("large")
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def vllm_engines(vllm_small, vllm_large) -> dict:
    """{"small": ..., "large": ...}: the engines `run_gen(..., backends=...)` and `run_audit` borrow."""
    return {"small": vllm_small, "large": vllm_large}


def _run_order(item) -> int:
    if item.get_closest_marker("slow") is not None:
        return 0
    if item.get_closest_marker("vllm") is None:
        return 1
    return 2 + VLLM_MODULE_ORDER.get(item.path.name, 2)


def pytest_collection_modifyitems(items):
    """The end-to-end runs (`slow`) first, so that under pytest-xdist (scripts/test.sh) the longest test starts at
    once; the vLLM tests last, in VLLM_MODULE_ORDER (a stable sort: each module's tests stay together)."""
    items.sort(key=_run_order)


def pytest_terminal_summary(terminalreporter):
    if VLLM_STARTS:
        terminalreporter.write_line(
            f"shared vLLM backends started: {len(VLLM_STARTS)} ({', '.join(VLLM_STARTS)}), two engines each"
        )
