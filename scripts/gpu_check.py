"""GPU check: `trace gen` on the toy world and on random-initialised stand-ins of Qwen2.5-Math-1.5B (small) and
-7B (large) -- their published configurations and Qwen2.5's real tokenizer (scripts/stand_ins.py), no weights
downloaded -- on GSM8K problems, printing per run the memory plan gen worked out before loading, what the GPU
then held (peak ``torch.cuda.max_memory_allocated`` for the transformers backend, whose models live in this
process; the device's used memory while vLLM's engine processes ran), generated tokens/s per model and bytes on
disk per generated token; at the end all of it as one JSON line.

Random weights rarely write the delimiter, so the Qwen steps run to --max-step-tokens: what is measured is the
engine and the tree bookkeeping at the real models' shapes, not what the models would write.

    python scripts/gpu_check.py [--problems 8] [--max-steps 3] [--backend hf] [--tiny]
        [--dtype D] [--tensor-parallel-size N] [--gpu-memory-utilization F] [--max-model-len N] [--quantization Q]

The engine settings take `trace gen`'s values (each for every model, or ROLE=VALUE,...). ``--tiny`` shrinks the
Qwen shapes (2 layers, width 32; the real vocabularies) so that the same code runs on a CPU in seconds; the tests
run it that way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QWEN = ("qwen2.5-math-1.5b", "qwen2.5-math-7b")
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
ENGINE_OPTIONS = ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "dtype", "quantization")


class _Watch:
    """gen's progress: keeps the memory plan and, once the engines run, the GPU memory the device has in use."""

    def __init__(self):
        self.plan = None
        self.device_used = None

    def __call__(self, stage: str, **info) -> None:
        import torch

        if stage == "memory-plan":
            self.plan = info["plan"]
            print("\n".join(self.plan.lines()), flush=True)
        elif stage == "round" and torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            self.device_used = max(self.device_used or 0, total - free)


def measure(label: str, small: str, large: str, dataset: str, out: Path, *, problems, max_steps, backend, engine):
    """Run gen (timings on) and return its numbers: the plan, what the GPU held, tokens/s per model, bytes per
    token."""
    import polars as pl
    import torch

    from tracegen.gen import GenOptions, run_gen
    from tracegen.memory_plan import GIB
    from tracestore.store import open_trace

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    options = GenOptions(
        small=small,
        large=large,
        dataset=dataset,
        out=out,
        limit=problems,
        max_steps=max_steps,
        max_step_tokens=64,
        backend=backend,
        timings=True,
        engine=engine,
    )
    watch = _Watch()
    started = time.perf_counter()
    summary = run_gen(options, progress=watch)
    wall = time.perf_counter() - started
    trace = open_trace(out)
    steps = trace.scan("steps").select("model", "n_gen_tokens", "gen_seconds").collect()
    per_model = steps.group_by("model").agg(tokens=pl.col("n_gen_tokens").sum(), seconds=pl.col("gen_seconds").sum())
    rates = {row["model"]: row["tokens"] / row["seconds"] for row in per_model.iter_rows(named=True) if row["seconds"]}
    on_disk = sum(os.path.getsize(path) for table in ("steps", "tokens") for path in trace.files(table))
    plan = watch.plan
    weights = sum(engine.weights for engine in plan.engines)
    in_process = backend == "hf"  # vLLM's engines allocate in processes of their own
    measured = torch.cuda.max_memory_allocated() if in_process and torch.cuda.is_available() else watch.device_used
    planned_total = (
        weights + sum(engine.kv_cache for engine in plan.engines) if in_process else plan.shares * plan.device.memory
    )
    result = {
        "label": label,
        "backend": backend,
        "device": plan.device.name,
        "steps": summary.new_steps,
        "tokens": summary.new_gen_tokens,
        "wall_seconds": round(wall, 1),
        "tokens_per_second": {model: round(rate, 1) for model, rate in rates.items()},
        "bytes_per_token": round(on_disk / max(summary.new_gen_tokens, 1), 1),
        "plan_weights_gib": round(weights / GIB, 3),
        "plan_total_gib": round(planned_total / GIB, 3),
        "measured_gib": None if measured is None else round(measured / GIB, 3),
        "measured": "peak torch.cuda.max_memory_allocated" if in_process else "device memory in use while generating",
        # the weights the plan counts were all there, and the GPU held no more than the plan allows
        "plan_holds": None if measured is None else bool(weights <= measured <= planned_total),
    }
    rates_text = ", ".join(f"{model} {rate:,.0f}" for model, rate in sorted(rates.items()))
    memory = "n/a (no GPU)" if measured is None else f"{result['measured_gib']:.2f} GiB ({result['measured']})"
    print(
        f"{label}: {summary.new_steps:,} steps, {summary.new_gen_tokens:,} tokens in {wall:.1f}s; generated tokens/s "
        f"{rates_text}; plan: weights {result['plan_weights_gib']:.2f} GiB, at most {result['plan_total_gib']:.2f} "
        f"GiB; GPU held {memory}; {result['bytes_per_token']:.1f} bytes on disk per generated token",
        flush=True,
    )
    return result


def run_check(folder: Path, *, problems: int, max_steps: int, backend: str, tiny: bool, engine=None) -> list[dict]:
    from scripts.stand_ins import write_stand_in
    from tracegen.options import EngineOptions

    engine = engine or EngineOptions()
    settings = dict(problems=problems, max_steps=max_steps, backend=backend, engine=engine)
    results = [measure(f"toy world ({backend})", "toy-small", "toy-large", "toy", folder / "toy", **settings)]
    started = time.perf_counter()
    small, large = (
        write_stand_in(name, folder / "models" / name, shrink=TINY if tiny else None, seed=seed)
        for seed, name in enumerate(QWEN)
    )
    print(f"random-initialised Qwen2.5-Math stand-ins written in {time.perf_counter() - started:.1f}s", flush=True)
    shapes = "tiny Qwen2.5-Math shapes" if tiny else "Qwen2.5-Math-1.5B / -7B shapes"
    label = f"{shapes}, random weights, GSM8K prompts ({backend})"
    results.append(measure(label, str(small), str(large), "gsm8k", folder / "qwen", **settings))
    return results


def main() -> None:
    from tracegen.engine_settings import parse_engine_options

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=8, help="problems per run")
    parser.add_argument("--max-steps", type=int, default=3, help="steps per solution (comb expansion)")
    parser.add_argument("--backend", default="hf", help="hf or vllm")
    parser.add_argument("--tiny", action="store_true", help="tiny Qwen shapes (a CPU test of this script)")
    parser.add_argument("--folder", type=Path, default=None, help="where models and traces go [default: a temp dir]")
    for name in ENGINE_OPTIONS:
        parser.add_argument(f"--{name.replace('_', '-')}", default=None, help="as trace gen takes it")
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    engine = parse_engine_options(*(getattr(args, name) for name in ENGINE_OPTIONS))
    results = run_check(
        folder, problems=args.problems, max_steps=args.max_steps, backend=args.backend, tiny=args.tiny, engine=engine
    )
    print(json.dumps({"gpu_check": results}, separators=(",", ":")))


if __name__ == "__main__":
    main()
