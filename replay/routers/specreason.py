"""SpecReason (Pan et al. 2025): the large model judges each small-model draft.

The judge (scorer ``judge``) reads the question and the steps so far and rates the last step 0-9;
its scores row holds value = the greedy digit and detail = its probabilities for the digits 0-9
(from the top-k logprobs). ``score="greedy"`` judges by the digit, ``score="expected"`` by the
expected digit under those probabilities (renormalised over the ten digits). A draft with score >=
``tau`` is kept; otherwise it is discarded (and paid for) and the large model writes that step; the
next step is drafted again. Every draft pays one judge call: the prefill of its context plus one
token (``n_tokens_processed``). On a trace of K models, ``draft`` (default: the smallest) plays the small
model and ``target`` (default: the largest) the large one, and the judge is the target's own verdict: scorer
``judge`` when the target is the largest model (`trace score --scorer judge` asks it), else ``judge@TARGET``
(`trace score --scorer judge@TARGET`); a replay without them is refused, naming that command. Another
``scorer`` is read as given.
"""

import numpy as np

from replay.routers import ROUTERS
from replay.routers.base import Domain, DraftRouter
from tracestore.errors import TraceError

DIGITS = np.arange(10, dtype=np.float64)
JUDGE = "judge"


@ROUTERS.register
class SpecReason(DraftRouter):
    name = "specreason"
    sweepable = ("tau",)
    domains = {"tau": Domain(0.0, 9.0)}  # the judge's digit, or its expected value

    def __init__(self, tau=7.0, score="greedy", scorer=JUDGE, draft="", target=""):
        self.tau = tau
        self.score = score
        self.scorer = scorer
        self.draft = draft  # default: the smallest model
        self.target = target  # default: the largest model

    def _check_params(self):
        self._check_choice("score", ("greedy", "expected"))

    def scorer_for(self, roles):
        """The target's own judge: ``judge`` for the largest model, ``judge@TARGET`` for a smaller one."""
        if self.scorer != JUDGE:
            return self.scorer
        _, target = self.draft_roles(roles)
        return JUDGE if target == roles[-1] else f"{JUDGE}@{target}"

    def draft_signal(self, data):
        scorer = self.scorer_for(data.roles)
        scores = data.scores_of(scorer)
        if self.score == "greedy":
            return scores["value"].cast(float).fill_null(np.nan).to_numpy()
        scored = scores["value"].is_not_null()
        bad = scored & ~(scores["detail"].list.len() == len(DIGITS)).fill_null(False)
        if bad.any():
            step_id = data.steps["step_id"].filter(bad)[0]
            raise TraceError(
                f"score='expected' needs the {scorer} scorer's ten digit probabilities in "
                f"detail, but step {step_id!r} has {scores['detail'].filter(bad)[0]!r}"
            )
        signal = np.full(len(scores), np.nan)
        mask = scored.to_numpy()
        probabilities = scores["detail"].filter(scored).explode().to_numpy().astype(np.float64).reshape(-1, 10)
        totals = probabilities.sum(axis=1)
        if (totals <= 0).any():
            step_id = data.steps["step_id"].filter(scored)[int(np.argmax(totals <= 0))]
            raise TraceError(f"step {step_id!r}: the {scorer} scorer's digit probabilities sum to 0")
        signal[mask] = probabilities @ DIGITS / totals
        return signal

    def accept(self, signal, params):
        return signal >= params["tau"]
