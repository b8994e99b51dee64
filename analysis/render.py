"""The report's text and figures: Markdown sections (each drawing its PNG figure into ``figures``), the
table formatting they share, and the HTML page around the Markdown. Numbers are written by analysis.units
(a cost unit chosen for the data, three significant digits); the summary at the top is analysis.summary's.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
from markdown_it import MarkdownIt

from analysis import plots
from analysis.misses import MISS_MARK, closure_advice, routers_toml
from analysis.operating_points import Row, percent
from analysis.options import ALL_ROWS, REPORTED_ROWS, ReportOptions
from analysis.protocol import few_calibration_problems, fit_and_pick_lines
from analysis.report_inputs import POLICY_MARK, Run, varying_params
from analysis.stats import PERMUTATIONS, PairedTest
from analysis.summary import Standing
from analysis.units import CostScale, number, percent_points, with_interval
from replay.params import params_text
from replay.results import summarize
from replay.routers import ROUTERS
from replay.routers.policy import TRAINING_FLAGS
from tracestore.schema import Manifest, model_char

GENERATOR = "trace report"
FIGURES = {
    "pareto": "pareto.png",
    "escalation": "escalation.png",
    "policy": "policy_training.png",
    "steer": "steer_mixtures.png",
    "latency": "latency.png",
}
BELOW_FLOOR_MARK = "†"


@dataclass
class Figures:
    """The report's figures as they are drawn: file name -> PNG, and file name -> the series its legend names
    ((label, colour, marker) each)."""

    png: dict[str, bytes] = field(default_factory=dict)
    series: dict[str, tuple] = field(default_factory=dict)

    def add(self, key: str, drawn: plots.Drawn) -> str:
        name = FIGURES[key]
        self.png[name] = drawn.png
        self.series[name] = drawn.series
        return name


# ---------------------------------------------------------------------- Markdown and HTML


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(headers: list[str], rows: list[list], right: set[int] = frozenset()) -> str:
    lines = [
        "| " + " | ".join(_cell(h) for h in headers) + " |",
        "|" + "|".join("---:" if i in right else "---" for i in range(len(headers))) + "|",
    ]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_html(markdown: str) -> str:
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    title = html.escape(markdown.splitlines()[0].lstrip("# ").strip())
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="generator" content="{GENERATOR}">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; display: block; max-width: 100%;
  overflow-x: auto; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; }}
th {{ background: #f2f2f2; }}
td[style*="right"] {{ white-space: nowrap; font-variant-numeric: tabular-nums; }}
img {{ max-width: 100%; }}
code {{ background: #f4f4f4; padding: 0 0.2em; }}
pre {{ background: #f4f4f4; padding: 0.6em; overflow-x: auto; }}
</style>
</head>
<body>
{body}</body>
</html>
"""


# ---------------------------------------------------------------------- sections


def header_section(
    trace_dir,
    manifest: Manifest,
    roles,
    result_paths,
    runs,
    problems,
    cost_model,
    scale: CostScale,
    convention,
    a_over_c_unit,
    options,
) -> str:
    models = manifest.models

    def describe(role: str) -> str:
        n_params = models[role].get("n_params")
        size = f" ({int(n_params):,} parameters)" if isinstance(n_params, (int, float)) and n_params else ""
        return f"{role}: {models[role].get('name', '?')}{size}"

    model_text = "; ".join(describe(role) for role in roles)
    dataset_name = manifest.dataset_name or "?"
    n_walks = runs[0].at_chosen().height
    split_text = "every row of the results" if options.split == ALL_ROWS else f"split {options.split}"
    unit = scale.unit + ("" if scale.unit == scale.source else f" (the results hold {scale.source})")
    lines = [
        f"# Routing report: {Path(trace_dir).name}",
        "",
        f"- Trace: `{trace_dir}` (dataset {dataset_name}; models {model_text})",
        f"- Evaluated on {split_text}: {len(problems):,} problems, {n_walks:,} (problem, world) walks per router",
        f"- Cost model: {cost_model} ({convention}), mean cost per query in {unit}; A/C as a multiple of "
        f"large-only's (in the seeds' table layouts: {a_over_c_unit})",
        "- Results: " + ", ".join(f"`{Path(path).name}`" for path in result_paths),
        *fit_and_pick_lines(runs),
    ]
    return "\n".join(lines)


def marked(run: Run) -> str:
    """A router's label, marked where some of its walks at the operating point missed."""
    return run.label + (f" {MISS_MARK}" if run.at_chosen()["misses"].sum() else "")


