"""Query-level cascade over K models (Chen, Chen, Yen: Confidence-Driven Multi-Scale Model Selection).

Models are tried in order of size (``models``, default the trace's roles in manifest order). Model
i's whole solution is kept if P(T) >= ``t_true`` and P(IK) >= ``t_ik``; otherwise the query goes
to model i+1; the last model's answer is always kept.

- P(IK): an MLP probe (64 hidden units, scikit-learn) on the prompt's hidden state of model i at
  ``layer`` (from the hidden table), fitted on the train split to predict whether model i's own
  solution is correct. It reads only the prompt, so a model the probe rejects is skipped before it
  writes anything; it then costs only its prompt prefill. ``pik=False`` is the ablation without it.
- P(T): the model's confidence in its answer, checked after it wrote its solution: ``p_true="ptrue"``
  reads the P(True) scorer (probability of "(A) True" when asked whether the answer is correct; one
  scorer call per checked answer, paid), ``final_mean``/``final_min`` use exp(mean/min logprob) of
  the final step, the step that holds the answer.

``probe=PATH`` loads the probes ``trace train pik`` saved (fitted 80/10/10 inside the train split,
with their test metrics) instead of fitting them here; the file's layer and hidden-state position
are used. It is a joblib pickle of a dict (load only files you trust)::

    {"format": "trace-pik", "version": 1, "layer": 24, "where": "prompt_last",
     "probes": {"small": Pipeline(StandardScaler, MLPClassifier)}, "metrics": {"small": {...}},
     "train_problem_ids": [...]}                      # must lie in the replay's train split
"""

import math
from pathlib import Path

import numpy as np
import polars as pl

from replay.artifacts import check_fitted_within, load_artifact
from replay.engine import Costs, ReplayData, Walk, walk_chains
from replay.errors import TraceError
from replay.routers.base import SEED, UNIT, Domain, QueryRouter

P_TRUE_SOURCES = ("ptrue", "final_mean", "final_min")
PIK_FORMAT = "trace-pik"
PIK_VERSION = 1
DEFAULT_LAYER, DEFAULT_WHERE = -1, "prompt_last"


def new_probe(seed: int, l2: float = 1e-4):
    """An unfitted P(IK) probe (a scikit-learn Pipeline): standardised hidden state -> MLP with 64 hidden
    units (L2 penalty ``l2``)."""
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(
        StandardScaler(), MLPClassifier(hidden_layer_sizes=(64,), alpha=l2, max_iter=2000, random_state=seed)
    )


def own_chain_labels(data: ReplayData, role: str) -> tuple[pl.DataFrame, np.ndarray]:
    """(problem_id and world of every root whose all-``role`` solution is cached to its end, whether that
    solution is correct)."""
    roots = data.roots
    chain = walk_chains(data, Costs(data, None), roots["node"].to_numpy(), data.roles.index(role))
    done = chain.final_step >= 0
    return roots.filter(pl.Series(done)).select("problem_id", "world"), data.tree.step_correct[chain.final_step[done]]


def hidden_matrix(data: ReplayData, role: str, layer: int, where: str, problem_ids: pl.Series) -> np.ndarray:
    """The hidden-state vector of ``role`` at (``layer``, ``where``) for each problem id, as rows of a matrix."""
    vectors = (
        data.hidden.filter((pl.col("model") == role) & (pl.col("layer") == layer) & (pl.col("where") == where))
        .select("problem_id", "vector")
        .collect()
    )
    if vectors["problem_id"].is_duplicated().any():
        raise TraceError(
            f"hidden has more than one {where} vector of model {role} at layer {layer} "
            f"for problem {vectors.filter(pl.col('problem_id').is_duplicated())['problem_id'][0]!r}"
        )
    aligned = pl.DataFrame({"problem_id": problem_ids}).join(
        vectors, on="problem_id", how="left", maintain_order="left"
    )
    lacking = aligned.filter(pl.col("vector").is_null())
    if lacking.height:
        raise TraceError(
            f"P(IK) needs the {where} hidden state of model {role} at layer {layer}, "
            f"which the trace lacks for problem {lacking['problem_id'][0]!r} (store it with trace gen "
            "--hidden-layers; a cascade can do without: pik=false)"
        )
    widths = aligned["vector"].list.len().unique()
    if len(widths) != 1:
        raise TraceError(f"hidden vectors of model {role} at layer {layer} differ in length")
    return aligned["vector"].explode().to_numpy().astype(np.float64).reshape(aligned.height, widths[0])


def load_probes(path: str | Path) -> dict:
    """The dict of a ``trace train pik`` file, checked."""
    import joblib

    return load_artifact(path, joblib.load, "P(IK) probe", PIK_FORMAT, PIK_VERSION, ("layer", "where", "probes"))


