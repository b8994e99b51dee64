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

Either way escalation is one-way (with two models, at most once); a step the walk needs and the trace lacks is a
miss (the comb trace, `trace gen --expand comb`, holds every path of both modes).

K models in play (a policy file whose ``roles`` list more than two models, M_0 < M_1 < ... < M_{K-1}; paper
§3.1): the action after a step of the current model M_k is continue (M_k writes the next step) or escalate to any
M_j, j > k (one-way: M_j writes from then on, and decides again unless it is M_{K-1}). The network has K logits
(continue, escalate to M_1, ..., escalate to M_{K-1}); at M_k the logits of M_1..M_k are not actions, so
pi(.|o) is the softmax over the rest; its input is the step's features and a one-hot of k. Deployed (eq. 6
generalised): the largest M_j whose pi(escalate to M_j | o) >= kappa, else continue; for K = 2 this is eq. (6).
(The paper runs the thresholded set "with the larger model when it contains both": with more than two actions
the largest model in the set.) ``replace`` generalises the same way: the rejected draft is discarded and M_j
drafts that step, judged again unless M_j is the largest. The comb holds every first escalation; a second one
(M_0 -> M_1 -> M_2) leaves the comb, and the walk reports the missing steps as misses for
`trace gen --expand closure`. A policy file records the
mode it was trained for (files from before the option existed: replace), and replaying it with the other mode
is an error: its kappa is calibrated for its own process.

Policy file (``torch.save`` of a dict; written by ``trace train policy``, read here)::

    {"format": "trace-policy", "version": 2,
     "features": ["conf_max_logit_math", "depth", ...],  # names from FEATURES, in input order
     "feature_mean": [...], "feature_std": [...],        # o = (raw - mean) / std; a null raw value -> 0
     "hidden": 64,                                        # width of the two hidden layers
     "kappa": 0.5,                                        # the trained threshold
     "escalate": "after",                                 # the decision process it was trained for
     "roles": ["m0", "m1", "m2"],                         # optional: the models in play, smallest first
     "role_models": ["toy-small", ...],                   # ... and their names (checked against the trace)
     "state_dict": {...},                                 # float64 tensors, torch.nn.Sequential's names
     "train_problem_ids": [...],                          # optional: the problems trained on
     "fitted_on": {...},                                  # optional: where (replay.artifacts.fit_record), checked
     "flags": [...],                                      # optional: how training ended, see TRAINING_FLAGS
     ...}                                                 # optional: training metadata (trace train policy)

The network (``replay.mlp.MLP``, ``policy_inputs`` wide): Linear-Tanh-Linear-Tanh-Linear, one logit per action
(continue, escalate to each larger model in play); pi = softmax of the logits (``policy_probabilities``), two
models: p = pi[escalate]. It is evaluated in ``replay.mlp``'s float64 arithmetic, which gives the same bits on
every x86 CPU, so a replay makes the same escalations everywhere, and the ones training made. Version 1 files
(float32 weights, evaluated in float32 by torch, whose bits depend on the CPU) still load: their weights are
evaluated the same way, in float64, so where pi lies within about 1e-7 of kappa a decision can differ from a
replay by an older version of this tool. Files without ``roles`` (written before K models) are two-model
policies from ``draft=`` (default the smallest model) to ``target=`` (default the largest), as before.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl

from replay.artifacts import load_artifact, saved_record
from replay.endpoint_signals import S_API, require_signals
from replay.mlp import MLP, exp
from replay.policy_walk import allowed_actions, walk_k_models
from replay.routers import ROUTERS
from replay.routers.base import Domain, DraftRouter
from replay.walk import ESCALATE_MODES
from tracestore.atomic import write_atomic
from tracestore.errors import TraceError

POLICY_FORMAT = "trace-policy"
POLICY_VERSION = 2  # 2: float64 weights, evaluated by replay.mlp; 1 (float32, torch) still loads
READABLE_VERSIONS = (1, 2)
ESCALATE = 1  # index of the escalate logit
MASKED = -1e9  # logit of an action not open (or not playable): probability exactly 0, a finite log
# How training ended, when it ended where the policy is not what was asked for (the file's "flags"; `trace train
# policy` says so and `trace report` marks the policy's row).
TRAINING_FLAGS = {
    "target_unreachable": "no policy reaches the coverage target 1 - alpha on the train split",
    "coverage_below_target": "the trained policy's coverage on the train split is below 1 - alpha",
    "kappa_at_0": "kappa ended at 0, the edge of its range: the policy escalates at every decision",
    "kappa_at_1": "kappa ended at 1, the edge of its range: the policy escalates only where pi(escalate) is 1",
}
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


def policy_inputs(n_features: int, n_actions: int = 2) -> int:
    """Width of the policy network's input: the features, and with K models in play (K > 2) the one-hot of the
    current model."""
    return n_features + (n_actions if n_actions > 2 else 0)


