"""The seeds' table layouts, from the same runs and operating points as the report (`trace report --table`).

- ``cmdp`` (Si, Lee, Bastani, Tables 1 and 2): one row per method at its operating point, the seed's methods
  first (small-only, large-only, RSD, SpecReason, STEER, the policy), then any other router; columns
  Acc (%), Cost and A/C (accuracy in % per cost unit) under the trace's dataset.
- ``cascade`` (Chen, Chen, Yen, Table 1): each model alone, then each cascade run (its chain of models, with
  or without P(IK)) at its operating point, with accuracy, PD (performance drop in points against the
  largest model alone) and Reduced CC (compute saved against the largest model alone, %); then, for a
  cascade swept over ``t_true``, its P(T)-threshold sensitivity: the same columns at every ``t_true``,
  the other parameters as chosen; last, every other chain the trace supports (each ordered subset of two or
  more of its models) that no run replayed, with the command that replays it.

Each table is written as Markdown and CSV next to the report. A table layout is a ``ReportTable`` subclass
registered in ``TABLES`` (replay.registry): the built-ins here with ``@TABLES.register``, others through entry
points of group ``trace.tables`` or as ``--table FILE.py:Class``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import polars as pl

from replay.params import params_text
from replay.registry import Registry, check_subclass

if TYPE_CHECKING:
    from analysis.operating_points import Row
    from analysis.report_inputs import Run

CMDP_ORDER = ("small-only", "large-only", "rsd", "specreason", "steer", "policy")
CHAIN_ARROW = " → "


@dataclass(frozen=True)
class TableInputs:
    """What a table is built from: the report's runs at their operating points."""

    rows: list[Row]  # the report's main table: small-only, large-only, then each router, at its operating point
    routers: list[Run]  # every router's run (all its configurations; ``chosen`` is the operating point)
    baselines: dict[str, Run]  # small-only and large-only
    roles: list[str]  # the trace's models, smallest first
    dataset: str
    cost_unit: str
    alone: Callable[[str], Run]  # one of the trace's models alone, replayed on the report's walks


class ReportTable:
    """A table layout of `trace report --table NAME`: ``frame`` builds it (written as table_NAME.csv), ``markdown``
    prints it in the report and table_NAME.md (by default every column as it is, under ``title``)."""

    name: ClassVar[str]
    title: ClassVar[str]

    def frame(self, inputs: TableInputs) -> pl.DataFrame:
        raise NotImplementedError

    def markdown(self, frame: pl.DataFrame, inputs: TableInputs) -> str:
        body = [["-" if value is None else str(value) for value in row] for row in frame.iter_rows()]
        return _markdown(self.title, frame.columns, body)


def _table_class(obj, origin: str) -> type[ReportTable]:
    return check_subclass(obj, origin, "table", ReportTable, ("frame",), {"name": str, "title": str})


def _looks_like_table(value) -> bool:
    return isinstance(value, type) and issubclass(value, ReportTable) and value is not ReportTable


TABLES = Registry("table", "trace.tables", _table_class, _looks_like_table)


@TABLES.register
class CmdpTable(ReportTable):
    """The CMDP seed's Tables 1 and 2: each method at its operating point, with Acc, Cost and A/C."""

    name = "cmdp"
    title = "The CMDP seed's layout (Tables 1 and 2): each method at its operating point"

    def frame(self, inputs: TableInputs) -> pl.DataFrame:
        return cmdp_table(inputs.rows, inputs.dataset, inputs.cost_unit)

    def markdown(self, frame: pl.DataFrame, inputs: TableInputs) -> str:
        dataset = frame["dataset"][0] if frame.height else "?"
        headers = ["Method", "Operating point", f"{dataset}: Acc (%)", f"Cost ({inputs.cost_unit})", "A/C"]
        cost_column = [column for column in frame.columns if column.startswith("cost_")][0]
        body = [
            [
                r["method"],
                r["operating_point"],
                _fmt(r["accuracy_pct"], ".1f"),
                _fmt(r[cost_column], ".4g"),
                _fmt(r["a_over_c"], ".4g"),
            ]
            for r in frame.iter_rows(named=True)
        ]
        return _markdown(self.title, headers, body)


@TABLES.register
class CascadeTable(ReportTable):
    """The cascade seed's Table 1: model chains with accuracy, PD and compute saving, with and without P(IK),
    and the P(T) threshold sensitivity."""

    name = "cascade"
    title = "The cascade seed's layout (Table 1): PD and Reduced CC against the largest model alone"

    def frame(self, inputs: TableInputs) -> pl.DataFrame:
        singles = {role: inputs.alone(role) for role in inputs.roles[1:-1]}
        return cascade_table(inputs.routers, inputs.baselines, inputs.roles, singles)

    def markdown(self, frame: pl.DataFrame, inputs: TableInputs) -> str:
        cost_unit = inputs.cost_unit
        headers = ["LLM(s)", "", "Operating point", "Acc. (%)", "PD (points)", "Reduced CC (%)", f"Cost ({cost_unit})"]
        body = [
            [
                r["chain"],
                r["kind"],
                r["operating_point"],
                _fmt(r["accuracy_pct"], ".2f"),
                _fmt(r["pd_points"], "+.2f"),
                _fmt(r["reduced_cc_pct"], ".2f"),
                _fmt(r["cost"], ".4g"),
            ]
            for r in frame.iter_rows(named=True)
        ]
        return _markdown(self.title, headers, body)


