"""Phase one, on the engines: `trace gen`, `trace score`, `trace audit`, `trace regrade`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from commands.console import console, err_console
from commands.options import FORCE, GENERATED_TRACE_DIR, TRACE_DIR, backend_option, out_option, seed_option
from data.toy import task as toy_task
from tracegen.backends import VLLM_MEMORY_BUDGET, VLLM_MEMORY_SHARES, VLLM_SCORER_SHARE
from tracegen.backends.endpoint_spec import ClientOptions
from tracegen.datasets import TOY_DEFAULT_SIZE
from tracegen.options import AuditOptions, GenOptions, RayOptions
from tracegen.scorers import SCORERS, preset_choices, world_variants
from tracestore.schema import LARGE, SMALL


def gen(
    model: str = typer.Option(
        None, "--model", help="Small model: alias (toy-small, qwen2.5-math-1.5b, ...), local folder or Hugging Face id."
    ),
    large: str = typer.Option(None, "--large", help="Large model: alias, local folder or Hugging Face id."),
    models: str = typer.Option(
        None,
        "--models",
        help=(
            "Instead of --model/--large: 2 to 10 models, smallest first, comma-separated "
            "(e.g. toy-small,toy-medium,toy-large); with 3 or more their roles are m0, m1, ..."
        ),
    ),
    dataset: str = typer.Option(
        ..., "--dataset", help="gsm8k, math500, omnimath, mmlu, toy; a JSONL path (format sniffed); or FORMAT=PATH."
    ),
    out: Path = out_option("Trace directory (created, or resumed if it holds a trace with the same settings).", ...),
    split: str = typer.Option(None, "--split", help="Dataset split (default: test, or the one in the file name)."),
    limit: int = typer.Option(None, "--limit", help=f"First N problems (default: all; {TOY_DEFAULT_SIZE} for toy)."),
    level: int = typer.Option(None, "--level", help=f"Toy difficulty level 1-4 (default: {toy_task.DEFAULT_LEVEL})."),
    worlds: int = typer.Option(GenOptions.worlds, "--worlds", help="Seeded sampling draws per problem."),
    expand: str = typer.Option(
        GenOptions.expand,
        "--expand",
        help=(
            "comb: all-small chain plus the all-large completion from each of its nodes (K models: each model's "
            "chain plus every larger model's completion from each of its nodes); full: every choice up to "
            "--depth; closure: comb, then whatever the --routers configurations miss, until nothing is missing; "
            "online: only what the --routers configurations walk (the router drives generation)."
        ),
    ),
    routers: Path = typer.Option(
        None,
        "--routers",
        help=(
            "TOML file of [[router]] tables (name, params, sweep) for --expand closure or online; a name may be "
            "any trace replay --router reference (FILE.py:Class relative to the TOML file); see tracegen/closure.py."
        ),
    ),
    budget_tokens: int = typer.Option(
        None, "--budget-tokens", help="Closure stops once this run generated this many tokens (default: no limit)."
    ),
    depth: int = typer.Option(None, "--depth", help="Depth of the exhaustive part of --expand full."),
    temperature: float = typer.Option(GenOptions.temperature, "--temperature", help="Sampling temperature."),
    top_p: float = typer.Option(GenOptions.top_p, "--top-p", help="Nucleus sampling mass."),
    max_step_tokens: int = typer.Option(
        GenOptions.max_step_tokens, "--max-step-tokens", help="Tokens at most per step (then finish_reason = length)."
    ),
    max_steps: int = typer.Option(GenOptions.max_steps, "--max-steps", help="Steps at most per solution."),
    topk: int = typer.Option(
        GenOptions.topk, "--topk", help="Top-k token ids and logprobs stored per generated token."
    ),
    hidden_layers: str = typer.Option(
        "",
        "--hidden-layers",
        help=(
            "Prompt hidden states to store for every model, e.g. -1,12 (-1 = last, normed); the layers the --routers "
            "configurations read are added (the cascade's P(IK): layer 24, or the last of a model with fewer)."
        ),
    ),
    backend: str = backend_option(
        "vllm, hf, an installed backend or FILE.py:Class (default: vllm where importable, else hf)."
    ),
    tensor_parallel_size: str = typer.Option(
        None,
        "--tensor-parallel-size",
        metavar="N|ROLE=N,...",
        help="vLLM: GPUs each engine of a model spreads over, for every model or per role (e.g. large=4) (default: 1).",
    ),
    gpu_memory_utilization: str = typer.Option(
        None,
        "--gpu-memory-utilization",
        metavar="F|ROLE=F,...",
        help=(
            f"vLLM: share of each GPU's memory the run's engines take together (default {VLLM_MEMORY_BUDGET}; two "
            f"models get {VLLM_MEMORY_SHARES[SMALL]:.0%}/{VLLM_MEMORY_SHARES[LARGE]:.0%} of it, K models in "
            f"proportion to their rank), or per role (small=0.25,large=0.6); a model's generator and exact-logprob "
            f"scorer split its share {1 - VLLM_SCORER_SHARE:.0%}/{VLLM_SCORER_SHARE:.0%}. Not part of the cache key."
        ),
    ),
    max_model_len: str = typer.Option(
        None,
        "--max-model-len",
        metavar="N|ROLE=N,...",
        help="Context in tokens (prompt + step) each engine is built for (default: the model's).",
    ),
    dtype: str = typer.Option(
        None,
        "--dtype",
        metavar="DTYPE|ROLE=DTYPE,...",
        help="auto, bfloat16, float16 or float32 (default: vllm the checkpoint's, hf float32).",
    ),
    quantization: str = typer.Option(
        None,
        "--quantization",
        metavar="METHOD|ROLE=METHOD,...",
        help="vLLM quantisation method, e.g. fp8 (default: none, or the checkpoint's own).",
    ),
    shard: str = typer.Option(
        None, "--shard", help="i/n: only problems whose id hashes to shard i of n (0-based), as writer shard{i}of{n}."
    ),
    seed: int = seed_option(
        "Base seed; each step's seed derives from it and (problem, world, node, model).", GenOptions.seed
    ),
    timings: bool = typer.Option(
        GenOptions.timings,
        "--timings",
        help=(
            "Store each step's share of measured engine wall time (gen_seconds) for latency models; off by default so "
            "the same command writes the same bytes."
        ),
    ),
    ray: str = typer.Option(
        None,
        "--ray",
        metavar="ADDRESS",
        help=(
            'Grow the trace with Ray workers (pip install ".\\[ray]"): "local" starts a Ray instance here, '
            '"auto" joins the cluster this machine belongs to, host:port joins that one. --out must be a path every '
            "node sees."
        ),
    ),
    workers: int = typer.Option(
        RayOptions.workers, "--workers", help="With --ray: workers, each a shard of the problems."
    ),
    gpus_per_worker: float = typer.Option(
        RayOptions.gpus_per_worker,
        "--gpus-per-worker",
        help="With --ray: GPUs each worker owns (its small and large engines share them).",
    ),
    cpus_per_worker: float = typer.Option(
        RayOptions.cpus_per_worker, "--cpus-per-worker", help="With --ray: CPUs each worker owns."
    ),
    api: list[str] = typer.Option(
        None,
        "--api",
        help=(
            "Serve a role by an OpenAI-compatible endpoint: ROLE:url=BASE_URL[,model=SERVED_NAME]"
            "[,mode=completions|chat][,key-env=VAR][,layout=final|instruction][,price=MODEL|IN/CACHED/OUT]"
            "[,context=N]. completions: exact token-id prefixes (self-hosted vLLM/SGLang; the role's --model/--large "
            "is the same checkpoint, for its tokenizer); chat: text in the messages (closed chat models; layout=final "
            "continues the assistant turn where the server supports continue_final_message). The key is read from "
            "$VAR and never stored. Repeatable."
        ),
    ),
    concurrency: int = typer.Option(
        ClientOptions.concurrency, "--concurrency", help="API requests in flight per --api role."
    ),
    request_timeout: float = typer.Option(
        ClientOptions.timeout, "--request-timeout", help="Seconds per API request attempt."
    ),
    max_retries: int = typer.Option(
        ClientOptions.max_retries,
        "--max-retries",
        help="Retries of an API request on 429, 5xx, timeouts or broken responses (with backoff).",
    ),
    budget_usd: float = typer.Option(
        ClientOptions.budget_usd,
        "--budget-usd",
        help="Stop sending API requests once this run spent this many US dollars (list prices; responses kept).",
    ),
) -> None:
    """Grow step trees of a small and a large model (or of K models) over a dataset and store them as a trace.

    On vLLM each step starts as soon as its parent is generated (the hf and API backends send each round of
    missing steps to each model as one batch); every round is appended atomically once it is done, and
    rerunning the same command resumes after a crash. Examples:
    trace gen --model toy-small --large toy-large --dataset toy --limit 200 --out runs/toy;
    trace gen --models toy-small,toy-medium,toy-large --dataset toy --out runs/toy3
    """
    from tracegen.backends.endpoint_spec import client_options, parse_api_spec
    from tracegen.closure import load_router_specs
    from tracegen.engine_settings import parse_engine_options
    from tracegen.gen import parse_models, run_gen
    from tracegen.hidden import parse_layers
    from tracegen.progress import GenProgress

    small, *middle, large = parse_models(model, large, models)
    options = GenOptions(
        small=small,
        large=large,
        middle=tuple(middle),
        dataset=dataset,
        out=out,
        split=split,
        limit=limit,
        level=level,
        worlds=worlds,
        expand=expand,
        depth=depth,
        temperature=temperature,
        top_p=top_p,
        max_step_tokens=max_step_tokens,
        max_steps=max_steps,
        topk=topk,
        hidden_layers=parse_layers(hidden_layers),
        backend=backend,
        shard=shard,
        seed=seed,
        timings=timings,
        routers=tuple(load_router_specs(routers)) if routers is not None else (),
        budget_tokens=budget_tokens,
        engine=parse_engine_options(tensor_parallel_size, gpu_memory_utilization, max_model_len, dtype, quantization),
        api=tuple(parse_api_spec(text) for text in api or ()),
        api_client=client_options(concurrency, request_timeout, max_retries, budget_usd),
    )
    ray_options = RayOptions(ray, workers, gpus_per_worker, cpus_per_worker)
    ray_options.check()
    if ray is not None:
        from tracegen.distributed import print_summary, run_on_ray

        print_summary(console, run_on_ray(options, ray_options, console))
        return
    with GenProgress(console) as progress:
        summary = run_gen(options, progress)
    if summary.up_to_date:
        console.print(
            f"[green]nothing to do[/] {escape(str(summary.out))}: it holds every step and score this command asks "
            f"for ({summary.problems:,} problems); no engine was started, {summary.seconds:.1f}s",
            highlight=False,
        )
    else:
        console.print(
            f"[green]done[/] {escape(str(summary.out))}: {summary.problems:,} problems, {summary.new_steps:,} new "
            f"steps, {summary.new_gen_tokens:,} generated tokens in {summary.rounds} rounds, {summary.seconds:.1f}s",
            highlight=False,
        )
    if summary.skipped_context_full:
        console.print(
            f"[yellow]{summary.skipped_context_full:,} node(s) left unexpanded because their prompt fills the "
            f"model's context, in problem(s):[/] {escape(', '.join(summary.context_full_problems))}",
            highlight=False,
        )
    if summary.closure is not None and summary.closure.remaining_misses:
        why = (
            "--budget-tokens spent"
            if summary.closure.budget_spent
            else "they cannot be grown (context full or --max-steps)"
        )
        console.print(f"[yellow]{summary.closure.remaining_misses:,} router misses left: {why}[/]")


def score(
    trace_dir: Path = GENERATED_TRACE_DIR,
    scorer: str = typer.Option(
        ...,
        "--scorer",
        help=f"One of {', '.join(sorted(SCORERS.names(installed=False)))}, an installed scorer (entry point of group "
        "trace.scorers) or FILE.py:Class. By world: "
        + "; ".join(
            f"{world} traces run " + ", ".join(f"{variant} for {signal}" for signal, variant in variants.items())
            for world, variants in world_variants().items()
        )
        + ". judge@ROLE asks the trace's ROLE model instead of its largest (SpecReason with target=ROLE).",
    ),
    model: str = typer.Option(
        None,
        "--model",
        help=(
            "Scorer model: alias, folder or Hugging Face id. prm: skywork-prm-1.5b (toy: toy-prm); judge/verifier: "
            "the trace's large model; ptrue: each answer's own model. api-verifier: its endpoint, "
            "url=BASE_URL,model=NAME[,key-env=VAR] (e.g. GPT-4o-mini as the open-to-closed step checker)."
        ),
    ),
    backend: str = backend_option(
        "vllm or hf (default: vllm where importable, else hf; the PRM always runs on transformers)."
    ),
    preset: str = typer.Option(
        None,
        "--preset",
        help="Prompt preset of a scorer that asks one (trace.json records its texts; a trace scored with one preset "
        "refuses another): "
        + "; ".join(f"{name}: {', '.join(presets)}" for name, presets in preset_choices().items())
        + ". Default: the preset the trace's scores were made with, else the first (the method's own words: "
        "SpecReason's code, the CMDP seed's Appendix A, the cascade seed's Table 7); trace is this project's "
        "earlier wording.",
    ),
    batch: int = typer.Option(None, "--batch", help="Steps per engine call (default: 64 for prm, 256 otherwise)."),
) -> None:
    """Annotate a trace's steps with a scorer, once, for the routers that read it.

    prm (RSD) and judge (SpecReason) score the small model's steps (judge@m1: m1's verdict on every smaller
    model's steps), ptrue (cascade) every final answer, verifier (the policy's coverage) every step. Values
    go to the scores table with the tokens each call processed (replay charges them); rerun to resume.
    Example: trace score runs/toy --scorer prm
    """
    from tracegen.progress import ScoreProgress
    from tracegen.scoring import run_score

    with ScoreProgress(scorer, console) as progress:
        summary = run_score(
            trace_dir, scorer, model=model, backend=backend, preset=preset, batch=batch, progress=progress
        )
    console.print(
        f"[green]done[/] {escape(str(trace_dir))}: {summary.new:,} new {escape(scorer)} scores "
        f"({summary.wanted:,} steps to score in all), {summary.seconds:.1f}s",
        highlight=False,
    )


def audit(
    trace_dir: Path = GENERATED_TRACE_DIR,
    sample: int = typer.Option(
        AuditOptions.sample, "--sample", help="Steps to regenerate (all of them when the trace has fewer)."
    ),
    seed: int = seed_option("Seed of the sample (stratified over model and depth).", AuditOptions.seed),
    backend: str = backend_option(
        "vllm or hf (default: the engine that wrote the trace; hf cross-checks a vllm trace)."
    ),
    min_identical: float = typer.Option(
        None,
        "--min-identical",
        help="Exit 1 when the share of identical steps is below this (default: 1.0 with the recorded engine, else 0).",
    ),
    out: Path = out_option("Also write one row per audited step to this .csv file."),
    force: bool = FORCE,
) -> None:
    """Regenerate a random sample of stored steps and compare them with the cache, token for token.

    Each sampled step (stratified over model and depth) is regenerated with the recorded model, prompt ids,
    sampling settings and the step's own seed; reported: the share identical token for token, where the
    others first diverge (token position, depth), max |delta logprob| and |delta max logit| on the tokens
    that agree, and how many answers or grades changed. The summary is appended to trace.json (audits) and
    shown by trace info. Example: trace audit runs/toy --sample 200 --seed 0 --backend hf
    """
    from analysis.info import audit_table
    from tracegen.audit import run_audit

    options = AuditOptions(
        root=trace_dir, sample=sample, seed=seed, backend=backend, min_identical=min_identical, out=out, force=force
    )
    with console.status("auditing") as status:

        def progress(stage: str, **info) -> None:
            if stage == "load":
                status.update(f"starting {info['backend']} for {', '.join(info['roles'])}")
            elif stage == "generate":
                status.update(f"regenerating {info['n']:,} {info['role']} steps")

        result = run_audit(options, progress=progress)
    console.print(audit_table(result.summary, title=escape(f"audit of {trace_dir}")))
    if out is not None:
        console.print(f"wrote {result.details.height:,} audited steps to {escape(str(out))}", highlight=False)
    if not result.passed:
        err_console.print(
            f"[bold red]audit failed:[/] {100 * result.summary['identical_share']:.1f}% of the steps are identical, "
            f"below --min-identical {result.summary['min_identical']:g}",
            highlight=False,
        )
        raise typer.Exit(1)


def regrade(
    trace_dir: Path = TRACE_DIR,
    grader: str = typer.Option(
        None,
        "--grader",
        help="math-verify, math-verify-choice, exact or toy-exact (default: the dataset's: math-verify for math "
        "sets, toy-exact for the toy world).",
    ),
    name: str = typer.Option(None, "--name", help="Name of the new grade set (default: the grader's name)."),
) -> None:
    """Grade every final step's answer again, offline, into a new named grade set (the old grades stay).

    Answers are extracted again from each solution's text. Prints how many answers flipped each way
    against the steps' own grades, with examples; replay, report, sql and diff read the set with
    --grades NAME. Rerun to grade steps grown since. Example: trace regrade runs/gsm8k --grader exact
    """
    from tracegen.regrade import run_regrade

    summary = run_regrade(trace_dir, grader, name)
    grader_entry = f"{summary.grader['name']} {summary.grader['version']}"
    console.print(
        f"[green]grade set {escape(summary.grade_set)}[/] ({escape(grader_entry)}): {summary.final_steps:,} final "
        f"steps, {summary.new:,} graded now; against the steps' own grades {summary.to_right:,} flipped wrong -> "
        f"right and {summary.to_wrong:,} right -> wrong; {summary.answers_changed:,} extracted answers differ",
        highlight=False,
    )
    for title, examples in (
        ("wrong -> right", summary.examples_to_right),
        ("right -> wrong", summary.examples_to_wrong),
    ):
        for example in examples:
            console.print(
                escape(
                    f"  {title}: {example['step_id']} answer {example['answer']!r}, reference {example['reference']!r}"
                ),
                highlight=False,
            )
