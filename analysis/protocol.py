"""The study protocol `trace report` keeps: routers fitted on other rows than those reported, operating points
picked on calibration rows (a split of the results, or results of a calibration trace: ``--pick-on``), and every
operating point checked against the baselines beside it.

- ``attach_pick_on``: each run's calibration rows from the ``--pick-on`` results of the same router and sweep; the
  trace they were replayed on must share the report trace's setting (models, revisions, templates, sampling,
  scorers: the cache-key rule, the first differing field named), and small-only and large-only there are replayed
  on that trace when the files do not hold them.
- ``check_overlaps``: reported rows whose problem a router's fit saw (``fit_overlap``, from `trace replay`), and
  problems both picked on and reported, are refused unless ``--allow-overlap``.
- ``mark_dominated``: a router's point that a baseline or another router beats (at least as accurate and
  cheaper, on the reported rows) says so in its row.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from analysis.report_inputs import Run, replay_baseline, result_input, split_runs
from replay.artifacts import check_setting, describe_record
from tracestore.errors import TraceError
from tracestore.store import open_trace

FEW_CALIBRATION_PROBLEMS = 50  # below this, the report warns that its operating points are noisy


def sweep_key(run: Run) -> tuple[str, tuple[str, ...]]:
    """What makes two results files the same router and sweep: its name and every configuration's parameters."""
    return run.router, tuple(sorted(json.dumps(params, sort_keys=True) for params in run.params.values()))


def fit_records(run: Run) -> list[dict]:
    """Where the run's router was fitted (`trace replay`'s ``fitted_on`` column; none in older results)."""
    if "fitted_on" not in run.outcomes.columns:
        return []
    return json.loads(run.outcomes["fitted_on"][0] or "[]")


def replayed_on(run: Run) -> dict | None:
    if "replayed_on" not in run.outcomes.columns:
        return None
    return json.loads(run.outcomes["replayed_on"][0])


def attach_pick_on(everyone: list[Run], pick_on: tuple, roles: list[str], manifest, trace_dir, cost_model, grades):
    """Set every run's ``pick_rows`` to the rows of the ``pick_on`` results of the same router and sweep."""
    picks: dict[tuple, Run] = {}
    for index, item in enumerate(pick_on_files(pick_on), 1):
        frame, source = result_input(item, index, roles)
        for run in split_runs(frame, f"--pick-on {source}"):
            record = replayed_on(run)
            if record is not None:
                check_setting(record, manifest, run.source, trace_dir, done="replayed")
            picks.setdefault(sweep_key(run), run)
    for run in everyone:
        picked = picks.get(sweep_key(run))
        if picked is None and run.router in ("small-only", "large-only"):
            picked = _baseline_there(run.router, list(picks.values()), cost_model, grades)
        if picked is None and not run.swept:  # nothing to pick: one configuration
            run.pick_rows, run.picked_on = None, ""
            continue
        if picked is None:
            raise TraceError(
                f"--pick-on holds no results of router {run.label} with the configurations of {run.source}: replay "
                "it with the same --param and --sweep on the calibration rows and pass that file too"
            )
        run.pick_rows = picked.outcomes
        record = replayed_on(picked)
        where = f" (replayed on {record['trace']})" if record else ""
        run.picked_on = f"{picked.source.removeprefix('--pick-on ')}{where}"


def pick_on_files(pick_on: tuple) -> list:
    """The ``--pick-on`` inputs with each folder (or glob pattern) given replaced by the Parquet files it holds."""
    files = []
    for item in pick_on:
        if isinstance(item, (str, Path)) and (Path(item).is_dir() or any(char in str(item) for char in "*?[")):
            pattern = Path(item) / "*.parquet" if Path(item).is_dir() else Path(item)
            found = sorted(pattern.parent.glob(pattern.name))
            if not found:
                raise TraceError(f"--pick-on {item} holds no results files (*.parquet)")
            files += found
        else:
            files.append(item)
    return files


