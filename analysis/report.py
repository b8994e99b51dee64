"""`trace report`: one page comparing routers from `trace replay --out` results on the trace they came from.

The page (``index.html``, its Markdown twin ``report.md`` and PNG figures next to them) holds:
- the seeds' Table 1: each router at its operating point plus small-only and large-only, with
  accuracy, mean cost per query, A/C, share of large-model steps and misses, and 95% bootstrap
  intervals (problems resampled, the worlds of a problem kept together);
- an accuracy-cost plot (a curve per swept router, a point per single model or fixed router);
- a paired test of every router against large-only: McNemar's on (problem, world) with one world, a
  permutation test with the problem as the unit with several;
- where escalations happen: the share of large-model steps by step index, from each walk's path;
- with ``policy_log``: coverage against 1 - alpha and kappa over policy training;
- with ``steer_gmm``: STEER's fitted mixtures over the histogram of the small model's confidences.

Which configuration of a swept router is shown (its operating point) is in analysis.operating_points;
what is read and checked, in analysis.report_inputs; the text, figures and HTML page, in analysis.render.

Every number comes from the results files and the trace; small-only and large-only, when no
results file holds them, are replayed here on the same problems, worlds and cost model. The same
inputs give the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from analysis.operating_points import PICK_RULES, choose_operating_points, parse_pin, table_row
from analysis.options import ReportOptions
from analysis.render import (
    FIGURES,
    GENERATOR,
    escalation_section,
    header_section,
    pareto_section,
    policy_section,
    render_html,
    significance_section,
    steer_section,
    table_section,
)
from analysis.report_inputs import (
    Run,
    check_against_trace,
    check_same_walks,
    label_runs,
    mark_policy_runs,
    read_policy_log,
    read_steer_mixtures,
    replay_baseline,
    result_input,
    select_splits,
    split_runs,
)
from analysis.stats import bootstrap_counts
from analysis.tables import TABLES, TableInputs
from tracestore.atomic import write_atomic
from tracestore.errors import TraceError
from tracestore.grades import graded_steps
from tracestore.outputs import check_outside_trace
from tracestore.store import open_trace

PAGE, MARKDOWN = "index.html", "report.md"


def table_files(name: str) -> tuple[str, str]:
    """The Markdown and CSV files of table ``name``."""
    return f"table_{name}.md", f"table_{name}.csv"


REPORT_FILES = (
    PAGE,
    MARKDOWN,
    *FIGURES.values(),
    *(f for name in TABLES.names(installed=False) for f in table_files(name)),
)
BASELINES = ("small-only", "large-only")


@dataclass
class Report:
    markdown: str
    figures: dict[str, bytes]  # file name -> PNG
    tables: dict[str, bytes] = field(default_factory=dict)  # file name -> the seeds' tables as Markdown and CSV

    def files(self) -> dict[str, bytes]:
        page = render_html(self.markdown).encode()
        return {MARKDOWN: self.markdown.encode(), PAGE: page, **self.figures, **self.tables}


# ---------------------------------------------------------------------- the report


def build_report(trace_dir, result_paths: list, options: ReportOptions) -> Report:
    """Read, check and compare; everything in memory (nothing is written here). ``result_paths``: results
    files of `trace replay --out`, or replay results in memory (replay.results.ReplayResult, or its
    outcomes DataFrame), in any mix."""
    if not result_paths:
        raise TraceError("give at least one results file from trace replay --out")
    if options.pick not in PICK_RULES:
        raise TraceError(f"--pick must be one of {', '.join(PICK_RULES)}, got {options.pick!r}")
    if options.bootstrap < 1:
        raise TraceError(f"--bootstrap must be at least 1, got {options.bootstrap}")
    layouts = [TABLES.get(name)() for name in options.tables]
    pins = [(text, *parse_pin(text)) for text in options.at]
    policy_log = read_policy_log(options.policy_log, options.alpha) if options.policy_log is not None else None
    steer_mixtures = read_steer_mixtures(options.steer_gmm) if options.steer_gmm is not None else None
    trace = open_trace(trace_dir)
    roles = trace.manifest.roles
    problem_ids = trace.scan("problems").select("problem_id").collect()["problem_id"]
    steps = trace.scan("steps").select(
        "step_id", "problem_id", "world", "path", "model", "depth", "is_final", "answer", "correct"
    )
    steps = graded_steps(trace, steps.collect(), options.grades)
    worlds = sorted(steps["world"].unique().to_list())
    finals = steps.filter(pl.col("is_final")).select(
        "problem_id", "world", "path", trace_correct="correct", in_trace=pl.lit(True)
    )
    runs: list[Run] = []
    sources = []
    for index, item in enumerate(result_paths, 1):
        frame, source = result_input(item, index, roles)
        check_against_trace(frame, source, trace_dir, problem_ids, worlds, finals)
        runs += split_runs(frame, source)
        sources.append(source)
    cost_models = sorted(
        {
            row
            for run in runs
            for row in run.outcomes.select("cost_model", "cost_unit", "cost_convention", "a_over_c_unit")
            .unique()
            .rows()
        }
    )
    if len(cost_models) > 1:
        raise TraceError(
            "the results use different cost models ("
            + ", ".join(f"{m} in {u}" for m, u, _, _ in cost_models)
            + "): replay every router with the same --cost"
        )
    cost_model, cost_unit, cost_convention, a_over_c_unit = cost_models[0]
    walks = check_same_walks(runs)
    baselines = {}
    for name in BASELINES:
        given = [run for run in runs if run.router == name]
        if len(given) > 1:
            raise TraceError(f"{name} appears in {given[0].source} and {given[1].source}; pass it once")
        baselines[name] = given[0] if given else replay_baseline(name, trace, walks, cost_model, grades=options.grades)
    routers = [run for run in runs if run.router not in BASELINES]
    everyone = [baselines["small-only"], baselines["large-only"], *routers]
    select_splits(everyone, options)
    for run in everyone:
        if run.swept and run.router in BASELINES:
            raise TraceError(f"{run.source}: {run.router} has {len(run.params)} configurations; expected one")
    label_runs(everyone, roles)
    mark_policy_runs(everyone)

    floor_text = choose_operating_points(everyone, routers, baselines["large-only"], pins, options, roles)

    problems = sorted(everyone[0].rows["problem_id"].unique().to_list())
    counts = bootstrap_counts(len(problems), options.bootstrap, options.seed)
    table = [table_row(run, problems, counts, roles) for run in everyone]
    figures: dict[str, bytes] = {}
    sections = [
        header_section(
            trace_dir,
            trace.manifest,
            roles,
            sources,
            everyone,
            problems,
            cost_model,
            cost_unit,
            cost_convention,
            a_over_c_unit,
            options,
        ),
        table_section(table, cost_unit, a_over_c_unit, options, floor_text, any(run.swept for run in routers)),
        pareto_section(everyone, roles, cost_unit, figures),
        significance_section(everyone, baselines["large-only"], options.seed),
        escalation_section(routers, roles, figures),
    ]
    if policy_log is not None:
        sections.append(policy_section(options.policy_log, *policy_log, figures))
    if steer_mixtures is not None:
        sections.append(steer_section(options.steer_gmm, *steer_mixtures, trace, figures))

    def alone(role: str) -> Run:  # for a table: one of the trace's models alone, on the reported rows
        run = replay_baseline("only", trace, walks, cost_model, {"model": role}, options.grades)
        select_splits([*everyone, run], options)
        return run

    inputs = TableInputs(
        table,
        routers,
        baselines,
        roles,
        trace.manifest.dataset_name or "?",
        cost_unit,
        alone,
        a_over_c_unit=a_over_c_unit,
        manifest=trace.manifest,
        seed=options.seed,
    )
    tables = {}
    for layout in layouts:
        frame = layout.frame(inputs)
        if not isinstance(frame, pl.DataFrame):
            raise TraceError(f"table {layout.name}: frame returned a {type(frame).__name__}, not a polars DataFrame")
        markdown = layout.markdown(frame, inputs)
        sections.append(markdown)
        md_file, csv_file = table_files(layout.name)
        tables[md_file] = (markdown + "\n").encode()
        tables[csv_file] = _csv_bytes(frame)
    return Report("\n\n".join(sections) + "\n", figures, tables)


def _csv_bytes(frame: pl.DataFrame) -> bytes:
    return frame.write_csv().encode()


# ---------------------------------------------------------------------- the output folder


def is_previous_report(folder: Path) -> bool:
    page = folder / PAGE
    try:
        return f'<meta name="generator" content="{GENERATOR}">' in page.read_text(errors="replace")[:2000]
    except OSError:
        return False


def check_out_dir(out: Path) -> None:
    """``out`` may be new, empty, or hold an earlier report (which is updated); anything else is refused,
    and so is a folder inside a trace's tables."""
    check_outside_trace(out)
    if out.exists() and not out.is_dir():
        raise TraceError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not is_previous_report(out):
        raise TraceError(f"--out {out} holds files that are not a trace report; choose a new or empty folder")


