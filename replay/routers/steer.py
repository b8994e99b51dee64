"""STEER (Lee et al., AAAI 2026, arXiv 2511.06190): route on the small model's step confidence.

On a trace of K models STEER escalates along a chain of models, smallest first, each time to the next one:
``models=m0,m1,m2`` names the chain (default: every model of the trace, in size order). ``draft=`` and
``target=`` name a two-model chain instead (draft default the smallest model, target default the next larger
than draft), as on the other draft routers; they cannot be combined with ``models=`` unless they say the
same (a two-model ``models`` with that draft and target). On a two-model trace the chain is its two models.
Below, "small" is the model writing at a hop of the chain and "large" the next model of the chain.

Signal: c = ``conf_max_logit_math`` of a small step, the mean raw max logit over its math tokens.

Mixtures: for every model of the chain but the last, and per step index d (``depth``: 0 for the first step),
a two-component Gaussian mixture (scikit-learn ``GaussianMixture(n_components=2, random_state=seed)``, full
covariance, 1-D) is fitted on the c of that model's steps at index d on its own solutions in the train split:
the steps of its all-own-model chain from the root (paths "s", "ss", ...; "0", "00", ... for m0), never steps
grown after another model's step (closure's and ``full``'s), so the fit does not depend on which routers a trace
was closed over; if there are at least ``min_samples`` of them (index 0 must have them). A step at index d uses
its own model's mixture of the largest fitted index <= d. The low component is the one with the lower mean.

Unconfident: a small step with confidence c at index d is unconfident iff
    P(low | c) > tau  AND  c < mean of the other (high) component,
where P(low | c) = w_low N(c; m_low, v_low) / (w_0 N(c; m_0, v_0) + w_1 N(c; m_1, v_1)) with the mixture's
weights w, means m and variances v. The second condition means an unusually *high* confidence never
escalates, however the components overlap. A step without math tokens (c null) carries no signal: never
unconfident. The chain's last model is never judged.

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

Along a longer chain each hop works the same way: in ``mode="switch"`` the model that took over writes on,
judged by its own mixtures, until one of its steps is unconfident and the next model takes over
(``escalate`` as above at every hop); in ``mode="step"`` the step the next model writes in place of a
discarded draft is judged by that model's mixtures in turn, and discarded and written by the model after
it if unconfident; the next step is drafted by the chain's first model again.

On a two-model trace the comb holds every path of ``mode="switch"`` (both escalate values); a longer chain
also needs, from the nodes of a larger model's completion, completions the comb does not grow, and
``mode="step"`` needs closure (`trace gen --expand closure`). A step the walk needs and the trace lacks is
a miss, which closure grows.

``gmms=PATH`` loads the mixtures that ``trace train steer`` saved instead of fitting them (JSON)::

    {"format": "trace-steer", "version": 2, "signal": "conf_max_logit_math", "min_samples": 10, "seed": 0,
     "train_problem_ids": [...],                      # the problems fitted on
     "fitted_on": {...},                              # where: replay.artifacts.fit_record (checked on load)
     "models": ["m0", "m1"],                          # the models fitted, smallest first
     "mixtures": [{"model": "m0", "depth": 0, "n": 812, "weights": [w0, w1], "means": [mu0, mu1],
                   "variances": [v0, v1], "low_component": 0}, ...]}

``low_component`` must name the component with the lower mean (it is what the router uses). A version 1
file (no ``models``, no ``model`` per mixture) holds one model's mixtures; they serve the chain's first
model, so it replays two-model chains. A file replays on any trace of the setting it was fitted in (its
``fitted_on.setting``: models, revisions, templates, sampling, ...; another dataset is the point), and the rows
of the problems it was fitted on are marked in the replay's outcomes.
"""

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from replay.artifacts import check_record, legacy_record
from replay.endpoint_signals import S_API, require_signals
from replay.routers import ROUTERS
from replay.routers.base import SEED, UNIT, Domain, DraftRouter
from replay.walk import ESCALATE_MODES
from tracestore.atomic import write_atomic
from tracestore.errors import TraceError
from tracestore.schema import model_char

SIGNAL = "conf_max_logit_math"
STEER_FORMAT = "trace-steer"
STEER_VERSION = 2
STEER_VERSIONS = (1, 2)  # the versions this reads


