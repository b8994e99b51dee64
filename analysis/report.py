"""`trace report`: one page comparing routers from `trace replay --out` results on the trace they came from.

The page (``index.html``, its Markdown twin ``report.md`` and PNG figures next to them) holds:
- a summary: the routers on the cost-accuracy frontier, each router's accuracy and cost against large-only
  with the paired test's p-value, the dominated ones (analysis.summary);
- the seeds' Table 1: each router at its operating point plus small-only and large-only, with
  accuracy, mean cost per query (in a unit chosen for the data, analysis.units), A/C against large-only's,
  share of large-model steps and misses, and 95% bootstrap intervals (problems resampled, the worlds of a
  problem kept together); rows by cost within the accuracy floor, then below it, then those with misses;
- an accuracy-cost plot (each swept router's own frontier, a point per single model or fixed router, the
  large-only and floor reference lines);
- a paired test of every router against large-only: McNemar's on (problem, world) with one world, a
  permutation test with the problem as the unit with several;
- where escalations happen: the share of large-model steps by step index, from each walk's path;
- every policy's training (coverage against 1 - alpha, kappa): the log beside each policy file of the results,
  and those given with ``policy_log``;
- with ``steer_gmm``: STEER's fitted mixtures over the histogram of the small model's confidences, a warning
  where one rests on few samples or a collapsed component.

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

from analysis.latency import latency_section, report_latencies
from analysis.operating_points import (
    PICK_RULES,
    calibration_accuracy,
    choose_operating_points,
    parse_floor,
    parse_pin,
    table_row,
)
from analysis.options import ALL_ROWS, REPORTED_ROWS, ReportOptions
from analysis.protocol import attach_pick_on, check_overlaps, mark_dominated
from analysis.render import (
    FIGURES,
    GENERATOR,
    Figures,
    escalation_section,
    header_section,
    pareto_section,
    render_html,
    significance_section,
    table_section,
)
from analysis.report_inputs import (
    Run,
    check_against_trace,
    check_same_walks,
    label_runs,
    mark_policy_runs,
    read_steer_mixtures,
    replay_baseline,
    result_input,
    select_splits,
    split_runs,
)
from analysis.stats import bootstrap_counts
from analysis.summary import paired_tests, standings, summary_section
from analysis.tables import TABLES, TableInputs
from analysis.training_sections import find_policy_logs, policy_section, steer_section
from analysis.units import cost_scale
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
    figure_series: dict[str, tuple] = field(default_factory=dict)  # file name -> (label, colour, marker) per series

    def files(self) -> dict[str, bytes]:
        page = render_html(self.markdown).encode()
        return {MARKDOWN: self.markdown.encode(), PAGE: page, **self.figures, **self.tables}

    def __repr__(self) -> str:
        title = self.markdown.splitlines()[0].lstrip("# ") if self.markdown else ""
        return (
            f"<Report {title!r}: report.md of {len(self.markdown):,} characters; figures "
            f"{', '.join(self.figures) or 'none'}; tables {', '.join(self.tables) or 'none'}>"
        )


# ---------------------------------------------------------------------- the report


def _reported_floor(options: ReportOptions, large_accuracy: float | None) -> tuple[float | None, str]:
    """The accuracy floor on the reported rows (relative floors to large-only's accuracy there)."""
    try:
        return parse_floor(options.accuracy_floor, large_accuracy)
    except TraceError:  # large-only missed on these rows: there is no floor relative to it
        return None, "none: large-only's walks missed"


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
    if options.pick_on:
        attach_pick_on(everyone, options.pick_on, roles, trace.manifest, trace_dir, cost_model, options.grades)
    check_overlaps(everyone, options.allow_overlap, options.pick_split == REPORTED_ROWS and not options.pick_on)
    policy_logs, unmatched_policies = find_policy_logs(options.policy_log, routers, options.alpha)

    floor_text = choose_operating_points(everyone, routers, baselines["large-only"], pins, options, roles)

    problems = sorted(everyone[0].rows["problem_id"].unique().to_list())
    counts = bootstrap_counts(len(problems), options.bootstrap, options.seed)
    table = [
        table_row(run, problems, counts, roles, calibration_accuracy(run, roles, options.bootstrap, options.seed))
        for run in everyone
    ]
    mark_dominated(table)
    large_row = table[1]
    scale = cost_scale(cost_unit, [row.cost.value for row in table])
    floor, reported_floor = _reported_floor(options, large_row.accuracy.value if large_row.misses == 0 else None)
    ordered = standings(table, floor)
    tests = paired_tests(everyone, baselines["large-only"], options.seed)
    evaluated = (
        "every row of the results" if options.split == ALL_ROWS else f"split {options.split}"
    ) + f" ({len(problems):,} problems)"
    figures = Figures()
    sections = [
        header_section(
            trace_dir,
            trace.manifest,
            roles,
            sources,
            everyone,
            problems,
            cost_model,
            scale,
            cost_convention,
            a_over_c_unit,
            options,
        ),
        summary_section(ordered, large_row, floor, reported_floor, tests, scale, evaluated),
        table_section(ordered, large_row, scale, a_over_c_unit, options, floor_text, reported_floor, trace_dir),
        pareto_section(ordered, roles, scale, large_row, None if floor is None else (floor, reported_floor), figures),
        significance_section([s.row.run for s in ordered], baselines["large-only"], tests),
        escalation_section([s.row.run for s in ordered if s.row.run.router not in BASELINES], roles, figures),
    ]
    latencies = report_latencies(trace_dir, options.latency_profile, options.grades)
    if latencies is not None:
        sections.append(latency_section(everyone, roles, latencies, figures))
    if policy_logs:
        sections.append(policy_section(policy_logs, figures, unmatched_policies))
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
        time=latencies.mean if latencies is not None else None,
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
    return Report("\n\n".join(sections) + "\n", figures.png, tables, figures.series)


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
    if isinstance(options.get("policy_log"), (str, Path)):
        options["policy_log"] = (options["policy_log"],)
    options = ReportOptions(**{k: tuple(v) if k in ("at", "tables", "policy_log") else v for k, v in options.items()})
    if out is not None:
        check_out_dir(Path(out))
    built = build_report(trace_dir, results, options)
    if out is not None:
        write_report(built, Path(out))
    return built
