"""The seeds' table layouts, from the same runs and operating points as the report (`trace report --table`).

- ``cmdp`` (Si, Lee, Bastani, Tables 1 and 2): one row per method at its operating point, the seed's methods
  first (small-only, large-only, RSD, SpecReason, STEER, the policy), then any other router; columns
  Ext. Models (whether the method reads a model of its own beside the routed ones: RSD's PRM), Acc (%), Cost
  and A/C in the cost model's A/C unit (FLOPs: accuracy % per TFLOP, Table 1; API: accuracy as a fraction per
  US cent, Table 2) under the trace's dataset.
- ``cascade`` (Chen, Chen, Yen, Table 1): each model alone, then each cascade run (its chain of models, with
  or without P(IK)) at its operating point, each metric relative to the chain's own last model M_k alone
  (3B -> 8B against 8B): accuracy, PD (points), Reduced CC by the seed's eq. (6) (CC = 2·N·k per model, k the
  queries that model answered: an attempt whose answer was not kept is not charged), the CC itself, the
  saving under the replay's cost model (every attempt, P(T) call and probe prefill paid) beside it, and a
  paired test against M_k (McNemar); then, for a cascade swept over ``t_true``, its P(T)-threshold
  sensitivity: the same columns at every ``t_true``, the other parameters as chosen; last, every other chain
  the trace supports (each ordered subset of two or more of its models) that no run replayed, with the
  command that replays it.

Each table's columns are defined once (``Column``: CSV name, Markdown header, format), and each row is a dict
of their values: a column is one more ``Column`` and one more value.

With a latency profile (analysis.latency), cmdp and cascade add a Time column: each row's mean seconds per query.

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

from analysis.misses import MISS_MARK
from analysis.stats import mcnemar, paired_problem_test
from replay.params import params_text
from replay.registry import Registry, check_subclass
from replay.results import router_scorer
from replay.routers import ROUTERS
from tracestore.errors import TraceError
from tracestore.schema import Manifest, role_of_char

if TYPE_CHECKING:
    from analysis.operating_points import Row
    from analysis.report_inputs import Run

CMDP_ORDER = ("small-only", "large-only", "rsd", "specreason", "steer", "policy")
SINGLE_MODEL_ROUTERS = ("small-only", "large-only", "only")
CHAIN_ARROW = " → "
GIGA = 1e9  # the cascade seed prints its eq. (6) compute cost in GFLOPs
TIME_COLUMN = "time_s"  # mean seconds per query under a latency profile (analysis.latency), when one is available
TIMED = "_timed"  # a record's (run, configuration or None for the chosen one), for its Time column


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
    a_over_c_unit: str = ""  # what one A/C number means under the results' cost model
    manifest: Manifest | None = None  # the trace's trace.json: model sizes, scorers
    seed: int = 0  # of the paired permutation test (several worlds per problem)
    time: Callable[..., float | None] | None = None  # time(run, config=chosen): mean seconds per query (a profile)


@dataclass(frozen=True)
class Column:
    """One column of a seed table: its CSV name and Markdown header (``{cost_unit}``, ``{a_over_c_unit}``,
    ``{unit_name}`` and ``{dataset}`` are filled in), its type, how Markdown prints a number (``spec``), and
    whether Markdown shows it at all (the CSV has every column)."""

    key: str
    header: str
    dtype: pl.DataType = pl.Float64
    spec: str = ""
    in_markdown: bool = True

    def text(self, value) -> str:
        if value is None:
            return "-"
        return format(value, self.spec) if self.spec else str(value)


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


class ColumnTable(ReportTable):
    """A layout whose columns are ``columns``: the frame is ``records`` under them, the Markdown their headers
    and formatted values, then ``notes``."""

    columns: ClassVar[tuple[Column, ...]]
    timed: ClassVar[bool] = False  # with a latency profile, a Time column from each record's TIMED (run, config)

    def records(self, inputs: TableInputs) -> list[dict]:
        raise NotImplementedError

    def notes(self, inputs: TableInputs) -> str:
        return ""

    def all_columns(self, inputs: TableInputs) -> tuple[Column, ...]:
        """``columns``, and Time where the table is timed and a latency profile is available."""
        timed = self.timed and inputs.time is not None
        return (*self.columns, Column(TIME_COLUMN, "Time (s)", spec=".4g")) if timed else self.columns

    def frame(self, inputs: TableInputs) -> pl.DataFrame:
        names = _names(inputs)
        columns = self.all_columns(inputs)
        schema = {column.key.format(**names): column.dtype for column in columns}
        keys = list(schema)
        rows = []
        for record in self.records(inputs):
            timed = record.pop(TIMED, None)
            if TIME_COLUMN in schema and timed is not None:
                record[TIME_COLUMN] = inputs.time(*timed)
            rows.append({key.format(**names): value for key, value in record.items()})
        return pl.DataFrame([{key: row.get(key) for key in keys} for row in rows], schema=schema)

    def markdown(self, frame: pl.DataFrame, inputs: TableInputs) -> str:
        names = _names(inputs)
        shown = [column for column in self.all_columns(inputs) if column.in_markdown]
        body = [
            [column.text(row[column.key.format(**names)]) for column in shown] for row in frame.iter_rows(named=True)
        ]
        table = _markdown(self.title, [column.header.format(**names) for column in shown], body)
        notes = self.notes(inputs)
        return table + ("\n\n" + notes if notes else "")


_MISSED_NOTE = f" {MISS_MARK}: some walks missed (needed steps the trace lacks); accuracy and cost cover the others."


def _names(inputs: TableInputs) -> dict[str, str]:
    return {
        "cost_unit": inputs.cost_unit,
        "unit_name": inputs.cost_unit.lower().replace(" ", "_"),
        "a_over_c_unit": inputs.a_over_c_unit or "accuracy per cost",
        "dataset": inputs.dataset,
    }


@TABLES.register
class CmdpTable(ColumnTable):
    """The CMDP seed's Tables 1 and 2: each method at its operating point, with Ext. Models, Acc, Cost and A/C."""

    name = "cmdp"
    timed = True
    title = "The CMDP seed's layout (Tables 1 and 2): each method at its operating point"
    columns = (
        Column("method", "Method", pl.String),
        Column("ext_models", "Ext. Models", pl.String),
        Column("operating_point", "Operating point", pl.String),
        Column("dataset", "Dataset", pl.String, in_markdown=False),
        Column("accuracy_pct", "{dataset}: Acc (%)", spec=".1f"),
        Column("cost_{unit_name}", "Cost ({cost_unit})", spec=".4g"),
        Column("a_over_c", "A/C ({a_over_c_unit})", spec=".4g"),
    )

    def records(self, inputs: TableInputs) -> list[dict]:
        rows = inputs.rows

        def rank(row: Row) -> tuple[int, int]:
            router = row.run.router
            return (CMDP_ORDER.index(router) if router in CMDP_ORDER else len(CMDP_ORDER), rows.index(row))

        scorers = inputs.manifest.scorers if inputs.manifest is not None else {}
        return [
            {
                "method": row.run.label + (f" {MISS_MARK}" if row.misses else ""),
                "ext_models": external_models(row.run, inputs.roles, scorers),
                "operating_point": params_text(row.run.point_params()),
                "dataset": inputs.dataset,
                "accuracy_pct": _scaled(row.accuracy.value, 100),
                "cost_{unit_name}": row.cost.value,
                "a_over_c": row.a_over_c.value,
                TIMED: (row.run, None),
            }
            for row in sorted(rows, key=rank)
        ]

    def notes(self, inputs: TableInputs) -> str:
        return (
            "Ext. Models: ✓ where the method reads a model of its own beside the routed ones (RSD's PRM), × where it "
            "reads none or one of the routed models' (SpecReason's judge is its target), – for a model alone; "
            f"A/C in {inputs.a_over_c_unit or 'accuracy per cost'}."
            + (_MISSED_NOTE if any(row.misses for row in inputs.rows) else "")
        )


