"""The reference study's estimates (scripts/study_gsm8k.sh prints them before it starts; --dry-run only them):
the memory plan of the real models on the GPU, and per dataset the steps, generated tokens, scorer work, GPU-hours
and disk the study will take, worked out from the dataset itself and from ratios measured on a grown trace.

    python scripts/study_plan.py [--datasets gsm8k,math500] [--limit N] [--small MODEL] [--large MODEL]
        [--backend vllm|hf] [--gpu-memory-gib G] [--ratios FILE | --pilot TRACE] [-- trace gen options]
    python scripts/study_plan.py --measure TRACE      # a grown trace's ratios, as JSON (how RATIOS_FILE was made)

How each number is made:

- From the dataset (read here): problems; prompt tokens, with Qwen2.5's real tokenizer (tracegen.qwen_tokenizer)
  and the study's chat template; the reference solutions' tokens (GSM8K without its calculator annotations).
- Assumed (until a pilot measures them): a model's solution is ``--verbosity`` (2) times its reference's tokens,
  in "\\n\\n" steps of ``--step-tokens`` (50) tokens each: a chain of L steps.
- From a grown trace (``--ratios FILE``, default RATIOS_FILE: the toy world's, measured with ``--measure`` on a
  trace grown as scripts/demo.sh grows it, comb and closure over data/toy/routers.toml): the comb's steps against
  the ideal comb of its chain (L + L(L+1)/2: the all-small chain and, from each of its nodes, an all-large
  completion as long as the chain's rest), closure growth (all steps / comb steps), the large model's share of the
  generated tokens, the share of steps the PRM and the judge score (the small model's), and of those P(T) scores
  (final ones), bytes per generated token in the trace's tables. ``--pilot TRACE`` (this study on some of the
  problems) replaces these ratios and the assumed chain length and step tokens with the pilot's own.
- GPU time: generated tokens / ``--decode-tokens-per-second`` (the large model on one GPU with vLLM: 2,000, an
  assumption until scripts/gpu_check.sh measures it; the small model's and the PRM's rates scaled by the parameter
  ratio), and at ``--prefill-ratio`` (10) times those rates the tokens gen's exact-logprob pass re-reads (each step
  once) and the scorers read (each call: the prompt and half a solution; the verifier every step).
- Disk: generated tokens x bytes per token, plus the small model's layer-24 prompt hidden state (float16) per
  problem.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RATIOS_FILE = Path(__file__).resolve().parent / "study_ratios.json"
ROUTERS_FILE = Path(__file__).resolve().parent / "study_routers.toml"
DECODE_TOKENS_PER_SECOND = 2000.0  # the large model (Qwen2.5-Math-7B) on one H100, vLLM: an assumption
PREFILL_RATIO = 10.0  # prefill tokens per second / generated tokens per second: an assumption
VERBOSITY = 2.0  # model tokens per step / the reference solutions' tokens per step: an assumption
GPU_MEMORY_GIB = 80.0  # an H100, where no GPU is visible
STEP_TOKENS = 50.0  # tokens of a "\\n\\n"-delimited step of Qwen2.5-Math-Instruct: an assumption
SCORER_MODELS = {"prm": "prm", "judge": "large", "verifier": "large", "first_token": "large"}  # whose rate it reads at
_CALCULATOR = re.compile(r"<<[^>]*>>")


@dataclass(frozen=True)
class Ratios:
    """What a grown trace says about a study's trees (see ``measure``)."""

    source: str
    trees: int
    chain_steps: float  # all-small chain, steps per tree
    comb_steps: float  # steps per tree on the comb (paths s...s and s...sL...L)
    steps: float  # steps per tree, comb and closure
    tokens_per_step: float
    large_token_share: float
    small_step_share: float  # the steps the PRM and the judge score
    final_step_share: float  # the steps P(T) scores
    bytes_per_gen_token: float

    @property
    def comb_factor(self) -> float:
        """Comb steps against the ideal comb of the chain's length."""
        return self.comb_steps / ideal_comb(self.chain_steps)

    @property
    def closure_growth(self) -> float:
        return self.steps / self.comb_steps


