"""Check `--cost latency` against reality on the toy world: predicted and measured seconds per query, per router.

    python bench/latency.py [--problems 10] [--backend hf|vllm] [--threads 1] [--out DIR]

1. Grow a toy trace (toy-small, toy-large) closed over the routers below (`trace gen --expand closure`), so that
   every one replays without a miss.
2. Measure a latency profile on this machine, in this process, on the same engines (tracegen.profile); again
   after the online runs (the machine's load drifts; the two profiles bracket the runs).
3. Predict each router's seconds per query: `trace replay --cost latency` with that profile.
4. Run each router online, one query at a time, on the same engines: the router's loop as a deployment runs it
   (draft, score, keep or let the large model write; or a cascade's chain, P(T), escalate), every step
   generated live with the trace's per-step seeds, every score computed live (the toy PRM's value head, the toy
   judge's teacher-forced verdict on the large model), decisions taken on the live values. Wall time per query.
   Every query is run by every router in turn, ``--repeats`` times over; its median time is kept.
5. Print per router: predicted and measured mean seconds per query, their ratio, and whether the routers' order
   by latency is the same; also how many queries took exactly the replayed path (online/replay fidelity).

Routers: small-only, large-only, rsd (tau 0.5), specreason (tau 7), cascade small -> large without P(IK), P(T) =
the final step's least likely token's probability (t_true 0.3).

The online runs do not go through `trace gen --expand online`: that loop replays the trace and writes Parquet
each round, which on the toy models' millisecond steps would time the bookkeeping, not the router. The load of
the machine (`uptime`) is printed before and after: a busy machine makes both the profile and the runs slower, not
always alike.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROUTERS = (
    ("small-only", {}),
    ("large-only", {}),
    ("rsd", {"tau": 0.5}),
    ("specreason", {"tau": 7.0}),
    ("cascade", {"pik": False, "p_true": "final_min", "t_true": 0.3}),
)


class Deployment:
    """The trace's models and scorers on live engines, and each router's loop over them, one query at a time."""

    def __init__(self, root: Path, kind: str):
        import polars as pl

        from tracegen.backends import StepSampling, load_backend
        from tracegen.models import load_tokenizer, named_model, trace_model
        from tracegen.prompts import prompt_token_ids
        from tracegen.value_head import load_value_head_model, trained_separator
        from tracestore.store import open_trace

        trace = open_trace(root)
        manifest = trace.manifest
        self.backends = {role: load_backend(kind, trace_model(manifest, role).path) for role in manifest.roles}
        tokenizer = load_tokenizer(trace_model(manifest, manifest.roles[0]))
        problems = trace.scan("problems").select("problem_id", "question").collect()
        self.questions = dict(problems.iter_rows())
        self.root_ids = {pid: prompt_token_ids(tokenizer, question) for pid, question in self.questions.items()}
        sampling = manifest["sampling"]
        self.sampling = StepSampling(
            temperature=sampling["temperature"],
            top_p=sampling["top_p"],
            max_step_tokens=sampling["max_step_tokens"],
            topk=sampling["topk"],
        )
        self.seed = manifest["seeds"]["seed"]
        self.max_steps = manifest["expansions"][-1]["max_steps"]
        prm = named_model(manifest.scorers["prm"]["name"], "prm").path
        self.prm = load_value_head_model(prm)
        self.prm_tokenizer = load_tokenizer(named_model(manifest.scorers["prm"]["name"], "prm"))
        self.prm_separator = trained_separator(prm)
        self.cached_paths = {
            (row[0], row[1]) for row in trace.scan("steps").select("problem_id", "path").collect().iter_rows()
        }
        self.pl = pl

    def step(self, problem: str, tree: dict, parent: str, role: str):
        from tracegen.backends import StepRequest
        from tracegen.expand import Request
        from tracegen.growth import request_seed

        ids = list(self.root_ids[problem])
        for end in range(1, len(parent) + 1):
            ids += tree[parent[:end]].token_ids
        seed = request_seed(self.seed, Request(problem, 0, parent, role))
        (step,) = self.backends[role].generate_steps([StepRequest(tuple(ids), seed)], self.sampling)
        return step, ids

    def prm_score(self, problem: str, tree: dict, path: str) -> float:
        import torch

        from tracegen.value_head import prm_input_ids

        texts = [tree[path[:end]].text for end in range(1, len(path) + 1)]
        ids, ends = prm_input_ids(self.prm_tokenizer, self.questions[problem], texts, self.prm_separator)
        tensor = torch.tensor([ids])
        with torch.inference_mode():
            logits = self.prm(tensor, torch.ones_like(tensor)).float()
        return float(torch.sigmoid(logits[0, ends[-1]]))

    def judge_score(self, prompt: list[int], step) -> float:
        logprobs = self.backends["large"].continuation_logprobs([prompt], [step.token_ids])[0]
        return float(round(9 * math.exp(sum(logprobs) / len(logprobs))))

    def run(self, router: str, params: dict, problem: str) -> str:
        """The router's loop on one query; returns the path it took."""
        from tracegen.grading import is_final_step

        tree: dict = {}
        path = ""

        def final(step) -> bool:
            return is_final_step(step.text, step.finish_reason)

        if router in ("small-only", "large-only", "cascade"):
            chain = ("small", "large") if router == "cascade" else (router.removesuffix("-only"),)
            for role in chain:
                path = ""
                while len(path) < self.max_steps:
                    step, _ = self.step(problem, tree, path, role)
                    path += role[0] if role == "small" else "L"
                    tree[path] = step
                    if final(step):
                        break
                if router == "cascade" and role == "small" and math.exp(min(step.logprobs)) >= params["t_true"]:
                    break
            return path
        while len(path) < self.max_steps:  # rsd, specreason: draft, score, keep or let the large model write
            draft, prompt = self.step(problem, tree, path, "small")
            tree[path + "s"] = draft
            if router == "rsd":
                keep = self.prm_score(problem, tree, path + "s") >= params["tau"]
            else:
                keep = self.judge_score(prompt, draft) >= params["tau"]
            if keep:
                written, path = draft, path + "s"
            else:
                written, _ = self.step(problem, tree, path, "large")
                path += "L"
                tree[path] = written
            if final(written):
                break
        return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=10)
    parser.add_argument("--backend", default=None, help="hf or vllm [default: vllm where importable]")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads, for profile and runs alike")
    parser.add_argument("--repeats", type=int, default=3, help="online runs of every query (the median is kept)")
    parser.add_argument("--out", default=None, help="folder for the trace and the profile [default: a temp folder]")
    args = parser.parse_args()

    import torch

    from tracegen.backends import default_backend
    from tracegen.closure import RouterSpec
    from tracegen.gen import GenOptions, run_gen
    from tracegen.profile import measure_profile

    torch.set_num_threads(args.threads)
    kind = args.backend or default_backend()
    base = Path(args.out or tempfile.mkdtemp(prefix="latency-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    root = base / "trace"
    load = os.getloadavg()[0]
    print(f"load before: {load:.2f} (1 min), {os.cpu_count()} CPUs; backend {kind}, {args.threads} thread(s)")
    specs = tuple(RouterSpec(name, {k: str(v) for k, v in params.items()}) for name, params in ROUTERS[2:4])
    started = time.perf_counter()
    run_gen(
        GenOptions(
            small="toy-small", large="toy-large", dataset="toy", out=root, limit=args.problems, backend=kind,
            expand="closure", routers=specs,
        )
    )  # fmt: skip
    print(f"trace grown in {time.perf_counter() - started:.0f}s")
    profile, document = measure_profile(
        root, out=base / "latency.json", backend=kind, threads=args.threads, repeats=5, force=True
    )
    for name, entry in document["entries"].items():
        print(
            f"profile {name}: {1e3 * entry['overhead_s']:.2f} ms + {1e3 * entry['prefill_s_per_token']:.3f} ms/prefill"
            f" token + {1e3 * entry['decode_s_per_token']:.3f} ms/decoded token (fit RMS "
            f"{1e3 * entry['residual_rms_s']:.1f} ms, {100 * entry['relative_rms']:.0f}%)"
        )

    deployment = Deployment(root, kind)
    problems = sorted(deployment.questions)
    for name, params in ROUTERS:  # warm-up (every engine and scorer once), as the profile's
        deployment.run(name, params, problems[0])
    replayed = predictions(root, profile)
    # Round robin (each query by every router in turn, all of it --repeats times): a change of the machine's load
    # while the bench runs falls on every router alike.
    times = {(name, problem): [] for name, _ in ROUTERS for problem in problems}
    paths = {}
    for _ in range(args.repeats):
        for problem in problems:
            for name, params in ROUTERS:
                started = time.perf_counter()
                paths[name, problem] = deployment.run(name, params, problem)
                times[name, problem].append(time.perf_counter() - started)
    print(f"load after the online runs: {os.getloadavg()[0]:.2f} (1 min)")
    # The profile again, after the runs: the machine's load drifts, and the two profiles bracket the runs.
    profile_after, _ = measure_profile(
        root, out=base / "latency-after.json", backend=kind, threads=args.threads, repeats=5, force=True
    )
    replayed_after = predictions(root, profile_after)
    rows = []
    for name, _ in ROUTERS:
        before = np.array([replayed[name][p][1] for p in problems])
        after = np.array([replayed_after[name][p][1] for p in problems])
        measured = np.array([np.median(times[name, p]) for p in problems])
        same = sum(paths[name, p] == replayed[name][p][0] for p in problems)
        rows.append((name, float(before.mean()), float(after.mean()), float(measured.mean()), same))
    print(f"load at the end: {os.getloadavg()[0]:.2f} (1 min)")
    print()
    print(
        f"{'router':<12} {'predicted (profile before)':>27} {'predicted (after)':>18} {'measured':>9} "
        f"{'pred/meas':>15} {'same path':>10}"
    )
    print(f"{'':<12} {'s/query':>27} {'s/query':>18} {'s/query':>9} {'before, after':>15}")
    for name, before, after, measured, same in rows:
        print(
            f"{name:<12} {before:>27.4f} {after:>18.4f} {measured:>9.4f} {before / measured:>7.2f}, "
            f"{after / measured:<6.2f} {same:>5}/{len(problems)}"
        )
    order_measured = [row[0] for row in sorted(rows, key=lambda row: row[3])]
    print()
    print(f"order by measured latency:  {' < '.join(order_measured)}")
    for which, column in (("before", 1), ("after", 2)):
        order = [row[0] for row in sorted(rows, key=lambda row: row[column])]
        within = sum(abs(row[column] / row[3] - 1) <= 0.2 for row in rows)
        print(
            f"order by predicted ({which}): {' < '.join(order)}; same order: {order == order_measured}; "
            f"within 20%: {within}/{len(rows)} routers"
        )


def predictions(root: Path, profile: Path) -> dict[str, dict[str, tuple[str, float]]]:
    """router -> problem -> (path, predicted seconds): `trace replay --cost latency` with ``profile``."""
    from replay.routers import make_router
    from replay.run import replay_trace

    return {
        name: replay_trace(root, make_router(name, **params), split="all", cost="latency", latency_profile=profile)
        .outcomes.select("problem_id", "path", "cost")
        .rows_by_key("problem_id", unique=True)
        for name, params in ROUTERS
    }


if __name__ == "__main__":
    main()