def external_models(run: Run, roles: list[str], scorers: dict[str, dict]) -> str:
    """The CMDP tables' "Ext. Models" of one run: "–" for a model alone, "✓" when its router reads a scorer that
    runs a model of its own, "×" when it reads none or a routed model's verdict, "?" when neither is known (a
    router that is not built in, a scorer trace.json does not describe)."""
    if run.router in SINGLE_MODEL_ROUTERS:
        return "–"
    cls = ROUTERS.builtins().get(run.router)
    if cls is None:
        return "?"
    params = run.params[run.chosen]
    scorer = router_scorer(cls(**{name: params[name] for name in cls.param_names() if name in params}), roles)
    if scorer is None:
        return "×"
    if scorer not in scorers:
        return "?"
    return "×" if scorers[scorer].get("model") in (*roles, "self") else "✓"


@TABLES.register
class CascadeTable(ColumnTable):
    """The cascade seed's Table 1: model chains with accuracy, PD, the compute saving of eq. (6) and of the
    replay's cost model, and McNemar, each against the chain's own last model; with and without P(IK), and the
    P(T) threshold sensitivity."""

    name = "cascade"
    timed = True
    title = "The cascade seed's layout (Table 1): each chain against its own last model M_k alone"
    columns = (
        Column("chain", "LLM(s)", pl.String),
        Column("kind", "", pl.String),
        Column("operating_point", "Operating point", pl.String),
        Column("accuracy_pct", "Acc. (%)", spec=".2f"),
        Column("pd_points", "PD (points)", spec="+.2f"),
        Column("reduced_cc_pct", "Reduced CC, eq. 6 (%)", spec=".2f"),
        Column("cc_gflops", "CC, eq. 6 (GFLOPs)", spec=".4g"),
        Column("reduced_cost_pct", "Reduced cost, every attempt paid (%)", spec=".2f"),
        Column("cost", "Cost ({cost_unit})", spec=".4g"),
        Column("p_vs_last", "p vs M_k", spec=".3g"),
    )

    def records(self, inputs: TableInputs) -> list[dict]:
        return cascade_records(inputs)

    def notes(self, inputs: TableInputs) -> str:
        return (
            "PD: accuracy minus M_k alone's, in points. Reduced CC: 1 - CC / CC(M_k alone), CC by the seed's eq. "
            "(6): 2·N·k summed over the chain's models, k the queries whose answer that model gave (an attempt "
            "whose answer was not kept is not charged), N the parameters trace.json records; CC is over the "
            "reported queries. Reduced cost: the same saving under the replay's cost model, which pays every "
            f"attempt, P(T) call and probe prefill (Cost, in {inputs.cost_unit} per query). p vs M_k: McNemar's "
            "test against M_k alone on the same (problem, world) walks (exact binomial under 25 discordant pairs), "
            "or a paired permutation test over problems when they have several worlds."
            + (_MISSED_NOTE if any(run.at_chosen()["misses"].sum() for run in inputs.routers) else "")
        )


