"""Benchmark `trace gen` on the toy world and print four ratios against their goals.

    python bench/gen.py [--problems 100] [--backend vllm|hf] [--sequential-steps 200]

1. Batched tree generation vs one request per node: a comb trace is grown (continuously on vLLM, else
   with one batch per model per round); then a sample of its nodes is generated again one request at a time by the
   same engines with the same seeds. Ratio of generated tokens per second (goal >= 5x). The
   sequential pass runs second, so the engine's prefix cache is warm for it: the ratio is
   conservative. The share of steps that came out identical is printed too (batch invariance).
2. Prefix-cache hits as a share of prompt tokens in the batched run: sum(n_cached_tokens) /
   sum(n_prompt_tokens) (goal >= 80%). vLLM caches whole KV blocks (16 tokens on GPU; trace
   uses 32 on CPU, where vLLM's own default is 128: --block-size 128 shows the difference).
3. Bytes on disk per generated token: size of the steps and tokens parts / generated tokens
   (goal <= 48).
4. The limit (vLLM only): the tree run's tokens/s against flat batches that generate the same number of
   tokens (each request exactly its step's n_gen_tokens, EOS ignored, the same top-k logprobs in the same
   raw-logit mode) from the same prompts (so of the same lengths), prefix caches reset first, both models'
   batches at once as the tree run sends them. Two limits: generation alone, and generation plus the exact
   log-probability scoring pass (prompt + step prefilled in raw_logprobs mode) that every tree step also
   gets. Goal: the tree run reaches >= 0.9x of the second, the limit doing the same work (tree bookkeeping,
   rounds and writing cost < 10%).

Engines run their first batches slower (one-time warm-up: about half of a cold 100-problem run on a CPU), so
the tree is grown cold (printed) and then, after the one-request-per-node pass, again on warm engines
--repeats times, each time after the flat limits and both ways: continuously (vLLM: each child joins its engine
as soon as its parent is generated, tracegen/continuous.py) and round by round, into new directories. Ratios use
the best of each, and every warm trace's part files must hold the same rows as the cold one's (printed), except
n_cached_tokens, vLLM's prefix-cache hits, which depend on the engines' schedule.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main() -> None:
    from tracegen.backends import StepRequest, StepSampling, default_backend, engine_kwargs_for, load_backend
    from tracegen.continuous import can_stream
    from tracegen.expand import Request
    from tracegen.gen import GenOptions
    from tracegen.growth import Tree, request_seed
    from tracegen.models import resolve_model
    from tracestore.store import open_trace

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=100, help="toy problems (level 3)")
    parser.add_argument("--backend", default=None, help="vllm or hf [default: vllm where importable]")
    parser.add_argument("--sequential-steps", type=int, default=200, help="nodes regenerated one request at a time")
    parser.add_argument(
        "--repeats", type=int, default=2, help="warm tree runs and flat limits, interleaved; the best of each counts"
    )
    parser.add_argument("--small", default="toy-small")
    parser.add_argument("--large", default="toy-large")
    parser.add_argument("--out", type=Path, default=None, help="trace directory [default: a temporary one]")
    parser.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="vLLM KV block size (prefix-cache granularity; default: 16 on GPU, 32 on CPU)",
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")

    kind = args.backend or default_backend()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-gen-")) / "trace"
    options = GenOptions(
        small=args.small,
        large=args.large,
        dataset="toy",
        out=out,
        limit=args.problems,
        max_step_tokens=64,
        max_steps=8,
        backend=kind,
        seed=0,
    )
    paths = {"small": resolve_model(args.small, "small").path, "large": resolve_model(args.large, "large").path}
    started = time.perf_counter()
    given = {"block_size": args.block_size} if args.block_size and kind == "vllm" else {}
    backends = {role: load_backend(kind, path, **engine_kwargs_for(kind, role, given)) for role, path in paths.items()}
    print(f"backend {kind}: engines loaded in {time.perf_counter() - started:.1f}s")

    summary, batched_seconds = timed_gen(options, backends)
    print(
        f"batched, cold engines: {summary.new_steps:,} steps, {summary.new_gen_tokens:,} tokens in "
        f"{summary.rounds} rounds, {batched_seconds:.1f}s -> {summary.new_gen_tokens / batched_seconds:,.0f} "
        "generated tokens/s"
    )

    trace = open_trace(out)
    steps = trace.scan("steps").collect()
    tokens = trace.scan("tokens").select("step_id", "token_ids").collect()
    by_id = {row["step_id"]: row for row in steps.join(tokens, on="step_id").iter_rows(named=True)}
    problems = {row["problem_id"]: row["question"] for row in trace.scan("problems").collect().iter_rows(named=True)}

    from transformers import AutoTokenizer

    from tracegen.prompts import prompt_token_ids

    tokenizer = AutoTokenizer.from_pretrained(paths["small"])
    sample = random.Random(0).sample(sorted(by_id), min(args.sequential_steps, len(by_id)))
    sampling = StepSampling(
        temperature=options.temperature, top_p=options.top_p, max_step_tokens=options.max_step_tokens, topk=options.topk
    )
    sequential_tokens, identical = 0, 0
    started = time.perf_counter()
    for step_id in sample:
        row = by_id[step_id]
        tree = Tree(problem=None, world=row["world"], root_ids=prompt_token_ids(tokenizer, problems[row["problem_id"]]))
        prefix = f"{row['problem_id']}/{row['world']}/"
        for end in range(1, len(row["parent_path"]) + 1):
            ancestor = by_id[prefix + row["parent_path"][:end]]
            tree.steps[ancestor["path"]] = ancestor_step(ancestor)
        request = Request(row["problem_id"], row["world"], row["parent_path"], row["model"])
        [step] = backends[row["model"]].generate_steps(
            [StepRequest(tuple(tree.prompt_ids(row["parent_path"])), request_seed(options.seed, request))], sampling
        )
        sequential_tokens += len(step.token_ids)
        identical += list(step.token_ids) == list(row["token_ids"])
    sequential_seconds = time.perf_counter() - started
    sequential_rate = sequential_tokens / sequential_seconds
    print(
        f"one request per node: {len(sample)} steps, {sequential_tokens:,} tokens in {sequential_seconds:.1f}s "
        f"-> {sequential_rate:,.0f} generated tokens/s; {identical}/{len(sample)} steps identical to the batched run"
    )

    limits, rates, all_same = {}, {}, True
    streams = can_stream(backends)
    root_ids = {pid: prompt_token_ids(tokenizer, question) for pid, question in problems.items()}
    for repeat in range(1, args.repeats + 1):  # interleaved, best of each: the machine's load drifts
        if kind == "vllm":
            for scored in (False, True):
                flat_tokens, flat_seconds = flat_batches(backends, by_id, root_ids, options, scored=scored)
                limits[scored] = max(limits.get(scored, 0.0), flat_tokens / flat_seconds)
                print(
                    f"[{repeat}] flat batches (the limit), "
                    f"{'generation + exact scoring' if scored else 'generation only'}: {len(by_id):,} requests, "
                    f"{flat_tokens:,} tokens in {flat_seconds:.1f}s -> {flat_tokens / flat_seconds:,.0f} tokens/s"
                )
        for schedule in ("continuous", "rounds") if streams else ("rounds",):
            rerun = replace(options, out=Path(tempfile.mkdtemp(prefix=f"bench-gen-{schedule}-")) / "trace")
            for backend in backends.values():
                reset_prefix_caches(backend)
            warm, warm_seconds = timed_gen(rerun, backends, rounds=schedule == "rounds")
            rates[schedule] = max(rates.get(schedule, 0.0), warm.new_gen_tokens / warm_seconds)
            same = part_contents(out) == part_contents(rerun.out)
            all_same &= same
            print(
                f"[{repeat}] tree run, {schedule}, warm engines: {warm.new_steps:,} steps, {warm.new_gen_tokens:,} "
                f"tokens in {warm_seconds:.1f}s -> {warm.new_gen_tokens / warm_seconds:,.0f} generated tokens/s; "
                f"step and token files {'identical' if same else 'DIFFERENT'} to the cold run's"
            )
    schedule = "continuous" if streams else "rounds"
    batched_rate = rates[schedule]

    cached = steps["n_cached_tokens"].sum() / steps["n_prompt_tokens"].sum()
    on_disk = sum(os.path.getsize(f) for table in ("steps", "tokens") for f in trace.files(table))
    whole = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    per_token = on_disk / steps["n_gen_tokens"].sum()
    print()
    print(
        f"best of {args.repeats}: warm tree run {batched_rate:,.0f} tokens/s ({schedule}"
        + (f"; round by round {rates['rounds']:,.0f}, so {batched_rate / rates['rounds']:.2f}x)" if streams else ")")
        + (
            f", flat limits {limits[False]:,.0f} (generation only) and {limits[True]:,.0f} (+ scoring)"
            if limits
            else ""
        )
        + f"; warm runs' files {'all identical' if all_same else 'NOT all identical'} to the cold run's"
    )
    print(f"batched / one-per-node tokens/s:      {batched_rate / sequential_rate:6.1f}x   (goal >= 5x)")
    print(f"prefix-cache hits / prompt tokens:    {cached:6.1%}   (goal >= 80%)")
    print(
        f"bytes on disk per generated token:    {per_token:6.1f}   (goal <= 48; whole trace dir "
        f"{whole / steps['n_gen_tokens'].sum():.1f})"
    )
    if limits:
        print(
            f"tree run / flat-batch limit tokens/s: {batched_rate / limits[True]:6.2f}x   (goal >= 0.9x; both "
            f"with the exact scoring pass; {batched_rate / limits[False]:.2f}x of generation alone)"
        )
    else:
        print("tree run / flat-batch limit tokens/s:    n/a   (the flat batch runs on vLLM only)")
    print(f"trace: {out}")


def timed_gen(options, backends, *, rounds: bool = False):
    """Run ``trace gen`` on loaded engines, continuously or with ``rounds`` round by round; (summary, seconds from
    the first round to the end)."""
    from unittest import mock

    from tracegen.gen import run_gen

    marks = {}

    def progress(stage, **info):
        marks.setdefault(stage, time.perf_counter())  # the first round report is the start of generation
        marks["last"] = time.perf_counter()

    schedule = mock.patch("tracegen.continuous.can_stream", return_value=False) if rounds else contextlib.nullcontext()
    with schedule:
        summary = run_gen(options, progress, backends=backends)
    return summary, marks["last"] - marks["round"]


def flat_batches(backends, by_id: dict, root_ids: dict, options, *, scored: bool) -> tuple[int, float]:
    """One vLLM batch per model of every step of the trace, each request generating exactly its step's
    n_gen_tokens from its step's prompt, the models' batches at once (one thread each, as the tree run);
    with ``scored``, each model's steps then go through its exact scoring pass. (tokens, wall seconds)"""
    from concurrent.futures import ThreadPoolExecutor

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    def prompt(row: dict) -> list[int]:
        prefix = f"{row['problem_id']}/{row['world']}/"
        ids = list(root_ids[row["problem_id"]])
        for end in range(1, len(row["parent_path"]) + 1):
            ids.extend(by_id[prefix + row["parent_path"][:end]]["token_ids"])
        return ids

    def run(role: str) -> int:
        backend = backends[role]
        rows = [row for row in by_id.values() if row["model"] == role and row["n_gen_tokens"] > 0]
        params = [
            SamplingParams(
                temperature=options.temperature,
                top_p=options.top_p,
                max_tokens=row["n_gen_tokens"],
                min_tokens=row["n_gen_tokens"],
                ignore_eos=True,
                seed=index,
                logprobs=options.topk,
                flat_logprobs=True,
            )
            for index, row in enumerate(rows)
        ]
        prompts = [prompt(row) for row in rows]
        outputs = backend.generator.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False
        )
        token_ids = [list(output.outputs[0].token_ids) for output in outputs]
        if scored:
            backend._score(prompts, token_ids, options.topk)
        return sum(len(ids) for ids in token_ids)

    for backend in backends.values():
        reset_prefix_caches(backend)  # a cold start, as the tree run had
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(backends)) as pool:
        tokens = sum(pool.map(run, backends))
    return tokens, time.perf_counter() - started


