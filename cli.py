"""The `trace` command line: thin Typer wrappers over tracegen/, replay/ and analysis/."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from replay.engine import DEFAULT_MAX_CONFIGS, STREAM_STATES
from replay.routers import ROUTERS
from tracegen.scorers import SCORERS, world_variants
from tracestore.errors import TraceError
from tracestore.remote import DEFAULT_TIMEOUT

app = typer.Typer(
    help="Cache step trees of a small and a large LLM once (gen), then replay any router on a CPU.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# emoji=False: a path or parameter such as a:b:c must print as typed, not as an emoji code
console = Console(emoji=False)
err_console = Console(stderr=True, emoji=False)


class _NoteHandler(logging.Handler):
    """The library's notices (a lock taken over, a lost part regrown) as one yellow line on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        err_console.print(f"[yellow]note:[/] {escape(record.getMessage())}", highlight=False, soft_wrap=True)


logging.getLogger("replay").addHandler(_NoteHandler())


def user_errors(command):
    """Print a TraceError as one red line and exit 1, instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except TraceError as error:
            err_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


LOCAL_TRACE_HELP = "Trace directory: a path, or a file:// URL."
GRADES_OPT = typer.Option(
    None,
    "--grades",
    help="Grade set of the final steps: default (the steps' own grades) or one written by trace regrade.",
)


@app.command()
@user_errors
def validate(
    trace_dir: str = typer.Argument(..., help=LOCAL_TRACE_HELP),
    repair: bool = typer.Option(
        False,
        "--repair",
        help=(
            "First repair what concurrent or crashed writers left: drop exact duplicate rows, remove temp files and "
            "uncommitted tokens parts, forget recorded parts that are gone, move files of the table folders that "
            "no writer recorded and no reader can read to _quarantine/; print each thing done. Takes the "
            "trace's writer lock."
        ),
    ),
) -> None:
    """Check every invariant of a trace (page checksums and value ranges included); exit 1 naming the first
    violation."""
    from tracestore.repair import repair as repair_trace
    from tracestore.validate import validate as validate_trace

    if repair:
        report = repair_trace(trace_dir)
        for line in report.done:
            console.print(f"repaired: {escape(line)}", highlight=False)
        for line in report.left:
            console.print(f"[yellow]left as is:[/] {escape(line)}", highlight=False)
        if not report.done and not report.left:
            console.print("nothing to repair")
    counts = validate_trace(trace_dir)
    console.print(
        f"[green]ok[/] {escape(str(trace_dir))}: " + ", ".join(f"{n:,} {table}" for table, n in counts.items()),
        highlight=False,
    )


@app.command()
@user_errors
def info(trace_dir: str = typer.Argument(..., help=LOCAL_TRACE_HELP)) -> None:
    """Problems, worlds, steps and generated tokens per model, single-model accuracy, size of the tables on disk
    (other files in the trace's folder are listed apart)."""
    from analysis.info import print_info, trace_info

    print_info(trace_info(trace_dir), console)


@app.command()
@user_errors
def sql(
    trace_dir: str = typer.Argument(..., help=LOCAL_TRACE_HELP),
    query: str = typer.Argument(
        ...,
        help="One DuckDB query (SELECT, WITH, FROM, DESCRIBE, ...) over the views problems, steps, tokens, grades, "
        "scores, hidden and the --file views.",
    ),
    file: list[str] = typer.Option(
        [],
        "--file",
        help="NAME=PATH: also read this .parquet, .csv or .json(l) file, as the view NAME (repeatable). No other "
        "file is readable.",
    ),
    out: Path = typer.Option(
        None, "--out", help="Write the result to this .csv or .parquet file instead of printing it."
    ),
    force: bool = typer.Option(False, "--force", help="Replace the --out file if it exists."),
    max_rows: int = typer.Option(50, "--max-rows", help="Rows to print (without --out)."),
    grades: str = GRADES_OPT,
    memory_limit: str = typer.Option(
        None,
        "--memory-limit",
        help="Memory the query may use, e.g. 4GB (default: DuckDB's, 80% of this machine's); nothing spills to disk.",
    ),
) -> None:
    """Run a read-only DuckDB query over the trace's Parquet parts, in place.

    Only one query runs (no COPY, ATTACH, CREATE, INSTALL, SET, ...), reading only the trace and --file files.
    """
    from analysis.sql import check_out_path, parse_file_option, print_result, run_sql, write_result

    if out is not None:
        check_out_path(out, force=force)
    files = {}
    for text in file:
        name, path = parse_file_option(text)
        if name in files:
            raise TraceError(f"--file {name} is given twice")
        files[name] = path
    result = run_sql(trace_dir, query, files, grades, memory_limit)
    if out is None:
        print_result(result, console, max_rows)
    else:
        write_result(result, out, force=force)
        console.print(f"wrote {result.num_rows:,} rows to {escape(str(out))}", highlight=False)


@app.command()
@user_errors
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
    out: Path = typer.Option(
        ..., "--out", help="Trace directory (created, or resumed if it holds a trace with the same settings)."
    ),
    split: str = typer.Option(None, "--split", help="Dataset split (default: test, or the one in the file name)."),
    limit: int = typer.Option(None, "--limit", help="First N problems (default: all; 200 for toy)."),
    level: int = typer.Option(None, "--level", help="Toy difficulty level 1-4 (default: 3)."),
    worlds: int = typer.Option(1, "--worlds", help="Seeded sampling draws per problem."),
    expand: str = typer.Option(
        "comb",
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
    temperature: float = typer.Option(0.7, "--temperature", help="Sampling temperature."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass."),
    max_step_tokens: int = typer.Option(
        256, "--max-step-tokens", help="Tokens at most per step (then finish_reason = length)."
    ),
    max_steps: int = typer.Option(32, "--max-steps", help="Steps at most per solution."),
    topk: int = typer.Option(5, "--topk", help="Top-k token ids and logprobs stored per generated token."),
    hidden_layers: str = typer.Option(
        "", "--hidden-layers", help="Prompt hidden states to store, e.g. -1,12 (-1 = last, normed) (default: none)."
    ),
    backend: str = typer.Option(
        None,
        "--backend",
        help="vllm, hf, an installed backend or FILE.py:Class (default: vllm where importable, else hf).",
    ),
    shard: str = typer.Option(
        None, "--shard", help="i/n: only problems whose id hashes to shard i of n (0-based), as writer shard{i}of{n}."
    ),
    seed: int = typer.Option(
        0, "--seed", help="Base seed; each step's seed derives from it and (problem, world, node, model)."
    ),
    timings: bool = typer.Option(
        False,
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
    workers: int = typer.Option(2, "--workers", help="With --ray: workers, each a shard of the problems."),
    gpus_per_worker: float = typer.Option(
        0.0, "--gpus-per-worker", help="With --ray: GPUs each worker owns (its small and large engines share them)."
    ),
    cpus_per_worker: float = typer.Option(1.0, "--cpus-per-worker", help="With --ray: CPUs each worker owns."),
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
    concurrency: int = typer.Option(8, "--concurrency", help="API requests in flight per --api role."),
    request_timeout: float = typer.Option(120.0, "--request-timeout", help="Seconds per API request attempt."),
    max_retries: int = typer.Option(
        6, "--max-retries", help="Retries of an API request on 429, 5xx, timeouts or broken responses (with backoff)."
    ),
    budget_usd: float = typer.Option(
        None,
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
    from tracegen.backends.openai_api import client_options, parse_api_spec
    from tracegen.closure import load_router_specs
    from tracegen.gen import GenOptions, parse_models, run_gen
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
        api=tuple(parse_api_spec(text) for text in api or ()),
        api_client=client_options(concurrency, request_timeout, max_retries, budget_usd),
    )
    if ray is None and (workers, gpus_per_worker, cpus_per_worker) != (2, 0.0, 1.0):
        raise TraceError("--workers, --gpus-per-worker and --cpus-per-worker need --ray")
    if ray is not None:
        from tracegen.distributed import print_summary, run_on_ray

        print_summary(console, run_on_ray(options, ray, workers, gpus_per_worker, cpus_per_worker, console))
        return
    with GenProgress(console) as progress:
        summary = run_gen(options, progress)
    console.print(
        f"[green]done[/] {escape(str(summary.out))}: {summary.problems:,} problems, {summary.new_steps:,} new steps, "
        f"{summary.new_gen_tokens:,} generated tokens in {summary.rounds} rounds, {summary.seconds:.1f}s",
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


@app.command()
@user_errors
def score(
    trace_dir: Path = typer.Argument(..., help="Trace directory (written by trace gen)."),
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
    backend: str = typer.Option(
        None,
        "--backend",
        help="vllm or hf (default: vllm where importable, else hf; the PRM always runs on transformers).",
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
        summary = run_score(trace_dir, scorer, model=model, backend=backend, batch=batch, progress=progress)
    console.print(
        f"[green]done[/] {escape(str(trace_dir))}: {summary.new:,} new {escape(scorer)} scores "
        f"({summary.wanted:,} steps to score in all), {summary.seconds:.1f}s",
        highlight=False,
    )


def _replay_table(result, swept: list[str], title: str, max_rows: int = 21):
    """Rich table of a replay summary, one row per configuration (evenly thinned for long sweeps)."""
    import json

    from rich.table import Table

    summary = result.summary()
    shown = range(summary.height)
    if summary.height > max_rows:  # thinned before rows become dicts: a sweep may have millions
        step = -(-(summary.height - 1) // (max_rows - 1))
        shown = [*shown[::step], *([shown[-1]] if (summary.height - 1) % step else [])]
    rows = summary[list(shown)].to_dicts()
    table = Table(
        title=title,
        caption=f"{len(rows)} of {summary.height} configurations shown" if len(rows) < summary.height else None,
    )
    table.add_column("Router")
    table.add_column("Params")
    for name in ("Acc", f"Cost ({result.cost_unit})", "A/C", "Large steps", "Misses"):
        table.add_column(name, justify="right")
    for row in rows:
        params = json.loads(row["params"])
        shown = {k: params[k] for k in swept} if swept else {k: v for k, v in params.items() if v not in ("", None)}
        table.add_row(
            row["router"],
            escape(" ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())),
            "-" if row["accuracy"] is None else f"{100 * row['accuracy']:.1f}%",
            "-" if row["cost"] is None else f"{row['cost']:.4g}",
            "-" if row["a_over_c"] is None else f"{row['a_over_c']:.4g}",
            "-" if row["large_share"] is None else f"{100 * row['large_share']:.1f}%",
            f"[yellow]{row['misses']:,}[/]" if row["misses"] else "0",
        )
    return table


def _print_registered() -> None:
    """`trace replay --list`: every router, scorer, cost model, backend and report table, where it comes from,
    and exit."""
    from rich.table import Table

    from analysis.tables import TABLES
    from replay.costs import COSTS
    from tracegen.backends import BACKENDS

    table = Table(title="Installed routers, scorers, cost models, backends and report tables")
    for name in ("Kind", "Name", "Source", "About"):
        table.add_column(name, no_wrap=name in ("Kind", "Name"))
    for registry in (ROUTERS, SCORERS, COSTS, BACKENDS, TABLES):
        for row in registry.rows():
            table.add_row(row.kind, escape(row.name), escape(row.source), escape(row.about))
    console.print(table)
    console.print(
        "Also, instead of a name: FILE.py:Class or module:Class (--router, --scorer, --cost, --backend, --table; "
        "a router may be a per-step function decide(node, ...)).",
        highlight=False,
    )
    raise typer.Exit()


@app.command()
@user_errors
def replay(
    trace_dir: str = typer.Argument(..., help="Trace directory, or a URI read in place (s3://bucket/path, gs://...)."),
    router: str = typer.Option(
        ...,
        "--router",
        help=(
            f"One of {', '.join(sorted(ROUTERS.names(installed=False)))}; an installed router (entry point of group "
            "trace.routers); or your own: FILE.py:Class or module:Class (a router class or per-step function; see "
            "README, 'Your own router'). 'help' lists them."
        ),
    ),
    list_registered: bool = typer.Option(
        False,
        "--list",
        is_eager=True,
        callback=lambda value: _print_registered() if value else None,
        help=(
            "List the routers, scorers, cost models, backends and report tables installed (built-in and from entry "
            "points) and exit."
        ),
    ),
    param: list[str] = typer.Option(
        [],
        "--param",
        help=(
            "Router parameter name=value, repeatable, e.g. --param mode=step; policy and steer: escalate=after "
            "(default) or replace."
        ),
    ),
    sweep: list[str] = typer.Option(
        [], "--sweep", help="Threshold sweep name=start:stop:step (stop included) or name=v1,v2,...; repeat for a grid."
    ),
    split: str = typer.Option(
        "test",
        "--split",
        help="Problems replayed: train, calibration, test or all (learned routers always fit on train).",
    ),
    cost: str = typer.Option(
        "flops",
        "--cost",
        help=(
            "flops: 2N FLOPs per generated token, models and scorers alike, prefill not counted (the seeds' "
            "convention), in TFLOPs; flops+prefill: also 2N per prefilled token; kaplan: 2N + 2 n_layer n_ctx d_model "
            "per generated token (the cascade seed's eq. 2); api: US cents at --price prices; or an installed cost "
            "model (trace replay --list) or FILE.py:Class."
        ),
    ),
    price: list[str] = typer.Option(
        [],
        "--price",
        help=(
            "api prices per model role or scorer of the trace, once each, repeatable: ROLE=MODEL (gpt-4.1-mini, "
            "gpt-4o-mini, ...), ROLE=input/cached/output in USD per 1M tokens (numbers >= 0), or ROLE=0 for a free "
            "(open) model; every role needs one. Example: --price small=0 --price large=gpt-4.1-mini"
        ),
    ),
    worlds: str = typer.Option("all", "--worlds", help="all, or comma-separated world numbers, e.g. 0,1."),
    split_seed: int = typer.Option(0, "--split-seed", help="Seed of the hash that assigns problems to splits."),
    split_fractions: str = typer.Option(
        "0.5,0.1,0.4", "--split-fractions", help="train,calibration,test fractions of the problems."
    ),
    out: Path = typer.Option(
        None, "--out", help="Parquet file for per-problem outcomes (one row per problem x world x configuration)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace the --out file if it exists."),
    max_configs: int = typer.Option(
        DEFAULT_MAX_CONFIGS,
        "--max-configs",
        help=(
            "Most configurations a sweep may have; a larger grid is refused, naming its size and memory. The "
            f"outcomes of more than {STREAM_STATES:,} walk states (configurations x problems x worlds) are streamed "
            "to a file instead of held in memory."
        ),
    ),
    grades: str = GRADES_OPT,
    memory_check: bool = typer.Option(
        True,
        "--memory-check/--no-memory-check",
        help="Refuse a sweep whose memory estimate exceeds the memory available (--no-memory-check: run it anyway).",
    ),
    timeout: float = typer.Option(
        DEFAULT_TIMEOUT,
        "--timeout",
        help="Seconds a trace at a URL (s3://, gs://, ...) has to open; an unreachable store is named after that.",
    ),
) -> None:
    """Replay a router on a cached trace (CPU only) and print accuracy, cost, A/C, large-step share and misses.

    One-way routers (policy; steer mode=switch) walk each (problem, world) so: the small model writes step 1;
    after each small step y, if y is final the walk ends; else if y triggers escalation (policy:
    pi(escalate | features of y) >= kappa; steer: P(low | c) > tau and c below the high component's mean, c =
    conf_max_logit_math of y, mixture of the largest fitted step index <= y's) then with escalate=after
    (default) y is kept and the large model writes every later step, and with escalate=replace y is discarded
    (paid for) and the large model writes that step and every later one, a final y included; else the small
    model writes the next step. steer mode=step discards a triggering step, has the large model write that one
    step, and goes back to the small model. A policy trained on K models (trace train policy on m0, m1, m2)
    continues or escalates to any larger model after each step of the current one, one-way (the largest model
    whose pi >= kappa). A step the trace lacks is a miss (reported, never invented).

    Example: trace replay runs/toy --router steer --param mode=step --sweep tau=0:1:0.01 --out steer.parquet
    """
    import time

    from replay import api
    from replay.splits import parse_fractions
    from tracestore.outputs import check_output_file

    if router == "help":
        _print_registered()
    if out is not None and out.suffix != ".parquet":
        raise TraceError(f"--out must name a .parquet file, got {out}")
    if out is not None:
        check_output_file(out, force=force)
    if max_configs < 1:
        raise TraceError(f"--max-configs must be at least 1, got {max_configs}")
    if worlds == "all":
        world_list = None
    else:
        try:
            world_list = [int(w) for w in worlds.split(",")]
        except ValueError:
            raise typer.BadParameter(f"--worlds must be all or numbers like 0,1, got {worlds!r}") from None
    chosen = api.router(router, **dict(api.parse_param(p) for p in param))
    started = time.perf_counter()
    result = api.replay(
        trace_dir,
        chosen,
        sweep=sweep,
        split=split,
        cost=cost,
        prices=price,
        worlds=world_list,
        split_seed=split_seed,
        fractions=parse_fractions(split_fractions),
        max_configs=max_configs,
        grades=grades,
        timeout=timeout,
        memory_check=memory_check,
    )
    seconds = time.perf_counter() - started
    title = escape(f"{trace_dir}: split {split}, cost {cost} (mean per query)")
    swept = [text.partition("=")[0].strip() for text in sweep]
    console.print(_replay_table(result, swept, title))
    console.print(f"replayed {chosen.name} in {seconds:.2f}s", highlight=False)
    hint = api.slow_sweep_hint(chosen, result, seconds)
    if hint:
        console.print(f"[yellow]{escape(hint)}[/]", highlight=False)
    misses = api.miss_list(result)
    if misses:
        console.print(
            f"[yellow]{result.summary()['misses'].sum():,} walks missed {len(misses):,} distinct uncached "
            "(node, model) steps or scores; their accuracy and cost are left out. First:[/]"
        )
        for miss in misses[:5]:
            what = f"{miss['scorer']} score of step" if miss["scorer"] else "step by"
            console.print(
                escape(f"  {miss['problem_id']} world {miss['world']} node {miss['path']!r}: {what} {miss['model']}"),
                highlight=False,
            )
    if out is not None:
        result.write_outcomes(out, force=force)
        console.print(f"wrote {result.n_outcomes:,} outcomes to {escape(str(out))}", highlight=False)


@app.command()
@user_errors
def report(
    trace_dir: Path = typer.Argument(..., help="Trace directory the results were replayed on."),
    results: list[Path] = typer.Argument(..., help="Outcome files written by trace replay --out (one or more)."),
    out: Path = typer.Option(
        ...,
        "--out",
        help="Report folder: created, or updated if it holds an earlier report; any other non-empty folder is refused.",
    ),
    pick: str = typer.Option(
        "ac",
        "--pick",
        help=(
            "Operating point of a swept router: ac (highest accuracy per cost at or above the floor), cheapest (at or "
            "above the floor) or accuracy (highest)."
        ),
    ),
    accuracy_floor: str = typer.Option(
        "large-0.02",
        "--accuracy-floor",
        help=(
            "Least accuracy an operating point needs: large (large-only's), large-D (D below it, 0-1 scale) or a "
            "number in [0, 1]."
        ),
    ),
    at: list[str] = typer.Option(
        [], "--at", help="Pin a router's configuration instead, e.g. --at steer:tau=0.3 (repeatable)."
    ),
    split: str = typer.Option(
        "test", "--split", help="Report the problems of this split (train, calibration, test), or all for every row."
    ),
    pick_split: str = typer.Option(
        "calibration",
        "--pick-split",
        help=(
            "Choose operating points on this split's problems (never the reported ones, as the seeds do), or "
            "'reported' to choose on the reported rows themselves (labelled so in the report)."
        ),
    ),
    bootstrap: int = typer.Option(
        1000, "--bootstrap", help="Bootstrap resamples of the problems for the 95% intervals."
    ),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    policy_log: Path = typer.Option(
        None,
        "--policy-log",
        help="Policy training log (*.log.parquet: step, coverage, kappa): adds coverage and kappa over training.",
    ),
    steer_gmm: Path = typer.Option(
        None,
        "--steer-gmm",
        help="STEER mixtures JSON: adds the fitted mixtures over the small model's confidence histograms.",
    ),
    table: list[str] = typer.Option(
        [],
        "--table",
        help=(
            "Add a seed's table layout, repeatable: cmdp (methods x Acc, Cost, A/C, as the CMDP seed's Tables 1-2) "
            "or cascade (model chains with accuracy, PD and compute saving, with and without P(IK), and the P(T) "
            "threshold sensitivity, as the cascade seed's Table 1), an installed table (trace replay --list) or "
            "FILE.py:Class; also written as table_NAME.md and .csv."
        ),
    ),
    alpha: float = typer.Option(
        None, "--alpha", help="Policy coverage target is 1 - alpha; default: the log's alpha column, else 0.02."
    ),
    grades: str = typer.Option(
        None,
        "--grades",
        help="Grade set the results were replayed with (trace replay --grades); default: the steps' own grades.",
    ),
) -> None:
    """Compare replayed routers on one page: table with bootstrap intervals, accuracy-cost plot, McNemar tests
    against large-only, escalations by step index (index.html, report.md and PNG figures in --out).

    Example: trace report runs/toy steer.parquet policy.parquet --out runs/toy-report
    """
    from analysis.report import ReportOptions, make_report

    options = ReportOptions(
        pick=pick,
        accuracy_floor=accuracy_floor,
        at=tuple(at),
        split=split,
        pick_split=pick_split,
        bootstrap=bootstrap,
        seed=seed,
        policy_log=policy_log,
        steer_gmm=steer_gmm,
        alpha=alpha,
        tables=tuple(table),
        grades=grades,
    )
    written = make_report(trace_dir, results, out, options)
    console.print(
        f"[green]wrote[/] {escape(str(out / 'index.html'))} and {len(written) - 1} more file(s) in {escape(str(out))}",
        highlight=False,
    )


@app.command()
@user_errors
def audit(
    trace_dir: Path = typer.Argument(..., help="Trace directory (written by trace gen)."),
    sample: int = typer.Option(100, "--sample", help="Steps to regenerate (all of them when the trace has fewer)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sample (stratified over model and depth)."),
    backend: str = typer.Option(
        None, "--backend", help="vllm or hf (default: the engine that wrote the trace; hf cross-checks a vllm trace)."
    ),
    min_identical: float = typer.Option(
        None,
        "--min-identical",
        help="Exit 1 when the share of identical steps is below this (default: 1.0 with the recorded engine, else 0).",
    ),
    out: Path = typer.Option(None, "--out", help="Also write one row per audited step to this .csv file."),
    force: bool = typer.Option(False, "--force", help="Replace the --out file if it exists."),
) -> None:
    """Regenerate a random sample of stored steps and compare them with the cache, token for token.

    Each sampled step (stratified over model and depth) is regenerated with the recorded model, prompt ids,
    sampling settings and the step's own seed; reported: the share identical token for token, where the
    others first diverge (token position, depth), max |delta logprob| and |delta max logit| on the tokens
    that agree, and how many answers or grades changed. The summary is appended to trace.json (audits) and
    shown by trace info. Example: trace audit runs/toy --sample 200 --seed 0 --backend hf
    """
    from analysis.info import audit_table
    from tracegen.audit import AuditOptions, run_audit

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


@app.command()
@user_errors
def regrade(
    trace_dir: Path = typer.Argument(..., help="Trace directory."),
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


@app.command()
@user_errors
def diff(
    a: Path = typer.Argument(..., help="A: a trace directory or a trace replay --out results file."),
    b: Path = typer.Argument(..., help="B: of the same kind as A (may be the same trace, with --grades-a/-b)."),
    grades_a: str = typer.Option(None, "--grades-a", help="Grade set of trace A (default: the steps' own)."),
    grades_b: str = typer.Option(None, "--grades-b", help="Grade set of trace B (default: the steps' own)."),
    config_a: int = typer.Option(
        None, "--config-a", help="Configuration of results file A (needed if it has several)."
    ),
    config_b: int = typer.Option(
        None, "--config-b", help="Configuration of results file B (needed if it has several)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the permutation test (several worlds)."),
    out: Path = typer.Option(None, "--out", help="Also write every (problem, world) pair to this .csv file."),
    force: bool = typer.Option(False, "--force", help="Replace the --out file if it exists."),
    max_ids: int = typer.Option(20, "--max-ids", help="Flipped problem ids to print per direction."),
) -> None:
    """Paired per-problem comparison of two traces, two grade sets of one trace, or two replay results.

    Traces are compared on each model's own chain from the root, results on one configuration each.
    Prints both right / only A / only B / both wrong (per world where there are several), McNemar's
    test (one world) or a paired permutation test over problems (several), and the flipped ids.
    Example: trace diff runs/toy runs/toy --grades-a default --grades-b exact
    """
    from rich.table import Table

    from analysis.diff import ONLY_A, ONLY_B, OUTCOMES, check_out_path, run_diff, write_pairs

    if out is not None:
        check_out_path(out, force=force)
    result = run_diff(a, b, grades_a=grades_a, grades_b=grades_b, config_a=config_a, config_b=config_b, seed=seed)
    console.print(escape(f"A: {result.a}\nB: {result.b}"), highlight=False)
    for comparison in result.comparisons:
        table = Table(title=escape(comparison.label))
        for column in ("world", *OUTCOMES, "no outcome", "McNemar p"):
            table.add_column(column, justify="left" if column == "world" else "right")
        several = comparison.by_world.height > 1
        for row in comparison.by_world.iter_rows(named=True):
            p_value = f"{row['p_value']:.4g}" if several else "-"
            table.add_row(str(row["world"]), *(f"{row[o]:,}" for o in OUTCOMES), f"{row['excluded']:,}", p_value)
        counts = comparison.counts
        if several:
            table.add_row("all", *(f"{counts[o]:,}" for o in OUTCOMES), f"{counts['excluded']:,}", "")
        console.print(table)
        test = comparison.test
        console.print(
            f"{escape(test.test)}: only A {test.only_first:,}, only B {test.only_second:,} of {test.n_pairs:,} pairs, "
            f"statistic {test.statistic:.4g}, p = {test.p_value:.4g}",
            highlight=False,
        )
        for outcome in (ONLY_A, ONLY_B):
            ids = comparison.flipped(outcome)
            if ids:
                shown = ", ".join(ids[:max_ids]) + (f", ... ({len(ids) - max_ids} more)" if len(ids) > max_ids else "")
                console.print(escape(f"  right {outcome}: {shown}"), highlight=False)
    if out is not None:
        rows = write_pairs(result, out, force=force)
        console.print(f"wrote {rows:,} pairs to {escape(str(out))}", highlight=False)


train_app = typer.Typer(
    help="Fit routers' learned parts on a trace's train split (CPU) and save them for replay.", no_args_is_help=True
)
app.add_typer(train_app, name="train")

TRACE_ARG = typer.Argument(..., help="Trace directory.")
SPLIT_SEED_OPT = typer.Option(
    0, "--split-seed", help="Seed of the hash that assigns problems to splits (as in trace replay)."
)
SPLIT_FRACTIONS_OPT = typer.Option(
    "0.5,0.1,0.4",
    "--split-fractions",
    help="train,calibration,test fractions (as in trace replay); fitting uses train only.",
)


@train_app.command("policy")
@user_errors
def train_policy_command(
    trace_dir: Path = TRACE_ARG,
    out: Path = typer.Option(
        Path("policy.pt"), "--out", help="Policy file to write; the training log goes next to it as NAME.log.parquet."
    ),
    force: bool = typer.Option(False, "--force", help="Replace the policy file and its log if they exist."),
    alpha: float = typer.Option(
        0.02, "--alpha", help="Allowed miscoverage: P(correct or large model alone wrong) >= 1 - alpha."
    ),
    steps: int = typer.Option(1000, "--steps", help="Policy updates."),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate of the critics (success and cost)."),
    batch: int = typer.Option(5, "--batch", help="Episodes (problem, world) rolled out per update."),
    eta: float = typer.Option(0.1, "--eta", help="Step size of the kappa update."),
    seed: int = typer.Option(
        0, "--seed", help="Seed of initialisation, episode sampling and actions; same seed, same file bytes."
    ),
    delta: float = typer.Option(
        0.01, "--delta", help="Trust region: mean KL between successive policies at most this (nats)."
    ),
    kappa: float = typer.Option(0.5, "--kappa", help="Initial threshold: escalate iff pi(escalate | o) >= kappa."),
    entropy_coef: float = typer.Option(
        0.05, "--entropy-coef", help="Weight of the policy's entropy in the objective (keeps it from saturating)."
    ),
    features: str = typer.Option(
        None,
        "--features",
        help=(
            "Observation: comma-separated steps columns and/or difficulty (default: "
            "conf_max_logit_math,depth,is_final,n_gen_tokens)."
        ),
    ),
    escalate: str = typer.Option(
        "after",
        "--escalate",
        help=(
            "Decision process: after (the small step that triggers escalation is kept, the large model writes the "
            "steps after it) or replace (that step is discarded and the large model rewrites it); replay the "
            "policy with the same --param escalate."
        ),
    ),
    cost: str = typer.Option(
        "flops",
        "--cost",
        help=(
            "Per-step cost the policy minimises, as trace replay --cost adds it up: flops (TFLOPs of generated "
            "tokens), flops+prefill, kaplan, api (USD; --price), an installed cost model or FILE.py:Class, or tokens "
            "(large-model generated tokens)."
        ),
    ),
    price: list[str] = typer.Option(
        [],
        "--price",
        help=(
            "With --cost api: prices ROLE=input/cached/output in USD per 1M tokens, repeatable; without any, "
            "GPT-4.1-mini rates for both models (as trace replay)."
        ),
    ),
    eta_decay: float = typer.Option(
        0.0,
        "--eta-decay",
        help=(
            "kappa step size at policy step k: eta / k^eta_decay (0: constant, the paper's setting; in (0.5, 1]: "
            "sum eta_k = inf and sum eta_k^2 < inf, the conditions of the paper's guarantee)."
        ),
    ),
    draft: str = typer.Option(
        "", "--draft", help="Role the policy starts on (default: the trace's smallest model, m0 or small)."
    ),
    target: str = typer.Option(
        "",
        "--target",
        help=(
            "Largest role the policy may escalate to (default: the trace's largest). The models in play are "
            "--draft .. --target in size order; with three or more, the action is continue or escalate to any "
            "larger one."
        ),
    ),
    models: str = typer.Option(
        "",
        "--models",
        help="Models in play as comma-separated roles, smallest first, any subset (e.g. m0,m2); instead of "
        "--draft/--target.",
    ),
    split_seed: int = SPLIT_SEED_OPT,
    split_fractions: str = SPLIT_FRACTIONS_OPT,
) -> None:
    """Train the escalation policy of --router policy (CMDP, V-trace critics, CPO steps, calibrated kappa).

    Decisions (escalate=after): after each non-final small step t the policy reads that step's features and
    continues with the small model or escalates (the large model writes steps t+1, t+2, ... to the end). Critics:
    V-trace toward the thresholded policy S(a|o) = 1{pi(a|o) >= kappa} / #{a': pi(a'|o) >= kappa}, rho = min(2,
    S/pi). CPO step: cost in --cost units (scaled by the large model alone's mean cost) under the
    constraint P(correct or large alone wrong) >= 1 - alpha computed exactly under S on the train split. kappa:
    kappa - eta (1 - coverage - alpha) after each step, coverage of the deployed rule (escalate iff
    pi(escalate | o) >= kappa) on fresh train episodes. Only the train split is read.

    K models in play (e.g. m0, m1, m2): after each non-final step of the current model the action is continue or
    escalate to any larger model (one-way; a middle model decides again); the policy also sees which model it
    is on; deployed: the largest model whose pi >= kappa. Escalations the trace cannot play out (m0 -> m1 -> m2
    on a comb) are left out of training; replays report them as misses for trace gen --expand closure.

    Example: trace train policy runs/toy --alpha 0.02 --steps 1000 --seed 0 --out policy.pt
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from replay.costs import parse_price
    from replay.splits import parse_fractions
    from replay.train_policy import DEFAULT_FEATURES, Hyperparameters, train_policy

    chosen = tuple(name.strip() for name in features.split(",") if name.strip()) if features else DEFAULT_FEATURES
    hp = Hyperparameters(
        alpha=alpha,
        steps=steps,
        lr=lr,
        batch=batch,
        eta=eta,
        seed=seed,
        delta=delta,
        kappa=kappa,
        entropy_coef=entropy_coef,
        features=chosen,
        escalate=escalate,
        cost=cost,
        prices=tuple(parse_price(p) for p in price),
        eta_decay=eta_decay,
        split_seed=split_seed,
        split_fractions=parse_fractions(split_fractions),
    )
    columns = (
        TextColumn("training"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[state]}"),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("train", total=steps, state="")

        def show(row):
            progress.update(
                task,
                completed=row["step"],
                state=f"kappa {row['kappa']:.3f} coverage {row['coverage']:.2f} case {row['case']}",
            )

        result = train_policy(trace_dir, out, hp, on_step=show, force=force, draft=draft, target=target, models=models)
    if not result.has_verifier:
        console.print(
            "no verifier scores in the trace: a trajectory is covered when correct or the large model alone is wrong"
        )
    if result.best_coverage < 1 - alpha:
        console.print(
            f"[yellow]no policy reaches coverage {1 - alpha:g} on the train split with escalate={result.escalate}: "
            f"at most {result.best_coverage:.4f} (episodes where no escalation point is right while the large model "
            "alone is)[/]"
        )
    console.print(
        f"[green]wrote[/] {escape(str(result.policy_path))} and {escape(str(result.log_path))}: "
        f"kappa {result.kappa:.4f}; on the "
        f"{result.n_train_episodes:,} train episodes (escalate={result.escalate}) coverage "
        f"{result.train_coverage:.4f} (target >= {1 - alpha:g}), accuracy {result.train_accuracy:.4f}, cost "
        f"{result.train_cost:.4g} {result.cost_unit} per query ({result.train_cost_share:.4f} of the large model "
        f"alone); {result.seconds:.1f}s"
    )


@train_app.command("pik")
@user_errors
def train_pik_command(
    trace_dir: Path = TRACE_ARG,
    model: str = typer.Option(
        "small", "--model", help="Model role(s) to probe, comma-separated (all but the largest of a cascade)."
    ),
    layer: str = typer.Option(
        "auto",
        "--layer",
        help="Layer of the stored prompt hidden state: auto (the paper's 24 when the model has more layers, else "
        "the last), or a number (-1 = last).",
    ),
    where: str = typer.Option("prompt_last", "--where", help="Position of the stored hidden state."),
    out: Path = typer.Option(Path("pik.joblib"), "--out", help="Probe file for --router cascade --param probe=FILE."),
    force: bool = typer.Option(False, "--force", help="Replace the probe file if it exists."),
    seed: int = typer.Option(0, "--seed", help="Seed of the probes and of the 80/10/10 fit/validation/test division."),
    split_seed: int = SPLIT_SEED_OPT,
    split_fractions: str = SPLIT_FRACTIONS_OPT,
) -> None:
    """Fit the cascade's P(IK) probes (MLP on the prompt hidden state predicting the model's own correctness).

    Example: trace train pik runs/toy --model small --out pik.joblib
    """
    from rich.table import Table

    from replay.splits import parse_fractions
    from replay.train_pik import train_pik

    models = [role.strip() for role in model.split(",") if role.strip()]
    reports, layers = train_pik(
        trace_dir,
        out,
        models,
        layer=layer,
        where=where,
        seed=seed,
        split_seed=split_seed,
        fractions=parse_fractions(split_fractions),
        force=force,
    )
    table = Table(title=f"P(IK) probes ({where}): test part of the train split")
    for name in ("Model", "Layer", "Fit / val / test", "Correct (fit)", "L2", "Accuracy", "F1", "AUROC"):
        table.add_column(name, justify="left" if name == "Model" else "right")
    for r in reports:
        table.add_row(
            r.model,
            str(layers[r.model]),
            f"{r.n_fit:,} / {r.n_validation:,} / {r.n_test:,}",
            f"{100 * r.positive_rate:.1f}%",
            f"{r.l2:g}",
            f"{r.test_accuracy:.3f}",
            f"{r.test_f1:.3f}",
            "-" if r.test_auroc != r.test_auroc else f"{r.test_auroc:.3f}",
        )
    console.print(table)
    console.print(f"[green]wrote[/] {escape(str(out))}", highlight=False)


@train_app.command("steer")
@user_errors
def train_steer_command(
    trace_dir: Path = TRACE_ARG,
    out: Path = typer.Option(
        Path("steer.json"),
        "--out",
        help="Mixture file for --router steer --param gmms=FILE and trace report --steer-gmm.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace the mixture file if it exists."),
    min_samples: int = typer.Option(
        10,
        "--min-samples",
        help="Step indices with fewer train confidences use the mixture of the largest fitted index below.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the mixtures' initialisation."),
    split_seed: int = SPLIT_SEED_OPT,
    split_fractions: str = SPLIT_FRACTIONS_OPT,
) -> None:
    """Fit STEER's two-component Gaussian mixtures of the small model's step confidence, per step index.

    The router then uses, at step index d, the mixture of the largest fitted index <= d, and calls a small step
    with confidence c unconfident iff P(low | c) > tau and c is below the other component's mean (low = the
    component with the lower mean). On a trace of K models every model but the largest gets its own mixtures
    (STEER escalates along m0 -> m1 -> ..., judging each model's steps by its own).

    Example: trace train steer runs/toy --out steer.json
    """
    from rich.table import Table

    from replay.splits import parse_fractions
    from replay.train_steer import train_steer

    if min_samples < 2:
        raise typer.BadParameter(f"--min-samples must be at least 2, got {min_samples}")
    rows = train_steer(
        trace_dir,
        out,
        min_samples=min_samples,
        seed=seed,
        split_seed=split_seed,
        fractions=parse_fractions(split_fractions),
        force=force,
    )
    table = Table(title="STEER mixtures of conf_max_logit_math (train split)")
    several = rows["model"].n_unique() > 1
    for name in ("Model",) * several + ("Step", "n", "Low mean", "Low sd", "Low weight", "High mean", "High sd"):
        table.add_column(name, justify="right")
    for row in rows.iter_rows(named=True):
        table.add_row(
            *(row["model"],) * several,
            str(row["depth"]),
            f"{row['n']:,}",
            f"{row['low_mean']:.4g}",
            f"{row['low_std']:.3g}",
            f"{row['low_weight']:.3f}",
            f"{row['high_mean']:.4g}",
            f"{row['high_std']:.3g}",
        )
    console.print(table)
    console.print(f"[green]wrote[/] {escape(str(out))}", highlight=False)


if __name__ == "__main__":
    app()
