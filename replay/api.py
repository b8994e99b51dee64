"""The Python API of phase two, for notebooks and scripts: what `trace replay` calls.

    from replay import api
    from analysis.report import report

    rsd = api.replay("runs/toy", "rsd", sweep={"tau": "0:1:0.05"}, split="all")
    rsd.summary()          # Polars: one row per configuration (accuracy, cost, A/C, large share, misses)
    rsd.outcomes           # Polars: one row per (configuration, problem, world)
    mine = api.replay("runs/toy", "my_router.py:MinLogprob", sweep={"theta": "-3:0:0.25"}, split="all")
    page = report("runs/toy", [rsd, mine], out="report/")   # the `trace report` page; page.markdown

    steer = api.fit("steer", "runs/gsm8k-train", splits=api.SplitSpec(by="split"))  # fit on one trace ...
    test = api.replay("runs/gsm8k-test", steer, sweep={"tau": "0:1:0.05"}, split="all")  # ... replay on another

A router is given as a registered name, an entry point, ``FILE.py:Class`` or ``module:Class`` (see
replay.routers), as a router class or per-step function (made with ``params``), or as a router instance.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl

from replay.costs import COSTS, Price, parse_prices
from replay.params import SweepLimits, parse_param, parse_sweeps
from replay.results import ReplayResult, miss_list, write_outcomes
from replay.routers import ROUTERS, make_router
from replay.routers.base import Router
from replay.run import fit_router, replay_trace
from replay.splits import SplitSpec
from replay.stepwise import StepRouter
from tracestore.errors import TraceError
from tracestore.remote import RemoteTrace, is_uri
from tracestore.store import Trace, open_trace
from tracestore.watch import check_unchanged, table_listing

__all__ = [
    "ReplayResult",
    "SplitSpec",
    "SweepLimits",
    "fit",
    "miss_list",
    "parse_param",
    "open_trace",
    "registered",
    "replay",
    "router",
    "slow_sweep_hint",
    "write_outcomes",
]

# a per-step router's replay slower than this suggests the vectorised form
SLOW_SECONDS = 10.0


def registered() -> pl.DataFrame:
    """The routers and cost models this installation knows (kind, name, source, about): built-in ones, and
    those installed packages declare through entry points (groups trace.routers, trace.costs). `trace replay
    --list` also shows phase one's scorers and backends and the report's tables."""
    rows = [*ROUTERS.rows(), *COSTS.rows()]
    columns = ("kind", "name", "source", "about")
    return pl.DataFrame([vars(row) for row in rows], schema=dict.fromkeys(columns, pl.String))


def router(reference: Any, **params: Any) -> Router:
    """A router: ``reference`` is a name, entry point, ``FILE.py:Class``, ``module:Class``, a router class or
    a per-step function; ``params`` are its constructor's (strings are converted as `--param` does)."""
    return make_router(reference, **params)


def _chosen(router: Any, params: Mapping[str, Any] | Sequence[str] | None) -> Router:
    if isinstance(params, Sequence) and not isinstance(params, str):
        params = dict(parse_param(text) for text in params)
    if isinstance(router, Router):
        if params:
            raise TraceError(f"params apply to a router given by name or class, not to the instance {router!r}")
        return router
    return make_router(router, **(params or {}))


def fit(
    router: Any,
    trace: str | os.PathLike | Trace,
    *,
    params: Mapping[str, Any] | Sequence[str] | None = None,
    splits: SplitSpec | None = None,
    grades: str | None = None,
) -> Router:
    """``router`` (as ``replay`` takes it) fitted on the train split of ``trace`` (and its calibration split, for a
    router that chooses something there), as ``splits`` divides it: pass it to ``replay`` to replay it on another
    trace of the same setting (what `trace replay --fit-on TRACE` does)."""
    root = trace.root if isinstance(trace, Trace) else trace
    return fit_router(_chosen(router, params), root, splits or SplitSpec(), grades)


