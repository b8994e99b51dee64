"""The report's figures as PNG bytes (matplotlib's Agg canvas; no pyplot, no global state).

Each function takes plain numbers and returns the PNG; the same inputs give the same bytes
(PNG metadata without the matplotlib version, fixed size and DPI). matplotlib is imported by the
functions that draw (it takes a second to import; most commands that import this module draw nothing).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 120
LOW_COLOR, HIGH_COLOR = "#d62728", "#1f77b4"


@dataclass(frozen=True)
class Curve:
    """A swept router: accuracy (0-1) and mean cost per configuration, and its chosen configuration."""

    label: str
    cost: np.ndarray
    accuracy: np.ndarray
    missed: np.ndarray  # configurations where some walk missed: drawn apart, not joined by the line
    chosen: int  # index into cost/accuracy


@dataclass(frozen=True)
class Point:
    """A single configuration: a single model or a fixed-configuration router."""

    label: str
    cost: float
    accuracy: float
    kind: str  # "small", "large" or "router"


def _figure(**kwargs) -> Figure:
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **kwargs)


def _png(figure: Figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


LOG_COST_SPAN = 10


def wants_log_cost_axis(costs: np.ndarray) -> bool:
    """Whether positive costs span more than a factor LOG_COST_SPAN (e.g. a judge-priced router beside
    single models), so that a linear axis would squeeze the other routers together."""
    costs = costs[np.isfinite(costs)]
    return bool(costs.size and costs.min() > 0 and costs.max() > LOG_COST_SPAN * costs.min())


def pareto_png(curves: list[Curve], points: list[Point], cost_unit: str) -> bytes:
    """Accuracy against mean cost per query: one line per swept router (configurations without misses in
    order of cost, those with misses as unjoined hollow markers, the chosen configuration circled), a
    marker per single model or fixed router."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    figure = _figure(figsize=(10, 5))
    axes = figure.add_subplot()
    colors = _cycle()
    for curve in curves:
        complete = np.flatnonzero(~curve.missed)
        order = complete[np.lexsort((curve.accuracy[complete], curve.cost[complete]))]
        color = next(colors)
        axes.plot(
            curve.cost[order],
            100 * curve.accuracy[order],
            "-o",
            color=color,
            markersize=3,
            linewidth=1.2,
            label=f"{curve.label}, sweep",
            zorder=3,
        )
        if curve.missed.any():
            axes.plot(
                curve.cost[curve.missed],
                100 * curve.accuracy[curve.missed],
                "o",
                color=color,
                markersize=5,
                markerfacecolor="none",
                linestyle="none",
                zorder=3,
            )
        axes.plot(
            curve.cost[curve.chosen],
            100 * curve.accuracy[curve.chosen],
            "o",
            markersize=11,
            markerfacecolor="none",
            markeredgecolor=color,
            markeredgewidth=2,
            zorder=4,
        )
    markers = {"small": ("s", "#555555"), "large": ("^", "#000000")}
    for point in points:
        marker, color = markers.get(point.kind, ("D", None))
        axes.plot(
            point.cost,
            100 * point.accuracy,
            marker,
            markersize=9,
            linestyle="none",
            color=color or next(colors),
            label=point.label,
            zorder=2,
        )
    if curves:
        axes.plot(
            [],
            [],
            "o",
            markersize=11,
            markerfacecolor="none",
            markeredgecolor="#555555",
            markeredgewidth=2,
            label="chosen operating point",
        )
    if any(curve.missed.any() for curve in curves):
        axes.plot(
            [],
            [],
            "o",
            markersize=5,
            markerfacecolor="none",
            markeredgecolor="#555555",
            linestyle="none",
            label="configuration with misses (finished walks only)",
        )
    log_scale = wants_log_cost_axis(
        np.concatenate([curve.cost for curve in curves] + [np.array([point.cost for point in points])])
    )
    cost_label = FuncFormatter(lambda value, _: f"{value:.3g}")
    if log_scale:
        axes.set_xscale("log")
        axes.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axes.xaxis.set_minor_formatter(NullFormatter())
    axes.xaxis.set_major_formatter(cost_label)
    axes.set_xlabel(f"Mean cost per query ({cost_unit}{', log scale' if log_scale else ''})")
    axes.set_ylabel("Accuracy (%)")
    axes.set_title("Accuracy against cost")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return _png(figure)


def _cycle():
    """Distinct colours for routers, skipping the greys of the single models."""
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#e377c2", "#8c564b", "#bcbd22"]
    while True:
        yield from palette


