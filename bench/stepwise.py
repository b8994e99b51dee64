"""Benchmark: a per-step router against the vectorised router it restates, on a GSM8K-sized synthetic trace.

RSD written per step (examples/step_rsd.py, ``decide(node)``: keep a draft whose PRM score reaches tau) and the
built-in vectorised RSD replay the same 101-point tau sweep on the trace bench/replay.py grows (1,319 problems,
comb + closure); prints both times, their ratio, and whether the outcomes are identical (they must be).

    python bench/stepwise.py [--problems 1319] [--repeats 3]
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("POLARS_MAX_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
if not __package__:  # run as `python bench/stepwise.py`: keep this file's folder from shadowing packages
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import time  # noqa: E402

from replay.costs import make_cost_model  # noqa: E402
from replay.params import parse_sweep  # noqa: E402
from replay.routers import ROUTERS, make_router  # noqa: E402
from replay.run import replay  # noqa: E402

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "step_rsd.py")
StepRsd = ROUTERS.get(f"{EXAMPLE}:StepRsd")  # loaded as `trace replay --router FILE.py:Class` loads it


def bench_replay_module():
    """bench/replay.py (its trace builder), imported by path: its name would shadow the replay package."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "replay.py")
    spec = importlib.util.spec_from_file_location("bench_replay", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=1319)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    bench = bench_replay_module()
    for scorer, generated in (("prm", 0), ("judge", 1)):  # what `trace score` records (bench/replay.py lacks it)
        bench.MANIFEST["scorers"][scorer].setdefault("generated_tokens", generated)
    data, rounds = bench.grow_trace(args.problems)
    data.tree  # noqa: B018 - builds the tree index once, outside the timings
    print(f"synthetic trace: {args.problems:,} problems, {data.steps.height:,} steps (comb + {rounds} closure rounds)")
    cost = make_cost_model("flops", bench.MANIFEST)
    sweep = dict([parse_sweep("tau=0:1:0.01")])
    timings, results = {}, {}
    for label, router in (("vectorised rsd", make_router("rsd")), ("per-step rsd", StepRsd())):
        router.fit(data)
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            results[label] = replay(data, router, cost, sweep)
            times.append(time.perf_counter() - started)
        timings[label] = min(times)
        size = f"101 thresholds x {data.roots.height:,} problems"
        print(f"{label:15s} {size}: {timings[label]:.3f}s (best of {args.repeats})")
    # params differ by the built-in's other parameters (draft, target); config numbers the same tau sweep in both
    vectorised, per_step = (
        results[label].outcomes.drop("router", "params") for label in ("vectorised rsd", "per-step rsd")
    )
    same = vectorised.equals(per_step)
    print(
        f"per-step / vectorised: {timings['per-step rsd'] / timings['vectorised rsd']:.1f}x the time; "
        f"identical outcomes: {same}"
    )


if __name__ == "__main__":
    main()
