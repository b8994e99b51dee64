"""Running a replay: every root of a trace walked by a router for each configuration of a sweep, in blocks,
and the result assembled; from a trace, with the router fitted on its train split (or on another trace's:
``fit_router``) and the rows its fit saw marked. A replay of more than
params.STREAM_STATES walk states streams its outcomes to a Parquet file, a block of configurations at a time.

The checks a replay makes of its router and sweep are replay.params'; the walks are the router's (on
replay.walk's kernel); the outcomes and misses are replay.results'.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from replay.artifacts import (
    check_setting,
    describe_record,
    load_split_data,
    manifest_digest,
    setting,
    split_data,
)
from replay.costs import CostModel, Price, make_cost_model
from replay.data import ReplayData
from replay.latency import profile_path
from replay.params import (
    DEFAULT_MAX_CONFIGS,
    STREAM_BLOCK_STATES,
    STREAM_STATES,
    Configs,
    check_grid_size,
    check_sweep,
    check_sweep_memory,
    sweep_configs,
)
from replay.results import OutcomeSource, ReplayResult, Walked, assemble, router_scorer, summarize
from replay.splits import SPLITS, SplitSpec
from replay.walk import Costs
from tracestore.errors import TraceError
from tracestore.remote import RemoteTrace
from tracestore.store import Trace, open_trace

# Walk states (problem x world x configuration) walked at once: a larger grid is walked in blocks of roots, each
# with every configuration. Small enough that a block's working arrays stay in the CPU's caches and its working
# memory is a small part of a replay's peak (a million states per chunk cost ~300 MB and 1.5x the time per state).
CHUNK_STATES = 131_072


def replay(
    data: ReplayData,
    router,
    cost_model: CostModel,
    sweep: dict[str, np.ndarray] | None = None,
    max_configs: int = DEFAULT_MAX_CONFIGS,
) -> ReplayResult:
    """Replay a fitted ``router`` over every root of ``data``, for one configuration or a whole sweep
    (at most ``max_configs`` configurations, walked CHUNK_STATES walk states at a time); the outcomes and
    misses are replay.results'."""
    router.check_fitted()
    check_sweep(router, sweep or {})
    check_grid_size(sweep or {}, max_configs, data.roots.height)
    configs, walked = _walk_configs(data, router, cost_model, sweep)
    return assemble(OutcomeSource.of(data), router, cost_model, configs, walked)


def _walk_configs(
    data: ReplayData, router, cost_model: CostModel, sweep: dict[str, np.ndarray] | None
) -> tuple[Configs, Walked]:
    """Walk every root of ``data`` with every configuration of the (checked) sweep."""
    configs = sweep_configs(router, sweep)
    # the costs' per-step arrays go before the outcomes' columns are built: a lower peak
    return configs, _walk(data, router, Costs(data, cost_model), configs)