def policy_probabilities(network: MLP, observation: np.ndarray, allowed: np.ndarray | None = None) -> np.ndarray:
    """pi(a | o) for rows of observations (any leading shape), over the ``allowed`` actions (default all): the
    softmax of the network's logits. Every caller (training's rollouts and thresholds, the replay) goes through
    here, so training and replay see the same bits."""
    rows = observation.reshape(-1, observation.shape[-1])
    logits = network(rows)
    if allowed is not None:
        logits = np.where(allowed.reshape(-1, logits.shape[-1]), logits, MASKED)
    weights = exp(logits - logits.max(axis=1, keepdims=True))
    return (weights / weights.sum(axis=1, keepdims=True)).reshape(*observation.shape[:-1], -1)


def with_role(observation: np.ndarray, role: np.ndarray, n_roles: int) -> np.ndarray:
    """Observations with the one-hot of the current model (position in the models in play) appended; K > 2."""
    one_hot = np.zeros((*role.shape, n_roles))
    np.put_along_axis(one_hot, role[..., None], 1.0, axis=-1)
    return np.concatenate([observation, one_hot], axis=-1)


def model_set(roles: list[str], draft: str, target: str, router: str, models: str = "") -> list[str]:
    """The models in play: ``models`` (comma-separated roles in size order, any subset of two or more, as the
    cascade's), else ``draft`` .. ``target`` in size order (defaults: the smallest, the largest); TraceError for
    an unknown role, a target not larger than the draft, or ``models`` with ``draft``/``target``."""
    if models:
        if draft or target:
            raise TraceError(f"{router}: give the models in play as models=... or as draft/target, not both")
        chosen = [role.strip() for role in models.split(",") if role.strip()]
        for role in chosen:
            if role not in roles:
                raise TraceError(f"{router}: model {role!r} is not one of the trace's models ({', '.join(roles)})")
        order = [roles.index(role) for role in chosen]
        if len(chosen) < 2 or order != sorted(set(order)):
            raise TraceError(f"{router}: models needs two or more of {', '.join(roles)}, smallest first, no repeats")
        return chosen
    draft, target = draft or roles[0], target or roles[-1]
    for param, role in (("draft", draft), ("target", target)):
        if role not in roles:
            raise TraceError(f"{router}: {param}={role!r} is not one of the trace's models ({', '.join(roles)})")
    if roles.index(target) <= roles.index(draft):
        raise TraceError(f"{router}: target {target} must be a larger model than draft {draft}")
    return roles[roles.index(draft) : roles.index(target) + 1]


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
    return np.nan_to_num(observation, nan=0.0)