@dataclass(frozen=True)
class SavedMixture:
    """One step index's two-component mixture as `trace train steer` saved it."""

    model: str | None  # the role it was fitted on (None in a version 1 file: the chain's first model)
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
    fitted_on: dict | None  # where it was fitted (replay.artifacts.fit_record); None in a file from before

    def of(self, role: str | None) -> list[SavedMixture]:
        """The mixtures of model ``role`` (None: those a version 1 file holds), by step index."""
        return [mixture for mixture in self.mixtures if mixture.model == role]

    @property
    def models(self) -> list[str | None]:
        """The models with mixtures, in the file's order (``[None]`` for a version 1 file)."""
        return list(dict.fromkeys(mixture.model for mixture in self.mixtures))


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
    version = saved.get("version")
    if version not in STEER_VERSIONS:
        readable = " and ".join(map(str, STEER_VERSIONS))
        raise TraceError(f"{path} has {kind} version {version!r}; this trace reads versions {readable}")
    train_ids = saved.get("train_problem_ids")
    if train_ids is not None and not isinstance(train_ids, list):
        raise TraceError(f"{path}: train_problem_ids must be a list of problem ids")
    mixtures = []
    for number, entry in enumerate(saved.get("mixtures") or []):
        try:
            depth, low, n = int(entry["depth"]), int(entry["low_component"]), int(entry.get("n", 0))
            model = str(entry["model"]) if version > 1 else None
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
                f"{path}: mixture {number} needs {'model, ' if version > 1 else ''}depth, low_component (0 or 1) "
                "and two weights, means and positive variances"
            ) from None
        if means[low] > means[1 - low]:
            raise TraceError(f"{path}: mixture {number} (depth {depth}): low_component {low} has the higher mean")
        mixtures.append(SavedMixture(model, depth, n, weights, means, variances, low))
    models = list(dict.fromkeys(mixture.model for mixture in mixtures))
    ordered = sorted(mixtures, key=lambda mixture: (models.index(mixture.model), mixture.depth))
    fitted_on = check_record(saved["fitted_on"], path) if "fitted_on" in saved else None
    return SavedMixtures(saved.get("signal", SIGNAL), ordered, train_ids, fitted_on)


@dataclass
class StepMixtures:
    """One model's fitted mixtures by step index, and the rule that reads them."""

    mixtures: dict  # step index -> fitted (or loaded) GaussianMixture; index 0 is always there
    low_component: dict[int, int]
    n_samples: dict[int, int]

    def _mixture_depths(self, depths: np.ndarray) -> np.ndarray:
        """The largest fitted step index <= each of ``depths``."""
        fitted = np.array(sorted(self.mixtures))
        return fitted[np.searchsorted(fitted, depths, side="right") - 1]

    def low_posterior(self, depths: np.ndarray, confidences: np.ndarray) -> np.ndarray:
        mixture_depth = self._mixture_depths(depths)
        posterior = np.full(len(depths), np.nan)
        for depth in np.unique(mixture_depth):
            rows = mixture_depth == depth
            probabilities = self.mixtures[depth].predict_proba(confidences[rows].reshape(-1, 1))
            posterior[rows] = probabilities[:, self.low_component[depth]]
        return posterior

    def high_mean(self, depths: np.ndarray) -> np.ndarray:
        mixture_depth = self._mixture_depths(depths)
        means = {d: self.mixtures[d].means_.ravel()[1 - self.low_component[d]] for d in np.unique(mixture_depth)}
        return np.array([means[d] for d in mixture_depth], dtype=np.float64)


