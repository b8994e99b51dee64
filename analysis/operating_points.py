"""Which configuration of each router `trace report` shows, and the table's numbers with their bootstrap
intervals.

Operating point of a swept router (several configurations in one results file): among the
configurations without misses (all, if every one missed), those whose accuracy reaches the floor
(default: large-only's accuracy minus 2 points); of these the one the rule prefers (``ac``: highest
A/C; ``cheapest``: lowest cost; ``accuracy``: highest accuracy, floor ignored). If none reaches
the floor, the most accurate one, flagged. ``at`` pins a router's configuration instead. Ties go
to higher accuracy, then lower cost, then the earlier configuration. The report states the rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from analysis.options import ReportOptions
from analysis.report_inputs import Run, sweep_grid
from analysis.stats import bootstrap_counts, percentile_interval, ratio, resampled_ratio
from replay.results import summarize
from tracestore.errors import TraceError

PICK_RULES = ("ac", "cheapest", "accuracy")
LEVEL = 0.95


def percent(value: float | None) -> str:
    """An accuracy (0-1) as the report prints it: 95.2%."""
    return "-" if value is None else f"{100 * value:.1f}%"


def parse_floor(text: str, large_accuracy: float | None) -> tuple[float, str]:
    """(accuracy floor, its description) from ``large``, ``large-D`` or a number in [0, 1]."""
    text = text.strip()
    try:
        if text.startswith("large"):
            rest = text[len("large") :].strip()
            drop = float(rest[1:]) if rest.startswith("-") else 0.0
            if rest and not rest.startswith("-"):
                raise ValueError
            if large_accuracy is None:
                raise TraceError("--accuracy-floor relative to large-only needs large-only outcomes without misses")
            return large_accuracy - drop, f"large-only accuracy {percent(large_accuracy)}" + (
                f" minus {100 * drop:g} points" if drop else ""
            )
        floor = float(text)
        if not 0 <= floor <= 1:
            raise ValueError
        return floor, f"{percent(floor)} accuracy"
    except ValueError:
        raise TraceError(
            f"--accuracy-floor must be large, large-D (e.g. large-0.02) or an accuracy in [0, 1], got {text!r}"
        ) from None


def parse_pin(text: str) -> tuple[str, dict[str, str]]:
    """``steer:tau=0.3,mode=step`` -> ("steer", {"tau": "0.3", "mode": "step"})."""
    label, sep, assignments = text.rpartition(":")
    pairs = [part.partition("=") for part in assignments.split(",")] if sep else []
    if not sep or not label or not pairs or any(not eq or not name for name, eq, _ in pairs):
        raise TraceError(f"--at must look like ROUTER:name=value[,name=value], got {text!r}")
    return label.strip(), {name.strip(): value.strip() for name, _, value in pairs}


def _matches(value, wanted: str) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return abs(float(value) - float(wanted)) <= 1e-9 * max(1.0, abs(float(value)))
        except ValueError:
            return False
    return str(value).lower() == wanted.lower() if isinstance(value, bool) else str(value) == wanted


def pin(run: Run, wanted: dict[str, str], text: str) -> None:
    unknown = [name for name in wanted if name not in run.params[min(run.params)]]
    if unknown:
        raise TraceError(f"--at {text}: router {run.label} has no parameter {unknown[0]}")
    hits = [
        config
        for config, params in run.params.items()
        if all(_matches(params[name], value) for name, value in wanted.items())
    ]
    if len(hits) != 1:
        shown = ", ".join(sorted({str(params[name]) for params in run.params.values() for name in wanted}))
        raise TraceError(f"--at {text}: {len(hits)} configurations of {run.label} match (values there: {shown})")
    run.chosen = hits[0]
    run.how = f"pinned with --at {text}"


def choose_operating_point(run: Run, rule: str, floor: float, roles: list[str]) -> None:
    summary = summarize(run.pick_rows, roles).filter(pl.col("accuracy").is_not_null())
    if summary.height == 0:
        raise TraceError(f"{run.source}: every walk of router {run.label} missed; it has no accuracy to report")
    candidates = summary.filter(pl.col("misses") == 0)
    eligible = f"{candidates.height} of {len(run.params)} configurations without misses"
    if candidates.height == 0:
        candidates, eligible = summary, f"every one of {len(run.params)} configurations missed some walks"
    by_accuracy = candidates.sort(["accuracy", "cost", "config"], descending=[True, False, False])
    meeting = candidates.filter(pl.col("accuracy") >= floor - 1e-12)
    if rule == "accuracy":
        best, how = by_accuracy, "highest accuracy"
    elif meeting.height == 0:
        best, how = by_accuracy, "no configuration reaches the floor: highest accuracy"
        run.below_floor = True
    elif rule == "ac":
        best, how = (
            meeting.sort(["a_over_c", "accuracy", "cost", "config"], descending=[True, True, False, False]),
            "highest A/C at or above the floor",
        )
    else:
        best, how = (
            meeting.sort(["cost", "accuracy", "config"], descending=[False, True, False]),
            "cheapest at or above the floor",
        )
    run.chosen = int(best["config"][0])
    run.how = f"{how}; {eligible}; grid {sweep_grid(run.params)}"


def choose_operating_points(
    runs: list[Run],
    routers: list[Run],
    large: Run,
    pins: list[tuple[str, str, dict[str, str]]],
    options: ReportOptions,
    roles: list[str],
) -> str:
    """Set every run's chosen configuration: pinned with ``--at``, chosen by the rule if swept, else its only
    one. ``routers`` are the runs other than the single models. Returns the floor's description."""
    large_summary = summarize(large.pick_rows, roles)
    large_accuracy = large_summary["accuracy"][0] if large_summary["misses"][0] == 0 else None
    needs_floor = options.pick != "accuracy" and any(run.swept for run in routers)
    floor, floor_text = parse_floor(options.accuracy_floor, large_accuracy) if needs_floor else (0.0, "none")
    pinned = set()
    for text, label, wanted in pins:
        matching = [run for run in routers if run.label == label] or [run for run in routers if run.router == label]
        if len(matching) != 1:
            known = ", ".join(run.label for run in routers) or "none"
            raise TraceError(
                f"--at {label}:...: {'no' if not matching else 'more than one'} router is called "
                f"{label!r}; routers: {known}"
            )
        pin(matching[0], wanted, text)
        pinned.add(id(matching[0]))
    for run in runs:
        if id(run) in pinned:
            continue
        if run.swept:
            choose_operating_point(run, options.pick, floor, roles)
        else:
            run.chosen = min(run.params)
            run.how = "its only configuration"
    return floor_text


