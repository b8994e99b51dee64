"""Benchmark the openai backend against a local OpenAI-compatible server: generated tokens per second with one
request in flight vs ``--concurrency`` (default 16), on the same requests, and print the ratio.

    python bench/endpoint.py [--url http://127.0.0.1:8000/v1 --model toy-large] [--requests 64] [--concurrency 16]

Without --url it starts `vllm serve` of toy-large on 127.0.0.1 (scripts/vllm_server.py). The requests are the first
step of toy problems in completions mode (token-id prompts, per-request seeds); each pass stores its responses
in a fresh temporary folder, so both passes send every request. The two passes must return the same tokens
(the seeds fix them); the count of steps that differ is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main() -> None:
    from scripts.vllm_server import local_server
    from tracegen.backends import StepRequest, StepSampling
    from tracegen.backends.endpoint_spec import ApiSpec, ClientOptions
    from tracegen.backends.openai_endpoint import OpenAIBackend
    from tracegen.datasets import load_dataset
    from tracegen.expand import Request
    from tracegen.growth import request_seed
    from tracegen.models import load_tokenizer, resolve_model
    from tracegen.prompts import STEP_DELIMITER, prompt_token_ids

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="base URL of a running server [default: start vllm serve]")
    parser.add_argument("--model", default="toy-large", help="model (alias or folder; its served name)")
    parser.add_argument("--requests", type=int, default=64, help="steps requested per pass")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight in the second pass")
    parser.add_argument("--max-step-tokens", type=int, default=48)
    args = parser.parse_args()

    model = resolve_model(args.model, "large")
    tokenizer = load_tokenizer(model)
    problems = load_dataset("toy", limit=args.requests).problems
    requests = [
        StepRequest(
            tuple(prompt_token_ids(tokenizer, problem.question)),
            request_seed(0, Request(problem.problem_id, 0, "", "large")),
        )
        for problem in problems
    ]
    sampling = StepSampling(temperature=0.7, max_step_tokens=args.max_step_tokens, delimiter=STEP_DELIMITER)
    server = contextlib.nullcontext(args.url) if args.url else local_server(model.path, args.model)
    with server as url:
        spec = ApiSpec(role="large", url=url, model=args.model, mode="completions")
        passes = {}
        for in_flight in (1, args.concurrency, 1):  # a first sequential pass warms the server up and is not timed
            with tempfile.TemporaryDirectory(prefix="bench-api-") as journal:
                backend = OpenAIBackend(
                    spec, journal_dir=Path(journal), model_name=args.model, client=ClientOptions(concurrency=in_flight)
                )
                backend.connect()
                started = time.perf_counter()
                steps = backend.generate_steps(requests, sampling)
                seconds = time.perf_counter() - started
            passes[in_flight] = (steps, seconds)
    (sequential, seq_seconds), (concurrent, conc_seconds) = passes[1], passes[args.concurrency]
    tokens = sum(len(step.token_ids) for step in sequential)
    differ = sum(a.token_ids != b.token_ids for a, b in zip(sequential, concurrent))
    print(f"{len(requests)} requests, {tokens:,} generated tokens per pass, server {url}")
    print(f"1 in flight:  {tokens / seq_seconds:8.1f} tokens/s ({seq_seconds:.2f} s)")
    print(f"{args.concurrency} in flight: {tokens / conc_seconds:8.1f} tokens/s ({conc_seconds:.2f} s)")
    print(f"ratio (--concurrency {args.concurrency} / 1): {seq_seconds / conc_seconds:.2f}x")
    print(f"steps that differ between the passes: {differ} of {len(requests)}")


if __name__ == "__main__":
    main()