def row_label(standing: Standing) -> str:
    """A router's label with its marks: † no configuration reached the floor, * some walks missed."""
    run = standing.row.run
    return (
        run.label
        + (f" {BELOW_FLOOR_MARK}" if run.below_floor else "")
        + (f" {MISS_MARK}" if standing.row.misses else "")
    )


def table_section(
    ordered: list[Standing],
    large: Row,
    scale: CostScale,
    a_over_c_unit: str,
    options: ReportOptions,
    floor_text: str,
    reported_floor: str,
    trace_dir,
) -> str:
    """The main table: ``ordered`` (analysis.summary.standings); A/C as a multiple of large-only's, or in the cost
    model's ``a_over_c_unit`` where large-only has none."""
    reference = large.a_over_c.value
    ac_header = "A/C (× large-only) ↑" if reference else f"A/C ({a_over_c_unit}) ↑"

    def a_over_c(row: Row) -> str:
        divisor = reference or 1.0
        interval = row.a_over_c.interval
        return with_interval(
            None if row.a_over_c.value is None else row.a_over_c.value / divisor,
            None if interval is None else (interval[0] / divisor, interval[1] / divisor),
        )

    headers = [
        "Router",
        "Operating point",
        "Accuracy (%) ↑",
        "Cal. acc (%)",
        f"Cost ({scale.unit} per query) ↓",
        ac_header,
        "Large steps (%)",
        "Misses",
    ]
    rows = [
        [
            row_label(standing),
            (params_text(standing.row.run.point_params()) or "-") + dominated_note(standing.row.run),
            with_interval(standing.row.accuracy.value, standing.row.accuracy.interval, percent_points),
            with_interval(standing.row.calibration.value, standing.row.calibration.interval, percent_points)
            if standing.row.calibration
            else "-",
            with_interval(scale(standing.row.cost.value), _scaled(standing.row.cost.interval, scale)),
            a_over_c(standing.row),
            with_interval(standing.row.large_share.value, standing.row.large_share.interval, percent_points),
            f"{standing.row.misses:,} of {standing.row.walks:,}" if standing.row.misses else "0",
        ]
        for standing in ordered
    ]
    swept = any(standing.row.run.swept for standing in ordered)
    rule = {
        "ac": "the highest accuracy per cost (A/C)",
        "cheapest": "the lowest cost",
        "accuracy": "the highest accuracy",
    }[options.pick]
    if options.pick_on:
        pick_rows = "the rows of the --pick-on results (a calibration trace or split), not the reported ones"
    elif options.pick_split == REPORTED_ROWS:
        pick_rows = "the reported rows themselves (which flatters threshold routers)"
    else:
        pick_rows = f"rows of split {options.pick_split}, not the reported ones"
    floor_clause = "" if options.pick == "accuracy" else f"those with accuracy at least the floor ({floor_text}), then "
    ac_text = (
        f"A/C is accuracy per cost as a multiple of large-only's ({number(reference)}, in {a_over_c_unit})"
        if reference
        else f"A/C is in {a_over_c_unit}"
    )
    notes = [
        "## Routers at their operating points",
        "",
        md_table(headers, rows, right={2, 3, 4, 5, 6, 7}),
        "",
        f"Rows: the routers within the accuracy floor on these rows ({reported_floor}) by cost, then the others by "
        f"cost, then those whose walks missed ({MISS_MARK}). Accuracy and cost are over the walks that finished; "
        f"{ac_text}; large steps is the share of kept steps written by the large model. Brackets: 95% percentile "
        f"bootstrap intervals, {options.bootstrap:,} resamples of the problems (the worlds of a problem stay "
        f"together), seed {options.seed}. Cal. acc: the point's accuracy on the rows it was picked on.",
        "",
        (
            f"**Operating point rule.** A router replayed over a sweep is shown at one configuration, chosen on "
            f"{pick_rows}: among configurations without misses, {floor_clause}{rule}; ties go to higher accuracy, "
            "lower cost, earlier configuration; `--at` pins one instead."
            + (
                f" {BELOW_FLOOR_MARK} no configuration reached the floor; the most accurate one is shown."
                if any(standing.row.run.below_floor for standing in ordered)
                else ""
            )
        )
        if swept
        else "**Operating point rule.** Every router has a single configuration; each is shown at it.",
        "",
    ]
    notes += [f"- {s.row.run.label}: {s.row.run.how} ({Path(s.row.run.source).name})" for s in ordered]
    notes += few_calibration_problems([s.row for s in ordered]) if swept else []
    if any(s.row.run.dominated_by for s in ordered):
        notes.append(
            "\nA point marked *dominated* is beaten on the reported rows by the row it names, which is at least as "
            "accurate and cheaper: the sweep's pick is no better than that baseline there."
        )
    notes += [
        f"\n{POLICY_MARK} {s.row.run.label}: the policy file says its training ended off target: "
        + "; ".join(TRAINING_FLAGS.get(flag, flag) for flag in s.row.run.training_flags)
        + "."
        for s in ordered
        if s.row.run.training_flags
    ]
    missed = [standing.row.run for standing in ordered if standing.row.misses]
    if missed:
        notes += [
            "",
            f"{MISS_MARK} Some walks of these routers needed steps the trace lacks: their accuracy and cost cover "
            "only the walks that finished, so they are listed last and never ranked. " + closure_advice(trace_dir),
            "",
            "```toml",
            "\n\n".join(run_toml(run) for run in missed),
            "```",
        ]
    return "\n".join(notes)


