"""Phase two, on a CPU: `trace replay` (and `--list`, what is installed)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from commands.console import console
from commands.options import (
    FORCE,
    GRADES,
    cost_option,
    out_option,
    parameter_default,
    price_option,
    split_fractions_option,
    split_option,
    split_seed_option,
    trace_dir_argument,
)
from replay import api
from replay.params import STREAM_STATES, SweepLimits
from replay.routers import ROUTERS
from tracestore.errors import TraceError
from tracestore.remote import open_remote


def _replay_table(result, swept: list[str], title: str, idle: tuple[str, ...] = (), max_rows: int = 21):
    """Rich table of a replay summary, one row per configuration (evenly thinned for long sweeps)."""
    import json

    from rich.table import Table

    from replay.params import params_text

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
    for name in ("Acc", f"Cost ({result.cost_unit})", f"A/C ({result.a_over_c_unit})", "Large steps", "Misses"):
        table.add_column(name, justify="right")
    for row in rows:
        params = json.loads(row["params"])
        shown = (
            {k: params[k] for k in swept}
            if swept
            else {k: v for k, v in params.items() if v not in ("", None) and k not in idle}
        )
        table.add_row(
            row["router"],
            escape(params_text(shown, separator=" ")),
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
        "per generated token (the cascade seed's eq. 2); api: US cents at --price prices; or an installed cost "
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

    from replay.splits import parse_fractions
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
    started = time.perf_counter()
    result = api.replay(
        api.open_trace(trace_dir, timeout=timeout),
        chosen,
        sweep=sweep,
        split=split,
        cost=cost,
        prices=price,
        worlds=world_list,
        split_seed=split_seed,
        fractions=parse_fractions(split_fractions),
        grades=grades,
        limits=SweepLimits(max_configs, memory_check),
    )
    seconds = time.perf_counter() - started
    title = escape(f"{trace_dir}: split {split}, cost {cost} (mean per query)")
    swept = [text.partition("=")[0].strip() for text in sweep]
    idle = chosen.idle_params(chosen.get_params())  # e.g. a cascade's t_ik without P(IK)
    console.print(_replay_table(result, [name for name in swept if name not in idle], title, idle))
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
