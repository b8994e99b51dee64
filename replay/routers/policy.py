"""Policy-guided stepwise routing (Si, Lee, Bastani 2026): a learned one-way escalation policy.

What a replay does, per (problem, world), with p(y) = pi(escalate | o(y)) the policy network's probability
for the observation o(y) of a small step y (the file's features of y's steps row, normalised) and kappa the
threshold (the file's, or ``--param kappa``):

``escalate="after"`` (default; the paper's process: the action picks the model of the *next* step):
  1. the small model writes step 1 at the root;
  2. let y be the step the small model just wrote. If y is final, the walk ends with y's answer (a final
     small step is never judged: the solution is finished, there is nothing left to escalate). Otherwise, if
     p(y) >= kappa, y is kept and the large model writes every later step from y's node until its final
     step (no more decisions); else the small model writes the next step and 2 repeats.
  Nothing is discarded; cost = the kept small steps + the kept large steps.

``escalate="replace"`` (ablation: the step that prompted the escalation is rewritten):
  1. the small model drafts the next step y at the current node (the root first);
  2. if p(y) >= kappa (final or not), y is discarded (paid for: cost_discarded, n_discarded = 1) and the large
     model writes, from y's parent node, that step and every later one until its final step; else y is kept,
     and the walk ends if y is final or goes back to 1.

Either way escalation is one-way and happens at most once; a step the walk needs and the trace lacks is a
miss (the comb trace, `trace gen --expand comb`, holds every path of both modes). A policy file records the
mode it was trained for (files from before the option existed: replace), and replaying it with the other mode
is an error: its kappa is calibrated for its own process.

Policy file (``torch.save`` of a dict; written by ``trace train policy``, read here)::

    {"format": "trace-policy", "version": 1,
     "features": ["conf_max_logit_math", "depth", ...],  # names from FEATURES, in input order
     "feature_mean": [...], "feature_std": [...],        # o = (raw - mean) / std; a null raw value -> 0
     "hidden": 64,                                        # width of the two hidden layers
     "kappa": 0.5,                                        # the trained threshold
     "escalate": "after",                                 # the decision process it was trained for
     "state_dict": {...},                                 # of policy_network(len(features), hidden)
     "train_problem_ids": [...],                          # optional: must lie in the replay's train split
     ...}                                                 # optional: training metadata (trace train policy)

The network is ``policy_network``: Linear-Tanh-Linear-Tanh-Linear, two logits (continue, escalate);
p = softmax(logits)[escalate], computed in float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl

from replay.api_signals import S_API, require_signals
from replay.artifacts import check_fitted_within, load_artifact
from replay.atomic import write_atomic
from replay.engine import ESCALATE_MODES
from replay.errors import TraceError
from replay.routers.base import Domain, DraftRouter

POLICY_FORMAT = "trace-policy"
POLICY_VERSION = 1
ESCALATE = 1  # index of the escalate logit
# Observation features: numeric columns of the steps table, plus the problem's difficulty
# (problems.meta "level": a number, or a string like "Level 3").
STEP_FEATURES = (
    "conf_max_logit_math",
    "conf_max_logit_mean",
    "conf_top1_prob_min_math",
    "logprob_mean",
    "logprob_min",
    "first_token_logprob",
    "depth",
    "is_final",
    "n_gen_tokens",
    "n_prompt_tokens",
)
FEATURES = (*STEP_FEATURES, "difficulty")
POLICY_INSTEAD = f"train it on S_API instead: trace train policy --features {S_API},depth,is_final,n_gen_tokens"


def mlp(n_inputs: int, hidden: int, n_outputs: int):
    """Three linear layers with tanh between them: the shape of the policy and of its critics."""
    import torch

    return torch.nn.Sequential(
        torch.nn.Linear(n_inputs, hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, n_outputs),
    )


def policy_network(n_features: int, hidden: int = 64):
    """The policy MLP: ``hidden`` units, logits for (continue, escalate)."""
    return mlp(n_features, hidden, 2)


def difficulty(meta: pl.Series) -> pl.Series:
    """The problems' ``level`` from their meta JSON as a float (null where absent)."""
    levels = [json.loads(text).get("level") if text else None for text in meta.to_list()]
    numbers = []
    for level in levels:
        if isinstance(level, str):
            digits = "".join(ch for ch in level if ch.isdigit())
            level = int(digits) if digits else None
        numbers.append(None if level is None else float(level))
    return pl.Series(numbers, dtype=pl.Float64)


def raw_features(steps: pl.DataFrame, problems: pl.DataFrame, features: list[str]) -> np.ndarray:
    """Unnormalised observation matrix, one row per step row (NaN for null values)."""
    unknown = [name for name in features if name not in FEATURES]
    if unknown:
        raise TraceError(f"unknown policy feature(s) {', '.join(unknown)}; known: {', '.join(FEATURES)}")
    frame = steps.select("problem_id", *[name for name in features if name in STEP_FEATURES])
    if "difficulty" in features:
        levels = problems.select("problem_id", difficulty=difficulty(problems["meta"]))
        frame = frame.join(levels, on="problem_id", how="left", maintain_order="left")
    columns = [frame[name].cast(pl.Float64).fill_null(np.nan).to_numpy() for name in features]
    return np.stack(columns, axis=1) if columns else np.zeros((steps.height, 0))


