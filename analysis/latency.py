"""The report's latency view: each router's seconds per query from a latency profile (replay.latency), beside its
cost.

When a profile is available (``--latency-profile FILE``, else TRACE/latency.json), every run is replayed again on
the trace with ``cost="latency"``, unless its results already are in seconds: the same router, configurations and
splits, fitted on this trace's train split as `trace replay` fits it, so the same walks; only the pricing differs
(a router fitted on another trace, `--fit-on`, is refitted here, which may walk otherwise). That gives, per run
and configuration, the seconds of every reported (problem, world): the mean, median (p50) and 95th percentile per
router, a Time column in the seeds' tables, and an accuracy-against-latency plot beside accuracy-against-cost. A
run that cannot be replayed here (a router file that is gone) is named in the section, without a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from analysis import plots
from analysis.report_inputs import Run, varying_params
from replay.latency import profile_path, read_profile
from replay.params import params_text
from replay.results import summarize
from replay.routers import make_router
from replay.run import replay_trace
from replay.splits import DEFAULT_FRACTIONS, DEFAULT_SPLIT_SEED, SplitSpec
from tracestore.errors import TraceError

if TYPE_CHECKING:
    from analysis.render import Figures


@dataclass
class Latencies:
    """Seconds per reported walk of each run (replayed on first use), by run and configuration."""

    trace_dir: str
    profile: str
    convention: str
    grades: str | None
    seconds: dict[int, pl.DataFrame] = field(default_factory=dict)  # id(run) -> config, problem_id, world, seconds
    failed: dict[str, str] = field(default_factory=dict)  # run label -> why it has no time

    def of(self, run: Run, config: int | None = None) -> pl.DataFrame | None:
        """The seconds of ``run``'s reported walks that finished at ``config`` (default: the chosen one); None
        when the run cannot be replayed here."""
        if id(run) not in self.seconds and run.label not in self.failed:
            try:
                self.seconds[id(run)] = _run_seconds(self.trace_dir, run, self.profile, self.grades)
            except TraceError as error:
                if "latency profile" in str(error):
                    raise
                self.failed[run.label] = str(error)
        frame = self.seconds.get(id(run))
        if frame is None:
            return None
        config = run.chosen if config is None else config
        reported = run.rows.filter((pl.col("config") == config) & (pl.col("misses") == 0)).select("problem_id", "world")
        return frame.filter(pl.col("config") == config).join(reported, on=["problem_id", "world"], how="semi")

    def mean(self, run: Run, config: int | None = None) -> float | None:
        frame = self.of(run, config)
        return None if frame is None or frame.height == 0 else float(frame["seconds"].mean())


def report_latencies(trace_dir, given_profile, grades: str | None) -> Latencies | None:
    """The report's latencies under the profile ``given_profile`` (default TRACE/latency.json; None: none)."""
    path = profile_path(trace_dir, given_profile)
    if path is None:
        return None
    profile = read_profile(path)
    return Latencies(
        str(trace_dir), path, f"{profile.engine} on {profile.hardware}, batch size {profile.batch_size}", grades
    )


def _run_seconds(trace_dir, run: Run, profile: str, grades: str | None) -> pl.DataFrame:
    """config (the run's), problem_id, world, seconds of every walk of ``run``, replayed with the latency cost."""
    if run.outcomes["cost_model"][0] == "latency":
        return run.outcomes.select("config", "problem_id", "world", seconds="cost")
    varying = varying_params(run.params)
    first = run.params[min(run.params)]
    fixed = {name: value for name, value in first.items() if name not in varying and value not in ("", None)}
    sweep = {name: sorted({params[name] for params in run.params.values()}) for name in varying}
    outcomes = run.outcomes
    recorded = json.loads(outcomes["splits"][0]) if "splits" in outcomes.columns else {}
    splits = SplitSpec(
        seed=recorded.get("seed", DEFAULT_SPLIT_SEED),
        fractions=tuple(recorded.get("fractions", DEFAULT_FRACTIONS)),
        by=recorded.get("by"),
    )
    name = "only" if run.router in ("small-only", "large-only") and "model" in fixed else run.router
    result = replay_trace(
        trace_dir,
        make_router(name, **fixed),
        sweep=sweep or None,
        split="all",
        cost="latency",
        latency_profile=profile,
        splits=splits,
        grades=grades,
    )
    configs = pl.DataFrame(
        {"params": [json.dumps(p, sort_keys=True) for p in run.params.values()], "config": list(run.params)},
        schema={"params": pl.String, "config": pl.Int32},
    )
    replayed = result.outcomes.select("params", "problem_id", "world", seconds="cost")
    return replayed.join(configs, on="params").select("config", "problem_id", "world", "seconds")


