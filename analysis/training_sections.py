"""The report's sections on what the learned routers learned: every policy's training curve (coverage against its
target, kappa) and STEER's fitted mixtures, with a warning where a fit is doubtful."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from analysis import plots
from analysis.render import Figures, md_table
from analysis.report_inputs import Run, read_policy_log
from analysis.units import number
from replay.train_policy import log_path_for

MIN_STEER_SAMPLES = 30  # a step index's mixture fitted on fewer confidences is flagged
COLLAPSED_SD_SHARE = 0.05  # a component narrower than this share of its confidences' spread has collapsed
MAX_MIXTURE_PANELS = 9


@dataclass(frozen=True)
class PolicyLog:
    """One policy's training log as the report reads it."""

    path: Path
    label: str  # the policy's row label in the table, or the log's file name
    log: pl.DataFrame  # step, coverage, kappa
    alpha: float
    alpha_source: str


def find_policy_logs(
    given: tuple[Path, ...], routers: list[Run], alpha: float | None
) -> tuple[list[PolicyLog], list[str]]:
    """The logs given (``--policy-log``) and the log beside each policy file of the report's policy routers, each
    labelled by the router it trained where one did; and the policies whose log is found nowhere."""
    trained = {}  # resolved log path -> the label of the policy it trained
    for run in routers:
        policy_path = run.params[min(run.params)].get("path") if run.router == "policy" else None
        if policy_path:
            trained.setdefault(log_path_for(policy_path).resolve(), run.label)
    paths = list(dict.fromkeys([Path(path).resolve() for path in given] + [p for p in trained if p.is_file()]))
    logs = [PolicyLog(path, trained.get(path, path.name), *read_policy_log(path, alpha)) for path in paths]
    unmatched = [f"{label} (looked for {path})" for path, label in trained.items() if path not in paths]
    return logs, unmatched


def policy_section(logs: list[PolicyLog], figures: Figures, unmatched: list[str]) -> str:
    """Coverage and kappa over training, every policy in one figure. ``unmatched``: policies in the table whose
    log was not found (named, so that a missing curve is not mistaken for a missing policy)."""
    name = figures.add(
        "policy",
        plots.policy_training_png(
            [
                plots.TrainingLog(
                    entry.label,
                    entry.log["step"].to_numpy(),
                    entry.log["coverage"].to_numpy(),
                    entry.log["kappa"].to_numpy(),
                    entry.alpha,
                )
                for entry in logs
            ]
        ),
    )
    rows = []
    for entry in logs:
        log = entry.log
        tail = log.tail(max(1, log.height // 10))
        rows.append(
            [
                entry.label,
                f"`{entry.path.name}`",
                f"{log.height:,} (steps {log['step'][0]}-{log['step'][-1]})",
                f"{1 - entry.alpha:g} (alpha {entry.alpha:g}, {entry.alpha_source})",
                f"{tail['coverage'].mean():.4f}",
                f"{tail['kappa'].mean():.4f}",
                f"{log['kappa'][-1]:.4f}",
            ]
        )
    lines = [
        "## Policy training",
        "",
        f"![Coverage and kappa over training]({name})",
        "",
        md_table(
            [
                "Policy",
                "Log",
                "Logged updates",
                "Target coverage 1 - alpha",
                "Mean coverage, last tenth",
                "Mean kappa, last tenth",
                "Final kappa",
            ],
            rows,
            right={2, 4, 5, 6},
        ),
    ]
    if unmatched:
        lines += ["", "No training log found for " + "; ".join(unmatched) + "."]
    return "\n".join(lines)


def mixture_warning(mixture: plots.Mixture, values: np.ndarray) -> str | None:
    """Why the fit at one step index is doubtful, or None: too few confidences, or a component whose spread
    collapsed to a spike (a few equal confidences fitted exactly)."""
    reasons = []
    if values.size < MIN_STEER_SAMPLES:
        reasons.append(f"{values.size} samples (fewer than {MIN_STEER_SAMPLES})")
    spread = float(values.std()) if values.size > 1 else 0.0
    sds = np.sqrt(mixture.variances)
    narrow = [i for i, sd in enumerate(sds) if spread > 0 and sd < COLLAPSED_SD_SHARE * spread]
    for index in narrow:
        which = "low-confidence" if index == mixture.low else "confident"
        reasons.append(f"{which} component collapsed (sd {number(float(sds[index]))})")
    return "; ".join(reasons) or None


def steer_section(
    path: Path,
    signal: str,
    mixtures: list[plots.Mixture],
    train_ids: list[str] | None,
    trace,
    figures: Figures,
) -> str:
    small = trace.manifest.roles[0]
    steps = trace.scan("steps").filter((pl.col("model") == small) & pl.col(signal).is_not_null())
    if train_ids is not None:
        steps = steps.filter(pl.col("problem_id").is_in(pl.Series(train_ids, dtype=pl.String).implode()))
    values = steps.select("depth", signal).collect()
    confidences = {
        mixture.depth: values.filter(pl.col("depth") == mixture.depth)[signal].cast(pl.Float64).to_numpy()
        for mixture in mixtures
    }
    warnings = {m.depth: w for m in mixtures if (w := mixture_warning(m, confidences[m.depth])) is not None}
    shown = mixtures[:MAX_MIXTURE_PANELS]
    name = figures.add("steer", plots.steer_mixtures_png(shown, confidences, signal, warnings))
    rows = [
        [
            m.depth,
            confidences[m.depth].size,
            f"{m.means[m.low]:.4g}",
            f"{np.sqrt(m.variances[m.low]):.4g}",
            f"{m.weights[m.low]:.3f}",
            f"{m.means[1 - m.low]:.4g}",
            f"{np.sqrt(m.variances[1 - m.low]):.4g}",
            f"⚠ {warnings[m.depth]}" if m.depth in warnings else "",
        ]
        for m in mixtures
    ]
    omitted = (
        f" Step indices after {shown[-1].depth} ({len(mixtures) - len(shown)} more) are in the table, not drawn."
        if len(mixtures) > len(shown)
        else ""
    )
    over = (
        f"the {len(train_ids):,} train problems the file lists (what the mixtures were fitted on)"
        if train_ids is not None
        else "every problem of the trace"
    )
    lines = [
        "## STEER confidence mixtures",
        "",
        f"![STEER mixtures over the small model's confidences]({name})",
        "",
        f"Mixtures from `{path.name}` over the histogram of `{signal}` of the {small}-model steps of {over}. "
        f"Red: the low-confidence component, whose posterior STEER compares with tau.{omitted}",
    ]
    if warnings:
        indices = ", ".join(map(str, sorted(warnings)))
        doubtful = (
            f"the mixtures of step indices {indices} are doubtful"
            if len(warnings) > 1
            else f"the mixture of step index {indices} is doubtful"
        )
        lines += [
            "",
            f"**Warning:** {doubtful} "
            f"(fitted on fewer than {MIN_STEER_SAMPLES} confidences, or with a component narrower than "
            f"{COLLAPSED_SD_SHARE:.0%} of the confidences' spread): STEER's decisions there rest on a few steps. "
            "`trace train steer --min-samples` sets how many a step index needs for its own mixture (one with "
            "fewer uses the nearest earlier index's).",
        ]
    lines += [
        "",
        md_table(
            ["Step index", "Small steps", "Low mean", "Low std", "Low weight", "High mean", "High std", "Note"],
            rows,
            right=set(range(7)),
        ),
    ]
    return "\n".join(lines)