def dominated_note(run: Run) -> str:
    """After a picked point that a baseline beats on the reported rows (analysis.protocol.mark_dominated)."""
    return f" (dominated: {', '.join(run.dominated_by)} as accurate and cheaper)" if run.dominated_by else ""


def _scaled(interval, scale: CostScale):
    return None if interval is None else (scale(interval[0]), scale(interval[1]))


def run_toml(run: Run) -> str:
    """The ``[[router]]`` table that grows what ``run`` missed: its fixed parameters that differ from the router's
    defaults, and its swept ones over the values the run has."""
    cls = ROUTERS.builtins().get(run.router)
    defaults = cls.param_defaults() if cls is not None else {}
    varying = varying_params(run.params)
    fixed = run.params[min(run.params)]
    params = {
        name: value
        for name, value in sorted(fixed.items())
        if name not in varying and (name not in defaults or json.dumps(defaults[name]) != json.dumps(value))
    }
    sweep = [
        f"{name}=" + ",".join(f"{value:g}" for value in sorted({config[name] for config in run.params.values()}))
        for name in varying
    ]
    note = "" if cls is not None else "your router: write its FILE.py:Class here"
    return routers_toml(run.router, params, sweep, note)


def pareto_section(
    ordered: list[Standing], roles: list[str], scale: CostScale, large: Row, floor, figures: Figures
) -> str:
    series = []
    for standing in ordered:
        run = standing.row.run
        summary = summarize(run.rows, roles).filter(pl.col("accuracy").is_not_null() & pl.col("cost").is_not_null())
        if summary.height == 0:
            continue
        configs = summary["config"].to_list()
        series.append(
            plots.Series(
                row_label(standing),
                plots.series_kind(run.router),
                summary["cost"].to_numpy() * scale.factor,
                summary["accuracy"].to_numpy(),
                (summary["misses"] > 0).to_numpy(),
                configs.index(run.chosen) if run.chosen in configs else 0,
                (summary["n"] - summary["misses"]).to_numpy(),
                int(summary["n"][0]),
            )
        )
    name = figures.add(
        "pareto", plots.pareto_png(series, scale.unit, (scale(large.cost.value), large.accuracy.value), floor)
    )
    swept = [f"{entry.label} ({len(entry.cost)} configurations)" for entry in series if len(entry.cost) > 1]
    return "\n".join(
        [
            "## Accuracy against cost",
            "",
            f"![Accuracy against mean cost per query]({name})",
            "",
            "Each swept router (" + (", ".join(swept) if swept else "none") + ") is drawn as its own frontier (the "
            "cheapest of its configurations at each accuracy), its other configurations faint, its operating point "
            "ringed; configurations where some walk missed are hollow and off the line (their accuracy and cost "
            "cover only the walks that finished). One marker per single model or fixed-configuration router. "
            "Dashed and dotted black: large-only's accuracy and cost; dash-dotted red: the accuracy floor.",
        ]
    )


