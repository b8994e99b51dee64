"""Running a replay: every root of a trace walked by a router for each configuration of a sweep, in blocks,
and the result assembled; from a trace, with its train split fitted. A replay of more than
params.STREAM_STATES walk states streams its outcomes to a Parquet file, a block of configurations at a time.

The checks a replay makes of its router and sweep are replay.params'; the walks are the router's (on
replay.walk's kernel); the outcomes and misses are replay.results'.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from replay.costs import CostModel, Price, make_cost_model
from replay.data import ReplayData
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
from replay.splits import DEFAULT_FRACTIONS, DEFAULT_SPLIT_SEED, SPLITS, assign_splits
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
    return walked


def split_frame(problem_ids: list[str], seed: int, fractions: tuple[float, float, float]) -> pl.DataFrame:
    """The split of every problem id."""
    return pl.DataFrame(
        {"problem_id": problem_ids, "split": assign_splits(problem_ids, seed, fractions)},
        schema={"problem_id": pl.String, "split": pl.String},
    )


def replay_trace(
    trace: str | os.PathLike | Trace | RemoteTrace,
    router,
    *,
    sweep: dict[str, np.ndarray] | None = None,
    split: str = "test",
    cost: str = "flops",
    prices: dict[str, Price] | None = None,
    worlds: list[int] | None = None,
    split_seed: int = DEFAULT_SPLIT_SEED,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    max_configs: int = DEFAULT_MAX_CONFIGS,
    grades: str | None = None,
    memory_check: bool = True,
) -> ReplayResult:
    """Open a trace (or take one opened: at a URL, ``open_trace(uri, timeout=...)``), fit ``router`` on its train
    split, replay it on ``split`` (or ``all``), its final steps graded by grade set ``grades`` (default: the
    steps' own). The sweep is checked (parameters, domains, grid size, and with ``memory_check`` its memory
    estimate against the memory available) before anything is fitted."""
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
    cost_model = make_cost_model(cost, trace.manifest, prices)
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
    splits = split_frame(data.problems["problem_id"].to_list(), split_seed, fractions)
    ids_of = {name: splits.filter(pl.col("split") == name)["problem_id"].to_list() for name in SPLITS}
    evaluated = data if split == "all" else data.subset(ids_of[split])
    if evaluated.problems.height == 0:
        raise TraceError(f"split {split!r} of {root} holds no problems (fractions {fractions}, seed {split_seed})")
    n_roots = evaluated.roots.height
    check_grid_size(sweep or {}, max_configs, n_roots)
    if memory_check:
        check_sweep_memory(sweep or {}, n_roots)
    router.fit(data.subset(ids_of["train"]))
    scores_lost = bool(scorer) and data.scores_of(scorer)["value"].is_null().all()
    root_split = evaluated.roots["problem_id"].replace_strict(splits["problem_id"], splits["split"], default=None)

    def check_scores(walked: Walked) -> None:
        if scores_lost and walked.miss_scorer[walked.miss_role >= 0].any():
            raise TraceError(
                f"router {router.name} reads {scorer} scores, but {root} holds none, although trace.json lists the "
                f"scorer (the scores were lost); run `trace score {root} --scorer {scorer}`"
            )

    def with_split(outcomes: pl.DataFrame) -> pl.DataFrame:
        # The outcomes are configuration-major (each configuration's rows are the roots in order), so each root's
        # split, looked up once, is repeated per configuration: no lookup per outcome row, no intermediate column.
        return outcomes.with_columns(  # the outcomes are not copied
            split=pl.concat([root_split] * (outcomes.height // n_roots), rechunk=True),
            split_seed=pl.lit(split_seed, dtype=pl.Int64),
            split_fractions=pl.lit(",".join(str(f) for f in fractions)),
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
