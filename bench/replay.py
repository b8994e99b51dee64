"""Benchmark: 101-point threshold sweeps of steer, rsd and specreason on a GSM8K-sized synthetic trace.

The trace has GSM8K's shape (1,319 problems, 3-7 steps, ~5 on average) and is grown like
`trace gen --expand closure`: start from the comb (the all-small chain plus the all-large completion
from each of its nodes), replay every sweep, synthesise the (node, model) steps the replays missed,
repeat until no sweep misses. Then each sweep is timed on one core (goal: well under a second).

With ``--online N``, it also runs SpecReason (tau=7, toy judge) online on N toy problems through
vLLM (engines started beforehand and not timed; the backend is vLLM where importable), then
replays the same router on the trace that run wrote, and prints the ratio of the two wall times
(goal >= 10^4): for one configuration (opening the trace, and on the trace loaded once, as a study
replaying many routers does) and per configuration of a 101-point sweep.

The default run grows a 10x trace (13,190 problems), times the first 1,319 problems and the whole,
and prints the goals at scale: sweep < 1 s, tree index < 0.5 s, peak memory of a replay from disk
< 1 KB per cached step, and how time grows from 1x to 10x (goal: no faster than the trace; CPU seconds, the
two sizes taking turns within each repeat so that other load on the machine weighs on both alike).

    python bench/replay.py [--problems 1319] [--scale 10] [--repeats 3] [--online 20]
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("POLARS_MAX_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
if not __package__:  # run as `python bench/replay.py`: this file's folder would shadow the replay package
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from replay.costs import make_cost_model  # noqa: E402
from replay.data import ReplayData  # noqa: E402
from replay.params import parse_sweep  # noqa: E402
from replay.results import miss_list  # noqa: E402
from replay.routers import make_router  # noqa: E402
from replay.run import replay  # noqa: E402
from replay.splits import hash_uniform  # noqa: E402
from tracestore.schema import SCHEMAS, model_char  # noqa: E402

MANIFEST = {
    "models": [{"role": "small", "n_params": 1.5e9}, {"role": "large", "n_params": 7e9}],
    "scorers": {
        "prm": {"model": "skywork-prm-1.5b", "n_params": 1.5e9, "generated_tokens": 0},
        "judge": {"model": "large", "generated_tokens": 1},
    },
}
SWEEPS = {
    "steer mode=switch": ("steer", {"mode": "switch"}, "tau=0:1:0.01"),
    "steer mode=step": ("steer", {"mode": "step"}, "tau=0:1:0.01"),
    "rsd": ("rsd", {}, "tau=0:1:0.01"),
    "specreason": ("specreason", {}, "tau=0:9:0.09"),
    "specreason score=expected": ("specreason", {"score": "expected"}, "tau=0:9:0.09"),
}


def uniforms(names: list[str], salt: str) -> np.ndarray:
    """One uniform draw per name; a different salt gives an independent draw."""
    return hash_uniform([f"{salt}:{name}" for name in names], seed=0)


def solution_length(problem_ids: list[str]) -> np.ndarray:
    return 3 + (uniforms(problem_ids, "length") * 5).astype(int)


def synth(problem_ids: list[str], paths: list[str]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Steps (and prm/judge scores of the small ones) for (problem, path) pairs, each a deterministic
    function of its ids: the same step whenever it is asked for."""
    names = [f"{p}/0/{path}" for p, path in zip(problem_ids, paths)]
    n = len(names)
    depth = np.array([len(path) - 1 for path in paths])
    small = np.array([path[-1] == "s" for path in paths])
    large_share = np.array([path.count("L") / len(path) for path in paths])
    is_final = depth + 1 == solution_length(problem_ids)
    ease = uniforms(problem_ids, "ease")  # per problem
    correct = uniforms(names, "correct") < np.clip(ease * 0.6 + 0.45 * large_share, 0, 0.97)
    n_gen = 20 + (uniforms(names, "tokens") * 60).astype(np.int32)
    hard = uniforms(names, "hard") > ease
    confidence = np.where(hard, 14.0, 19.0) + 2.0 * (uniforms(names, "conf") - 0.5)
    prm = np.clip(np.where(hard, 0.35, 0.8) + 0.3 * (uniforms(names, "prm") - 0.5), 0, 1)
    center = 9 * np.clip(prm + 0.1 * (uniforms(names, "judge") - 0.5), 0, 1)
    digit_logits = -((np.arange(10)[None, :] - center[:, None]) ** 2) / 2
    probabilities = np.exp(digit_logits) / np.exp(digit_logits).sum(axis=1, keepdims=True)
    prompt = 120 + 50 * depth
    steps = pl.DataFrame(
        {
            "step_id": names,
            "problem_id": problem_ids,
            "world": np.zeros(n, dtype=np.int32),
            "parent_path": [path[:-1] for path in paths],
            "path": paths,
            "depth": depth.astype(np.int32),
            "model": ["small" if is_small else "large" for is_small in small],
            "text": [""] * n,
            "n_prompt_tokens": prompt.astype(np.int32),
            "n_new_prefill_tokens": np.full(n, 60, dtype=np.int32),
            "n_cached_tokens": (prompt - 60).astype(np.int32),
            "n_gen_tokens": n_gen,
            "finish_reason": ["eos" if final else "delimiter" for final in is_final],
            "is_final": is_final,
            "answer": ["42" if final else None for final in is_final],
            "correct": [bool(c) if final else None for c, final in zip(correct, is_final)],
            "conf_max_logit_mean": confidence,
            "conf_max_logit_math": confidence,
            "conf_top1_prob_min_math": prm,
            "logprob_mean": -prm,
            "logprob_min": -2 * prm,
            "first_token_logprob": -prm,
            "gen_seconds": np.zeros(n),
        }
    )
    steps = pl.from_arrow(steps.to_arrow().cast(SCHEMAS["steps"]))
    judged = np.flatnonzero(small)
    context = (prompt + n_gen)[judged].astype(np.int32)
    scores = pl.concat(
        [
            pl.DataFrame(
                {
                    "step_id": [names[i] for i in judged],
                    "scorer": "prm",
                    "value": prm[judged],
                    "detail": [None] * len(judged),
                    "n_tokens_processed": context,
                },
                schema_overrides={"detail": pl.List(pl.Float32)},
            ),
            pl.DataFrame(
                {
                    "step_id": [names[i] for i in judged],
                    "scorer": "judge",
                    "value": probabilities[judged].argmax(axis=1).astype(np.float32),
                    "detail": probabilities[judged].astype(np.float32).tolist(),
                    "n_tokens_processed": context + 1,
                }
            ),
        ],
        how="vertical_relaxed",
    )
    return steps, pl.from_arrow(scores.to_arrow().cast(SCHEMAS["scores"]))