def _baseline_there(name: str, picks: list[Run], cost_model: str, grades) -> Run:
    """``name`` replayed on the walks and trace of the ``--pick-on`` results, which do not hold it."""
    record = replayed_on(picks[0]) if picks else None
    if record is None or not Path(record["trace"]).is_dir():
        raise TraceError(
            f"--pick-on results do not hold {name} and do not name a trace to replay it on: replay {name} on the "
            "calibration rows and pass that file to --pick-on too"
        )
    walks = picks[0].outcomes.select("problem_id", "world").unique().sort("problem_id", "world")
    run = replay_baseline(name, open_trace(record["trace"]), walks, cost_model, grades=grades)
    run.source = f"{name} replayed on {record['trace']}"
    return run


def check_overlaps(everyone: list[Run], allow: bool, picking_on_reported: bool) -> None:
    """TraceError if reported rows are rows a router's fit saw, or rows its point was picked on (unless ``allow``;
    picking on the reported rows, ``--pick-split reported``, is asked for and labelled)."""
    if allow:
        return
    for run in everyone:
        reported = run.rows["problem_id"].unique()
        if "fit_overlap" in run.rows.columns:
            seen = run.rows.filter(pl.col("fit_overlap"))["problem_id"].n_unique()
            if seen:
                fitted = "; ".join(describe_record(record) for record in fit_records(run)) or "its fit"
                raise TraceError(
                    f"{seen:,} of the {reported.len():,} problems reported for {run.label} are among those it was "
                    f"fitted on ({fitted}): report other rows (--split) or fit elsewhere, or pass --allow-overlap"
                )
        if not picking_on_reported and run.pick_rows is not None:
            both = run.pick_rows.filter(pl.col("problem_id").is_in(reported.implode()))["problem_id"].n_unique()
            if both:
                raise TraceError(
                    f"{both:,} of the {reported.len():,} problems reported for {run.label} are also among those its "
                    "operating point is picked on: pick on calibration rows, or pass --allow-overlap"
                )


def fit_and_pick_lines(everyone: list[Run]) -> list[str]:
    """The header's lines saying where each router was fitted and where its operating point was picked."""
    lines = []
    for run in everyone:
        parts = [f"fitted: {describe_record(record)}" for record in fit_records(run)]
        if run.swept:
            parts.append(f"point picked on {run.picked_on}")
        if parts:
            lines.append(f"  - {run.label}: " + "; ".join(parts))
    return ["- Where fitted and picked:", *lines] if lines else []


UPPER_BOUNDS = ("oracle",)  # rows no router can be: they dominate without saying anything about a pick


def mark_dominated(table: list) -> None:
    """Set ``dominated_by`` of each router's row that another row (small-only, large-only or another router; not the
    oracle, an upper bound) beats on the reported rows: at least as accurate and cheaper."""
    for row in table:
        if row.run.router in ("small-only", "large-only", *UPPER_BOUNDS) or None in (
            row.accuracy.value,
            row.cost.value,
        ):
            continue
        row.run.dominated_by = [
            other.run.label
            for other in table
            if other is not row
            and other.run.router not in UPPER_BOUNDS
            and other.accuracy.value is not None
            and other.cost.value is not None
            and other.accuracy.value >= row.accuracy.value
            and other.cost.value < row.cost.value
        ]


def few_calibration_problems(table: list) -> list[str]:
    """The table's warning when a swept router's point was picked on fewer than FEW_CALIBRATION_PROBLEMS problems,
    naming how wide its calibration accuracy interval is."""
    few = [
        row
        for row in table
        if row.run.swept and row.calibration is not None and row.calibration_problems < FEW_CALIBRATION_PROBLEMS
    ]
    if not few:
        return []
    widths = [
        (row.calibration.interval[1] - row.calibration.interval[0]) for row in few if row.calibration.interval
    ] or [float("nan")]
    n_problems = min(row.calibration_problems for row in few)
    return [
        f"\n**Few calibration problems.** Operating points were picked on as few as {n_problems} problems (fewer "
        f"than {FEW_CALIBRATION_PROBLEMS}): the 95% interval of a pick's calibration accuracy is up to "
        f"{100 * max(widths):.1f} points wide, so the pick is mostly noise; calibrate on more problems."
    ]
