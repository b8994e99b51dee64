"""The report's text and figures: Markdown sections (each drawing its PNG figure into ``figures``), the
number and table formatting they share, and the HTML page around the Markdown.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import polars as pl
from markdown_it import MarkdownIt

from analysis import plots
from analysis.operating_points import Estimate, Row, percent
from analysis.options import ALL_ROWS, REPORTED_ROWS, ReportOptions
from analysis.report_inputs import POLICY_MARK, Run
from analysis.stats import PERMUTATIONS, mcnemar, paired_problem_test
from replay.params import params_text
from replay.results import summarize
from replay.routers.policy import TRAINING_FLAGS
from tracestore.schema import Manifest, model_char

GENERATOR = "trace report"
FIGURES = {
    "pareto": "pareto.png",
    "escalation": "escalation.png",
    "policy": "policy_training.png",
    "steer": "steer_mixtures.png",
}
MAX_MIXTURE_PANELS = 9


# ---------------------------------------------------------------------- Markdown and HTML


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _with_interval(estimate: Estimate, fmt) -> str:
    if estimate.value is None:
        return "-"
    if estimate.interval is None:
        return fmt(estimate.value)
    low, high = estimate.interval
    return f"{fmt(estimate.value)} [{fmt(low)}, {fmt(high)}]"


def _pct_bare(value: float) -> str:
    return f"{100 * value:.1f}"


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
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; }}
th {{ background: #f2f2f2; }}
img {{ max-width: 100%; }}
code {{ background: #f4f4f4; padding: 0 0.2em; }}
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
    cost_unit,
    cost_convention,
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
    lines = [
        f"# Routing report: {Path(trace_dir).name}",
        "",
        f"- Trace: `{trace_dir}` (dataset {dataset_name}; models {model_text})",
        f"- Evaluated on {split_text}: {len(problems):,} problems, {n_walks:,} (problem, world) walks per router",
        f"- Cost model: {cost_model} ({cost_convention}), mean cost per query in {cost_unit}; A/C in {a_over_c_unit}",
        "- Results: " + ", ".join(f"`{Path(path).name}`" for path in result_paths),
    ]
    return "\n".join(lines)


def table_section(
    table: list[Row], cost_unit: str, a_over_c_unit: str, options: ReportOptions, floor_text: str, swept: bool
) -> str:
    headers = ["Router", "Operating point", "Acc (%) ↑", f"Cost ({cost_unit}) ↓", "A/C ↑", "Large steps (%)", "Misses"]
    rows = []
    for row in table:
        flag = " †" if row.run.below_floor else ""
        rows.append(
            [
                row.run.label + flag,
                params_text(row.run.point_params()) or "-",
                _with_interval(row.accuracy, _pct_bare),
                _with_interval(row.cost, _num),
                _with_interval(row.a_over_c, _num),
                _with_interval(row.large_share, _pct_bare),
                f"{row.misses} of {row.walks}" if row.misses else "0",
            ]
        )
    rule = {
        "ac": "the highest accuracy per cost (A/C)",
        "cheapest": "the lowest cost",
        "accuracy": "the highest accuracy",
    }[options.pick]
    pick_rows = (
        "the reported rows themselves (which flatters threshold routers)"
        if options.pick_split == REPORTED_ROWS
        else f"rows of split {options.pick_split}, not the reported ones"
    )
    floor_clause = "" if options.pick == "accuracy" else f"those with accuracy at least the floor ({floor_text}), then "
    notes = [
        "## Routers at their operating points",
        "",
        md_table(headers, rows, right={2, 3, 4, 5, 6}),
        "",
        f"Accuracy and cost are over the walks that finished; A/C is {a_over_c_unit}; large steps "
        "is the share of kept steps written by the large model. Brackets: 95% percentile bootstrap intervals, "
        f"{options.bootstrap:,} resamples of the problems (the worlds of a problem stay together), "
        f"seed {options.seed}.",
        "",
        (
            f"**Operating point rule.** A router replayed over a sweep is shown at one configuration, chosen on "
            f"{pick_rows}: among configurations without misses, {floor_clause}{rule}; ties go to higher accuracy, "
            "lower cost, earlier configuration; `--at` pins one instead."
            + (
                " † no configuration reached the floor; the most accurate one is shown."
                if any(r.run.below_floor for r in table)
                else ""
            )
        )
        if swept
        else "**Operating point rule.** Every router has a single configuration; each is shown at it.",
        "",
    ]
    notes += [f"- {row.run.label}: {row.run.how} ({Path(row.run.source).name})" for row in table]
    notes += [
        f"\n{POLICY_MARK} {row.run.label}: the policy file says its training ended off target: "
        + "; ".join(TRAINING_FLAGS.get(flag, flag) for flag in row.run.training_flags)
        + "."
        for row in table
        if row.run.training_flags
    ]
    return "\n".join(notes)


def pareto_section(runs: list[Run], roles: list[str], cost_unit: str, figures: dict[str, bytes]) -> str:
    curves, points = [], []
    for run in runs:
        summary = summarize(run.rows, roles).filter(pl.col("accuracy").is_not_null() & pl.col("cost").is_not_null())
        if run.swept:
            if summary.height == 0:
                continue
            configs = summary["config"].to_list()
            chosen = configs.index(run.chosen) if run.chosen in configs else 0
            curves.append(
                plots.Curve(
                    run.label,
                    summary["cost"].to_numpy(),
                    summary["accuracy"].to_numpy(),
                    (summary["misses"] > 0).to_numpy(),
                    chosen,
                )
            )
        else:
            chosen = summary.filter(pl.col("config") == run.chosen)
            if chosen.height:
                kind = {"small-only": "small", "large-only": "large"}.get(run.router, "router")
                points.append(plots.Point(run.label, float(chosen["cost"][0]), float(chosen["accuracy"][0]), kind))
    figures[FIGURES["pareto"]] = plots.pareto_png(curves, points, cost_unit)
    swept = [f"{curve.label} ({len(curve.cost)} configurations)" for curve in curves]
    return "\n".join(
        [
            "## Accuracy against cost",
            "",
            f"![Accuracy against mean cost per query]({FIGURES['pareto']})",
            "",
            "One line per swept router (" + (", ".join(swept) if swept else "none") + "), its chosen operating point "
            "circled; configurations where some walk missed are hollow and not joined (their accuracy and cost cover "
            "only the walks that finished). One marker per single model or fixed-configuration router.",
        ]
    )


def significance_section(runs: list[Run], large: Run, seed: int) -> str:
    """Each router against large-only, paired on (problem, world): McNemar's test with one world per problem,
    else a paired permutation test with the problem as the unit (its worlds are not independent)."""
    reference = large.at_chosen().select("problem_id", "world", large_correct="correct", large_misses="misses")
    several_worlds = reference["world"].n_unique() > 1
    rows = []
    for run in runs:
        if run is large:
            continue
        paired = (
            run.at_chosen()
            .join(reference, on=["problem_id", "world"], how="inner")
            .filter((pl.col("misses") == 0) & (pl.col("large_misses") == 0))
        )
        correct, large_correct = paired["correct"].to_numpy(), paired["large_correct"].to_numpy()
        if several_worlds:
            test = paired_problem_test(correct, large_correct, paired["problem_id"].to_numpy(), seed)
        else:
            test = mcnemar(correct, large_correct)
        rows.append(
            [
                run.label,
                test.n_pairs,
                test.only_first,
                test.only_second,
                test.test,
                f"{test.statistic:.4g}",
                f"{test.p_value:.4g}",
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


def escalation_section(routers: list[Run], roles: list[str], figures: dict[str, bytes]) -> str:
    title = "## Where escalations happen"
    if not routers:
        return f"{title}\n\nNo router besides the single models was given."
    large_char = model_char(roles[-1])
    by_depth = {run.label: escalation_by_depth(run.at_chosen(), large_char) for run in routers}
    figures[FIGURES["escalation"]] = plots.escalation_png(
        {label: (frame["depth"].to_numpy(), frame["share"].to_numpy()) for label, frame in by_depth.items()}, roles[-1]
    )
    depths = sorted({depth for frame in by_depth.values() for depth in frame["depth"].to_list()})
    depth_rows = []
    for depth in depths:
        cells = [depth]
        for frame in by_depth.values():
            at = frame.filter(pl.col("depth") == depth)
            cells.append(f"{percent(at['share'][0])} of {at['walks'][0]}" if at.height else "-")
        depth_rows.append(cells)
    first_rows = []
    for run in routers:
        first = first_escalation(run.at_chosen(), large_char)
        share = first["escalated"] / first["walks"] if first["walks"] else None
        first_rows.append(
            [
                run.label,
                first["walks"],
                f"{first['escalated']} ({percent(share)})",
                "-" if first["median"] is None else f"{first['median']:g}",
            ]
        )
    return "\n".join(
        [
            title,
            "",
            f"![Share of {roles[-1]}-model steps by step index]({FIGURES['escalation']})",
            "",
            f"Share of the steps at each step index (0 = first step) that the {roles[-1]} model wrote, over the "
            "finished walks at each router's operating point (read from each walk's path; discarded drafts are not "
            "steps).",
            "",
            md_table(["Step index", *by_depth], depth_rows, right=set(range(len(by_depth) + 1))),
            "",
            md_table(
                ["Router", "Finished walks", f"Walks with a {roles[-1]} step", "Median first index"],
                first_rows,
                right={1, 2, 3},
            ),
        ]
    )


def policy_section(path: Path, log: pl.DataFrame, alpha: float, alpha_source: str, figures: dict[str, bytes]) -> str:
    figures[FIGURES["policy"]] = plots.policy_training_png(
        log["step"].to_numpy(), log["coverage"].to_numpy(), log["kappa"].to_numpy(), alpha
    )
    tail = log.tail(max(1, log.height // 10))
    return "\n".join(
        [
            "## Policy training",
            "",
            f"![Coverage and kappa over training]({FIGURES['policy']})",
            "",
            f"From `{path.name}`: {log.height:,} logged updates, steps {log['step'][0]}-{log['step'][-1]}. "
            f"Target coverage 1 - alpha = {1 - alpha:g} (alpha {alpha:g}, {alpha_source}). "
            f"Over the last {tail.height:,} logged updates: "
            f"mean coverage {tail['coverage'].mean():.4f}, mean kappa {tail['kappa'].mean():.4f}; final kappa "
            f"{log['kappa'][-1]:.4f}.",
        ]
    )


def steer_section(
    path: Path,
    signal: str,
    mixtures: list[plots.Mixture],
    train_ids: list[str] | None,
    trace,
    figures: dict[str, bytes],
) -> str:
    small = trace.manifest.roles[0]
    steps = trace.scan("steps").filter((pl.col("model") == small) & pl.col(signal).is_not_null())
    if train_ids is not None:
        steps = steps.filter(pl.col("problem_id").is_in(pl.Series(train_ids, dtype=pl.String).implode()))
    values = steps.select("depth", signal).collect()
    shown = mixtures[:MAX_MIXTURE_PANELS]
    confidences = {
        mixture.depth: values.filter(pl.col("depth") == mixture.depth)[signal].cast(pl.Float64).to_numpy()
        for mixture in shown
    }
    figures[FIGURES["steer"]] = plots.steer_mixtures_png(shown, confidences, signal)
    high = [1 - m.low for m in shown]
    rows = [
        [
            m.depth,
            confidences[m.depth].size,
            f"{m.means[m.low]:.4g}",
            f"{np.sqrt(m.variances[m.low]):.4g}",
            f"{m.weights[m.low]:.3f}",
            f"{m.means[h]:.4g}",
            f"{np.sqrt(m.variances[h]):.4g}",
        ]
        for m, h in zip(shown, high)
    ]
    omitted = (
        f" Step indices after {shown[-1].depth} ({len(mixtures) - len(shown)} more) are not drawn."
        if len(mixtures) > len(shown)
        else ""
    )
    over = (
        f"the {len(train_ids):,} train problems the file lists (what the mixtures were fitted on)"
        if train_ids is not None
        else "every problem of the trace"
    )
    return "\n".join(
        [
            "## STEER confidence mixtures",
            "",
            f"![STEER mixtures over the small model's confidences]({FIGURES['steer']})",
            "",
            f"Mixtures from `{path.name}` over the histogram of `{signal}` of the {small}-model steps of {over}. "
            f"Red: the low-confidence component, whose posterior STEER compares with tau.{omitted}",
            "",
            md_table(
                ["Step index", "Small steps", "Low mean", "Low std", "Low weight", "High mean", "High std"],
                rows,
                right=set(range(7)),
            ),
        ]
    )