def cascade_records(inputs: TableInputs) -> list[dict]:
    """Every model alone, every cascade run at its operating point and the t_true sensitivity of swept ones,
    each against its chain's last model alone, and every chain of the trace's models that no run replayed."""
    roles = inputs.roles
    alone = {
        roles[0]: inputs.baselines["small-only"],
        **{role: inputs.alone(role) for role in roles[1:-1]},
        roles[-1]: inputs.baselines["large-only"],
    }
    sizes = _parameter_counts(inputs.manifest, roles)
    several_worlds = alone[roles[-1]].at_chosen()["world"].n_unique() > 1

    def record(chain: str, kind: str, point: str, rows: pl.DataFrame, last: str | None, timed: tuple) -> dict:
        reference = alone[last].at_chosen() if last is not None else None
        return {
            "chain": chain + (f" {MISS_MARK}" if rows["misses"].sum() else ""),
            "kind": kind,
            "operating_point": point,
            **chain_measures(rows, reference, sizes, several_worlds, inputs.seed),
            TIMED: timed,
        }

    records = [record(role, "single model", "", alone[role].at_chosen(), None, (alone[role], None)) for role in roles]
    replayed = set()
    for run in inputs.routers:
        if run.router != "cascade":
            continue
        chosen = run.params[run.chosen]
        models = _chain(chosen, roles)
        chain = CHAIN_ARROW.join(models)
        replayed.add(chain)
        pik = "with P(IK)" if chosen.get("pik", True) else "without P(IK)"
        records.append(record(chain, pik, params_text(run.point_params()), run.at_chosen(), models[-1], (run, None)))
        others = {key: value for key, value in chosen.items() if key != "t_true"}
        for config, params in sorted(run.params.items(), key=lambda item: item[1].get("t_true", 0)):
            if config == run.chosen or {k: v for k, v in params.items() if k != "t_true"} != others:
                continue
            point = params_text({"t_true": params["t_true"]})
            rows = run.rows.filter(pl.col("config") == config)
            records.append(record(chain, f"{pik}, P(T) sensitivity", point, rows, models[-1], (run, config)))
    for size in range(2, len(roles) + 1):
        for subset in itertools.combinations(roles, size):
            chain = CHAIN_ARROW.join(subset)
            if chain not in replayed:
                how = f"trace replay --router cascade --param models={','.join(subset)}"
                records.append({"chain": chain, "kind": "not replayed", "operating_point": how})
    return records


