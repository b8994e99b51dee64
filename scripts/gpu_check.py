"""GPU check: `trace gen` on the toy world and on random-initialised Qwen2 models shaped like
Qwen2.5-Math-1.5B (small) and Qwen2.5-Math-7B (large) -- the same layer count, width, MLP width,
attention and key/value heads and vocabulary, no weights downloaded -- printing generated tokens/s
per model, peak GPU memory and bytes on disk per generated token.

The random models use the toy tokenizer (the toy task's prompts are valid token ids of any vocabulary
that large); their steps are random tokens, so they run to --max-step-tokens: what is measured is the
engine and the tree bookkeeping at the real models' shapes, not what the models would write.

    python scripts/gpu_check.py [--problems 8] [--max-steps 3] [--backend hf] [--tiny]

``--tiny`` shrinks the Qwen shapes (2 layers, width 32; the real vocabularies) so that the same code
runs on a CPU in seconds; the tests run it that way.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QWEN_SHAPES = {
    "qwen2.5-math-1.5b": dict(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    ),
    "qwen2.5-math-7b": dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
}
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def random_model(name: str, folder: Path, *, tiny: bool = False, seed: int = 0) -> Path:
    """A Qwen2 checkpoint of ``name``'s shape with random weights (bfloat16 on disk) and the toy tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from data.toy.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    shape = {**QWEN_SHAPES[name], **(TINY if tiny else {})}
    config = Qwen2Config(
        **shape,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialised where it is fast
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    path = folder / (f"{name}-tiny" if tiny else name)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    return path


def measure(label: str, small: str, large: str, out: Path, *, problems: int, max_steps: int, backend: str) -> dict:
    """Run gen (timings on) and return its numbers: tokens/s per model, peak GPU memory, bytes per token."""
    import polars as pl
    import torch

    from tracegen.gen import GenOptions, run_gen
    from tracestore.store import open_trace

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    options = GenOptions(
        small=small,
        large=large,
        dataset="toy",
        out=out,
        limit=problems,
        max_steps=max_steps,
        max_step_tokens=64,
        backend=backend,
        timings=True,
    )
    started = time.perf_counter()
    summary = run_gen(options)
    wall = time.perf_counter() - started
    trace = open_trace(out)
    steps = trace.scan("steps").select("model", "n_gen_tokens", "gen_seconds").collect()
    per_model = steps.group_by("model").agg(tokens=pl.col("n_gen_tokens").sum(), seconds=pl.col("gen_seconds").sum())
    rates = {row["model"]: row["tokens"] / row["seconds"] for row in per_model.iter_rows(named=True) if row["seconds"]}
    on_disk = sum(os.path.getsize(path) for table in ("steps", "tokens") for path in trace.files(table))
    result = {
        "label": label,
        "steps": summary.new_steps,
        "tokens": summary.new_gen_tokens,
        "wall_seconds": wall,
        "tokens_per_second": rates,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "bytes_per_token": on_disk / max(summary.new_gen_tokens, 1),
    }
    order = ["small", "large"]
    ranked = sorted(rates.items(), key=lambda item: (order.index(item[0]) if item[0] in order else 2, item[0]))
    rates_text = ", ".join(f"{model} {rate:,.0f}" for model, rate in ranked)
    peak = f"{result['peak_gpu_gib']:.1f} GiB" if result["peak_gpu_gib"] is not None else "n/a (no GPU)"
    print(
        f"{label}: {summary.new_steps:,} steps, {summary.new_gen_tokens:,} tokens in {wall:.1f}s; "
        f"generated tokens/s {rates_text}; peak GPU memory {peak}; "
        f"{result['bytes_per_token']:.1f} bytes on disk per generated token",
        flush=True,
    )
    return result


def run_check(folder: Path, *, problems: int, max_steps: int, backend: str, tiny: bool) -> list[dict]:
    results = [
        measure(
            f"toy world ({backend})",
            "toy-small",
            "toy-large",
            folder / "toy",
            problems=problems,
            max_steps=max_steps,
            backend=backend,
        )
    ]
    started = time.perf_counter()
    small, large = (random_model(name, folder / "models", tiny=tiny) for name in QWEN_SHAPES)
    print(
        f"random-initialised Qwen2.5-Math-1.5B/-7B shapes written in {time.perf_counter() - started:.1f}s", flush=True
    )
    shapes = "tiny Qwen2.5-Math shapes" if tiny else "Qwen2.5-Math-1.5B / -7B shapes"
    results.append(
        measure(
            f"{shapes}, random weights ({backend})",
            str(small),
            str(large),
            folder / "qwen",
            problems=problems,
            max_steps=max_steps,
            backend=backend,
        )
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=8, help="toy problems per run")
    parser.add_argument("--max-steps", type=int, default=3, help="steps per solution (comb expansion)")
    parser.add_argument("--backend", default="hf", help="hf or vllm")
    parser.add_argument("--tiny", action="store_true", help="tiny Qwen shapes (a CPU test of this script)")
    parser.add_argument("--folder", type=Path, default=None, help="where models and traces go [default: a temp dir]")
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    run_check(folder, problems=args.problems, max_steps=args.max_steps, backend=args.backend, tiny=args.tiny)


if __name__ == "__main__":
    main()
