"""What `trace train policy` leaves: the policy file, its training log next to it, and the result it returns."""

from __future__ import annotations

import io
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl

from replay.artifacts import fit_record
from replay.data import ReplayData
from replay.routers.policy import save_policy
from tracestore.atomic import write_atomic


@dataclass
class TrainResult:
    policy_path: Path
    log_path: Path
    kappa: float
    n_train_episodes: int
    train_coverage: float  # of the deployed policy on every train episode
    best_coverage: float  # of the best possible policy under this escalate mode on the train episodes
    train_accuracy: float
    train_cost: float  # mean cost per query in the cost model's units
    train_cost_share: float  # ... divided by the large model alone's mean cost
    cost_unit: str
    escalate: str
    has_verifier: bool
    seconds: float
    log: pl.DataFrame
    alpha: float
    flags: list[str]  # how training ended, when not as asked (replay.routers.policy.TRAINING_FLAGS)
    sha256: str  # of the policy file's bytes

    def warnings(self) -> list[str]:
        """One sentence per flag, with its numbers."""
        target = 1 - self.alpha
        said = {
            "target_unreachable": (
                f"no policy reaches coverage {target:g} on the train split with escalate={self.escalate}: at most "
                f"{self.best_coverage:.4f} (episodes where no escalation point is right while the large model alone "
                "is)"
            ),
            "coverage_below_target": (
                f"the trained policy's coverage on the train split, {self.train_coverage:.4f}, is below the target "
                f"{target:g}, which a policy can reach (at most {self.best_coverage:.4f}): train longer (--steps) or "
                "with other --seed, --eta or --delta"
            ),
            "kappa_at_0": "kappa ended at 0, the edge of its range: the policy escalates at every decision",
            "kappa_at_1": (
                "kappa ended at 1, the edge of its range: the policy escalates only where pi(escalate | o) is 1"
            ),
        }
        if "target_unreachable" in self.flags:  # the coverage cannot but fall short
            said.pop("coverage_below_target")
        return [said[flag] for flag in self.flags if flag in said]


def training_flags(kappa: float, coverage: float, best_coverage: float, alpha: float) -> list[str]:
    """The ``TRAINING_FLAGS`` that hold: the coverage target out of reach or not reached on the train split, kappa
    at an edge of [0, 1]."""
    flags = []
    if best_coverage < 1 - alpha:
        flags.append("target_unreachable")
    if coverage < 1 - alpha:
        flags.append("coverage_below_target")
    if kappa <= 0 or kappa >= 1:
        flags.append("kappa_at_0" if kappa <= 0 else "kappa_at_1")
    return flags


def log_path_for(policy_path: str | Path) -> Path:
    """``policy.pt`` -> ``policy.log.parquet`` next to it."""
    policy_path = Path(policy_path)
    return policy_path.with_name(f"{policy_path.stem}.log.parquet")


def finish_training(
    out,
    policy,
    hp,
    train: ReplayData,
    roles: list[str],
    source,
    kappa: float,
    final,
    log: list,
    started: float,
    n_episodes: int,
) -> TrainResult:
    """Write the policy file and its training log; ``source`` (the two-model ``Episodes`` or the K-model
    ``StateGraph``) gives the feature scaling, cost unit and scale, and ``final`` the deployed policy's
    walk over every train episode."""
    metrics = {
        "coverage": float(final.covered.mean()),
        "best_coverage": source.best_coverage(),
        "accuracy": float(final.correct.mean()),
        "cost": float(final.total_cost.mean() * source.cost_scale),
        "cost_share": float(final.total_cost.mean()),
        "episodes": int(n_episodes),
    }
    coverage_events = ["correct", "large_alone_wrong"] + (["all_steps_verified"] if source.has_verifier else [])
    models = train.manifest.models
    flags = training_flags(kappa, metrics["coverage"], metrics["best_coverage"], hp.alpha)
    sha256 = save_policy(
        out,
        policy,
        list(hp.features),
        source.feature_mean,
        source.feature_std,
        kappa,
        hp.hidden,
        escalate=hp.escalate,
        roles=roles,
        role_models=[models[role]["name"] for role in roles],
        train_problem_ids=sorted(train.problems["problem_id"].to_list()),
        fitted_on=fit_record(train, "policy"),
        alpha=float(hp.alpha),
        coverage_events=coverage_events,
        cost_model=hp.cost,
        cost_unit=source.cost_unit,
        cost_scale=source.cost_scale,
        trace={"dataset": train.manifest.dataset, "models": list(models.values())},
        training=_plain(asdict(hp)),
        train_metrics=metrics,
        flags=flags,
    )
    log_frame = pl.DataFrame(log, schema_overrides={"case": pl.String, "line_search": pl.Int32})
    buffer_bytes = io.BytesIO()
    log_frame.write_parquet(buffer_bytes, compression="zstd")
    log_path = log_path_for(out)
    write_atomic(log_path, buffer_bytes.getvalue())
    return TrainResult(
        policy_path=Path(out),
        log_path=log_path,
        kappa=kappa,
        n_train_episodes=n_episodes,
        train_coverage=metrics["coverage"],
        best_coverage=metrics["best_coverage"],
        train_accuracy=metrics["accuracy"],
        train_cost=metrics["cost"],
        train_cost_share=metrics["cost_share"],
        cost_unit=source.cost_unit,
        escalate=hp.escalate,
        has_verifier=source.has_verifier,
        seconds=time.perf_counter() - started,
        log=log_frame,
        alpha=hp.alpha,
        flags=flags,
        sha256=sha256,
    )


def _plain(value):
    """Tuples as lists, recursively: what the policy file's ``training`` entry stores (torch's safe loader)."""
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value
