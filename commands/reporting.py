"""Phase two's results: `trace report` (one page comparing replayed routers) and `trace diff` (two traces, grade
sets or results, problem by problem)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from analysis.options import DEFAULT_ALPHA, ReportOptions
from commands.console import console
from commands.options import FORCE, grades_option, out_option, seed_option, split_option, trace_dir_argument


def report(
    trace_dir: Path = trace_dir_argument("Trace directory the results were replayed on."),
    results: list[Path] = typer.Argument(..., help="Outcome files written by trace replay --out (one or more)."),
    out: Path = out_option(
        "Report folder: created, or updated if it holds an earlier report; any other non-empty folder is refused.", ...
    ),
    pick: str = typer.Option(
        ReportOptions.pick,
        "--pick",
        help=(
            "Operating point of a swept router: ac (highest accuracy per cost at or above the floor), cheapest (at or "
            "above the floor) or accuracy (highest)."
        ),
    ),
    accuracy_floor: str = typer.Option(
        ReportOptions.accuracy_floor,
        "--accuracy-floor",
        help=(
            "Least accuracy an operating point needs: large (large-only's), large-D (D below it, 0-1 scale) or a "
            "number in [0, 1]."
        ),
    ),
    at: list[str] = typer.Option(
        [], "--at", help="Pin a router's configuration instead, e.g. --at steer:tau=0.3 (repeatable)."
    ),
    split: str = split_option(
        "Report the problems of this split (train, calibration, test), or all for every row.", ReportOptions.split
    ),
    pick_split: str = typer.Option(
        ReportOptions.pick_split,
        "--pick-split",
        help=(
            "Choose operating points on this split's problems (never the reported ones, as the seeds do), or "
            "'reported' to choose on the reported rows themselves (labelled so in the report)."
        ),
    ),
    pick_on: list[Path] = typer.Option(
        [],
        "--pick-on",
        help=(
            "Choose operating points on these results instead (trace replay --out of the same routers and sweeps on a "
            "calibration trace or split): a file, a folder of them or a quoted glob, repeatable, e.g. --pick-on "
            "results-calibration/. The trace they were replayed on must share this one's models, revisions, "
            "templates, sampling and scorers."
        ),
    ),
    allow_overlap: bool = typer.Option(
        ReportOptions.allow_overlap,
        "--allow-overlap",
        help="Report rows whose problems a router was fitted on, or its operating point picked on (refused otherwise).",
    ),
    bootstrap: int = typer.Option(
        ReportOptions.bootstrap, "--bootstrap", help="Bootstrap resamples of the problems for the 95% intervals."
    ),
    seed: int = seed_option("Bootstrap seed.", ReportOptions.seed),
    policy_log: list[Path] = typer.Option(
        [],
        "--policy-log",
        help=(
            "Policy training log (*.log.parquet: step, coverage, kappa), repeatable: adds coverage and kappa over "
            "training. The log beside each replayed policy file (NAME.log.parquet next to NAME.pt) is found without it."
        ),
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
        None,
        "--alpha",
        help=f"Policy coverage target is 1 - alpha; default: the log's alpha column, else {DEFAULT_ALPHA:g}.",
    ),
    grades: str = grades_option(
        "Grade set the results were replayed with (trace replay --grades); default: the steps' own grades."
    ),
    latency_profile: Path = typer.Option(
        None,
        "--latency-profile",
        help=(
            "Latency profile (trace profile) for a Latency section (mean, p50, p95 seconds per query, accuracy "
            "against latency) and a Time column in --table cmdp and cascade; default TRACE_DIR/latency.json if any."
        ),
    ),
) -> None:
    """Compare replayed routers on one page: table with bootstrap intervals, accuracy-cost plot, McNemar tests
    against large-only, escalations by step index (index.html, report.md and PNG figures in --out); with a
    latency profile, seconds per query and accuracy against latency.

    Example: trace report runs/toy steer.parquet policy.parquet --out runs/toy-report
    """
    from analysis.report import make_report

    options = ReportOptions(
        pick=pick,
        accuracy_floor=accuracy_floor,
        at=tuple(at),
        split=split,
        pick_split=pick_split,
        pick_on=tuple(pick_on),
        allow_overlap=allow_overlap,
        bootstrap=bootstrap,
        seed=seed,
        policy_log=tuple(policy_log),
        steer_gmm=steer_gmm,
        alpha=alpha,
        tables=tuple(table),
        grades=grades,
        latency_profile=latency_profile,
    )
    written = make_report(trace_dir, results, out, options)
    console.print(
        f"[green]wrote[/] {escape(str(out / 'index.html'))} and {len(written) - 1} more file(s) in {escape(str(out))}",
        highlight=False,
    )


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
    seed: int = seed_option("Seed of the permutation test (several worlds).", 0),
    out: Path = out_option("Also write every (problem, world) pair to this .csv file."),
    force: bool = FORCE,
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