# ---------------------------------------------------------------------- the table's numbers


@dataclass(frozen=True)
class Estimate:
    value: float | None
    interval: tuple[float, float] | None


@dataclass(frozen=True)
class Row:
    run: Run
    accuracy: Estimate
    cost: Estimate
    a_over_c: Estimate
    large_share: Estimate
    misses: int
    walks: int
    calibration: Estimate | None = None  # accuracy on the rows the point was picked on
    calibration_problems: int = 0


def per_problem_sums(rows: pl.DataFrame, problems: list[str], roles: list[str]) -> dict[str, np.ndarray]:
    """Sums over the worlds of each problem (in ``problems`` order) of what the table's ratios need."""
    done = pl.col("misses") == 0
    sums = rows.group_by("problem_id").agg(
        correct=(pl.col("correct").fill_null(False) & done).sum(),
        finished=done.sum(),
        cost=pl.col("cost").filter(done).sum(),
        large=pl.col(f"n_{roles[-1]}").filter(done).sum(),
        steps=pl.sum_horizontal(pl.col(f"n_{role}") for role in roles).filter(done).sum(),
    )
    aligned = pl.DataFrame({"problem_id": problems}).join(sums, on="problem_id", how="left", maintain_order="left")
    return {name: aligned[name].fill_null(0).cast(pl.Float64).to_numpy() for name in aligned.columns[1:]}


def calibration_accuracy(run: Run, roles: list[str], n_resamples: int, seed: int) -> tuple[Estimate, int] | None:
    """(accuracy of the chosen configuration on the rows it was picked on, with its bootstrap interval; their number
    of problems); None for a run that has no such rows (one configuration, no --pick-on results of its own)."""
    if run.pick_rows is None:
        return None
    rows = run.pick_rows.filter(pl.col("config") == run.chosen)
    problems = sorted(rows["problem_id"].unique().to_list())
    sums = per_problem_sums(rows, problems, roles)
    value = float(ratio(sums["correct"].sum(), sums["finished"].sum()))
    samples = resampled_ratio(bootstrap_counts(len(problems), n_resamples, seed), sums["correct"], sums["finished"])
    return Estimate(None if np.isnan(value) else value, percentile_interval(samples, LEVEL)), len(problems)


def table_row(
    run: Run, problems: list[str], counts: np.ndarray, roles: list[str], calibration: tuple[Estimate, int] | None = None
) -> Row:
    rows = run.at_chosen()
    sums = per_problem_sums(rows, problems, roles)

    def estimate(numerator: str, denominator: str) -> tuple[Estimate, np.ndarray]:
        value = float(ratio(sums[numerator].sum(), sums[denominator].sum()))
        samples = resampled_ratio(counts, sums[numerator], sums[denominator])
        return Estimate(None if np.isnan(value) else value, percentile_interval(samples, LEVEL)), samples

    accuracy, accuracy_samples = estimate("correct", "finished")
    cost, cost_samples = estimate("cost", "finished")
    scale = float(rows["a_over_c_scale"][0])  # the cost model's: A/C as its seed table prints it
    a_over_c = Estimate(
        scale * accuracy.value / cost.value if accuracy.value is not None and cost.value else None,
        percentile_interval(ratio(scale * accuracy_samples, cost_samples), LEVEL),
    )
    large_share, _ = estimate("large", "steps")
    return Row(run, accuracy, cost, a_over_c, large_share, int(rows["misses"].sum()), rows.height, *(calibration or ()))