def normalise(raw: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    observation = (raw - mean) / std
    return np.nan_to_num(observation, nan=0.0).astype(np.float32)


def save_policy(
    path: str | Path,
    network,
    features: list[str],
    feature_mean,
    feature_std,
    kappa: float,
    hidden: int = 64,
    escalate: str = "after",
    **metadata,
) -> None:
    """Write a policy file atomically; the same arguments give the same bytes (``metadata``: plain values)."""
    import io

    import torch

    saved = {
        **metadata,
        "format": POLICY_FORMAT,
        "version": POLICY_VERSION,
        "features": list(features),
        "feature_mean": [float(x) for x in feature_mean],
        "feature_std": [float(x) for x in feature_std],
        "hidden": int(hidden),
        "kappa": float(kappa),
        "escalate": escalate,
        "state_dict": network.state_dict(),
    }
    buffer = io.BytesIO()  # in memory, the archive's inner folder name does not depend on the file name
    torch.save(saved, buffer)
    write_atomic(path, buffer.getvalue())


def load_policy(path: str | Path) -> tuple[object, dict]:
    """(network in eval mode, the file's dict) from a policy file, checked."""
    import torch

    path = Path(path)
    saved = load_artifact(
        path,
        lambda p: torch.load(p, map_location="cpu", weights_only=True),
        "policy",
        POLICY_FORMAT,
        POLICY_VERSION,
        ("features", "feature_mean", "feature_std", "hidden", "kappa", "state_dict"),
    )
    n = len(saved["features"])
    if (
        len(saved["feature_mean"]) != n
        or len(saved["feature_std"]) != n
        or not all(s > 0 for s in saved["feature_std"])
    ):
        raise TraceError(f"policy file {path}: feature_mean and feature_std need {n} entries, std > 0")
    network = policy_network(n, saved["hidden"])
    try:
        network.load_state_dict(saved["state_dict"])
    except RuntimeError as error:
        raise TraceError(
            f"policy file {path}: state_dict does not fit a {n}-feature network with "
            f"{saved['hidden']} hidden units ({str(error).splitlines()[0]})"
        ) from None
    return network.eval(), saved


class PolicyRouter(DraftRouter):
    name = "policy"
    sweepable = ("kappa",)
    domains = {"kappa": Domain(0.0, 1.0, optional=True)}  # unset: the policy file's trained kappa
    one_way = True

    def __init__(self, path="", kappa=None, escalate="after", draft="", target=""):
        self.path = path
        self.kappa = kappa
        self.escalate = escalate
        self.draft = draft  # default: the smallest model
        self.target = target  # default: the largest model

    def _check_params(self):
        if not self.path:
            raise TraceError("router policy needs --param path=POLICY_FILE")
        self._check_choice("escalate", ESCALATE_MODES)

    def _fit(self, train):
        self.network_, saved = load_policy(self.path)
        check_fitted_within(self.path, saved.get("train_problem_ids"), train.problems["problem_id"].to_list())
        trained_for = saved.get("escalate", "replace")
        if trained_for != self.escalate:
            raise TraceError(
                f"router policy: {self.path} was trained for escalate={trained_for} (its kappa is calibrated for "
                f"that process); replay it with --param escalate={trained_for}, or train one with "
                f"trace train policy --escalate {self.escalate}"
            )
        self.features_ = list(saved["features"])
        require_signals(train.manifest, self.draft_roles(train.roles)[0], self.features_, "policy", POLICY_INSTEAD)
        self.feature_mean_ = np.asarray(saved["feature_mean"], dtype=np.float64)
        self.feature_std_ = np.asarray(saved["feature_std"], dtype=np.float64)
        self.kappa_ = float(saved["kappa"])

    def decision_params(self):
        return {"kappa": self.kappa_ if self.kappa is None else self.kappa}

    def escalate_probability(self, steps: pl.DataFrame, problems: pl.DataFrame) -> np.ndarray:
        """pi(escalate | o) for each step row."""
        import torch

        observation = normalise(raw_features(steps, problems, self.features_), self.feature_mean_, self.feature_std_)
        with torch.no_grad():
            logits = self.network_(torch.from_numpy(observation))
            return torch.softmax(logits, dim=1)[:, ESCALATE].double().numpy()

    def draft_signal(self, data):
        signal = np.full(data.steps.height, np.nan)
        draft, _ = self.draft_roles(data.roles)
        small = (data.steps["model"] == draft).to_numpy()
        signal[small] = self.escalate_probability(data.steps.filter(pl.Series(small)), data.problems)
        return signal

    def accept(self, signal, params):
        """Keep the small step (no escalation) iff p < kappa."""
        return signal < params["kappa"]