def reset_prefix_caches(backend) -> None:
    """Forget a vLLM backend's cached prefixes (the hf backend keeps none)."""
    for engine in (getattr(backend, "generator", None), getattr(backend, "scorer", None)):
        if engine is not None:
            engine.reset_prefix_cache()


def part_contents(root: Path) -> dict[str, object]:
    """Every steps and tokens part file by its table and sequence number: the tokens parts' bytes, the steps parts'
    rows without ``n_cached_tokens`` (vLLM's prefix-cache hits, which depend on the engines' schedule; the part
    names end in a digest of the parts' bytes, so they differ with it)."""
    import polars as pl

    return {
        f"{table}/{path.name.rsplit('-', 1)[0]}": (
            pl.read_parquet(path).drop("n_cached_tokens").hash_rows().to_list()
            if table == "steps"
            else hashlib.sha256(path.read_bytes()).hexdigest()
        )
        for table in ("steps", "tokens")
        for path in sorted((Path(root) / table).glob("part-*"))
    }


def ancestor_step(row: dict):
    from tracegen.growth import StoredStep

    return StoredStep(
        row["model"], row["text"], list(row["token_ids"]), row["n_prompt_tokens"], row["n_gen_tokens"], row["is_final"]
    )


if __name__ == "__main__":
    main()