class Cascade(QueryRouter):
    name = "cascade"
    sweepable = ("t_true", "t_ik")
    domains = {"t_true": UNIT, "t_ik": UNIT, "layer": Domain(-1, math.inf, integer=True), "seed": SEED}

    def __init__(
        self,
        models="",
        p_true="ptrue",
        t_true=0.5,
        pik=True,
        t_ik=0.5,
        layer=DEFAULT_LAYER,
        where=DEFAULT_WHERE,
        seed=0,
        probe="",
    ):
        self.models = models
        self.p_true = p_true
        self.t_true = t_true
        self.pik = pik
        self.t_ik = t_ik
        self.layer = layer
        self.where = where
        self.seed = seed
        self.probe = probe

    @property
    def scorer(self):
        return "ptrue" if self.p_true == "ptrue" else None

    def _check_params(self):
        self._check_choice("p_true", P_TRUE_SOURCES)

    def _fit(self, train):
        roles = [role.strip() for role in self.models.split(",")] if self.models else list(train.roles)
        unknown = [role for role in roles if role not in train.roles]
        if unknown or len(roles) < 2:
            raise TraceError(
                f"router cascade: models must name two or more of the trace's models "
                f"({', '.join(train.roles)}), smallest first; got {self.models!r}"
            )
        self.roles_ = roles
        self.probes_ = {}
        self.layer_, self.where_ = self.layer, self.where
        if not self.pik:
            return
        if self.probe:
            self._load_probes(train)
            return
        for role in roles[:-1]:
            roots, labels = own_chain_labels(train, role)
            if len(np.unique(labels)) < 2:
                raise TraceError(
                    f"cannot fit the P(IK) probe of model {role}: its {labels.size} complete train "
                    f"solutions are all {'correct' if labels.all() else 'wrong'} (use pik=false)"
                )
            features = hidden_matrix(train, role, self.layer, self.where, roots["problem_id"])
            self.probes_[role] = new_probe(self.seed).fit(features, labels)

    def _load_probes(self, train):
        saved = load_probes(self.probe)
        for param, default in (("layer", DEFAULT_LAYER), ("where", DEFAULT_WHERE)):
            if getattr(self, param) not in (default, saved[param]):
                raise TraceError(
                    f"router cascade: probe file {self.probe} was trained on {param} {saved[param]!r}, "
                    f"not {getattr(self, param)!r}"
                )
        check_fitted_within(self.probe, saved.get("train_problem_ids"), train.problems["problem_id"].to_list())
        lacking = [role for role in self.roles_[:-1] if role not in saved["probes"]]
        if lacking:
            raise TraceError(
                f"router cascade: probe file {self.probe} has no probe for model(s) {', '.join(lacking)} "
                f"(it has {', '.join(saved['probes']) or 'none'})"
            )
        self.layer_, self.where_ = saved["layer"], saved["where"]
        self.probes_ = {role: saved["probes"][role] for role in self.roles_[:-1]}

    def _hidden(self, data, role, problem_ids: pl.Series) -> np.ndarray:
        return hidden_matrix(data, role, self.layer_, self.where_, problem_ids)

    def _p_true(self, data, final_steps: np.ndarray) -> np.ndarray:
        """P(T) of each final step row (NaN where the ptrue score is not cached)."""
        if self.p_true == "ptrue":
            values = data.scores_of("ptrue")["value"].cast(float).fill_null(np.nan).to_numpy()
        else:
            column = "logprob_mean" if self.p_true == "final_mean" else "logprob_min"
            values = np.exp(data.steps[column].cast(float).to_numpy())
        return values[final_steps]

    def walk(self, data, costs, starts, params):
        roots, inverse = np.unique(starts, return_inverse=True)
        root_frame = data.roots
        order = np.argsort(root_frame["node"].to_numpy())
        root_problems = root_frame["problem_id"].gather(
            order[np.searchsorted(root_frame["node"].to_numpy()[order], roots)]
        )
        result = Walk.empty(len(data.roles), len(starts))
        undecided = np.ones(len(starts), dtype=bool)
        for position, role in enumerate(self.roles_):
            r = data.role_index(role, self.name)
            last = position == len(self.roles_) - 1
            writes = undecided.copy()
            if self.pik and not last:
                p_ik = self.probes_[role].predict_proba(self._hidden(data, role, root_problems))[:, 1][inverse]
                skipped = writes & (p_ik < params["t_ik"])
                first_step = data.tree.children[r, starts]
                unpriced = skipped & (first_step < 0)
                result.end_node[unpriced] = starts[unpriced]
                result.miss_role[unpriced] = r
                undecided &= ~unpriced
                paid = skipped & ~unpriced
                result.prefill[paid] += costs.prefill[first_step[paid]]
                writes &= ~skipped
            chain = walk_chains(data, costs, roots, r).take(inverse)
            result.decode[:, writes] += chain.decode[:, writes]
            result.kept[:, writes] += chain.kept[:, writes]
            result.prefill[writes] += chain.prefill[writes]
            missed = writes & chain.missed
            result.end_node[missed] = chain.end_node[missed]
            result.miss_role[missed] = chain.miss_role[missed]
            undecided &= ~missed
            finished = writes & ~chain.missed
            if last:
                keep = finished
            else:
                final = np.where(finished, chain.final_step, 0)
                if self.scorer:
                    call_cost = costs.scorer(self.scorer)[final]
                    unscored = finished & np.isnan(call_cost)
                    result.end_node[unscored] = data.tree.step_parent[final[unscored]]
                    result.miss_role[unscored] = r
                    result.miss_scorer[unscored] = True
                    undecided &= ~unscored
                    finished &= ~unscored
                    result.scorer[finished] += call_cost[finished]
                keep = finished & (self._p_true(data, final) >= params["t_true"])
            result.final_step[keep] = chain.final_step[keep]
            result.end_node[keep] = chain.end_node[keep]
            undecided &= ~keep
        return result