def replay(
    trace: str | os.PathLike | Trace | RemoteTrace,
    router: Any,
    *,
    params: Mapping[str, Any] | Sequence[str] | None = None,
    sweep: Mapping[str, Any] | Sequence[str] | None = None,
    split: str = "test",
    cost: str = "flops",
    prices: Mapping[str, Price] | Sequence[str] | None = None,
    worlds: Sequence[int] | None = None,
    splits: SplitSpec | None = None,
    allow_overlap: bool = False,
    grades: str | None = None,
    limits: SweepLimits = SweepLimits(),
    latency_profile: str | os.PathLike | None = None,
) -> ReplayResult:
    """Fit ``router`` on the trace's train split (unless it is fitted already, e.g. by ``fit`` on another trace)
    and replay it on ``split`` (train, calibration, test or all), as ``splits`` divides the problems (default: a
    hash of the problem ids, 50/10/40; ``SplitSpec(by="split")``: the dataset's own split).

    ``router``: a router instance, or what ``router()`` takes, made with ``params`` (a dict, or `--param`
    strings ``name=value``). ``sweep``: parameter -> ``"start:stop:step"`` (stop included), ``"v1,v2"`` or a
    sequence of numbers, or `--sweep` strings; several parameters make a grid. ``grades``: the grade set of the
    final steps (default: the steps' own; others are written by `trace regrade`). ``cost``: flops,
    flops+prefill, kaplan, api (with ``prices``: role -> Price, or `--price` strings) or an installed cost
    model; ``latency`` reads the latency profile ``latency_profile`` (default: the trace's latency.json).
    Replaying one split whose problems the router's fit saw is refused unless ``allow_overlap``.
    ``trace``: a path or URL, or a trace opened with ``open_trace`` (at a URL, with a ``timeout`` of
    its own). ``limits``: how many configurations a sweep may have, and whether a sweep whose memory estimate
    exceeds the memory available is refused (a sweep of more than params.STREAM_STATES walk states streams its
    outcomes to a file instead of holding them). Returns the outcomes (``.outcomes``, one row per
    configuration, problem and world), the ``.summary()`` per configuration and the ``.misses`` (steps or
    scores the trace lacks), the same ones `trace replay` prints and writes. A local trace's table folders are
    listed before and after: if the router's code wrote there, a TraceError names the files instead.
    """
    chosen = _chosen(router, params)
    if prices is not None and not isinstance(prices, Mapping):
        prices = parse_prices(list(prices))
    root = trace.root if isinstance(trace, (Trace, RemoteTrace)) else trace
    listed = None if is_uri(root) else table_listing(root)
    result = replay_trace(
        trace,
        chosen,
        sweep=parse_sweeps(sweep, limits.max_configs, limits.memory_check),
        split=split,
        cost=cost,
        prices=dict(prices) if prices else None,
        worlds=list(worlds) if worlds is not None else None,
        splits=splits or SplitSpec(),
        allow_overlap=allow_overlap,
        max_configs=limits.max_configs,
        grades=grades,
        memory_check=limits.memory_check,
        latency_profile=latency_profile,
    )
    if listed is not None:
        check_unchanged(root, listed, f"router {chosen.name}")
    return result


def slow_sweep_hint(router: Router, result: ReplayResult, seconds: float) -> str | None:
    """A suggestion to write the vectorised form, when a per-step router's replay took long."""
    if not isinstance(router, StepRouter) or seconds < SLOW_SECONDS:
        return None
    n_configs = result.summary().height
    return (
        f"{router.name} is a per-step router: {n_configs:,} configuration(s) took {seconds:.1f}s, one Python call "
        "per draft and configuration. For sweeps write it as a vectorised DraftRouter (draft_signal: one number "
        "per step row; accept: keep or not for arrays of signals and parameter values); see README, "
        "'Your own router'."
    )