def escalation_png(series: dict[str, tuple[np.ndarray, np.ndarray]], large_role: str) -> bytes:
    """Share of the steps at each step index that the large model wrote, one line per router."""
    figure = _figure(figsize=(8, 4.5))
    axes = figure.add_subplot()
    colors = _cycle()
    for label, (depths, shares) in series.items():
        axes.plot(depths, 100 * shares, "-o", color=next(colors), markersize=4, label=label)
    axes.set_xlabel("Step index in the solution (0 = first step)")
    axes.set_ylabel(f"Steps written by the {large_role} model (%)")
    axes.set_ylim(-3, 103)
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.set_title("Where escalations happen")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    return _png(figure)


def policy_training_png(step: np.ndarray, coverage: np.ndarray, kappa: np.ndarray, alpha: float) -> bytes:
    """Coverage against its target 1 - alpha (per update, and its running mean over a twentieth of the
    updates), and the escalation threshold kappa, over training."""
    figure = _figure(figsize=(10, 4))
    left, right = figure.subplots(1, 2)
    window = max(1, len(coverage) // 20)
    left.plot(step, coverage, color=HIGH_COLOR, linewidth=0.8, alpha=0.35, label="coverage per update (batch)")
    if window > 1:
        running = np.convolve(coverage, np.ones(window) / window, mode="valid")
        left.plot(
            step[window - 1 :], running, color=HIGH_COLOR, linewidth=1.8, label=f"running mean of {window} updates"
        )
    left.axhline(1 - alpha, color=LOW_COLOR, linestyle="--", label=f"target 1 - alpha = {1 - alpha:g}")
    left.set_xlabel("Training step")
    left.set_ylabel("Coverage P(R_policy = 1 or R_large = 0)")
    left.set_title("Coverage constraint")
    left.legend(fontsize="small")
    right.plot(step, kappa, color="#2ca02c", linewidth=1.2, label="kappa")
    right.set_xlabel("Training step")
    right.set_ylabel("kappa (escalate iff pi(escalate | o) >= kappa)")
    right.set_title("Escalation threshold")
    right.legend(fontsize="small")
    for axes in (left, right):
        axes.grid(True, alpha=0.3)
    return _png(figure)


@dataclass(frozen=True)
class Mixture:
    """A two-component 1-D Gaussian mixture fitted at one step index."""

    depth: int
    weights: np.ndarray
    means: np.ndarray
    variances: np.ndarray
    low: int  # index of the low-confidence component

    def component_densities(self, x: np.ndarray) -> np.ndarray:
        """(n_components, len(x)): weight * normal pdf of each component."""
        spread = np.sqrt(self.variances)[:, None]
        z = (x[None, :] - self.means[:, None]) / spread
        return self.weights[:, None] * np.exp(-0.5 * z**2) / (spread * np.sqrt(2 * np.pi))


def steer_mixtures_png(mixtures: list[Mixture], confidences: dict[int, np.ndarray], signal: str) -> bytes:
    """One panel per step index: histogram of the small model's confidences there, the two weighted
    components (low-confidence one in red) and their sum."""
    columns = min(3, len(mixtures))
    rows = -(-len(mixtures) // columns)
    figure = _figure(figsize=(4.2 * columns, 3.4 * rows))
    panels = np.atleast_1d(figure.subplots(rows, columns, squeeze=False).ravel())
    for axes, mixture in zip(panels, mixtures):
        values = confidences.get(mixture.depth, np.array([]))
        spread = np.sqrt(mixture.variances)
        x = np.linspace(
            np.concatenate([mixture.means - 4 * spread, values]).min(),
            np.concatenate([mixture.means + 4 * spread, values]).max(),
            400,
        )
        if values.size:
            axes.hist(
                values,
                bins=min(40, max(5, values.size // 5)),
                density=True,
                color="#cccccc",
                edgecolor="#999999",
                label=f"small steps (n={values.size})",
            )
        densities = mixture.component_densities(x)
        for index, density in enumerate(densities):
            low = index == mixture.low
            axes.plot(
                x,
                density,
                color=LOW_COLOR if low else HIGH_COLOR,
                linewidth=1.5,
                label=("low-confidence" if low else "confident") + f" (w={mixture.weights[index]:.2f})",
            )
        axes.plot(x, densities.sum(axis=0), color="black", linewidth=1, linestyle="--", label="mixture")
        axes.set_title(f"step index {mixture.depth}")
        axes.set_xlabel(f"{signal} (step confidence)")
        axes.set_ylabel("Density")
        axes.legend(fontsize="x-small")
    for axes in panels[len(mixtures) :]:
        axes.set_visible(False)
    figure.suptitle("STEER: fitted mixtures over the small model's step confidences")
    return _png(figure)