def ideal_comb(chain: float) -> float:
    """Steps of a comb whose all-small chain has ``chain`` steps and whose completions run as long as its rest."""
    return chain + chain * (chain + 1) / 2


def measure(root: str | Path) -> Ratios:
    """The ratios of a grown two-model trace (comb plus closure)."""
    import polars as pl

    from analysis.info import trace_info
    from tracestore.store import open_trace

    steps = open_trace(root).scan("steps").select("problem_id", "world", "path", "model", "is_final", "n_gen_tokens")
    steps = steps.collect()
    trees = steps.select("problem_id", "world").n_unique()
    tokens = steps["n_gen_tokens"].sum()
    return Ratios(
        source=str(root),
        trees=trees,
        chain_steps=steps.filter(pl.col("path").str.contains("^s+$")).height / trees,
        comb_steps=steps.filter(pl.col("path").str.contains("^s*L+$|^s+$")).height / trees,
        steps=steps.height / trees,
        tokens_per_step=tokens / steps.height,
        large_token_share=steps.filter(pl.col("model") == "large")["n_gen_tokens"].sum() / tokens,
        small_step_share=steps.filter(pl.col("model") == "small").height / steps.height,
        final_step_share=steps["is_final"].mean(),
        bytes_per_gen_token=trace_info(root).bytes_per_gen_token,
    )


def load_ratios(path: Path) -> Ratios:
    data = json.loads(Path(path).read_text())
    return Ratios(**{key: data[key] for key in Ratios.__dataclass_fields__})


@dataclass(frozen=True)
class DatasetShape:
    """A dataset's size, its prompts and its reference solutions, in Qwen2.5 tokens."""

    name: str
    problems: int
    prompt_tokens: float  # per problem, the chat prompt
    solution_tokens: float  # per reference solution
    solution_steps: float  # per reference solution


def reference_steps(solution: str, dataset: str) -> list[str]:
    """A reference solution's steps: GSM8K's lines before "####" (without calculator annotations), else its
    paragraphs."""
    if dataset == "gsm8k":
        lines = solution.split("####")[0].splitlines()
        return [_CALCULATOR.sub("", line).strip() for line in lines if line.strip()]
    return [part.strip() for part in solution.split("\n\n") if part.strip()]


def dataset_shape(spec: str, limit: int | None, tokenizer) -> DatasetShape:
    from tracegen.datasets import load_dataset
    from tracegen.prompts import prompt_token_ids

    dataset = load_dataset(spec, limit=limit)
    prompts = steps = tokens = 0
    for problem in dataset.problems:
        prompts += len(prompt_token_ids(tokenizer, problem.question))
        solution = reference_steps(problem.meta.get("solution", ""), dataset.name) or [problem.reference]
        steps += len(solution)
        tokens += sum(len(tokenizer.encode(step, add_special_tokens=False)) for step in solution)
    n = len(dataset.problems)
    return DatasetShape(spec.partition("=")[0], n, prompts / n, tokens / n, steps / n)


@dataclass(frozen=True)
class Estimate:
    dataset: str
    problems: int
    solution_steps: float  # a model's solution, assumed
    steps: float
    gen_tokens_small: float
    gen_tokens_large: float
    scorer_calls: dict
    scorer_tokens: float  # prompt and solution tokens the scorers read
    gpu_hours: float
    disk_gib: float