def _walk(data: ReplayData, router, costs: Costs, configs: Configs) -> Walked:
    """Walk every root of ``data`` with every one of ``configs``."""
    n_roots, n_configs = data.roots.height, len(configs)
    n_nodes = data.tree.children.shape[1]
    walked = Walked(len(data.roles), n_configs, n_roots, np.int32 if n_nodes < 2**31 else np.int64)
    root_nodes = data.roots["node"].to_numpy()
    # A block of roots with every configuration at a time: the walk touches only those roots' trees, which
    # stay in the CPU's caches, so a state costs the same however large the trace.
    block = max(1, CHUNK_STATES // max(n_configs, 1))
    for first in range(0, n_roots, block):
        roots = slice(first, min(first + block, n_roots))
        starts = np.tile(root_nodes[roots], n_configs)
        params = {name: np.repeat(values, len(starts) // n_configs) for name, values in configs.values.items()}
        walked.put(roots, router.walk(data, costs, starts, params))
    costs.check_priced(walked.cost, walked.decode, router.name)
    return walked


def replay_trace(
    trace: str | os.PathLike | Trace | RemoteTrace,
    router,
    *,
    sweep: dict[str, np.ndarray] | None = None,
    split: str = "test",
    cost: str = "flops",
    prices: dict[str, Price] | None = None,
    worlds: list[int] | None = None,
    splits: SplitSpec = SplitSpec(),
    allow_overlap: bool = False,
    max_configs: int = DEFAULT_MAX_CONFIGS,
    grades: str | None = None,
    memory_check: bool = True,
    latency_profile: str | os.PathLike | None = None,
) -> ReplayResult:
    """Open a trace (or take one opened: at a URL, ``open_trace(uri, timeout=...)``), fit ``router`` on its train
    split (and calibration split, for a router that uses one) unless it is fitted already (``fit_router``: on
    another trace), and replay it on ``split`` (or ``all``) as ``splits`` divides the problems, its final steps
    graded by grade set ``grades`` (default: the steps' own). The sweep is checked (parameters, domains, grid
    size, and with ``memory_check`` its memory estimate against the memory available) before anything is fitted.

    The outcomes say where the router was fitted (``fitted_on``: JSON, one record per fitted part), on which trace
    they were replayed (``replayed_on``: its directory, cache-key digest and setting) and, per row, whether the
    fit saw the row's problem (``fit_overlap``). Replaying one split (not ``all``) whose problems a fit saw is
    refused unless ``allow_overlap``; with ``all`` the rows are only marked (`trace report` refuses to report them).
    ``latency_profile``: the profile ``cost="latency"`` reads (default: the trace's latency.json).
    """
    if split not in (*SPLITS, "all"):
        raise TraceError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}, all")
    check_sweep(router, sweep or {})
    trace = trace if isinstance(trace, (Trace, RemoteTrace)) else open_trace(trace)
    root = trace.root
    scorer = router_scorer(router, trace.manifest.roles)
    if scorer and scorer not in trace.manifest.scorers:
        _, _, asked = scorer.partition("@")
        whose = f" (the {asked} model's own verdicts)" if asked else ""
        raise TraceError(
            f"router {router.name} reads {scorer} scores{whose}, which {root} does not have; "
            f"run `trace score {root} --scorer {scorer}` first"
        )
    cost_model = make_cost_model(cost, trace.manifest, prices, profile_path(root, latency_profile))
    if latency_profile and not getattr(cost_model, "uses_profile", False):
        raise TraceError(f"--latency-profile applies to --cost latency, not {cost}")
    data = ReplayData.from_trace(trace, grades)
    if worlds is not None:
        absent = sorted(set(worlds) - set(data.worlds))
        if absent:
            raise TraceError(
                f"{root} has no world(s) {', '.join(map(str, absent))}; it has {', '.join(map(str, data.worlds))}"
            )
        data = ReplayData(
            data.manifest, data.steps, data.problems, scores=data.scores, hidden=data.hidden, worlds=worlds
        )
    parts = split_data(data, trace, splits.check())
    evaluated = data if split == "all" else parts.of(split)
    if evaluated.problems.height == 0:
        raise TraceError(f"split {split!r} of {root} holds no problems ({splits.describe()})")
    n_roots = evaluated.roots.height
    check_grid_size(sweep or {}, max_configs, n_roots)
    if memory_check:
        check_sweep_memory(sweep or {}, n_roots)
    if is_fitted(router):
        for record in router.fitted_on_:
            check_setting(record, trace.manifest, record.get("file") or f"router {router.name}", root)
    else:
        router.fit(parts.train, parts.calibration)
    fitted_ids = set().union(*(record["problem_ids"] for record in router.fitted_on_))
    if split != "all" and not allow_overlap:
        check_no_overlap(router, evaluated.problems["problem_id"].to_list(), fitted_ids, f"split {split} of {root}")
    scores_lost = bool(scorer) and data.scores_of(scorer)["value"].is_null().all()
    root_ids = evaluated.roots["problem_id"]
    table = parts.splits
    root_split = root_ids.replace_strict(table["problem_id"], table["split"], default=None, return_dtype=pl.String)
    root_overlap = root_ids.is_in(pl.Series(sorted(fitted_ids), dtype=pl.String).implode())
    del parts
    records = json.dumps([summary_record(record) for record in router.fitted_on_], sort_keys=True)
    replayed_on = {
        "trace": str(root),
        "manifest_digest": manifest_digest(trace.manifest),
        "setting": setting(trace.manifest, [scorer] if scorer else []),
    }

    def check_scores(walked: Walked) -> None:
        if scores_lost and walked.miss_scorer[walked.miss_role >= 0].any():
            raise TraceError(
                f"router {router.name} reads {scorer} scores, but {root} holds none, although trace.json lists the "
                f"scorer (the scores were lost); run `trace score {root} --scorer {scorer}`"
            )

    def with_split(outcomes: pl.DataFrame) -> pl.DataFrame:
        # The outcomes are configuration-major (each configuration's rows are the roots in order), so each root's
        # split, looked up once, is repeated per configuration: no lookup per outcome row, no intermediate column.
        n_configs = outcomes.height // n_roots
        return outcomes.with_columns(  # the outcomes are not copied
            split=pl.concat([root_split] * n_configs, rechunk=True),
            splits=pl.lit(json.dumps(splits.record(), sort_keys=True)),
            fit_overlap=pl.concat([root_overlap] * n_configs, rechunk=True),
            fitted_on=pl.lit(records),
            replayed_on=pl.lit(json.dumps(replayed_on, sort_keys=True)),
        )

    if math.prod(len(values) for values in (sweep or {}).values()) * n_roots > STREAM_STATES:
        configs = sweep_configs(router, sweep)
        return _replay_streamed(evaluated, router, cost_model, configs, with_split, check_scores)
    configs, walked = _walk_configs(evaluated, router, cost_model, sweep)
    check_scores(walked)
    source = OutcomeSource.of(evaluated)
    del data, evaluated  # the trace's steps, scores and index are freed before the outcomes are built: a lower peak
    result = assemble(source, router, cost_model, configs, walked)
    del source, walked
    result.outcomes = with_split(result.outcomes)
    return result


def is_fitted(router) -> bool:
    return hasattr(router, "n_train_problems_")


def fit_router(router, root: str | os.PathLike, splits: SplitSpec = SplitSpec(), grades: str | None = None):
    """``router`` fitted on the train split (and calibration split) of the trace at ``root``: what `trace replay
    --fit-on TRACE` replays on another trace."""
    parts = load_split_data(root, splits, grades)
    return router.fit(parts.train, parts.calibration)


def check_no_overlap(router, problem_ids: list[str], fitted_ids: set[str], rows: str) -> None:
    """TraceError if some of ``problem_ids`` (the rows replayed) are among the problems a fit of ``router`` saw."""
    overlap = sorted(set(problem_ids) & fitted_ids)
    if overlap:
        what = "; ".join(describe_record(record) for record in router.fitted_on_)
        raise TraceError(
            f"{len(overlap):,} of the {len(problem_ids):,} problems of {rows} are among those router {router.name} "
            f"was fitted on ({what}; first: {overlap[0]!r}); replay another split or trace, or pass --allow-overlap"
        )


def summary_record(record: dict) -> dict:
    """A fit record as the outcomes carry it: its problem ids counted, not listed."""
    summary = {key: value for key, value in record.items() if key not in ("problem_ids", "setting")}
    return {**summary, "n_problems": len(record["problem_ids"])}


def _replay_streamed(
    data: ReplayData,
    router,
    cost_model: CostModel,
    configs: Configs,
    finish: Callable[[pl.DataFrame], pl.DataFrame],
    check: Callable[[Walked], None],
) -> ReplayResult:
    """A replay too large to hold (see STREAM_STATES): the configurations walked in blocks of at most
    STREAM_BLOCK_STATES walk states, each block's outcomes (completed by ``finish``) appended to a Parquet file
    in the temp folder, its summary and misses kept."""
    source = OutcomeSource.of(data)
    costs = Costs(data, cost_model)
    per_block = max(1, STREAM_BLOCK_STATES // data.roots.height)
    handle, name = tempfile.mkstemp(prefix="trace-outcomes-", suffix=".parquet")
    os.close(handle)
    path = Path(name)
    summaries, misses = [], []

    def blocks() -> Iterator[pa.Table]:
        for first in range(0, len(configs), per_block):
            block = configs.take(slice(first, first + per_block))
            walked = _walk(data, router, costs, block)
            check(walked)
            part = assemble(source, router, cost_model, block, walked)
            outcomes = finish(part.outcomes.with_columns(pl.col("config") + first))
            summaries.append(summarize(outcomes, source.roles))
            misses.append(part.misses.with_columns(pl.col("config") + first))
            yield outcomes.to_arrow()

    try:
        parts = blocks()
        head = next(parts)
        with pq.ParquetWriter(path, head.schema, compression="zstd") as writer:
            writer.write_table(head)
            for outcomes in parts:
                writer.write_table(outcomes)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return ReplayResult(
        None,
        source.roles,
        cost_model.unit,
        cost_model.a_over_c_unit,
        pl.concat(misses),
        outcomes_file=path,
        summary=pl.concat(summaries),
    )
