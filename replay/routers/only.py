"""Baseline: one named model writes every step (``--param model=m1``): each model of a K-model trace alone."""

import numpy as np

from replay.routers import ROUTERS
from replay.routers.base import WriterRouter
from tracestore.errors import TraceError


@ROUTERS.register
class Only(WriterRouter):
    name = "only"

    def __init__(self, model=""):
        self.model = model

    def _check_params(self):
        if not self.model:
            raise TraceError("router only needs --param model=ROLE (a role of the trace: small, large or m0, m1, ...)")

    def choose(self, data, nodes, params):
        return np.full(len(nodes), data.role_index(self.model, self.name))