def save_policy(
    path: str | Path,
    network: MLP,
    features: list[str],
    feature_mean,
    feature_std,
    kappa: float,
    hidden: int = 64,
    escalate: str = "after",
    roles: list[str] | None = None,
    role_models: list[str] | None = None,
    **metadata,
) -> str:
    """Write a policy file atomically; the same arguments give the same bytes (``metadata``: plain values).
    Returns the SHA-256 of the bytes written (hex)."""
    import hashlib
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
        **({"roles": list(roles), "role_models": list(role_models or [])} if roles else {}),
        "state_dict": network.state_dict(),
    }
    buffer = io.BytesIO()  # in memory, the archive's inner folder name does not depend on the file name
    torch.save(saved, buffer)
    write_atomic(path, buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def load_policy(path: str | Path) -> tuple[MLP, dict]:
    """(network, the file's dict) from a policy file, checked."""
    import torch

    path = Path(path)
    saved = load_artifact(
        path,
        lambda p: torch.load(p, map_location="cpu", weights_only=True),
        "policy",
        POLICY_FORMAT,
        READABLE_VERSIONS,
        ("features", "feature_mean", "feature_std", "hidden", "kappa", "state_dict"),
    )
    n = len(saved["features"])
    if (
        len(saved["feature_mean"]) != n
        or len(saved["feature_std"]) != n
        or not all(s > 0 for s in saved["feature_std"])
    ):
        raise TraceError(f"policy file {path}: feature_mean and feature_std need {n} entries, std > 0")
    roles = saved.get("roles")
    if roles is not None and (
        not isinstance(roles, list) or len(roles) < 2 or len(saved.get("role_models") or []) != len(roles)
    ):
        raise TraceError(f"policy file {path}: 'roles' must list two or more models, with as many 'role_models'")
    n_actions, hidden = len(roles) if roles else 2, saved["hidden"]
    state = saved["state_dict"]
    widths = [(policy_inputs(n, n_actions), hidden), (hidden, hidden), (hidden, n_actions)]
    expected = {}
    for i, (n_in, n_out) in enumerate(widths):
        expected[f"{2 * i}.weight"], expected[f"{2 * i}.bias"] = (n_out, n_in), (n_out,)
    got = {name: tuple(value.shape) for name, value in state.items()} if isinstance(state, dict) else {}
    wrong = [name for name in expected if got.get(name) != expected[name]]
    if wrong:
        raise TraceError(
            f"policy file {path}: state_dict does not fit a {n}-feature network with {hidden} hidden units and "
            f"{n_actions} actions ({wrong[0]}: {got.get(wrong[0], 'missing')}, expected {expected[wrong[0]]})"
        )
    return MLP.from_state_dict(state), saved


@ROUTERS.register
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

    def draft_roles(self, roles):
        fitted = getattr(self, "roles_", None)
        return (fitted[0], fitted[-1]) if fitted else super().draft_roles(roles)

    def _check_params(self):
        if not self.path:
            raise TraceError("router policy needs --param path=POLICY_FILE")
        self._check_choice("escalate", ESCALATE_MODES)

    def _fit(self, train):
        self.network_, saved = load_policy(self.path)
        self.loaded(saved_record(saved, self.path, "policy"), train, self.path)
        trained_for = saved.get("escalate", "replace")
        if trained_for != self.escalate:
            raise TraceError(
                f"router policy: {self.path} was trained for escalate={trained_for} (its kappa is calibrated for "
                f"that process); replay it with --param escalate={trained_for}, or train one with "
                f"trace train policy --escalate {self.escalate}"
            )
        self.features_ = list(saved["features"])
        self.roles_ = None  # draft_roles reads draft=/target= until the file's models are known
        self.roles_ = self._roles_in_play(saved, train)
        for role in self.roles_[:-1]:  # the models whose steps the policy reads
            require_signals(train.manifest, role, self.features_, "policy", POLICY_INSTEAD)
        self.feature_mean_ = np.asarray(saved["feature_mean"], dtype=np.float64)
        self.feature_std_ = np.asarray(saved["feature_std"], dtype=np.float64)
        self.kappa_ = float(saved["kappa"])

    def _roles_in_play(self, saved: dict, train) -> list[str]:
        """The file's models (checked against the trace and draft=/target=), or draft and target for a file
        written before K models."""
        roles = saved.get("roles")
        if roles is None:
            return list(self.draft_roles(train.roles))
        names = {role: info.get("name") for role, info in train.manifest.models.items()}
        trained = ", ".join(f"{role}={name}" for role, name in zip(roles, saved["role_models"], strict=True))
        if any(names.get(role) != name for role, name in zip(roles, saved["role_models"], strict=True)):
            have = ", ".join(f"{role}={name}" for role, name in names.items())
            raise TraceError(
                f"router policy: {self.path} was trained for the models {trained}; this trace has {have}: "
                f"train one on this trace (trace train policy)"
            )
        for param, given, own in (("draft", self.draft, roles[0]), ("target", self.target, roles[-1])):
            if given and given != own:
                raise TraceError(
                    f"router policy: {self.path} was trained for the models {trained}; leave out "
                    f"--param {param}={given}, or train one with trace train policy --{param} {given}"
                )
        order = [train.roles.index(role) for role in roles]
        if order != sorted(set(order)):
            raise TraceError(f"router policy: {self.path}'s models {trained} are not in size order on this trace")
        return list(roles)

    def decision_params(self):
        # unfitted (a router file checked before any replay) the file's kappa is not read yet: NaN
        return {"kappa": getattr(self, "kappa_", float("nan")) if self.kappa is None else self.kappa}

    def escalate_probability(self, steps: pl.DataFrame, problems: pl.DataFrame) -> np.ndarray:
        """pi(escalate | o) for each step row."""
        observation = normalise(raw_features(steps, problems, self.features_), self.feature_mean_, self.feature_std_)
        return policy_probabilities(self.network_, observation)[:, ESCALATE]

    def action_probabilities(self, data) -> np.ndarray:
        """(step rows, K) pi(a | o) of each step row written by a model in play below the largest, where a is
        continue or escalate to a larger model (0 for actions not open at that model); NaN rows elsewhere."""
        n_roles = len(self.roles_)
        position = np.full(len(data.roles), -1)
        position[[data.roles.index(role) for role in self.roles_[:-1]]] = np.arange(n_roles - 1)
        row_position = position[data.tree.step_role]
        rows = np.flatnonzero(row_position >= 0)
        raw = raw_features(data.steps[rows], data.problems, self.features_)
        observation = with_role(normalise(raw, self.feature_mean_, self.feature_std_), row_position[rows], n_roles)
        probability = np.full((data.steps.height, n_roles), np.nan)
        probability[rows] = policy_probabilities(
            self.network_, observation, allowed_actions(row_position[rows], n_roles)
        )
        return probability

    def draft_signal(self, data):
        signal = np.full(data.steps.height, np.nan)
        draft, _ = self.draft_roles(data.roles)
        small = (data.steps["model"] == draft).to_numpy()
        signal[small] = self.escalate_probability(data.steps.filter(pl.Series(small)), data.problems)
        return signal

    def accept(self, signal, params):
        """Keep the small step (no escalation) iff p < kappa."""
        return signal < params["kappa"]

    def walk(self, data, costs, starts, params):
        if len(self.roles_) == 2:
            return super().walk(data, costs, starts, params)
        return walk_k_models(
            data, costs, starts, params["kappa"], self.action_probabilities(data), self.roles_, self.escalate
        )
