"""STEER (Lee et al., AAAI 2026, arXiv 2511.06190): route on the small model's step confidence.

On a trace of K models, ``draft`` (default: the smallest) plays the small model and ``target`` (default:
the next larger model than ``draft``) the large one: STEER escalates to the next larger model.

Signal: c = ``conf_max_logit_math`` of a small step, the mean raw max logit over its math tokens.

Mixtures: per step index d (``depth``: 0 for the first step), a two-component Gaussian mixture
(scikit-learn ``GaussianMixture(n_components=2, random_state=seed)``, full covariance, 1-D) is fitted on
the c of every small step at index d in the train split (every small step row of the trace there, not only
the all-small chain's), if there are at least ``min_samples`` of them (index 0 must have them). A step at
index d uses the mixture of the largest fitted index <= d. The low component is the one with the lower mean.

Unconfident: a small step with confidence c at index d is unconfident iff
    P(low | c) > tau  AND  c < mean of the other (high) component,
where P(low | c) = w_low N(c; m_low, v_low) / (w_0 N(c; m_0, v_0) + w_1 N(c; m_1, v_1)) with the mixture's
weights w, means m and variances v. The second condition means an unusually *high* confidence never
escalates, however the components overlap. A step without math tokens (c null) carries no signal: never
unconfident.

Walk, per (problem, world), by ``mode``:

``mode="switch"`` (one-way), ``escalate="after"`` (default; the CMDP seed's description of STEER: switch to
the large model for the *subsequent* steps):
  the small model writes step 1; after each small step y: if y is final, the walk ends; else if y is
  unconfident, y is kept and the large model writes every later step to its final step; else the small model
  writes the next step. Nothing is discarded.
``mode="switch"``, ``escalate="replace"`` (ablation): the small model drafts each step y; if y is
  unconfident (final or not) it is discarded (paid for) and the large model writes, from y's parent node,
  that step and every later one; else y is kept (the walk ends if y is final).
``mode="step"`` (draft and replace, one step at a time; ``escalate`` is not used): the small model drafts
  each step y; if y is unconfident (final or not) it is discarded (paid for) and the large model writes that
  one step; the small model drafts the step after it. The walk ends at the first final step kept.

The comb trace holds every path of ``mode="switch"`` (both escalate values); ``mode="step"`` needs closure
(`trace gen --expand closure`). A step the walk needs and the trace lacks is a miss.

``gmms=PATH`` loads the mixtures that ``trace train steer`` saved instead of fitting them (JSON)::

    {"format": "trace-steer", "version": 1, "signal": "conf_max_logit_math", "min_samples": 10, "seed": 0,
     "train_problem_ids": [...],                      # must lie in the replay's train split
     "mixtures": [{"depth": 0, "n": 812, "weights": [w0, w1], "means": [m0, m1],
                   "variances": [v0, v1], "low_component": 0}, ...]}

``low_component`` must name the component with the lower mean (it is what the router uses).
"""

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from replay.api_signals import S_API, require_signals
from replay.artifacts import check_fitted_within
from replay.atomic import write_atomic
from replay.engine import ESCALATE_MODES
from replay.errors import TraceError
from replay.routers.base import SEED, UNIT, Domain, DraftRouter

SIGNAL = "conf_max_logit_math"
STEER_FORMAT = "trace-steer"
STEER_VERSION = 1


@dataclass(frozen=True)
class SavedMixture:
    """One step index's two-component mixture as `trace train steer` saved it."""

    depth: int
    n: int  # train confidences it was fitted on (0 when the file does not say)
    weights: np.ndarray
    means: np.ndarray
    variances: np.ndarray
    low_component: int  # 0 or 1: the low-confidence component


@dataclass(frozen=True)
class SavedMixtures:
    """A `trace train steer` file, checked: its signal, mixtures by step index, and the train problems."""

    signal: str
    mixtures: list[SavedMixture]
    train_problem_ids: list[str] | None  # None when the file does not record them


