"""The report's figures as PNG bytes (matplotlib's Agg canvas; no pyplot, no global state).

Each function takes plain numbers and returns a ``Drawn``: the PNG and the series its legend names, each with
its colour and marker (what a test checks: no two series of a figure look alike). Every series gets a colour
and a marker from ``series_styles``, which never repeats a pair within a figure; legends sit outside the axes.
The same inputs give the same bytes (PNG metadata without the matplotlib version, fixed size and DPI).
matplotlib is imported by the functions that draw (it takes a second to import; most commands that import this
module draw nothing).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

from analysis.frontier import frontier_order
from analysis.units import tick

DPI = 120
LOW_COLOR, HIGH_COLOR = "#d62728", "#1f77b4"
# nine colours apart from the single models' black and grey, eleven markers: a (colour, marker) pair repeats only
# after 99 series, a colour after 9 and a marker after 11
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#e377c2", "#8c564b", "#bcbd22")
MARKERS = ("o", "D", "v", "P", "X", "<", "h", ">", "p", "*", "d")
SMALL_STYLE, LARGE_STYLE = ("#7f7f7f", "s"), ("#000000", "^")
FEW_WALKS = 10  # a point resting on fewer walks is drawn hollow and labelled with its count
FAINT = 0.3


@dataclass(frozen=True)
class Style:
    color: str
    marker: str


def series_styles(kinds: list[str]) -> list[Style]:
    """A style per series, in order: the single models' fixed ones (``kinds`` "small", "large"), the others'
    from the palette and marker cycles."""
    styles, index = [], 0
    for kind in kinds:
        if kind in ("small", "large"):
            styles.append(Style(*(SMALL_STYLE if kind == "small" else LARGE_STYLE)))
        else:
            styles.append(Style(PALETTE[index % len(PALETTE)], MARKERS[index % len(MARKERS)]))
            index += 1
    return styles


@dataclass(frozen=True)
class Drawn:
    """A figure: its PNG, and the (label, colour, marker) of every legend entry drawn with a marker."""

    png: bytes
    series: tuple[tuple[str, str, str], ...]


def _drawn(figure: Figure, keys: tuple[str, ...] = ()) -> Drawn:
    """The figure's PNG and its series: the legend entries with a marker but those explaining the marks (``keys``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_hex
    from matplotlib.lines import Line2D

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    series = []
    for legend in [axes.get_legend() for axes in figure.axes] + list(figure.legends):
        if legend is None:
            continue
        for handle, text in zip(legend.legend_handles, legend.get_texts()):
            marked = isinstance(handle, Line2D) and handle.get_marker() not in (None, "", "None", " ")
            if marked and text.get_text() not in keys:
                series.append((text.get_text(), to_hex(handle.get_color()), str(handle.get_marker())))
    return Drawn(buffer.getvalue(), tuple(series))


def _figure(**kwargs) -> Figure:
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **kwargs)


def _outside_legend(axes, **kwargs) -> None:
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", borderaxespad=0, **kwargs)


# ---------------------------------------------------------------------- accuracy against cost


def series_kind(router: str) -> str:
    """How a router's series is drawn: "small" and "large" for the single models, "router" for the rest."""
    return {"small-only": "small", "large-only": "large"}.get(router, "router")


@dataclass(frozen=True)
class Series:
    """A router's configurations: mean cost (shown unit) and accuracy (0-1) of each, which ones missed, which one
    is its operating point, and how many walks finished at each (of ``walks``)."""

    label: str
    kind: str  # "small", "large" or "router"
    cost: np.ndarray
    accuracy: np.ndarray
    missed: np.ndarray  # configurations where some walk missed: drawn hollow, off the frontier line
    chosen: int  # index of the operating point
    finished: np.ndarray
    walks: int


LOG_COST_SPAN = 10
PARETO_KEYS = ("operating point (ringed)", "off its sweep's frontier", "configuration with misses (hollow)")


def wants_log_cost_axis(costs: np.ndarray) -> bool:
    """Whether positive costs span more than a factor LOG_COST_SPAN (e.g. a judge-priced router beside
    single models), so that a linear axis would squeeze the other routers together."""
    costs = costs[np.isfinite(costs)]
    return bool(costs.size and costs.min() > 0 and costs.max() > LOG_COST_SPAN * costs.min())


