"""`trace gen --ray` on a local Ray instance (2 CPUs, 2 workers, the toy models on the fake backend: seeded toy steps,
no model): the trace equals a single-process run's step for step, also when a worker process is killed mid-run."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from tests.test_gen import options, toy_models  # noqa: F401 - toy_models is a fixture
from tests.test_shard_race import assert_same_steps
from tracegen.distributed import run_distributed
from tracegen.gen import run_gen
from tracegen.options import ALL_ROLES, EngineOptions
from tracestore.errors import TraceError
from tracestore.validate import validate

ray = pytest.importorskip("ray")
# enough problems that a worker's round takes far longer than the kill takes to land
SETTINGS = dict(limit=60, max_steps=4, backend="fake")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(toy_models, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("single") / "trace"
    run_gen(options(toy_models, out, **SETTINGS))
    return out


def writers(root) -> set[str]:
    return {path.name.split("-")[1] for path in (root / "steps").glob("part-*.parquet")}


def test_two_ray_workers_grow_the_single_process_trace(local_ray, toy_models, reference, tmp_path):  # noqa: F811
    out = tmp_path / "ray"
    seen = []
    summary = run_distributed(options(toy_models, out, **SETTINGS), workers=2, progress=seen.append)
    validate(out)
    assert_same_steps(out, reference)
    assert writers(out) == {"shard0of2", "shard1of2"}
    assert sum(worker.problems for worker in summary.workers) == SETTINGS["limit"]
    assert all(worker.new_steps > 0 for worker in summary.workers)
    assert summary.new_steps == len(open_steps(out))  # a fresh trace: every step is new, grown once
    assert seen and sum(worker.problems for worker in seen[-1]) == SETTINGS["limit"]


def test_a_killed_worker_is_restarted_and_resumes_from_its_parts(local_ray, toy_models, reference, tmp_path):  # noqa: F811
    out = tmp_path / "ray"
    killed = {}

    def kill_first_worker_after_its_first_part(actors):
        pid = ray.get(actors[0].pid.remote())

        def watch():
            deadline = time.time() + 300
            while not list((out / "steps").glob("part-shard0of2-*")) and time.time() < deadline:
                time.sleep(0.01)
            os.kill(pid, signal.SIGKILL)
            killed["pid"] = pid
            killed["parts"] = len(list((out / "steps").glob("part-shard0of2-*")))

        threading.Thread(target=watch, daemon=True).start()

    summary = run_distributed(
        options(toy_models, out, **SETTINGS), workers=2, on_start=kill_first_worker_after_its_first_part
    )
    assert killed.get("parts", 0) >= 1, "the worker was not killed mid-run"
    validate(out)
    assert_same_steps(out, reference)  # no step lost, none twice
    shard0 = sum(1 for step in open_steps(out) if step.startswith(tuple(summary_problem_ids(out, 0))))
    # the restarted worker's run grew only what its first process had not stored
    assert summary.workers[0].new_steps < shard0


def test_a_worker_failure_prints_the_workers_own_error(local_ray, toy_models, tmp_path):  # noqa: F811
    engine = EngineOptions(dtype={ALL_ROLES: "no-such-dtype"})  # what --dtype checks; the options object does not
    broken = options(toy_models, tmp_path / "ray", limit=2, engine=engine)
    with pytest.raises(TraceError) as failed:
        run_distributed(broken, workers=1)
    message = str(failed.value)  # issue 29: not Ray's first line "ray::_Worker.run() (pid=..., ip=...)"
    assert message == "a Ray worker failed: AttributeError: module 'torch' has no attribute 'no-such-dtype'"


def open_steps(root):
    from tracestore.store import open_trace

    return open_trace(root).scan("steps").select("step_id").collect()["step_id"].to_list()


def summary_problem_ids(root, shard: int) -> list[str]:
    from tracegen.gen import in_shard
    from tracestore.store import open_trace

    ids = open_trace(root).scan("problems").select("problem_id").collect()["problem_id"].to_list()
    return [f"{pid}/" for pid in ids if in_shard(pid, (shard, 2))]
