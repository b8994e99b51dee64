"""Query-level cascade over K models (Chen, Chen, Yen: Confidence-Driven Multi-Scale Model Selection).

Models are tried in order of size (``models``, default the trace's roles in manifest order). Model
i's whole solution is kept if P(T) >= ``t_true`` (default 0.9, the paper's) and P(IK) >= ``t_ik``;
otherwise the query goes to model i+1; the last model's answer is always kept. A solution written and then
not trusted (P(T) too low) is paid for and its steps count as discarded (``n_discarded``, ``cost_discarded``),
not as kept steps of its model.

- P(IK): an MLP probe (64 hidden units, scikit-learn) on the prompt's hidden state of model i at
  ``layer`` (``auto``: the paper's layer 24 when the model has more layers, else its last; from the
  hidden table), fitted as ``replay.pik`` does to predict whether model i's own solution is correct: it
  learns from model i's own solutions (its all-own-model chain from the root) of the train split, its
  L2 penalty chosen on the calibration split's. It reads only the prompt, so a model the probe rejects is
  skipped before it writes anything; it then costs only its prompt prefill. ``pik=False`` is the
  ablation without it.
- P(T): the model's confidence in its answer, checked after it wrote its solution: ``p_true="ptrue"``
  reads the P(True) scorer (probability of "(A) True" when asked whether the answer is correct; one
  scorer call per checked answer, paid), ``first_token`` the paper's first-token confidence for
  generation tasks (the probability that its reply to "answer in the format 'Answer: ...'" starts with
  "Answer"; scorer first_token), ``final_mean``/``final_min`` use exp(mean/min logprob) of the final
  step, the step that holds the answer.

``probe=PATH`` loads the probes ``trace train pik`` saved (fitted the same way, with their test
metrics) instead of fitting them here; the file's layers and hidden-state position are used. It is a
joblib pickle of a dict (load only files you trust)::

    {"format": "trace-pik", "version": 2, "layers": {"small": 24}, "where": "prompt_last",
     "probes": {"small": Pipeline(StandardScaler, MLPClassifier)}, "metrics": {"small": {...}},
     "fitted_on": {...}}                              # where: replay.artifacts.fit_record (checked on load)
"""

import numpy as np
import polars as pl

from replay.artifacts import saved_record
from replay.pik import (
    AUTO_LAYER,
    DEFAULT_WHERE,
    PAPER_LAYER,
    fit_probes,
    hidden_matrix,
    layer_for_blocks,
    load_probes,
    probe_layer,
)
from replay.routers import ROUTERS
from replay.routers.base import SEED, UNIT, QueryRouter
from replay.walk import Walk, walk_chains
from tracestore.errors import TraceError

P_TRUE_SOURCES = ("ptrue", "first_token", "final_mean", "final_min")
SCORED_P_TRUE = ("ptrue", "first_token")  # read from the scores table (trace score --scorer ptrue | first_token)
PROBE_PARAMS = ("t_ik", "layer", "where", "seed", "probe")  # what only the P(IK) probe reads


