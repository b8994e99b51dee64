"""A replay's result: the outcomes of its walks (one row per configuration, problem and world), its misses, and
the summary per configuration.

Outcomes: router, params (JSON, swept values filled in), config, problem_id, world, path (the final node, or
where the walk missed), answer and correct (null after a miss), cost = cost_<role> (decoding of kept steps, per
role) + cost_prefill + cost_discarded (drafts thrown away) + cost_scorer, n_<role> kept steps, n_discarded,
misses (0 or 1: a walk stops at its first miss), cost_model, cost_unit and cost_convention (how the cost model
counts, in words), a_over_c_unit and a_over_c_scale (A/C = a_over_c_scale x accuracy / cost, as the cost model's
seed table prints it). The misses are what ``miss_list`` returns for `trace gen --expand closure` (and online
replay) to fill.
"""

from __future__ import annotations

import json
import os
import shutil
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from replay.costs import CostModel
from replay.data import ReplayData
from replay.params import Configs
from replay.walk import Walk
from tracestore.atomic import write_atomic
from tracestore.outputs import check_output_file


class ReplayResult:
    """Per-(problem, world, configuration) outcomes, the misses, and the roles of the trace.

    The outcomes of a replay of more than params.STREAM_STATES walk states are not held in memory: they are in
    the Parquet file ``outcomes_file`` (in the temp folder, deleted with the result), their summary computed as
    they were written; ``outcomes`` reads them when asked for."""

    def __init__(
        self,
        outcomes: pl.DataFrame | None,
        roles: list[str],
        cost_unit: str,
        a_over_c_unit: str,
        misses: pl.DataFrame,
        *,
        outcomes_file: Path | None = None,
        summary: pl.DataFrame | None = None,
    ):
        self._outcomes = outcomes
        self.roles = roles
        self.cost_unit = cost_unit
        self.a_over_c_unit = a_over_c_unit
        self.misses = misses
        self.outcomes_file = outcomes_file
        self._summary = summary
        if outcomes_file is not None:
            weakref.finalize(self, outcomes_file.unlink, missing_ok=True)

    @property
    def outcomes(self) -> pl.DataFrame:
        return self._outcomes if self._outcomes is not None else pl.read_parquet(self.outcomes_file)

    @outcomes.setter
    def outcomes(self, outcomes: pl.DataFrame) -> None:
        self._outcomes = outcomes

    @property
    def n_outcomes(self) -> int:
        return self._outcomes.height if self._outcomes is not None else pq.read_metadata(self.outcomes_file).num_rows

    def summary(self) -> pl.DataFrame:
        return self._summary if self._summary is not None else summarize(self._outcomes, self.roles)

    def write_outcomes(self, path: str | os.PathLike, *, force: bool = False) -> None:
        """Write the outcomes to Parquet as ``write_outcomes`` does (streamed ones copied from their file)."""
        if self.outcomes_file is None:
            write_outcomes(self._outcomes, path, force=force)
        else:
            path = check_output_file(path, force=force)
            write_atomic(path, lambda temp: shutil.copyfile(self.outcomes_file, temp))


def write_outcomes(outcomes: pl.DataFrame, path: str | os.PathLike, *, force: bool = False) -> None:
    """Write outcomes to Parquet atomically (a temp file renamed over ``path``; an existing file is replaced
    only with ``force``)."""
    path = check_output_file(path, force=force)
    write_atomic(path, lambda temp: outcomes.write_parquet(temp, compression="zstd"))


class Walked:
    """What every state of a replay did, configuration-major (state = config x n_roots + root), filled in
    blocks of roots by ``put``: the outcomes' numeric columns, and where each walk ended."""

    def __init__(self, n_roles: int, n_configs: int, n_roots: int, index_dtype: type = np.int64):
        self.n_configs, self.n_roots = n_configs, n_roots
        n_states = n_configs * n_roots
        self.cost = np.zeros(n_states)
        self.decode = np.zeros((n_roles, n_states))
        self.prefill = np.zeros(n_states)
        self.discarded = np.zeros(n_states)
        self.scorer = np.zeros(n_states)
        self.kept = np.zeros((n_roles, n_states), dtype=np.int32)
        self.n_discarded = np.zeros(n_states, dtype=np.int32)
        self.final_step = np.zeros(n_states, dtype=index_dtype)
        self.end_node = np.zeros(n_states, dtype=index_dtype)
        self.miss_role = np.zeros(n_states, dtype=np.int8)  # at most 10 roles
        self.miss_scorer = np.zeros(n_states, dtype=bool)

    def put(self, roots: slice, walk: Walk) -> None:
        """The walk of roots ``roots`` with every configuration, its states configuration-major."""
        for name, value in (("cost", walk.total), *vars(walk).items()):
            target = getattr(self, name)
            grid = target.reshape(*target.shape[:-1], self.n_configs, self.n_roots)
            grid[..., roots] = value.reshape(*value.shape[:-1], self.n_configs, -1)


@dataclass(frozen=True)
class OutcomeSource:
    """What the outcomes read from a replay's data once its walks are done: the roots, each node's path, each
    step row's answer and correct, the roles. Taken out of the data, so that a caller done with the data can
    free its steps, scores and index before the outcomes' columns are built (a lower peak)."""

    roots: pl.DataFrame
    node_path: pl.Series
    final_values: pl.DataFrame
    roles: list[str]

    @classmethod
    def of(cls, data: ReplayData) -> OutcomeSource:
        return cls(data.roots.select("problem_id", "world"), data.node_path_series, data.final_values, data.roles)


