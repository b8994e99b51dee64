"""The report's story in a few lines: which routers are on the cost-accuracy frontier, each one's accuracy and cost
against large-only with the paired test's p-value, which ones are dominated, and the order of the main table's rows.

Standing of a router at its operating point, on the reported rows:
- complete: none of its walks missed (a router with misses reports accuracy and cost over its finished walks
  only, so it is never ranked: listed last and left off the frontier);
- within the floor: its accuracy reaches the accuracy floor (``--accuracy-floor``, relative to large-only's
  accuracy on the reported rows);
- on the frontier: no other complete operating point (the single models included, the oracle not: it reads
  the grades) is at least as accurate for no more cost; otherwise dominated, by the cheapest frontier point
  that is.
The table lists the complete routers within the floor by cost, then the complete ones below it by cost, then
those with misses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from analysis.frontier import dominated_by, on_frontier
from analysis.misses import MISS_MARK
from analysis.operating_points import Row, percent
from analysis.report_inputs import Run
from analysis.stats import PairedTest, mcnemar, paired_problem_test
from analysis.units import CostScale, number, share
from replay.params import params_text

REFERENCE_ROUTERS = ("oracle",)  # routers that read the grades: bounds, never winners


@dataclass(frozen=True)
class Standing:
    row: Row
    complete: bool
    within_floor: bool
    reference: bool
    frontier: bool
    dominated_by: Row | None


def standings(table: list[Row], floor: float | None) -> list[Standing]:
    """Each row's standing, in the order the main table lists them."""
    ranked = [
        row
        for row in table
        if row.misses == 0
        and row.run.router not in REFERENCE_ROUTERS
        and row.accuracy.value is not None
        and row.cost.value is not None
    ]
    cost = np.array([row.cost.value for row in ranked], dtype=float)
    accuracy = np.array([row.accuracy.value for row in ranked], dtype=float)
    mask = on_frontier(cost, accuracy) if ranked else np.array([], dtype=bool)
    result = []
    for row in table:
        index = next((i for i, other in enumerate(ranked) if other is row), None)
        beaten = dominated_by(cost, accuracy, index) if index is not None else None
        result.append(
            Standing(
                row=row,
                complete=row.misses == 0,
                within_floor=floor is not None
                and row.accuracy.value is not None
                and row.accuracy.value >= floor - 1e-12,
                reference=row.run.router in REFERENCE_ROUTERS,
                frontier=index is not None and bool(mask[index]),
                dominated_by=ranked[beaten] if beaten is not None else None,
            )
        )

    def key(standing: Standing):
        cost = standing.row.cost.value
        return (not standing.complete, not standing.within_floor, np.inf if cost is None else cost)

    return sorted(result, key=key)


def paired_tests(runs: list[Run], large: Run, seed: int) -> dict[int, PairedTest]:
    """Each run (by ``id``) against large-only, paired on (problem, world) at the operating points, pairs where
    either walk missed left out: McNemar's test with one world per problem, else a paired permutation test with
    the problem as the unit (its worlds are not independent)."""
    reference = large.at_chosen().select("problem_id", "world", large_correct="correct", large_misses="misses")
    several_worlds = reference["world"].n_unique() > 1
    tests = {}
    for run in runs:
        if run is large:
            continue
        paired = (
            run.at_chosen()
            .join(reference, on=["problem_id", "world"], how="inner")
            .filter((pl.col("misses") == 0) & (pl.col("large_misses") == 0))
        )
        correct, large_correct = paired["correct"].to_numpy(), paired["large_correct"].to_numpy()
        if several_worlds:
            tests[id(run)] = paired_problem_test(correct, large_correct, paired["problem_id"].to_numpy(), seed)
        else:
            tests[id(run)] = mcnemar(correct, large_correct)
    return tests


def versus_large(row: Row, large: Row, test: PairedTest | None) -> str:
    """``97.6% at 43% of large-only's cost, 2.4 points above it; p = 0.69``."""
    accuracy, cost = row.accuracy.value, row.cost.value
    if accuracy is None or cost is None or large.accuracy.value is None or not large.cost.value:
        return "no finished walk"
    points = 100 * (accuracy - large.accuracy.value)
    if abs(points) < 0.05:
        relation = "level with it"
    else:
        relation = f"{abs(points):.1f} points {'above' if points > 0 else 'below'} it"
    text = f"{percent(accuracy)} at {share(cost / large.cost.value)} of large-only's cost, {relation}"
    return text + (f"; p = {number(test.p_value, 2)}" if test is not None else "")