def latency_section(runs: list[Run], roles: list[str], latencies: Latencies, figures: Figures) -> str:
    """Mean, p50 and p95 seconds per query of each run at its operating point, accuracy per second, and the
    accuracy-against-latency plot."""
    lines = [
        "## Latency",
        "",
        f"Seconds per query from the latency profile {Path(latencies.profile).name} ({latencies.convention}): the "
        "serial time of each walk, every step used (kept or discarded) and every scorer call one request "
        "(overhead + new prefill + decode); see replay.latency for what it leaves out.",
        "",
        "| Router | Operating point | Acc (%) | Mean (s) | p50 (s) | p95 (s) | Acc (%) per s |",
        "|---|---|---|---|---|---|---|",
    ]
    series, large = [], None
    for run in runs:
        frame = latencies.of(run)
        if frame is None or frame.height == 0:
            continue
        seconds = frame["seconds"].to_numpy()
        chosen = run.at_chosen().filter(pl.col("misses") == 0)
        accuracy = float(chosen["correct"].cast(pl.Float64).mean()) if chosen.height else float("nan")
        mean = float(seconds.mean())
        lines.append(
            f"| {run.label} | {params_text(run.point_params()) or '-'} | {100 * accuracy:.1f} | {mean:.4g} | "
            f"{np.percentile(seconds, 50):.4g} | {np.percentile(seconds, 95):.4g} | {100 * accuracy / mean:.4g} |"
        )
        series.append(_plotted(run, roles, latencies, accuracy, mean, frame.height))
        if run.router == "large-only":
            large = (mean, accuracy)
    for label, why in latencies.failed.items():
        lines.append(f"| {label} | no time: {why} | | | | | |")
    series = [entry for entry in series if entry is not None]
    if not series:
        return "\n".join(lines)
    if large is None:  # no large-only run here: the reference lines sit at the slowest point
        slowest = max(series, key=lambda entry: entry.cost[entry.chosen])
        large = (float(slowest.cost[slowest.chosen]), float(slowest.accuracy[slowest.chosen]))
    name = figures.add("latency", plots.pareto_png(series, "seconds", large, None))
    lines += ["", f"![Accuracy against mean seconds per query]({name})"]
    return "\n".join(lines)


def _plotted(run: Run, roles, latencies: Latencies, accuracy: float, mean: float, walks: int) -> plots.Series | None:
    """The run's configurations as a series of the accuracy-against-latency plot (None: no configuration timed)."""
    kind = plots.series_kind(run.router)
    if not run.swept:
        return plots.Series(
            run.label, kind, np.array([mean]), np.array([accuracy]), np.array([False]), 0, np.array([walks]), walks
        )
    summary = summarize(run.rows, roles).filter(pl.col("accuracy").is_not_null())
    configs = summary["config"].to_list()
    seconds = [latencies.mean(run, config) for config in configs]
    keep = [i for i, value in enumerate(seconds) if value is not None]
    if not keep:
        return None
    chosen = configs.index(run.chosen) if run.chosen in configs else 0
    return plots.Series(
        run.label,
        kind,
        np.array([seconds[i] for i in keep]),
        summary["accuracy"].to_numpy()[keep],
        (summary["misses"] > 0).to_numpy()[keep],
        keep.index(chosen) if chosen in keep else 0,
        (summary["n"] - summary["misses"]).to_numpy()[keep],
        int(summary["n"][0]),
    )