def comb_paths(length: int) -> list[str]:
    paths = ["s" * depth for depth in range(1, length + 1)]
    for k in range(length):
        paths += ["s" * k + "L" * j for j in range(1, length - k + 1)]
    return paths


def grow_trace(n_problems: int) -> tuple[ReplayData, int]:
    """Comb, then closure rounds over all sweeps until nothing misses; returns (data, rounds)."""
    problem_ids = [f"gsm8k-{i:04d}" for i in range(n_problems)]
    problems = pl.DataFrame({"problem_id": problem_ids, "meta": ["{}"] * n_problems})
    pairs = [(p, path) for p, length in zip(problem_ids, solution_length(problem_ids)) for path in comb_paths(length)]
    steps, scores = synth([p for p, _ in pairs], [path for _, path in pairs])
    cost = make_cost_model("flops", MANIFEST)
    rounds = 0
    while True:
        data = ReplayData(MANIFEST, steps, problems, scores=scores)
        needed = set()
        for router, params, sweep in SWEEPS.values():
            result = replay(data, make_router(router, **params).fit(data), cost, dict([parse_sweep(sweep)]))
            needed |= {(m["problem_id"], m["path"] + model_char(m["model"])) for m in miss_list(result)}
        if not needed:
            return data, rounds
        rounds += 1
        new_steps, new_scores = synth([p for p, _ in sorted(needed)], [path for _, path in sorted(needed)])
        steps, scores = pl.concat([steps, new_steps]), pl.concat([scores, new_scores])


def write_trace(data: ReplayData, root: str) -> None:
    """The synthetic trace as a trace directory (one TABLE.parquet per table; no tokens: replay reads none)."""
    from tracestore.schema import SCHEMA_VERSION, manifest_json
    from tracestore.store import write_parquet

    os.makedirs(root)
    with open(os.path.join(root, "trace.json"), "w", encoding="utf-8") as handle:
        handle.write(manifest_json({**MANIFEST, "schema_version": SCHEMA_VERSION}))
    problems = data.problems.select(
        "problem_id",
        dataset=pl.lit("gsm8k"),
        split=pl.lit("test"),
        question=pl.lit(""),
        reference=pl.lit("42"),
        meta="meta",
    )
    tables = {"problems": problems, "steps": data.steps.with_columns(text=pl.lit("")), "scores": data.scores.collect()}
    for table, frame in tables.items():
        arrow = frame.select(SCHEMAS[table].names).to_arrow().cast(SCHEMAS[table])
        write_parquet(arrow, os.path.join(root, f"{table}.parquet"), table)