def estimate(
    shape: DatasetShape,
    ratios: Ratios,
    n_params: dict[str, int],
    hidden_bytes_per_problem: int,
    *,
    chain: float,
    step_tokens: float,
    decode: float,
    prefill_ratio: float,
) -> Estimate:
    """The study's work on ``shape``'s problems (one world each): all-small chains of ``chain`` steps of
    ``step_tokens`` tokens, trees as ``ratios`` grow them, ``decode`` generated tokens/s for the large model."""
    steps = shape.problems * ideal_comb(chain) * ratios.comb_factor * ratios.closure_growth
    tokens = steps * step_tokens
    large, small = tokens * ratios.large_token_share, tokens * (1 - ratios.large_token_share)
    rates = {"large": decode}
    rates["small"] = rates["prm"] = decode * n_params["large"] / n_params["small"]
    drafts = steps * ratios.small_step_share
    calls = {"prm": drafts, "judge": drafts, "verifier": steps, "first_token": steps * ratios.final_step_share}
    context = shape.prompt_tokens + chain * step_tokens / 2  # what a scorer call reads
    seconds = (small / rates["small"] + large / rates["large"]) * (1 + 1 / prefill_ratio)  # and gen's scoring pass
    for name, count in calls.items():
        seconds += count * context / (rates[SCORER_MODELS[name]] * prefill_ratio)
    disk = tokens * ratios.bytes_per_gen_token + shape.problems * hidden_bytes_per_problem
    return Estimate(
        dataset=shape.name,
        problems=shape.problems,
        solution_steps=chain,
        steps=steps,
        gen_tokens_small=small,
        gen_tokens_large=large,
        scorer_calls=calls,
        scorer_tokens=sum(calls.values()) * context,
        gpu_hours=seconds / 3600,
        disk_gib=disk / (1 << 30),
    )


def memory_plan_lines(args, shapes: dict) -> list[str]:
    """The memory plan `trace gen` would print for the real models, on this machine's GPU or an assumed one."""
    from tracegen.engine_settings import backend_kwargs, check_engine_options
    from tracegen.memory_plan import GIB, Device, plan_memory

    engine = _engine_options(args.gen_options)
    kind = args.backend
    roles = tuple(shapes)
    check_engine_options(engine, kind, roles, set(roles))
    kwargs = {role: backend_kwargs(kind, role, roles, engine) for role in roles}
    device = Device.current()
    if not device.gpu or args.gpu_memory_gib:
        gib = args.gpu_memory_gib or GPU_MEMORY_GIB
        device = Device(f"a {gib:g} GiB GPU (assumed)", int(gib * GIB), True)
    plan = plan_memory(kind, shapes, kwargs, device, hidden_roles=["small"])
    lines = plan.lines()
    lines += [f"  does not fit: {problem}" for problem in plan.problems()]
    return lines


def _engine_options(gen_options: list[str]):
    """EngineOptions from the trace gen options passed through (--tensor-parallel-size N, ...)."""
    from tracegen.engine_settings import parse_engine_options

    names = ("--tensor-parallel-size", "--gpu-memory-utilization", "--max-model-len", "--dtype", "--quantization")
    given = {}
    for index, option in enumerate(gen_options):
        name, _, value = option.partition("=")
        if name in names:
            given[name] = value or gen_options[index + 1]
    return parse_engine_options(*(given.get(name) for name in names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="gsm8k,math500")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--small", default="qwen2.5-math-1.5b")
    parser.add_argument("--large", default="qwen2.5-math-7b")
    parser.add_argument("--backend", default="vllm")
    parser.add_argument("--gpu-memory-gib", type=float, default=None, help="plan for a GPU of this size")
    parser.add_argument("--ratios", type=Path, default=RATIOS_FILE)
    parser.add_argument("--pilot", type=Path, default=None, help="a trace of this study on some problems")
    parser.add_argument("--decode-tokens-per-second", type=float, default=DECODE_TOKENS_PER_SECOND)
    parser.add_argument("--prefill-ratio", type=float, default=PREFILL_RATIO)
    parser.add_argument("--verbosity", type=float, default=VERBOSITY)
    parser.add_argument("--step-tokens", type=float, default=STEP_TOKENS)
    parser.add_argument("--measure", type=Path, default=None, help="print a grown trace's ratios as JSON and exit")
    parser.add_argument("gen_options", nargs="*", help="trace gen options, after --")
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(asdict(measure(args.measure)), indent=2))
        return
    report(args)