def pareto_png(series: list[Series], cost_unit: str, large: tuple[float, float], floor: tuple[float, str] | None):
    """Accuracy against mean cost per query. A swept router: its own frontier (the cheapest configuration at each
    accuracy) as a line, its other configurations as faint markers, those with misses hollow, the operating point
    ringed; a single configuration: one marker. Reference lines: large-only's accuracy and cost (``large``: cost,
    accuracy) and the accuracy floor (value, description)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    figure = _figure(figsize=(11, 5.5))
    axes = figure.add_subplot()
    styles = series_styles([entry.kind for entry in series])
    large_cost, large_accuracy = large
    axes.axhline(100 * large_accuracy, color="#000000", linestyle="--", linewidth=0.8, label="large-only accuracy")
    axes.axvline(large_cost, color="#000000", linestyle=":", linewidth=0.8, label="large-only cost")
    if floor is not None:
        axes.axhline(100 * floor[0], color="#d62728", linestyle="-.", linewidth=0.8, label=f"floor: {floor[1]}")
    for entry, style in zip(series, styles):
        _draw_series(axes, entry, style)
    if any(len(entry.cost) > 1 for entry in series):
        axes.plot([], [], "o", markersize=12, markerfacecolor="none", markeredgecolor="#555555", label=PARETO_KEYS[0])
        axes.plot([], [], "o", color="#555555", alpha=FAINT, linestyle="none", label=PARETO_KEYS[1])
    if any(entry.missed.any() for entry in series):
        axes.plot(
            [], [], "o", markerfacecolor="none", markeredgecolor="#555555", linestyle="none", label=PARETO_KEYS[2]
        )
    every_cost = np.concatenate([entry.cost for entry in series] + [np.array([large_cost])])
    log_scale = wants_log_cost_axis(every_cost)
    if log_scale:
        axes.set_xscale("log")
        axes.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axes.xaxis.set_minor_formatter(NullFormatter())
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: tick(value)))
    axes.set_xlabel(f"Mean cost per query ({cost_unit}{', log scale' if log_scale else ''})")
    axes.set_ylabel("Accuracy (%)")
    axes.set_title("Accuracy against cost")
    axes.grid(True, alpha=0.3)
    _outside_legend(axes)
    return _drawn(figure, PARETO_KEYS)


def _draw_series(axes, entry: Series, style: Style) -> None:
    color, marker = style.color, style.marker
    complete = np.flatnonzero(~entry.missed)
    if len(entry.cost) == 1:
        hollow = bool(entry.missed[0])
        axes.plot(
            entry.cost,
            100 * entry.accuracy,
            marker,
            color=color,
            markersize=10 if entry.kind == "large" else 9,
            markerfacecolor="none" if hollow else color,
            linestyle="none",
            label=entry.label,
            zorder=6 if entry.kind in ("small", "large") else 5,
        )
    else:
        front = complete[frontier_order(entry.cost[complete], entry.accuracy[complete])]
        axes.plot(
            entry.cost[front],
            100 * entry.accuracy[front],
            "-" + marker,
            color=color,
            markersize=5,
            linewidth=1.4,
            label=entry.label,
            zorder=4,
        )
        rest = np.setdiff1d(complete, front)
        axes.plot(entry.cost[rest], 100 * entry.accuracy[rest], marker, color=color, alpha=FAINT, linestyle="none")
        missed = np.flatnonzero(entry.missed)
        axes.plot(
            entry.cost[missed],
            100 * entry.accuracy[missed],
            marker,
            color=color,
            markerfacecolor="none",
            alpha=0.6,
            linestyle="none",
        )
        axes.plot(
            entry.cost[entry.chosen],
            100 * entry.accuracy[entry.chosen],
            "o",
            markersize=13,
            markerfacecolor="none",
            markeredgecolor=color,
            markeredgewidth=1.8,
            zorder=5,
        )
    if entry.missed[entry.chosen]:
        axes.annotate(
            f"n={int(entry.finished[entry.chosen])} of {entry.walks}",
            (entry.cost[entry.chosen], 100 * entry.accuracy[entry.chosen]),
            textcoords="offset points",
            xytext=(6, -12),
            fontsize="x-small",
            color=color,
        )


# ---------------------------------------------------------------------- escalations by step index


@dataclass(frozen=True)
class Shares:
    """A router's share of large-model steps at each step index, over ``walks`` walks there."""

    label: str
    depth: np.ndarray
    share: np.ndarray
    walks: np.ndarray