def write_report(report: Report, out: Path) -> list[Path]:
    """Write the report's files into ``out`` (each atomically) and remove figures of an earlier report
    that this one lacks; other files in ``out`` are left alone."""
    check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    files = report.files()
    written = []
    for name, data in files.items():
        target = out / name
        write_atomic(target, data)
        written.append(target)
    for name in REPORT_FILES:
        if name not in files and (out / name).exists():
            (out / name).unlink()
    return written


def make_report(trace_dir, result_paths: list, out: Path, options: ReportOptions) -> list[Path]:
    """Check ``out``, build the report in memory, then write it: bad input leaves ``out`` untouched."""
    check_out_dir(out)
    return write_report(build_report(trace_dir, result_paths, options), out)


def report(trace_dir, results: list, *, out=None, **options) -> Report:
    """Compare replay results on one page: the Python form of `trace report`.

    ``results``: replay results (``replay.api.replay``'s), their outcomes DataFrames or `trace replay --out`
    files, in any mix; ``options``: the fields of ``ReportOptions`` (pick, accuracy_floor, split, pick_split,
    bootstrap, seed, tables, ...). With ``out``, the page is also written there (as `trace report --out`).
    Returns the report: ``markdown`` (the page's text), ``figures`` and ``tables`` (file name -> bytes).
    """
    options = ReportOptions(**{k: tuple(v) if k in ("at", "tables") else v for k, v in options.items()})
    if out is not None:
        check_out_dir(Path(out))
    built = build_report(trace_dir, results, options)
    if out is not None:
        write_report(built, Path(out))
    return built
