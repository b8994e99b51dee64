"""Reward-guided speculative decoding (Liao et al. 2025).

The small model drafts each step; a process reward model scores it (scorer ``prm``: value =
sigmoid of the value head at the step's last token, computed on the question plus the accepted
steps, i.e. the draft's own path). A draft with score >= ``tau`` is kept; otherwise it is
discarded (and paid for) and the large model writes that one step; the next step is drafted by the
small model again. Every draft pays one PRM call. On a trace of K models, ``draft`` (default: the
smallest) plays the small model and ``target`` (default: the largest) the large one.
"""

import numpy as np

from replay.routers import ROUTERS
from replay.routers.base import UNIT, DraftRouter


@ROUTERS.register
class Rsd(DraftRouter):
    name = "rsd"
    sweepable = ("tau",)
    domains = {"tau": UNIT}  # the PRM's score is a sigmoid

    def __init__(self, tau=0.7, scorer="prm", draft="", target=""):
        self.tau = tau
        self.scorer = scorer
        self.draft = draft  # default: the smallest model
        self.target = target  # default: the largest model

    def draft_signal(self, data):
        return data.scores_of(self.scorer)["value"].cast(float).fill_null(np.nan).to_numpy()

    def accept(self, signal, params):
        return signal >= params["tau"]