def report(args) -> None:
    from tracegen.qwen_tokenizer import build_qwen_tokenizer

    shapes = {role: _shape(name) for role, name in (("small", args.small), ("large", args.large))}
    ratios = measure(args.pilot) if args.pilot else load_ratios(args.ratios)
    print("\n".join(memory_plan_lines(args, shapes)))
    tokenizer = build_qwen_tokenizer()
    n_params = {role: shape.n_params for role, shape in shapes.items()}
    hidden_bytes = 2 * shapes["small"].d_model  # one float16 vector per problem: the small model's layer 24
    shape_source = (
        "chains and steps as the pilot's"
        if args.pilot
        else f"assumed: solutions {args.verbosity:g} x the references' tokens in steps of {args.step_tokens:g}"
    )
    print(
        f"estimates (one world each; from {ratios.source}: comb {ratios.comb_factor:.2f} x the ideal comb, closure "
        f"x{ratios.closure_growth:.2f}, large model {ratios.large_token_share:.0%} of the tokens, "
        f"{ratios.bytes_per_gen_token:.1f} B/token; {shape_source}; {args.decode_tokens_per_second:,.0f} generated "
        f"tok/s for the large model on one GPU, prefill x{args.prefill_ratio:g}):"
    )
    total_hours = total_disk = 0.0
    for spec in args.datasets.split(","):
        shape = dataset_shape(spec, args.limit, tokenizer)
        if args.pilot:
            chain, step_tokens = ratios.chain_steps, ratios.tokens_per_step
        else:
            chain, step_tokens = shape.solution_tokens * args.verbosity / args.step_tokens, args.step_tokens
        result = estimate(
            shape,
            ratios,
            n_params,
            hidden_bytes,
            chain=chain,
            step_tokens=step_tokens,
            decode=args.decode_tokens_per_second,
            prefill_ratio=args.prefill_ratio,
        )
        total_hours += result.gpu_hours
        total_disk += result.disk_gib
        calls = ", ".join(f"{name} {count:,.0f}" for name, count in sorted(result.scorer_calls.items()))
        print(
            f"  {shape.name}: {shape.problems:,} problems (prompts {shape.prompt_tokens:.0f} tokens, reference "
            f"solutions {shape.solution_tokens:.0f} tokens in {shape.solution_steps:.1f} steps) -> solutions of "
            f"~{result.solution_steps:.1f} steps, ~{result.steps:,.0f} steps grown, "
            f"~{result.gen_tokens_small / 1e6:.2f}M small + {result.gen_tokens_large / 1e6:.2f}M large generated "
            f"tokens; scorer calls {calls} "
            f"(~{result.scorer_tokens / 1e6:.1f}M tokens read); ~{result.gpu_hours:.2f} GPU-hours; "
            f"~{result.disk_gib:.2f} GiB on disk"
        )
    print(
        f"  total: ~{total_hours:.2f} GPU-hours, ~{total_disk:.2f} GiB (estimates: scripts/study_plan.py says what "
        "each assumes; --pilot TRACE replaces the toy ratios and the verbosity with a pilot's)"
    )


def _shape(name: str):
    """The memory plan's view of a model: its checkpoint where it is cached or a folder, else its published
    configuration (scripts/stand_ins.py)."""
    from scripts.stand_ins import REFERENCE_CONFIGS, reference_shape
    from tracegen.memory_plan import ModelShape
    from tracegen.models import canonical_name, resolve_model

    model = resolve_model(name, "plan")
    if model.is_local:
        return ModelShape.of_checkpoint(canonical_name(model), model.path)
    if name in REFERENCE_CONFIGS:
        return reference_shape(name)
    raise SystemExit(f"study_plan: {name} is neither cached nor a model whose configuration this script knows")


if __name__ == "__main__":
    main()