@ROUTERS.register
class Steer(DraftRouter):
    name = "steer"
    sweepable = ("tau",)
    domains = {"tau": UNIT, "min_samples": Domain(2, math.inf, integer=True), "seed": SEED}

    def __init__(
        self,
        tau=0.5,
        mode="switch",
        escalate="after",
        min_samples=10,
        seed=0,
        gmms="",
        draft="",
        target="",
        models="",
    ):
        self.tau = tau
        self.mode = mode
        self.escalate = escalate
        self.min_samples = min_samples
        self.seed = seed
        self.gmms = gmms
        self.draft = draft  # default: the smallest model
        self.target = target  # default: the next larger model than draft
        self.models = models  # the chain, smallest first; default: every model (draft/target: those two)

    def default_target(self, roles, draft):
        """STEER escalates to the next larger model."""
        return roles[roles.index(draft) + 1] if draft in roles[:-1] else roles[-1]

    def chain(self, roles: list[str]) -> tuple[str, ...]:
        """The models STEER escalates along on a trace with model ``roles`` (smallest first)."""
        if not self.models:
            if self.draft or self.target or len(roles) == 2:
                return self.draft_roles(roles)
            return tuple(roles)
        chain = tuple(role.strip() for role in self.models.split(","))
        unknown = [role for role in chain if role not in roles]
        ordered = not unknown and all(roles.index(a) < roles.index(b) for a, b in zip(chain, chain[1:]))
        if unknown or len(chain) < 2 or not ordered:
            raise TraceError(
                f"router steer: models must name two or more of the trace's models ({', '.join(roles)}), "
                f"smallest first; got {self.models!r}"
            )
        if (self.draft or self.target) and (
            len(chain) != 2 or self.draft not in ("", chain[0]) or self.target not in ("", chain[1])
        ):
            given = ", ".join(f"{name}={getattr(self, name)}" for name in ("draft", "target") if getattr(self, name))
            raise TraceError(
                f"router steer: models={self.models} and {given} disagree; give the chain as models=... or a "
                "two-model chain as draft=/target=, not both"
            )
        return chain

    @property
    def one_way(self):
        return self.mode == "switch"

    @classmethod
    def idle_params(cls, params):
        return ("escalate",) if params.get("mode", cls.param_defaults()["mode"]) == "step" else ()

    def _check_params(self):
        self._check_choice("mode", ("switch", "step"))
        self._check_choice("escalate", ESCALATE_MODES)

    def _fit(self, train):
        self.chain_ = self.chain(train.roles)
        judged = self.chain_[:-1]  # every model that can be escalated from
        for role in judged:
            require_signals(
                train.manifest,
                role,
                [SIGNAL],
                "steer",
                f"route on S_API ({S_API}) with the policy instead: trace train policy --features {S_API},depth,...",
            )
        if self.gmms:
            self.by_role_ = self._load(train, judged)
        else:
            self.by_role_ = {role: self._fit_role(train, role) for role in judged}
            self.learned_from(train, "STEER mixtures")

    def _fit_role(self, train, role: str) -> StepMixtures:
        confidences = own_chain_steps(train.steps, role).filter(pl.col(SIGNAL).is_not_null())
        per_depth = confidences.group_by("depth").agg(pl.col(SIGNAL)).sort("depth")
        fitted = StepMixtures({}, {}, {})
        for depth, values in per_depth.iter_rows():
            if len(values) < self.min_samples:
                continue
            mixture = _mixture(self.seed)
            mixture.fit(np.asarray(values, dtype=np.float64).reshape(-1, 1))
            fitted.mixtures[depth] = mixture
            fitted.low_component[depth] = int(np.argmin(mixture.means_.ravel()))
            fitted.n_samples[depth] = len(values)
        if 0 not in fitted.mixtures:
            raise TraceError(
                f"router steer needs at least min_samples={self.min_samples} {role}-model "
                f"{SIGNAL} values at step index 0 of its own solutions in the train split; it has "
                f"{confidences.filter(pl.col('depth') == 0).height} (fit on another trace: --fit-on TRACE, "
                "or gmms=FILE from trace train steer)"
            )
        return fitted

    # The chain's first model's mixtures, by step index (what two-model STEER fits).
    @property
    def mixtures_(self) -> dict:
        return self.by_role_[self.chain_[0]].mixtures

    @property
    def low_component_(self) -> dict[int, int]:
        return self.by_role_[self.chain_[0]].low_component

    @property
    def n_samples_(self) -> dict[int, int]:
        return self.by_role_[self.chain_[0]].n_samples

    def save(self, path, **metadata) -> None:
        """Write the fitted mixtures of every model as a ``gmms`` JSON file (floats round-trip exactly), with where
        they were fitted."""
        self.check_fitted()
        (fitted_on,) = self.fitted_on_
        mixtures = [
            {
                "model": role,
                "depth": int(depth),
                "n": int(fitted.n_samples[depth]),
                "weights": mixture.weights_.tolist(),
                "means": mixture.means_.ravel().tolist(),
                "variances": mixture.covariances_.ravel().tolist(),
                "low_component": fitted.low_component[depth],
            }
            for role, fitted in self.by_role_.items()
            for depth, mixture in sorted(fitted.mixtures.items())
        ]
        saved = {
            "format": STEER_FORMAT,
            "version": STEER_VERSION,
            "signal": SIGNAL,
            "min_samples": self.min_samples,
            "seed": self.seed,
            **metadata,
            "train_problem_ids": fitted_on["problem_ids"],
            "fitted_on": fitted_on,
            "models": list(self.by_role_),
            "mixtures": mixtures,
        }
        write_atomic(path, (json.dumps(saved, indent=1) + "\n").encode())

    def _load(self, train, judged: tuple[str, ...]) -> dict[str, StepMixtures]:
        saved = load_mixtures(self.gmms, "trace steer")
        if saved.signal != SIGNAL:
            raise TraceError(f"router steer: {self.gmms} has signal {saved.signal!r}; this trace reads {SIGNAL}")
        record = saved.fitted_on or legacy_record("STEER mixtures", saved.train_problem_ids)
        self.loaded(None if record is None else {**record, "file": str(self.gmms)}, train, self.gmms)
        if saved.models == [None]:  # version 1: one model's mixtures, for the chain's first model
            if len(judged) > 1:
                raise TraceError(
                    f"router steer: {self.gmms} (version 1) holds one model's mixtures, but the chain "
                    f"{' -> '.join(self.chain_)} escalates from {', '.join(judged)}; refit it with trace train steer"
                )
            sources = {judged[0]: None}
        else:
            lacking = [role for role in judged if role not in saved.models]
            if lacking:
                raise TraceError(
                    f"router steer: {self.gmms} has no mixtures of model(s) {', '.join(lacking)} (it has "
                    f"{', '.join(map(str, saved.models)) or 'none'}); refit it with trace train steer"
                )
            sources = {role: role for role in judged}
        by_role = {}
        for role, source in sources.items():
            loaded = StepMixtures({}, {}, {})
            for entry in saved.of(source):
                mixture = _mixture(self.seed)
                mixture.weights_, mixture.means_ = entry.weights, entry.means.reshape(2, 1)
                mixture.covariances_ = entry.variances.reshape(2, 1, 1)
                mixture.precisions_cholesky_ = (1 / np.sqrt(entry.variances)).reshape(2, 1, 1)
                mixture.precisions_ = (1 / entry.variances).reshape(2, 1, 1)
                mixture.n_features_in_ = 1
                loaded.mixtures[entry.depth], loaded.low_component[entry.depth] = mixture, entry.low_component
                loaded.n_samples[entry.depth] = entry.n
            if 0 not in loaded.mixtures:
                raise TraceError(f"router steer: {self.gmms} has no mixture of model {role} for step index 0")
            by_role[role] = loaded
        return by_role

    def low_posterior(self, depths: np.ndarray, confidences: np.ndarray, role: str | None = None) -> np.ndarray:
        """P(low | c) for each (step index, confidence), under model ``role``'s (default: the chain's first
        model's) mixture of the largest fitted index <= d."""
        return self.by_role_[role or self.chain_[0]].low_posterior(depths, confidences)

    def high_mean(self, depths: np.ndarray, role: str | None = None) -> np.ndarray:
        """Mean of the high (other) component of the mixture each step index uses."""
        return self.by_role_[role or self.chain_[0]].high_mean(depths)

    def unconfident(
        self, depths: np.ndarray, confidences: np.ndarray, tau: float | np.ndarray, role: str | None = None
    ) -> np.ndarray:
        """The rule: P(low | c) > tau and c below the high component's mean."""
        return (self.low_posterior(depths, confidences, role) > tau) & (confidences < self.high_mean(depths, role))

    def draft_signal(self, data):
        """Of each step row of a model the chain escalates from, P(low | c) under its model's mixtures where c
        lies below the high component's mean, 0 where it does not (never above a tau in [0, 1]); NaN for the
        other rows and for steps without a confidence."""
        steps = data.steps
        signal = np.full(steps.height, np.nan)
        for role in self.by_role_:
            judged = ((steps["model"] == role) & steps[SIGNAL].is_not_null()).to_numpy()
            depths = steps["depth"].to_numpy()[judged]
            confidences = steps[SIGNAL].to_numpy()[judged].astype(np.float64)
            posterior = self.low_posterior(depths, confidences, role)
            signal[judged] = np.where(confidences < self.high_mean(depths, role), posterior, 0.0)
        return signal

    def accept(self, signal, params):
        """Keep the step unless it is unconfident (NaN: no signal, kept)."""
        return ~(signal > params["tau"])


def own_chain_steps(steps: pl.DataFrame, role: str) -> pl.DataFrame:
    """The steps of ``role``'s own solutions: its all-``role`` chain from the root (every character of the path is
    the role's), which no other model's step precedes."""
    char = model_char(role)
    return steps.filter(
        (pl.col("model") == role)
        & (pl.col("path").str.count_matches(char, literal=True) == pl.col("path").str.len_chars())
    )


def _mixture(seed: int):
    """An unfitted two-component scikit-learn GaussianMixture."""
    from sklearn.mixture import GaussianMixture

    return GaussianMixture(n_components=2, random_state=seed)