def load_mixtures(path: str | os.PathLike, kind: str) -> SavedMixtures:
    """Read and check a ``gmms`` file (the format in the module doc); ``kind`` names the file in errors."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{kind} file {path} does not exist")
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TraceError(f"{kind} file {path} is not JSON ({error})") from None
    if not isinstance(saved, dict) or saved.get("format") != STEER_FORMAT:
        raise TraceError(f"{path} is not a {kind} file (no format {STEER_FORMAT!r}; write one with trace train steer)")
    if saved.get("version") != STEER_VERSION:
        raise TraceError(f"{path} has {kind} version {saved.get('version')!r}; this trace reads {STEER_VERSION}")
    train_ids = saved.get("train_problem_ids")
    if train_ids is not None and not isinstance(train_ids, list):
        raise TraceError(f"{path}: train_problem_ids must be a list of problem ids")
    mixtures = []
    for number, entry in enumerate(saved.get("mixtures") or []):
        try:
            depth, low, n = int(entry["depth"]), int(entry["low_component"]), int(entry.get("n", 0))
            weights, means, variances = (
                np.asarray(entry[key], dtype=np.float64) for key in ("weights", "means", "variances")
            )
            if (
                not (weights.shape == means.shape == variances.shape == (2,))
                or (variances <= 0).any()
                or low not in (0, 1)
                or not np.isfinite(np.concatenate([weights, means, variances])).all()
            ):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise TraceError(
                f"{path}: mixture {number} needs depth, low_component (0 or 1) and two weights, means "
                "and positive variances"
            ) from None
        if means[low] > means[1 - low]:
            raise TraceError(f"{path}: mixture {number} (depth {depth}): low_component {low} has the higher mean")
        mixtures.append(SavedMixture(depth, n, weights, means, variances, low))
    return SavedMixtures(saved.get("signal", SIGNAL), sorted(mixtures, key=lambda mixture: mixture.depth), train_ids)


class Steer(DraftRouter):
    name = "steer"
    sweepable = ("tau",)
    domains = {"tau": UNIT, "min_samples": Domain(2, math.inf, integer=True), "seed": SEED}

    def __init__(self, tau=0.5, mode="switch", escalate="after", min_samples=10, seed=0, gmms="", draft="", target=""):
        self.tau = tau
        self.mode = mode
        self.escalate = escalate
        self.min_samples = min_samples
        self.seed = seed
        self.gmms = gmms
        self.draft = draft  # default: the smallest model
        self.target = target  # default: the next larger model than draft

    def default_target(self, roles, draft):
        """STEER escalates to the next larger model."""
        return roles[roles.index(draft) + 1] if draft in roles[:-1] else roles[-1]

    @property
    def one_way(self):
        return self.mode == "switch"

    def _check_params(self):
        self._check_choice("mode", ("switch", "step"))
        self._check_choice("escalate", ESCALATE_MODES)

    def _fit(self, train):
        draft, _ = self.draft_roles(train.roles)
        require_signals(
            train.manifest,
            draft,
            [SIGNAL],
            "steer",
            f"route on S_API ({S_API}) with the policy instead: trace train policy --features {S_API},depth,...",
        )
        if self.gmms:
            self._load(train)
            return
        confidences = train.steps.filter((pl.col("model") == draft) & pl.col(SIGNAL).is_not_null())
        per_depth = confidences.group_by("depth").agg(pl.col(SIGNAL)).sort("depth")
        self.mixtures_ = {}
        self.low_component_ = {}
        self.n_samples_ = {}
        for depth, values in per_depth.iter_rows():
            if len(values) < self.min_samples:
                continue
            mixture = _mixture(self.seed)
            mixture.fit(np.asarray(values, dtype=np.float64).reshape(-1, 1))
            self.mixtures_[depth] = mixture
            self.low_component_[depth] = int(np.argmin(mixture.means_.ravel()))
            self.n_samples_[depth] = len(values)
        if 0 not in self.mixtures_:
            raise TraceError(
                f"router steer needs at least min_samples={self.min_samples} {draft}-model "
                f"{SIGNAL} values at step index 0 in the train split; it has "
                f"{confidences.filter(pl.col('depth') == 0).height}"
            )

    def save(self, path, train_problem_ids: list[str], **metadata) -> None:
        """Write the fitted mixtures as a ``gmms`` JSON file (floats round-trip exactly)."""
        self.check_fitted()
        mixtures = [
            {
                "depth": int(depth),
                "n": int(self.n_samples_[depth]),
                "weights": mixture.weights_.tolist(),
                "means": mixture.means_.ravel().tolist(),
                "variances": mixture.covariances_.ravel().tolist(),
                "low_component": self.low_component_[depth],
            }
            for depth, mixture in sorted(self.mixtures_.items())
        ]
        saved = {
            "format": STEER_FORMAT,
            "version": STEER_VERSION,
            "signal": SIGNAL,
            "min_samples": self.min_samples,
            "seed": self.seed,
            **metadata,
            "train_problem_ids": sorted(train_problem_ids),
            "mixtures": mixtures,
        }
        write_atomic(path, (json.dumps(saved, indent=1) + "\n").encode())

    def _load(self, train):
        saved = load_mixtures(self.gmms, "trace steer")
        if saved.signal != SIGNAL:
            raise TraceError(f"router steer: {self.gmms} has signal {saved.signal!r}; this trace reads {SIGNAL}")
        check_fitted_within(self.gmms, saved.train_problem_ids, train.problems["problem_id"].to_list())
        self.mixtures_, self.low_component_, self.n_samples_ = {}, {}, {}
        for entry in saved.mixtures:
            mixture = _mixture(self.seed)
            mixture.weights_, mixture.means_ = entry.weights, entry.means.reshape(2, 1)
            mixture.covariances_ = entry.variances.reshape(2, 1, 1)
            mixture.precisions_cholesky_ = (1 / np.sqrt(entry.variances)).reshape(2, 1, 1)
            mixture.precisions_ = (1 / entry.variances).reshape(2, 1, 1)
            mixture.n_features_in_ = 1
            self.mixtures_[entry.depth], self.low_component_[entry.depth] = mixture, entry.low_component
            self.n_samples_[entry.depth] = entry.n
        if 0 not in self.mixtures_:
            raise TraceError(f"router steer: {self.gmms} has no mixture for step index 0")

    def _mixture_depths(self, depths: np.ndarray) -> np.ndarray:
        """The largest fitted step index <= each of ``depths`` (index 0 is always fitted)."""
        fitted = np.array(sorted(self.mixtures_))
        return fitted[np.searchsorted(fitted, depths, side="right") - 1]

    def low_posterior(self, depths: np.ndarray, confidences: np.ndarray) -> np.ndarray:
        """P(low | c) for each (step index, confidence), under the mixture of the largest fitted index <= d."""
        mixture_depth = self._mixture_depths(depths)
        posterior = np.full(len(depths), np.nan)
        for depth in np.unique(mixture_depth):
            rows = mixture_depth == depth
            probabilities = self.mixtures_[depth].predict_proba(confidences[rows].reshape(-1, 1))
            posterior[rows] = probabilities[:, self.low_component_[depth]]
        return posterior

    def high_mean(self, depths: np.ndarray) -> np.ndarray:
        """Mean of the high (other) component of the mixture each step index uses."""
        mixture_depth = self._mixture_depths(depths)
        means = {d: self.mixtures_[d].means_.ravel()[1 - self.low_component_[d]] for d in np.unique(mixture_depth)}
        return np.array([means[d] for d in mixture_depth], dtype=np.float64)

    def unconfident(self, depths: np.ndarray, confidences: np.ndarray, tau: float | np.ndarray) -> np.ndarray:
        """The rule: P(low | c) > tau and c below the high component's mean."""
        return (self.low_posterior(depths, confidences) > tau) & (confidences < self.high_mean(depths))

    def draft_signal(self, data):
        """P(low | c) where c lies below the high component's mean, 0 where it does not (never above a tau in
        [0, 1]), NaN for large steps and small steps without a confidence."""
        steps = data.steps
        draft, _ = self.draft_roles(data.roles)
        judged = ((steps["model"] == draft) & steps[SIGNAL].is_not_null()).to_numpy()
        depths = steps["depth"].to_numpy()[judged]
        confidences = steps[SIGNAL].to_numpy()[judged].astype(np.float64)
        signal = np.full(steps.height, np.nan)
        signal[judged] = np.where(confidences < self.high_mean(depths), self.low_posterior(depths, confidences), 0.0)
        return signal

    def accept(self, signal, params):
        """Keep the small step unless it is unconfident (NaN: no signal, kept)."""
        return ~(signal > params["tau"])


def _mixture(seed: int):
    """An unfitted two-component scikit-learn GaussianMixture."""
    from sklearn.mixture import GaussianMixture

    return GaussianMixture(n_components=2, random_state=seed)