def escalation_png(series: list[Shares], large_role: str) -> Drawn:
    """Share of the steps at each step index that the large model wrote, one line per router; a point resting
    on fewer than FEW_WALKS walks hollow, with its count."""
    figure = _figure(figsize=(11, 4.8))
    axes = figure.add_subplot()
    for entry, style in zip(series, series_styles(["router"] * len(series))):
        axes.plot(
            entry.depth,
            100 * entry.share,
            "-",
            color=style.color,
            linewidth=1.3,
            marker=style.marker,
            label=entry.label,
        )
        few = entry.walks < FEW_WALKS
        axes.plot(
            entry.depth[few],
            100 * entry.share[few],
            style.marker,
            color="white",
            markeredgecolor=style.color,
            markersize=7,
            linestyle="none",
        )
        for depth, value, walks in zip(entry.depth[few], entry.share[few], entry.walks[few]):
            axes.annotate(
                f"n={walks}",
                (depth, 100 * value),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize="x-small",
                color=style.color,
            )
    key = f"fewer than {FEW_WALKS} walks (hollow)"
    if any((entry.walks < FEW_WALKS).any() for entry in series):
        axes.plot([], [], "o", color="white", markeredgecolor="#555555", linestyle="none", label=key)
    axes.set_xlabel("Step index in the solution (0 = first step)")
    axes.set_ylabel(f"Steps written by the {large_role} model (%)")
    axes.set_ylim(-3, 103)
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.set_title("Where escalations happen")
    axes.grid(True, alpha=0.3)
    _outside_legend(axes)
    return _drawn(figure, (key,))


# ---------------------------------------------------------------------- policy training


@dataclass(frozen=True)
class TrainingLog:
    """One policy's training log: step, coverage and kappa per logged update, and its coverage target's alpha."""

    label: str
    step: np.ndarray
    coverage: np.ndarray
    kappa: np.ndarray
    alpha: float


def policy_training_png(logs: list[TrainingLog]) -> Drawn:
    """Coverage (running mean over a twentieth of the updates; per update faint) against each target 1 - alpha,
    and the escalation threshold kappa, over training: one colour and marker per policy."""
    figure = _figure(figsize=(12, 4.4))
    left, right = figure.subplots(1, 2)
    for log, style in zip(logs, series_styles(["router"] * len(logs))):
        window = max(1, len(log.coverage) // 20)
        marks = max(1, len(log.step) // 8)
        left.plot(log.step, log.coverage, color=style.color, linewidth=0.7, alpha=FAINT)
        running = np.convolve(log.coverage, np.ones(window) / window, mode="valid")
        left.plot(
            log.step[window - 1 :],
            running,
            color=style.color,
            marker=style.marker,
            markevery=marks,
            linewidth=1.6,
            label=log.label,
        )
        right.plot(
            log.step, log.kappa, color=style.color, marker=style.marker, markevery=marks, linewidth=1.3, label=log.label
        )
    for alpha in sorted({log.alpha for log in logs}):
        left.axhline(
            1 - alpha, color="#555555", linestyle="--", linewidth=0.9, label=f"target 1 - alpha = {1 - alpha:g}"
        )
    left.set_xlabel("Training step")
    left.set_ylabel("Coverage P(R_policy = 1 or R_large = 0)")
    left.set_title("Coverage constraint (running mean; per update faint)")
    right.set_xlabel("Training step")
    right.set_ylabel("kappa (escalate iff pi(escalate | o) >= kappa)")
    right.set_title("Escalation threshold")
    for axes in (left, right):
        axes.grid(True, alpha=0.3)
    handles, labels = left.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right upper", fontsize="small")
    return _drawn(figure)


# ---------------------------------------------------------------------- STEER mixtures


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


def steer_mixtures_png(
    mixtures: list[Mixture], confidences: dict[int, np.ndarray], signal: str, warnings: dict[int, str]
) -> Drawn:
    """One panel per step index: histogram of the small model's confidences there, the two weighted
    components (low-confidence one in red) and their sum; a panel whose fit is doubtful (``warnings``)
    says why in red."""
    columns = min(3, len(mixtures))
    rows = -(-len(mixtures) // columns)
    figure = _figure(figsize=(4.4 * columns, 3.5 * rows))
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
        warning = warnings.get(mixture.depth)
        axes.set_title(
            f"step index {mixture.depth}" + (f"\n{warning}" if warning else ""),
            color=LOW_COLOR if warning else "black",
            fontsize="medium",
        )
        axes.set_xlabel(f"{signal} (step confidence)")
        axes.set_ylabel("Density")
        axes.legend(fontsize="x-small")
    for axes in panels[len(mixtures) :]:
        axes.set_visible(False)
    figure.suptitle("STEER: fitted mixtures over the small model's step confidences")
    return _drawn(figure)
