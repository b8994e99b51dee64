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

    python bench/replay.py [--problems 1319] [--repeats 3] [--online 20]
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
from replay.engine import ReplayData, miss_list, parse_sweep, replay  # noqa: E402
from replay.routers import make_router  # noqa: E402
from replay.schema import SCHEMAS, model_char  # noqa: E402
from replay.splits import hash_uniform  # noqa: E402

MANIFEST = {
    "models": [{"role": "small", "n_params": 1.5e9}, {"role": "large", "n_params": 7e9}],
    "scorers": {"prm": {"model": "skywork-prm-1.5b", "n_params": 1.5e9}, "judge": {"model": "large"}},
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=1319)
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
    data, rounds = grow_trace(args.problems)
    print(
        f"synthetic trace: {args.problems:,} problems, {data.steps.height:,} steps "
        f"(comb + {rounds} closure rounds), built in {time.perf_counter() - started:.1f}s"
    )
    cost = make_cost_model("flops", MANIFEST)
    fresh = ReplayData(MANIFEST, data.steps, data.problems, scores=data.scores)
    started = time.perf_counter()
    fresh.tree  # noqa: B018 - builds the tree index, once per trace
    fresh.roots  # noqa: B018
    print(f"tree index: {time.perf_counter() - started:.3f}s (once per trace)")
    for label, (router, params, sweep) in SWEEPS.items():
        chosen = make_router(router, **params).fit(fresh)
        name, values = parse_sweep(sweep)
        timings = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            result = replay(fresh, chosen, cost, {name: values})
            timings.append(time.perf_counter() - started)
        summary = result.summary()
        print(
            f"{label:28s} {len(values)} thresholds x {fresh.roots.height:,} problems: "
            f"{min(timings):.3f}s per sweep (best of {args.repeats}); misses {int(summary['misses'].sum())}; "
            f"accuracy {summary['accuracy'].min():.3f}-{summary['accuracy'].max():.3f}"
        )


def online_vs_replay(n_problems: int, repeats: int) -> None:
    import tempfile

    from replay.engine import replay_trace
    from replay.store import open_trace
    from tracegen.backends import default_backend, engine_kwargs_for, load_backend
    from tracegen.closure import RouterSpec
    from tracegen.gen import GenOptions, run_gen
    from tracegen.models import resolve_model

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