def assemble(source: OutcomeSource, router, cost_model: CostModel, configs: Configs, walked: Walked) -> ReplayResult:
    """The result of a replay's walks: its outcomes and misses."""
    outcomes = _outcomes(source, router, cost_model, configs, walked)
    return ReplayResult(
        outcomes=outcomes,
        roles=source.roles,
        cost_unit=cost_model.unit,
        a_over_c_unit=cost_model.a_over_c_unit,
        misses=_misses(source.roles, router, outcomes, walked),
    )


def _outcomes(source: OutcomeSource, router, cost_model: CostModel, configs: Configs, walked: Walked) -> pl.DataFrame:
    n_roots, n_configs = source.roots.height, len(configs)
    state_config = np.repeat(np.arange(n_configs, dtype=np.int32), n_roots)
    params_json = pl.Series([json.dumps(p, sort_keys=True) for p in configs.params], dtype=pl.String)
    final = pl.Series(np.ma.masked_array(walked.final_step, walked.final_step < 0))
    return pl.DataFrame(
        {
            "params": params_json.gather(state_config),
            "config": state_config,
            "problem_id": pl.concat([source.roots["problem_id"]] * n_configs, rechunk=True),
            "world": pl.concat([source.roots["world"].cast(pl.Int32)] * n_configs, rechunk=True),
            "path": source.node_path.gather(walked.end_node),
            **source.final_values.select(pl.all().gather(final)).to_dict(),
            "cost": walked.cost,
            **{f"cost_{role}": walked.decode[i] for i, role in enumerate(source.roles)},
            "cost_prefill": walked.prefill,
            "cost_discarded": walked.discarded,
            "cost_scorer": walked.scorer,
            **{f"n_{role}": walked.kept[i] for i, role in enumerate(source.roles)},
            "n_discarded": walked.n_discarded,
            "misses": (walked.miss_role >= 0).astype(np.int32),
        },
        schema_overrides={"problem_id": pl.String, "world": pl.Int32, "path": pl.String},
    ).select(
        pl.lit(router.name, dtype=pl.String).alias("router"),
        pl.all(),
        cost_model=pl.lit(cost_model.name, dtype=pl.String),
        cost_unit=pl.lit(cost_model.unit, dtype=pl.String),
        cost_convention=pl.lit(cost_model.convention, dtype=pl.String),
        a_over_c_unit=pl.lit(cost_model.a_over_c_unit, dtype=pl.String),
        a_over_c_scale=pl.lit(float(cost_model.a_over_c_scale), dtype=pl.Float64),
    )


def _misses(roles: list[str], router, outcomes: pl.DataFrame, walked: Walked) -> pl.DataFrame:
    missed = np.flatnonzero(walked.miss_role >= 0)
    return pl.DataFrame(
        {
            "problem_id": outcomes["problem_id"].gather(missed),
            "world": outcomes["world"].gather(missed),
            "path": outcomes["path"].gather(missed),
            "model": pl.Series(roles, dtype=pl.String).gather(walked.miss_role[missed]),
            "scorer": pl.Series([router_scorer(router, roles)], dtype=pl.String)
            .new_from_index(0, missed.size)
            .set(pl.Series(~walked.miss_scorer[missed]), None),
            "config": outcomes["config"].gather(missed),
        }
    )


def miss_list(result: ReplayResult) -> list[dict]:
    """The distinct missing items of a replay, as records for closure and online generation:
    ``{"problem_id", "world", "path", "model", "scorer", "n_configs"}`` -- the step ``model`` would
    write at node ``path`` of (problem_id, world), or, when ``scorer`` is set, that scorer's score of
    the cached step at (path, model). ``n_configs`` counts the configurations that needed it."""
    grouped = (
        result.misses.group_by("problem_id", "world", "path", "model", "scorer")
        .agg(n_configs=pl.col("config").n_unique())
        .sort("problem_id", "world", "path", "model", "scorer", nulls_last=False)
    )
    return grouped.to_dicts()


def summarize(outcomes: pl.DataFrame, roles: list[str]) -> pl.DataFrame:
    """One row per configuration: accuracy and mean cost over the walks that finished, A/C (in the cost model's
    A/C unit), the share of kept steps written by the largest model, and the number of walks that missed."""
    steps = pl.sum_horizontal(pl.col(f"n_{role}") for role in roles)
    done = pl.col("misses") == 0
    return (
        outcomes.group_by("router", "config", "params", maintain_order=True)
        .agg(
            n=pl.len(),
            misses=pl.col("misses").sum(),
            accuracy=pl.col("correct").cast(pl.Float64).mean(),
            cost=pl.col("cost").filter(done).mean(),
            large_steps=pl.col(f"n_{roles[-1]}").filter(done).sum(),
            all_steps=steps.filter(done).sum(),
            a_over_c_scale=pl.col("a_over_c_scale").first(),
        )
        .with_columns(large_share=pl.when(pl.col("all_steps") > 0).then(pl.col("large_steps") / pl.col("all_steps")))
        .with_columns(a_over_c=pl.col("a_over_c_scale") * pl.col("accuracy") / pl.col("cost"))
        .drop("large_steps", "all_steps", "a_over_c_scale")
        .sort("config")
    )


def router_scorer(router, roles: list[str]) -> str | None:
    """The scorer ``router`` reads on a trace with model ``roles`` (None: none)."""
    scorer_for = getattr(router, "scorer_for", None)
    return scorer_for(roles) if scorer_for is not None else getattr(router, "scorer", None)