def _name(row: Row) -> str:
    point = params_text(row.run.point_params())
    return f"**{row.run.label}**" + (f" at {point}" if point and row.run.swept else "")


def summary_section(
    ordered: list[Standing],
    large: Row,
    floor: float | None,
    floor_text: str,
    tests: dict[int, PairedTest],
    scale: CostScale,
    evaluated: str,
) -> str:
    """The section at the top of the report: one paragraph naming the winners, then every router against
    large-only. ``tests``: the paired test of each run (by ``id``) against large-only; ``evaluated``: what
    the numbers are over ("split test, 83 problems")."""
    routers = [s for s in ordered if s.row.run.router not in ("small-only", "large-only")]
    contenders = [s for s in routers if s.complete and not s.reference]
    within = [s for s in contenders if s.within_floor]
    cheaper = [s for s in within if large.cost.value and s.row.cost.value < large.cost.value]
    large_cost = f"{scale.text(large.cost.value)} {scale.unit} per query"
    lines = ["## Summary", ""]
    paragraph = [f"On {evaluated}, large-only is {percent(large.accuracy.value)} accurate at {large_cost}."]
    if floor is not None:
        paragraph.append(f"The accuracy floor is {percent(floor)} ({floor_text}).")
    if cheaper:
        best = cheaper[0]
        paragraph.append(
            f"The cheapest router within it is {_name(best.row)}: "
            f"{versus_large(best.row, large, tests.get(id(best.row.run)))}."
        )
        most = max(within, key=lambda s: (s.row.accuracy.value, -s.row.cost.value))
        if most is not best and most.row.accuracy.value > best.row.accuracy.value:
            paragraph.append(
                f"The most accurate within it is {_name(most.row)}: "
                f"{versus_large(most.row, large, tests.get(id(most.row.run)))}."
            )
    elif floor is not None:
        closest = max(contenders, key=lambda s: (s.row.accuracy.value, -s.row.cost.value), default=None)
        paragraph.append(
            "No router reaches the floor for less than large-only's cost"
            + (
                f"; the most accurate is {_name(closest.row)}: "
                f"{versus_large(closest.row, large, tests.get(id(closest.row.run)))}."
                if closest is not None
                else "."
            )
        )
    frontier = [
        f"{s.row.run.label} ({percent(s.row.accuracy.value)} at {share(s.row.cost.value / large.cost.value)})"
        if large.cost.value
        else s.row.run.label
        for s in sorted((s for s in ordered if s.frontier), key=lambda s: s.row.cost.value)
    ]
    dominated = [s.row.run.label for s in ordered if s.complete and not s.reference and not s.frontier]
    if frontier:
        paragraph.append(
            "On the cost-accuracy frontier (the cheapest at each accuracy; cost as a share of large-only's): "
            + ", ".join(frontier)
            + "."
        )
    if dominated:
        paragraph.append(
            "Dominated (another operating point is at least as accurate for no more cost): "
            + ", ".join(dominated)
            + "."
        )
    incomplete = [s.row.run.label for s in routers if not s.complete]
    if incomplete:
        paragraph.append(
            f"Not ranked, because some of their walks missed steps the trace lacks ({MISS_MARK} in the tables): "
            + ", ".join(incomplete)
            + "."
        )
    references = [s for s in routers if s.reference]
    for standing in references:
        paragraph.append(
            f"The {standing.row.run.label} reads the grades, a bound rather than a contender: "
            f"{versus_large(standing.row, large, tests.get(id(standing.row.run)))}."
        )
    lines += [" ".join(paragraph), "", "Each router against large-only, in the table's order:", ""]
    for standing in ordered:
        row = standing.row
        if row is large:
            continue
        if not standing.complete:
            verdict = (
                f"{MISS_MARK} {row.misses:,} of {row.walks:,} walks missed: over the finished walks only, not ranked"
            )
        elif standing.reference:
            verdict = "reads the grades (a bound)"
        elif standing.frontier:
            verdict = "on the frontier"
        elif standing.dominated_by is not None:
            verdict = f"dominated by {standing.dominated_by.run.label}"
        else:
            verdict = "dominated"
        lines.append(
            f"- {_name(row)}: {versus_large(row, large, tests.get(id(row.run)))}. {verdict[0].upper()}{verdict[1:]}."
        )
    return "\n".join(lines)