@ROUTERS.register
class Cascade(QueryRouter):
    name = "cascade"
    sweepable = ("t_true", "t_ik")
    uses_calibration = True  # the probes' L2 penalty
    domains = {"t_true": UNIT, "t_ik": UNIT, "seed": SEED}  # layer: an integer or auto, checked by probe_layer

    def __init__(
        self,
        models="",
        p_true="first_token",  # the paper's P(T) for generation tasks
        t_true=0.9,  # the paper's
        pik=True,
        t_ik=0.5,
        layer=AUTO_LAYER,
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

    @classmethod
    def idle_params(cls, params):
        return () if params.get("pik", True) else PROBE_PARAMS

    @property
    def scorer(self):
        return self.p_true if self.p_true in SCORED_P_TRUE else None

    def _check_params(self):
        self._check_choice("p_true", P_TRUE_SOURCES)

    def _chain(self, trace_roles: list[str]) -> list[str]:
        """The models tried, in order: ``models``, or every model of the trace."""
        roles = [role.strip() for role in self.models.split(",")] if self.models else list(trace_roles)
        unknown = [role for role in roles if role not in trace_roles]
        ordered = not unknown and all(trace_roles.index(a) < trace_roles.index(b) for a, b in zip(roles, roles[1:]))
        if unknown or len(roles) < 2 or not ordered:
            raise TraceError(
                f"router cascade: models must name two or more of the trace's models "
                f"({', '.join(trace_roles)}), smallest first; got {self.models!r}"
            )
        return roles

    def hidden_layers(self, roles, n_layers):
        """The layer each P(IK) probe reads (every model of the chain but the last; none named for a model of
        unknown depth, such as one an API serves)."""
        if not self.pik:
            return {}
        chain = self._chain(list(roles))[:-1]
        if self.probe:
            saved = load_probes(self.probe)["layers"]
            return {role: {saved[role]: f"cascade P(IK) probe file {self.probe}"} for role in chain if role in saved}
        layers = {}
        for role in chain:
            if self.layer == AUTO_LAYER and role not in n_layers:
                layers[role] = {}
                continue
            layer = layer_for_blocks(self.layer, n_layers.get(role))
            if self.layer != AUTO_LAYER:
                why = f"cascade P(IK), layer={self.layer}"
            elif layer == PAPER_LAYER:
                why = f"cascade P(IK): the paper's layer {PAPER_LAYER} ({n_layers[role]} blocks)"
            else:
                why = (
                    f"cascade P(IK): the last layer ({n_layers[role]} blocks, not more than the paper's {PAPER_LAYER})"
                )
            layers[role] = {layer: why}
        return layers

    def _fit(self, train, calibration=None):
        roles = self._chain(list(train.roles))
        self.roles_ = roles
        self.probes_, self.layers_, self.where_ = {}, {}, self.where
        if not self.pik:
            return
        if self.probe:
            self._load_probes(train)
            return
        self.probes_, self.layers_, _, fitted_on = fit_probes(
            train, calibration, None, roles[:-1], self.layer, self.where, self.seed
        )
        self.learned_from(train, "P(IK) probes", fitted_on, hidden_roles=roles[:-1])

    def _load_probes(self, train):
        saved = load_probes(self.probe)
        if self.where not in (DEFAULT_WHERE, saved["where"]):
            raise TraceError(
                f"router cascade: probe file {self.probe} was trained on where {saved['where']!r}, not {self.where!r}"
            )
        for role, layer in saved["layers"].items():
            if self.layer != AUTO_LAYER and probe_layer(train, role, self.layer) != layer:
                raise TraceError(
                    f"router cascade: probe file {self.probe} read model {role} at layer {layer}, not {self.layer}"
                )
        self.loaded(saved_record(saved, self.probe, "P(IK) probes"), train, self.probe)
        lacking = [role for role in self.roles_[:-1] if role not in saved["probes"]]
        if lacking:
            raise TraceError(
                f"router cascade: probe file {self.probe} has no probe for model(s) {', '.join(lacking)} "
                f"(it has {', '.join(saved['probes']) or 'none'})"
            )
        self.where_ = saved["where"]
        self.layers_ = {role: saved["layers"][role] for role in self.roles_[:-1]}
        self.probes_ = {role: saved["probes"][role] for role in self.roles_[:-1]}

    def _hidden(self, data, role, problem_ids: pl.Series) -> np.ndarray:
        return hidden_matrix(data, role, self.layers_[role], self.where_, problem_ids)

    def _p_true(self, data, final_steps: np.ndarray) -> np.ndarray:
        """P(T) of each final step row (NaN where the ptrue score is not cached)."""
        if self.p_true in SCORED_P_TRUE:
            values = data.scores_of(self.p_true)["value"].cast(float).fill_null(np.nan).to_numpy()
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
            rejected = finished & ~keep  # a solution written, then not trusted: paid for, its steps discarded
            written = writes & ~rejected
            result.decode[:, written] += chain.decode[:, written]
            result.kept[:, written] += chain.kept[:, written]
            result.prefill[written] += chain.prefill[written]
            result.discarded[rejected] += chain.decode[:, rejected].sum(axis=0) + chain.prefill[rejected]
            result.n_discarded[rejected] += chain.kept[:, rejected].sum(axis=0)
            result.final_step[keep] = chain.final_step[keep]
            result.end_node[keep] = chain.end_node[keep]
            undecided &= ~keep
        return result
