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
"""

import numpy as np
import polars as pl
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from replay.engine import Costs, Walk, walk_chains
from replay.errors import TraceError
from replay.routers.base import QueryRouter

P_TRUE_SOURCES = ("ptrue", "final_mean", "final_min")


class Cascade(QueryRouter):
    name = "cascade"
    sweepable = ("t_true", "t_ik")

    def __init__(self, models="", p_true="ptrue", t_true=0.5, pik=True, t_ik=0.5, layer=-1,
                 where="prompt_last", seed=0):
        self.models = models
        self.p_true = p_true
        self.t_true = t_true
        self.pik = pik
        self.t_ik = t_ik
        self.layer = layer
        self.where = where
        self.seed = seed

    @property
    def scorer(self):
        return "ptrue" if self.p_true == "ptrue" else None

    def _check_params(self):
        self._check_choice("p_true", P_TRUE_SOURCES)

    def _fit(self, train):
        roles = [role.strip() for role in self.models.split(",")] if self.models else list(train.roles)
        unknown = [role for role in roles if role not in train.roles]
        if unknown or len(roles) < 2:
            raise TraceError(f"router cascade: models must name two or more of the trace's models "
                             f"({', '.join(train.roles)}), smallest first; got {self.models!r}")
        self.roles_ = roles
        self.probes_ = {}
        if not self.pik:
            return
        roots = train.roots
        costs = Costs(train, None)
        for role in roles[:-1]:
            chain = walk_chains(train, costs, roots["node"].to_numpy(), train.roles.index(role))
            done = chain.final_step >= 0
            labels = train.tree.step_correct[chain.final_step[done]]
            if len(np.unique(labels)) < 2:
                raise TraceError(f"cannot fit the P(IK) probe of model {role}: its {labels.size} complete train "
                                 f"solutions are all {'correct' if labels.all() else 'wrong'} (use pik=false)")
            features = self._hidden(train, role, roots["problem_id"].filter(pl.Series(done)))
            probe = make_pipeline(StandardScaler(),
                                  MLPClassifier(hidden_layer_sizes=(64,), max_iter=500, random_state=self.seed))
            self.probes_[role] = probe.fit(features, labels)

    def _hidden(self, data, role, problem_ids: pl.Series) -> np.ndarray:
        """The hidden-state vector of ``role`` for each problem id, as rows of a matrix."""
        vectors = (data.hidden.filter((pl.col("model") == role) & (pl.col("layer") == self.layer)
                                      & (pl.col("where") == self.where))
                   .select("problem_id", "vector").collect())
        if vectors["problem_id"].is_duplicated().any():
            raise TraceError(f"hidden has more than one {self.where} vector of model {role} at layer {self.layer} "
                             f"for problem {vectors.filter(pl.col('problem_id').is_duplicated())['problem_id'][0]!r}")
        aligned = pl.DataFrame({"problem_id": problem_ids}).join(vectors, on="problem_id", how="left",
                                                                 maintain_order="left")
        lacking = aligned.filter(pl.col("vector").is_null())
        if lacking.height:
            raise TraceError(f"P(IK) needs the {self.where} hidden state of model {role} at layer {self.layer}, "
                             f"which the trace lacks for problem {lacking['problem_id'][0]!r} (or use pik=false)")
        widths = aligned["vector"].list.len().unique()
        if len(widths) != 1:
            raise TraceError(f"hidden vectors of model {role} at layer {self.layer} differ in length")
        return aligned["vector"].explode().to_numpy().astype(np.float64).reshape(aligned.height, widths[0])

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
        root_problems = root_frame["problem_id"].gather(order[np.searchsorted(
            root_frame["node"].to_numpy()[order], roots)])
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