MEMORY_PROBE = """
import json, sys
from replay.params import parse_sweep
from replay.run import replay_trace
from replay.routers import make_router


def status(field):
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field + ":"))


root, router, params, sweep = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # resets the peak (VmHWM) to what is resident now: what the imports left
before = status("VmRSS")
result = replay_trace(root, make_router(router, **params), sweep=dict([parse_sweep(sweep)]), split="all")
print(json.dumps({"kib": status("VmHWM") - before, "rows": result.outcomes.height}))
"""


def replay_memory(root: str, router: str, params: dict, sweep: str) -> tuple[float, int]:
    """Peak resident memory a fresh process adds replaying ``sweep`` on the trace at ``root`` (opening it,
    loading it, indexing it, walking, outcomes), beyond what its imports left resident (Linux: the peak is
    reset through /proc/self/clear_refs after the imports); (bytes, outcome rows)."""
    import json
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo}
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, root, router, json.dumps(params), sweep],
        env=env,
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    )
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    return probe["kib"] * 1024.0, probe["rows"]


def time_sweeps(sizes: dict[str, ReplayData], repeats: int) -> dict[str, dict[str, tuple[float, float, dict]]]:
    """Best wall and CPU seconds of each sweep on each trace size, and its summary numbers. The sizes take
    turns within each repeat, so load from other processes weighs on both sides of a growth ratio alike."""
    cost = make_cost_model("flops", MANIFEST)
    timings = {size: {} for size in sizes}
    for label, (router, params, sweep) in SWEEPS.items():
        chosen = {size: make_router(router, **params).fit(data) for size, data in sizes.items()}
        name, values = parse_sweep(sweep)
        walls, cpus, results = {size: [] for size in sizes}, {size: [] for size in sizes}, {}
        for _ in range(repeats):
            for size, data in sizes.items():
                wall, cpu = time.perf_counter(), time.process_time()
                results[size] = replay(data, chosen[size], cost, {name: values})
                walls[size].append(time.perf_counter() - wall)
                cpus[size].append(time.process_time() - cpu)
        for size in sizes:
            summary = results[size].summary()
            timings[size][label] = (
                min(walls[size]),
                min(cpus[size]),
                {
                    "configs": len(values),
                    "misses": int(summary["misses"].sum()),
                    "accuracy": (summary["accuracy"].min(), summary["accuracy"].max()),
                },
            )
    return timings


def time_index(sizes: dict[str, ReplayData], repeats: int) -> dict[str, tuple[float, float]]:
    """Best wall and CPU seconds of building the tree index of each trace size (sizes taking turns)."""
    walls, cpus = {size: [] for size in sizes}, {size: [] for size in sizes}
    for _ in range(repeats):
        for size, data in sizes.items():
            fresh = ReplayData(MANIFEST, data.steps, data.problems, scores=data.scores)
            wall, cpu = time.perf_counter(), time.process_time()
            fresh.tree  # noqa: B018 - builds the tree index, once per trace
            fresh.roots  # noqa: B018
            walls[size].append(time.perf_counter() - wall)
            cpus[size].append(time.process_time() - cpu)
    return {size: (min(walls[size]), min(cpus[size])) for size in sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=1319)
    parser.add_argument(
        "--scale",
        type=int,
        default=10,
        help="also time a trace this many times larger (its first --problems: the small one)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--online",
        type=int,
        default=0,
        metavar="N",
        help="also time an online run on N toy problems against its replay",
    )
    args = parser.parse_args()
    if args.online:
        online_vs_replay(args.online, args.repeats)

    started = time.perf_counter()
    large, rounds = grow_trace(args.problems * args.scale)
    print(
        f"synthetic trace: {large.roots.height:,} problems, {large.steps.height:,} steps "
        f"(comb + {rounds} closure rounds), built in {time.perf_counter() - started:.1f}s; "
        f"the small trace is its first {args.problems:,} problems"
    )
    small = large.subset(large.problems["problem_id"].head(args.problems).to_list())
    sizes = {"small": small, "large": large} if args.scale > 1 else {"small": small}
    index = time_index(sizes, args.repeats)
    sweeps = time_sweeps(sizes, args.repeats)
    for size, data in sizes.items():
        wall, cpu = index[size]
        print(f"\n{data.roots.height:,} problems, {data.steps.height:,} steps")
        print(f"  tree index: {wall:.3f}s ({cpu:.3f}s CPU), once per trace")
        for label, (wall, cpu, info) in sweeps[size].items():
            low, high = info["accuracy"]
            print(
                f"  {label:28s} {info['configs']} thresholds: {wall:.3f}s per sweep ({cpu:.3f}s CPU; best of "
                f"{args.repeats}); misses {info['misses']}; accuracy {low:.3f}-{high:.3f}"
            )
    if args.scale == 1:
        return

    import tempfile

    label = "specreason score=expected"
    router, params, sweep = SWEEPS[label]
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as folder:
        root = os.path.join(folder, "trace")
        write_trace(large, root)
        peak, rows = replay_memory(root, router, params, sweep)
    n_steps = large.steps.height
    worst_sweep = max(wall for wall, _, _ in sweeps["large"].values())
    growth = {
        name: sweeps["large"][name][1] / sweeps["small"][name][1] for name in SWEEPS
    }  # CPU seconds: the machine's other load does not enter the ratio
    index_growth = index["large"][1] / index["small"][1]
    print(f"\ngoals at {large.roots.height:,} problems ({n_steps:,} cached steps):")
    print(f"  slowest 101-point sweep:   {worst_sweep:8.3f} s     (goal < 1 s)")
    print(f"  tree index:                {index['large'][0]:8.3f} s     (goal < 0.5 s)")
    print(
        f"  peak replay memory:        {peak / n_steps:8.0f} B per cached step ({peak / 1e6:.0f} MB replaying "
        f"{label} from disk, {rows:,} outcome rows; goal < 1 KB)"
    )
    print(
        f"  growth {args.problems:,} -> {large.roots.height:,} problems "
        f"({args.scale}x; goal <= {args.scale}x, CPU time):"
    )
    print(f"    tree index                 {index_growth:6.1f}x")
    for name, ratio in growth.items():
        print(f"    {name:26s} {ratio:6.1f}x")
    together = sum(sweeps["large"][name][1] for name in SWEEPS) / sum(sweeps["small"][name][1] for name in SWEEPS)
    print(f"    {'all five sweeps together':26s} {together:6.1f}x")