def cmdp_table(rows: list[Row], dataset: str, cost_unit: str) -> pl.DataFrame:
    """One row per method, the seed's order first; accuracy in %, cost per query, A/C in % per cost unit."""

    def rank(row: Row) -> tuple[int, int]:
        router = row.run.router
        return (CMDP_ORDER.index(router) if router in CMDP_ORDER else len(CMDP_ORDER), rows.index(row))

    return pl.DataFrame(
        [
            {
                "method": row.run.label,
                "operating_point": params_text(row.run.point_params()),
                "dataset": dataset,
                "accuracy_pct": _scaled(row.accuracy.value, 100),
                f"cost_{_unit_name(cost_unit)}": row.cost.value,
                "a_over_c": row.a_over_c.value,
            }
            for row in sorted(rows, key=rank)
        ],
        schema_overrides={
            "accuracy_pct": pl.Float64,
            f"cost_{_unit_name(cost_unit)}": pl.Float64,
            "a_over_c": pl.Float64,
        },
    )


def cascade_table(
    runs: list[Run], baselines: dict[str, Run], roles: list[str], singles: dict[str, Run] | None = None
) -> pl.DataFrame:
    """Every model alone (``singles``: the runs of the models between the smallest and the largest), every
    cascade run at its operating point, the t_true sensitivity of swept ones, and every chain of the trace's
    models that no run replayed."""
    largest = _accuracy_and_cost(baselines["large-only"].at_chosen())
    records = []
    alone = {roles[0]: baselines["small-only"], **(singles or {}), roles[-1]: baselines["large-only"]}
    for role in roles:
        if role in alone:
            accuracy, cost = _accuracy_and_cost(alone[role].at_chosen())
            records.append(_record(role, "single model", "", accuracy, cost, largest))
    replayed = set()
    for run in runs:
        if run.router != "cascade":
            continue
        chosen = run.params[run.chosen]
        chain = CHAIN_ARROW.join(_chain(chosen, roles))
        replayed.add(chain)
        with_pik = chosen.get("pik", True)
        pik = "with P(IK)" if with_pik else "without P(IK)"
        point = {k: v for k, v in run.point_params().items() if with_pik or k != "t_ik"}
        accuracy, cost = _accuracy_and_cost(run.at_chosen())
        records.append(_record(chain, pik, params_text(point), accuracy, cost, largest))
        others = {key: value for key, value in chosen.items() if key != "t_true"}
        for config, params in sorted(run.params.items(), key=lambda item: item[1].get("t_true", 0)):
            if config == run.chosen or {k: v for k, v in params.items() if k != "t_true"} != others:
                continue
            accuracy, cost = _accuracy_and_cost(run.rows.filter(pl.col("config") == config))
            records.append(
                _record(
                    chain,
                    f"{pik}, P(T) sensitivity",
                    params_text({"t_true": params["t_true"]}),
                    accuracy,
                    cost,
                    largest,
                )
            )
    for size in range(2, len(roles) + 1):
        for subset in itertools.combinations(roles, size):
            chain = CHAIN_ARROW.join(subset)
            if chain not in replayed:
                how = f"trace replay --router cascade --param models={','.join(subset)}"
                records.append({"chain": chain, "kind": "not replayed", "operating_point": how})
    return pl.DataFrame(
        records,
        schema={
            "chain": pl.String,
            "kind": pl.String,
            "operating_point": pl.String,
            "accuracy_pct": pl.Float64,
            "pd_points": pl.Float64,
            "reduced_cc_pct": pl.Float64,
            "cost": pl.Float64,
        },
    )


def _markdown(title: str, headers: list[str], body: list[list[str]]) -> str:
    lines = [f"## {title}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def _accuracy_and_cost(rows: pl.DataFrame) -> tuple[float | None, float | None]:
    done = rows.filter(pl.col("misses") == 0)
    if done.height == 0:
        return None, None
    return float(done["correct"].cast(pl.Float64).mean()), float(done["cost"].mean())


def _record(chain, kind, point, accuracy, cost, largest) -> dict:
    large_accuracy, large_cost = largest
    return {
        "chain": chain,
        "kind": kind,
        "operating_point": point,
        "accuracy_pct": _scaled(accuracy, 100),
        "pd_points": None if accuracy is None or large_accuracy is None else 100 * (accuracy - large_accuracy),
        "reduced_cc_pct": None if cost is None or not large_cost else 100 * (1 - cost / large_cost),
        "cost": cost,
    }


def _chain(params: dict, roles: list[str]) -> list[str]:
    models = params.get("models") or ""
    return [role.strip() for role in models.split(",")] if models else list(roles)


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else factor * value


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _unit_name(cost_unit: str) -> str:
    return cost_unit.lower().replace(" ", "_")
