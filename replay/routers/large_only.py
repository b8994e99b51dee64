"""Baseline: the large model (the largest, on a trace of K models) writes every step."""

import numpy as np

from replay.routers import ROUTERS
from replay.routers.base import WriterRouter


@ROUTERS.register
class LargeOnly(WriterRouter):
    name = "large-only"

    def __init__(self):
        pass

    def choose(self, data, nodes, params):
        return np.full(len(nodes), len(data.roles) - 1)