def online_vs_replay(n_problems: int, repeats: int) -> None:
    import tempfile

    from replay.run import replay_trace
    from tracegen.backends import default_backend, engine_kwargs_for, load_backend
    from tracegen.closure import RouterSpec
    from tracegen.gen import GenOptions, run_gen
    from tracegen.models import resolve_model
    from tracestore.store import open_trace

    kind = default_backend()
    started = time.perf_counter()
    engines = {
        role: load_backend(kind, resolve_model(f"toy-{role}", role).path, **engine_kwargs_for(kind, role, {}))
        for role in ("small", "large")
    }
    print(f"online ({kind}): engines started in {time.perf_counter() - started:.1f}s (not timed below)")
    spec = RouterSpec("specreason", {"tau": "7"})
    try:
        with tempfile.TemporaryDirectory(prefix="bench-online-") as folder:
            options = GenOptions(
                small="toy-small",
                large="toy-large",
                dataset="toy",
                out=f"{folder}/trace",
                limit=n_problems,
                expand="online",
                routers=(spec,),
                backend=kind,
            )
            started = time.perf_counter()
            summary = run_gen(options, backends=engines)
            online = time.perf_counter() - started
            loaded = ReplayData.from_trace(open_trace(options.out))
            loaded.tree  # noqa: B018 - builds the tree index, once per trace
            cost = make_cost_model("flops", loaded.manifest)
            timings, in_memory, sweeps = [], [], []
            for _ in range(repeats):
                started = time.perf_counter()
                result = replay_trace(options.out, spec.router(), split="all")
                timings.append(time.perf_counter() - started)
                started = time.perf_counter()
                replay(loaded, spec.router().fit(loaded), cost)
                in_memory.append(time.perf_counter() - started)
                started = time.perf_counter()
                replay_trace(options.out, spec.router(), split="all", sweep={"tau": np.linspace(0, 9, 101)})
                sweeps.append(time.perf_counter() - started)
    finally:
        for engine in engines.values():
            engine.close()
    replayed, walked = min(timings), min(in_memory)
    print(
        f"specreason tau=7 on {n_problems} toy problems: online {online:.1f}s ({summary.new_steps} steps, "
        f"{summary.rounds} rounds); replay {replayed * 1e3:.1f} ms opening the trace on disk, "
        f"{walked * 1e3:.2f} ms on the trace loaded once (best of {repeats}); "
        f"misses {int(result.outcomes['misses'].sum())}"
    )
    print("online / replay (goal >= 10^4):")
    print(f"  one configuration, opening the trace:       {online / replayed:12,.0f}x")
    print(f"  one configuration, trace loaded once:       {online / walked:12,.0f}x")
    print(f"  per configuration of a 101-point sweep:     {online / (min(sweeps) / 101):12,.0f}x")


if __name__ == "__main__":
    main()