def chain_measures(
    rows: pl.DataFrame,
    reference: pl.DataFrame | None,
    sizes: dict[str, float],
    several_worlds: bool,
    seed: int = 0,
) -> dict:
    """The cascade table's numbers of one configuration's walks ``rows``, over those that finished: accuracy,
    the eq. (6) CC (2·N of the model whose answer each walk kept, summed, in GFLOPs) and the mean cost; with
    ``reference`` (M_k alone's walks), PD, both savings and the paired test against it."""
    done = rows.filter(pl.col("misses") == 0)
    if done.height == 0:
        return {}
    accuracy = float(done["correct"].cast(pl.Float64).mean())
    cost = float(done["cost"].mean())
    cc = 2 * sum(sizes[role_of_char(path[-1])] for path in done["path"].to_list())
    measures = {"accuracy_pct": 100 * accuracy, "cc_gflops": cc / GIGA, "cost": cost}
    reference_done = reference.filter(pl.col("misses") == 0) if reference is not None else None
    if reference_done is None or reference_done.height == 0:
        return measures
    reference_accuracy = float(reference_done["correct"].cast(pl.Float64).mean())
    reference_cc = 2 * sum(sizes[role_of_char(path[-1])] for path in reference_done["path"].to_list())
    reference_cost = float(reference_done["cost"].mean())
    paired = done.select("problem_id", "world", "correct").join(
        reference_done.select("problem_id", "world", reference_correct="correct"), on=["problem_id", "world"]
    )
    correct, reference_correct = paired["correct"].to_numpy(), paired["reference_correct"].to_numpy()
    if several_worlds:
        test = paired_problem_test(correct, reference_correct, paired["problem_id"].to_numpy(), seed)
    else:
        test = mcnemar(correct, reference_correct)
    return {
        **measures,
        "pd_points": 100 * (accuracy - reference_accuracy),
        "reduced_cc_pct": 100 * (1 - (cc / done.height) / (reference_cc / reference_done.height)),
        "reduced_cost_pct": 100 * (1 - cost / reference_cost) if reference_cost else None,
        "p_vs_last": test.p_value,
    }


def _parameter_counts(manifest: Manifest | None, roles: list[str]) -> dict[str, float]:
    """Each model's N for eq. (6); a model without one is an error, never a zero."""
    sizes = manifest.n_params if manifest is not None else {}
    lacking = [role for role in roles if role not in sizes]
    if lacking:
        raise TraceError(
            f"table cascade: its CC (the seed's eq. 6, 2·N·k) needs n_params of {', '.join(lacking)} in trace.json"
        )
    return sizes


def _markdown(title: str, headers: list[str], body: list[list[str]]) -> str:
    lines = [f"## {title}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def _chain(params: dict, roles: list[str]) -> list[str]:
    models = params.get("models") or ""
    return [role.strip() for role in models.split(",")] if models else list(roles)


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else factor * value
