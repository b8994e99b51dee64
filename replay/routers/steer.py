"""STEER (Lee et al., AAAI 2026, arXiv 2511.06190): route on the small model's step confidence.

Signal: ``conf_max_logit_math``, the mean raw max logit over a step's math tokens. Per step index,
a two-component Gaussian mixture is fitted on the small model's confidences in the train split; a
draft is unconfident when the posterior of the low-mean component exceeds ``tau``. The small
model drafts every step; an unconfident draft is discarded (and paid for) and the large model
writes that step. ``mode="switch"``: the large model then writes every later step as well;
``mode="step"``: the next step is drafted by the small model again.

A step index with fewer than ``min_samples`` train confidences uses the mixture of the deepest
index below it that has enough. A draft without math tokens (null confidence) carries no signal
and is kept.
"""

import numpy as np
import polars as pl
from sklearn.mixture import GaussianMixture

from replay.engine import SMALL
from replay.errors import TraceError
from replay.routers.base import DraftRouter

SIGNAL = "conf_max_logit_math"


class Steer(DraftRouter):
    name = "steer"
    sweepable = ("tau",)

    def __init__(self, tau=0.5, mode="switch", min_samples=10, seed=0):
        self.tau = tau
        self.mode = mode
        self.min_samples = min_samples
        self.seed = seed

    @property
    def one_way(self):
        return self.mode == "switch"

    def _check_params(self):
        self._check_choice("mode", ("switch", "step"))
        self._check_range("min_samples", 2, float("inf"))

    def _fit(self, train):
        confidences = train.steps.filter((pl.col("model") == SMALL) & pl.col(SIGNAL).is_not_null())
        per_depth = confidences.group_by("depth").agg(pl.col(SIGNAL)).sort("depth")
        self.mixtures_ = {}
        self.low_component_ = {}
        for depth, values in per_depth.iter_rows():
            if len(values) < self.min_samples:
                continue
            mixture = GaussianMixture(n_components=2, random_state=self.seed)
            mixture.fit(np.asarray(values, dtype=np.float64).reshape(-1, 1))
            self.mixtures_[depth] = mixture
            self.low_component_[depth] = int(np.argmin(mixture.means_.ravel()))
        if 0 not in self.mixtures_:
            raise TraceError(f"router steer needs at least min_samples={self.min_samples} small-model "
                             f"{SIGNAL} values at step index 0 in the train split; it has "
                             f"{confidences.filter(pl.col('depth') == 0).height}")

    def low_posterior(self, depths: np.ndarray, confidences: np.ndarray) -> np.ndarray:
        """Posterior of the low-confidence component for each (step index, confidence)."""
        fitted = np.array(sorted(self.mixtures_))
        mixture_depth = fitted[np.searchsorted(fitted, depths, side="right") - 1]
        posterior = np.full(len(depths), np.nan)
        for depth in np.unique(mixture_depth):
            rows = mixture_depth == depth
            probabilities = self.mixtures_[depth].predict_proba(confidences[rows].reshape(-1, 1))
            posterior[rows] = probabilities[:, self.low_component_[depth]]
        return posterior

    def draft_signal(self, data):
        steps = data.steps
        judged = ((steps["model"] == SMALL) & steps[SIGNAL].is_not_null()).to_numpy()
        signal = np.full(steps.height, np.nan)
        signal[judged] = self.low_posterior(steps["depth"].to_numpy()[judged],
                                            steps[SIGNAL].to_numpy()[judged].astype(np.float64))
        return signal

    def accept(self, signal, params):
        return ~(signal > params["tau"])
