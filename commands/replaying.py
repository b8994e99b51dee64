"""Phase two, on a CPU: `trace replay` (and `--list`, what is installed)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from commands.console import console
from commands.options import (
    FORCE,
    GRADES,
    LATENCY_PROFILE,
    cost_option,
    out_option,
    parameter_default,
    price_option,
    split_by_option,
    split_fractions_option,
    split_option,
    split_seed_option,
    split_spec,
    trace_dir_argument,
)
from replay import api
from replay.artifacts import describe_record
from replay.params import STREAM_STATES, SweepLimits, params_text
from replay.routers import ROUTERS
from tracestore.errors import TraceError
from tracestore.remote import open_remote


def _print_registered() -> None:
    """`trace replay --list`: every router, scorer, cost model, backend and report table, where it comes from,
    and exit."""
    from rich.table import Table

    from analysis.tables import TABLES
    from replay.costs import COSTS
    from tracegen.backends import BACKENDS
    from tracegen.scorers import SCORERS

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


def replay(
    trace_dir: str = trace_dir_argument("Trace directory, or a URI read in place (s3://bucket/path, gs://...)."),
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
    split: str = split_option(
        "Problems replayed: train, calibration, test or all (learned routers always fit on train).",
        parameter_default(api.replay, "split"),
    ),
    cost: str = cost_option(
        "flops: 2N FLOPs per generated token, models and scorers alike, prefill not counted (the seeds' "
        "convention), in TFLOPs; flops+prefill: also 2N per prefilled token; kaplan: 2N + 2 n_layer n_ctx d_model "
        "per generated token (the cascade seed's eq. 2); api: US cents at --price prices; latency: serial seconds "
        "per query from a latency profile (--latency-profile); or an installed cost "
        "model (trace replay --list) or FILE.py:Class.",
        parameter_default(api.replay, "cost"),
    ),
    price: list[str] = price_option(
        "api prices per model role or scorer of the trace, once each, repeatable: ROLE=MODEL (gpt-4.1-mini, "
        "gpt-4o-mini, ...), ROLE=input/cached/output in USD per 1M tokens (numbers >= 0), or ROLE=0 for a free "
        "(open) model; every role needs one. Example: --price small=0 --price large=gpt-4.1-mini"
    ),
    worlds: str = typer.Option("all", "--worlds", help="all, or comma-separated world numbers, e.g. 0,1."),
    split_seed: int = split_seed_option("Seed of the hash that assigns problems to splits."),
    split_fractions: str = split_fractions_option("train,calibration,test fractions of the problems."),
    split_by: str = split_by_option(),
    fit_on: str = typer.Option(
        None,
        "--fit-on",
        help=(
            "Fit the router on this trace's train split (and calibration split) instead, as the split options divide "
            "it: train here, evaluate there. Its models, revisions, templates and sampling must match (a mismatch "
            "names the field)."
        ),
    ),
    allow_overlap: bool = typer.Option(
        parameter_default(api.replay, "allow_overlap"),
        "--allow-overlap",
        help="Replay a split even where the router's fit (here, --fit-on, or a fitted file) saw its problems.",
    ),
    out: Path = out_option("Parquet file for per-problem outcomes (one row per problem x world x configuration)."),
    force: bool = FORCE,
    max_configs: int = typer.Option(
        parameter_default(SweepLimits, "max_configs"),
        "--max-configs",
        help=(
            "Most configurations a sweep may have; a larger grid is refused, naming its size and memory. The "
            f"outcomes of more than {STREAM_STATES:,} walk states (configurations x problems x worlds) are streamed "
            "to a file instead of held in memory."
        ),
    ),
    grades: str = GRADES,
    memory_check: bool = typer.Option(
        parameter_default(SweepLimits, "memory_check"),
        "--memory-check/--no-memory-check",
        help="Refuse a sweep whose memory estimate exceeds the memory available (--no-memory-check: run it anyway).",
    ),
    timeout: float = typer.Option(
        parameter_default(open_remote, "timeout"),
        "--timeout",
        help="Seconds a trace at a URL (s3://, gs://, ...) has to open; an unreachable store is named after that.",
    ),
    latency_profile: Path = LATENCY_PROFILE,
    show_all: bool = typer.Option(
        False,
        "--all",
        help=(
            "Print every configuration: by default a sweep of two or more parameters prints its frontier (the "
            "cheapest configuration at each accuracy) and a long one-parameter sweep an even sample of it."
        ),
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

    from tracestore.outputs import check_output_file

    if router == "help":
        _print_registered()
    if out is not None and out.suffix != ".parquet":
        raise TraceError(f"--out must name a .parquet file, got {out}")
    if out is not None:
        check_output_file(out, force=force)
    if worlds == "all":
        world_list = None
    else:
        try:
            world_list = [int(w) for w in worlds.split(",")]
        except ValueError:
            raise typer.BadParameter(f"--worlds must be all or numbers like 0,1, got {worlds!r}") from None
    chosen = api.router(router, **dict(api.parse_param(p) for p in param))
    splits = split_spec(split_seed, split_fractions, split_by)
    started = time.perf_counter()
    if fit_on is not None:
        chosen = api.fit(chosen, fit_on, splits=splits, grades=grades)
    result = api.replay(
        api.open_trace(trace_dir, timeout=timeout),
        chosen,
        sweep=sweep,
        split=split,
        cost=cost,
        prices=price,
        worlds=world_list,
        splits=splits,
        allow_overlap=allow_overlap,
        grades=grades,
        limits=SweepLimits(max_configs, memory_check),
        latency_profile=latency_profile,
    )
    seconds = time.perf_counter() - started
    from analysis.misses import closure_advice, routers_toml
    from analysis.replay_table import replay_table

    swept = [text.partition("=")[0].strip() for text in sweep]
    given = dict(api.parse_param(text) for text in param)
    title = escape(
        f"{chosen.name}"
        + (f" ({params_text(given)})" if given else "")
        + f" on {trace_dir}: split {split}, cost model {cost}, means per query"
    )
    idle = chosen.idle_params(chosen.get_params())  # e.g. a cascade's t_ik without P(IK)
    shown = [name for name in swept if name not in idle]
    summary = result.summary()
    console.print(
        replay_table(summary, result.cost_unit, result.a_over_c_unit, shown, title, show_all, console.width, idle)
    )
    console.print(f"replayed {chosen.name} in {seconds:.2f}s", highlight=False)
    for record in chosen.fitted_on_:
        console.print(f"fitted: {escape(describe_record(record))}", highlight=False)
    overlap = result.outcomes.filter("fit_overlap")["problem_id"].n_unique()
    if overlap:
        console.print(
            f"[yellow]{overlap:,} problem(s) replayed here were among those the router was fitted on (marked "
            "fit_overlap); trace report refuses to report or pick on them unless --allow-overlap[/]",
            highlight=False,
        )
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
        console.print(escape(closure_advice(trace_dir)), highlight=False)
        console.print(escape(routers_toml(router, given, sweep)), highlight=False, soft_wrap=True)
    if out is not None:
        result.write_outcomes(out, force=force)
        console.print(f"wrote {result.n_outcomes:,} outcomes to {escape(str(out))}", highlight=False)
