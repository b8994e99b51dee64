"""`trace replay`'s terminal table: one row per configuration, fitted to the terminal (``COLUMNS`` respected:
long cells wrap, numbers are three significant digits in a unit chosen for the data, nothing is cut short).

Which configurations are shown: a sweep of two or more parameters (a grid, where sweep order means nothing)
shows its frontier (the cheapest configuration at each accuracy among those without misses) by cost; a longer
one-parameter sweep is thinned evenly; ``show_all`` (`--all`) shows every configuration, a grid's frontier first.
A configuration where some walk missed is marked (its accuracy and cost cover only the walks that finished) and
never listed above a complete one in a grid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import polars as pl
from rich.markup import escape
from rich.table import Table

from analysis.frontier import frontier_order
from analysis.misses import MISS_MARK
from analysis.units import CostScale, cost_scale, number
from replay.params import params_text

MAX_ROWS = 21


@dataclass(frozen=True)
class Shown:
    """The summary rows to print, in order, and what the caption says about the choice (None: every row, in
    sweep order)."""

    rows: list[dict]
    choice: str | None


def frontier_indices(summary: pl.DataFrame) -> list[int]:
    """Row indices of the configurations without misses on the cost-accuracy frontier, by cost."""
    complete = np.flatnonzero(
        (summary["misses"] == 0).to_numpy() & summary["accuracy"].is_not_null().to_numpy()
        & summary["cost"].is_not_null().to_numpy()
    )  # fmt: skip
    cost = summary["cost"].to_numpy()[complete].astype(float)
    accuracy = summary["accuracy"].to_numpy()[complete].astype(float)
    return [int(complete[i]) for i in frontier_order(cost, accuracy)]


def shown_rows(summary: pl.DataFrame, swept: list[str], show_all: bool, max_rows: int = MAX_ROWS) -> Shown:
    """The rows to print (a sweep may have millions of configurations: rows become dicts only once chosen)."""
    n = summary.height
    if len(swept) >= 2:
        frontier = frontier_indices(summary)
        if not show_all:
            return Shown(
                summary[frontier].to_dicts(),
                f"{len(frontier)} of {n} configurations shown: the frontier (the cheapest at each accuracy, "
                "without misses), by cost; --all shows every one",
            )
        chosen = set(frontier)
        missed = (summary["misses"] > 0).to_numpy()
        rest = [i for i in range(n) if i not in chosen]
        order = frontier + [i for i in rest if not missed[i]] + [i for i in rest if missed[i]]
        return Shown(
            summary[order].to_dicts(),
            f"the {len(frontier)} frontier configurations first, by cost; then the others"
            + (f", those with misses ({MISS_MARK}) last" if missed[rest].any() else ""),
        )
    if show_all or n <= max_rows:
        return Shown(summary.to_dicts(), None)
    step = -(-(n - 1) // (max_rows - 1))
    thinned = [*range(0, n, step), *([n - 1] if (n - 1) % step else [])]
    return Shown(
        summary[thinned].to_dicts(),
        f"{len(thinned)} of {n} configurations shown, evenly spaced; --all shows every one",
    )


def a_over_c_words(a_over_c_unit: str, scale: CostScale) -> str:
    """The cost model's A/C unit in words with the cost unit shown ("accuracy % per TFLOP" -> "... per MFLOP")."""
    source = CostScale(scale.source, scale.source).singular
    return a_over_c_unit.replace(f"per {source}", f"per {scale.singular}") if scale.factor != 1 else a_over_c_unit


def replay_table(
    summary: pl.DataFrame,
    cost_unit: str,
    a_over_c_unit: str,
    swept: list[str],
    title: str,
    show_all: bool,
    width: int,
    idle: tuple[str, ...] = (),
) -> Table:
    """The rich table of a replay summary (replay.results.summarize) for a terminal ``width`` wide; ``title``
    names the run; ``idle``: parameters the configuration does not read (not shown)."""
    shown = shown_rows(summary, swept, show_all)
    scale = cost_scale(cost_unit, summary["cost"].to_list())
    missed = any(row["misses"] for row in shown.rows)
    notes = [shown.choice] if shown.choice else []
    if missed:
        notes.append(f"{MISS_MARK} some walks missed: accuracy and cost over the walks that finished")
    rows = []
    for row in shown.rows:
        params = json.loads(row["params"])
        params = (
            {k: params[k] for k in swept}
            if swept
            else {k: v for k, v in params.items() if v not in ("", None) and k not in idle}
        )
        accuracy = "-" if row["accuracy"] is None else f"{100 * row['accuracy']:.1f}"
        rows.append(
            [
                escape(params_text(params, separator=" ")) or "-",
                f"{accuracy}{MISS_MARK}" if row["misses"] else accuracy,
                scale.text(row["cost"]),
                "-" if row["a_over_c"] is None else number(row["a_over_c"] / scale.factor),
                "-" if row["large_share"] is None else f"{100 * row['large_share']:.1f}",
                f"{row['misses']:,} of {row['n']:,}" if row["misses"] else "0",
            ]
        )
    headers = [
        "Params" if swept else "Configuration",
        "Acc %",
        f"Cost {scale.unit}",
        f"A/C {a_over_c_words(a_over_c_unit, scale)}",
    ]
    headers += ["Large %", "Misses"]

    # the number columns on one line each where the terminal has room, else as narrow as their longest word;
    # the configuration column takes the rest, its text wrapped
    def needed(index: int, by_word: bool) -> int:
        texts = [headers[index], *(row[index] for row in rows)]
        return max(len(word) for text in texts for word in (text.split() if by_word else [text]))

    longest = max((len(row[0]) for row in rows), default=0)
    by_word = longest + sum(needed(i, False) + 3 for i in range(1, len(headers))) + 4 > width
    table = Table(title=title, caption="; ".join(notes) or None)
    table.add_column(headers[0], overflow="fold")
    for index, header in enumerate(headers[1:], 1):
        table.add_column(header, justify="right", overflow="fold", width=needed(index, by_word))
    for cells, row in zip(rows, shown.rows):
        table.add_row(*cells, style="yellow" if row["misses"] else None)
    return table