def significance_section(runs: list[Run], large: Run, tests: dict[int, PairedTest]) -> str:
    """Each router against large-only, paired on (problem, world) (analysis.summary.paired_tests)."""
    several_worlds = large.at_chosen()["world"].n_unique() > 1
    rows = []
    for run in runs:
        if run is large:
            continue
        test = tests[id(run)]
        rows.append(
            [
                marked(run),
                test.n_pairs,
                test.only_first,
                test.only_second,
                test.test,
                number(test.statistic),
                number(test.p_value),
                "yes" if test.p_value < 0.05 else "no",
            ]
        )
    return "\n".join(
        [
            "## Significance against large-only ("
            + ("paired permutation over problems" if several_worlds else "McNemar")
            + ")",
            "",
            md_table(
                [
                    "Router",
                    "Pairs",
                    "Router right, large wrong",
                    "Router wrong, large right",
                    "Test",
                    "Statistic",
                    "p-value",
                    "p < 0.05",
                ],
                rows,
                right={1, 2, 3, 5, 6},
            ),
            "",
            "Paired on (problem, world) at each router's operating point; pairs where either walk missed are left out. "
            + (
                "The worlds of a problem are not independent, so the unit is the problem: a two-sided paired "
                "permutation test on each problem's mean correctness over its worlds (statistic: the mean "
                f"difference, router minus large-only; {PERMUTATIONS:,} random sign flips, or all of them when fewer)."
                if several_worlds
                else "Exact two-sided binomial test when the discordant pairs number fewer than 25 (statistic: the "
                "smaller discordant count), else chi-square with continuity correction, 1 degree of freedom."
            ),
        ]
    )


def escalation_by_depth(rows: pl.DataFrame, large_char: str) -> pl.DataFrame:
    """Per step index of the finished walks: walks with a step there, and the share the large model wrote.
    A walk's path spells who wrote each kept step, so the index of a path character is its step index."""
    chars = (
        rows.filter(pl.col("misses") == 0)
        .select(char=pl.col("path").str.split(""))
        .with_columns(depth=pl.int_ranges(pl.col("char").list.len()))
        .explode("char", "depth")
    )
    return (
        chars.group_by("depth")
        .agg(walks=pl.len(), large=(pl.col("char") == large_char).sum())
        .with_columns(share=pl.col("large") / pl.col("walks"))
        .sort("depth")
    )


def first_escalation(rows: pl.DataFrame, large_char: str) -> dict:
    finished = rows.filter(pl.col("misses") == 0)
    first = finished["path"].str.find(large_char, literal=True).drop_nulls()
    return {
        "walks": finished.height,
        "escalated": first.len(),
        "median": None if first.len() == 0 else float(first.median()),
    }


def escalation_section(routers: list[Run], roles: list[str], figures: Figures) -> str:
    """``routers`` in the table's order (the figure gives each the style the accuracy-cost plot gave it)."""
    title = "## Where escalations happen"
    if not routers:
        return f"{title}\n\nNo router besides the single models was given."
    large_char = model_char(roles[-1])
    by_depth = {run.label: escalation_by_depth(run.at_chosen(), large_char) for run in routers}
    name = figures.add(
        "escalation",
        plots.escalation_png(
            [
                plots.Shares(label, frame["depth"].to_numpy(), frame["share"].to_numpy(), frame["walks"].to_numpy())
                for label, frame in by_depth.items()
            ],
            roles[-1],
        ),
    )
    depths = sorted({depth for frame in by_depth.values() for depth in frame["depth"].to_list()})
    rows = []
    for run in routers:
        frame = by_depth[run.label]
        first = first_escalation(run.at_chosen(), large_char)
        share = first["escalated"] / first["walks"] if first["walks"] else None
        cells = [
            marked(run),
            first["walks"],
            f"{first['escalated']} ({percent(share)})",
            "-" if first["median"] is None else f"{first['median']:g}",
        ]
        for depth in depths:
            at = frame.filter(pl.col("depth") == depth)
            cells.append(f"{percent_points(at['share'][0])} ({at['walks'][0]})" if at.height else "-")
        rows.append(cells)
    headers = ["Router", "Finished walks", f"Walks with a {roles[-1]} step", "Median first index", *map(str, depths)]
    return "\n".join(
        [
            title,
            "",
            f"![Share of {roles[-1]}-model steps by step index]({name})",
            "",
            f"Share (%) of the steps at each step index (0 = first step) that the {roles[-1]} model wrote, over the "
            "finished walks at each router's operating point (read from each walk's path; discarded drafts are not "
            f"steps); in brackets, the walks with a step at that index. Points on fewer than {plots.FEW_WALKS} walks "
            "are hollow in the figure.",
            "",
            md_table(headers, rows, right=set(range(1, len(headers)))),
        ]
    )
