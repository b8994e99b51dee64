"""What `trace report` takes, each setting with its default written once: the command line reads its defaults
from ReportOptions. Kept apart from the report's code, so that building the command line stays cheap."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_FLOOR = "large-0.02"
ALL_ROWS = "all"  # --split: every row of the results
REPORTED_ROWS = "reported"  # --pick-split: choose on the rows reported (flatters threshold routers; labelled)
DEFAULT_ALPHA = 0.02  # the policy seed's alpha, when the training log does not record its own


@dataclass(frozen=True)
class ReportOptions:
    """How operating points are chosen (the rule: analysis.operating_points) and which optional sections
    are drawn."""

    pick: str = "ac"  # ac | cheapest | accuracy
    accuracy_floor: str = DEFAULT_FLOOR  # large, large-D, or an accuracy in [0, 1]
    at: tuple[str, ...] = ()  # pinned configurations: ROUTER:name=value[,name=value]
    split: str = "test"  # report rows of this split, or ALL_ROWS
    pick_split: str = "calibration"  # choose operating points on rows of this split, or REPORTED_ROWS
    bootstrap: int = 1000  # bootstrap resamples
    seed: int = 0  # bootstrap seed
    policy_log: tuple[Path, ...] = ()  # training logs beyond those found beside the policy files of the results
    steer_gmm: Path | None = None
    alpha: float | None = None  # policy coverage target 1 - alpha (default: the log's alpha, else DEFAULT_ALPHA)
    tables: tuple[str, ...] = ()  # the seeds' table layouts to add (analysis.tables)
    grades: str | None = None  # the trace's grade set the results were replayed with (default: the steps' own)
    pick_on: tuple = ()  # results of a calibration trace or split to choose operating points on (not pick_split)
    allow_overlap: bool = False  # report rows a router's fit saw, or rows its point was picked on
    latency_profile: Path | None = None  # seconds per query beside cost (default: the trace's latency.json, if any)
