"""`trace gen --ray local` from the command line: a driver killed mid-run (kill -9), then the same command
rerun, leaves the trace an uninterrupted single-process run writes, step for step."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time

import pytest

from tests.test_gen import ROOT, gen_command, options, toy_models  # noqa: F401 - toy_models is a fixture
from tests.test_shard_race import assert_same_steps
from tracegen.gen import run_gen
from tracestore.store import open_trace
from tracestore.validate import validate

pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")  # installed with ray

N_PROBLEMS = 120  # enough that each round of a worker takes longer than the kill (a few problems take milliseconds)


def test_a_killed_driver_rerun_resumes_to_the_uninterrupted_trace(toy_models, tmp_path):  # noqa: F811
    reference, out = tmp_path / "reference", tmp_path / "ray"
    run_gen(options(toy_models, reference, max_steps=5, limit=N_PROBLEMS, backend="fake"))
    command = [*gen_command(toy_models, out, backend="fake", limit=N_PROBLEMS), "--ray", "local", "--workers", "2"]
    driver = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((out / "steps").glob("part-shard*.parquet")) and time.time() < deadline and driver.poll() is None:
        time.sleep(0.01)
    # the driver and the local Ray instance it started die at once, as on a lost machine: otherwise the
    # workers may finish their shards before Ray notices that the driver is gone
    processes = [psutil.Process(driver.pid), *psutil.Process(driver.pid).children(recursive=True)]
    for sent in (signal.SIGSTOP, signal.SIGKILL):
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(sent)
    driver.wait()
    time.sleep(2)  # any Ray process outside the driver's tree stops with it
    partial = open_trace(out).scan("steps").collect().height
    full = open_trace(reference).scan("steps").collect().height
    assert 0 < partial < full, "the kill should land after the first part and before the last"
    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "2 Ray workers" in rerun.stdout and "worker 1 (shard 1/2)" in rerun.stdout
    validate(out)
    assert_same_steps(out, reference)
