"""Baseline: the small model (the smallest, on a trace of K models) writes every step."""

import numpy as np

from replay.routers import ROUTERS
from replay.routers.base import WriterRouter


@ROUTERS.register
class SmallOnly(WriterRouter):
    name = "small-only"

    def __init__(self):
        pass

    def choose(self, data, nodes, params):
        return np.full(len(nodes), 0)
