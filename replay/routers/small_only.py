"""Baseline: the small model writes every step."""

import numpy as np

from replay.routers.base import WriterRouter
from replay.schema import SMALL


class SmallOnly(WriterRouter):
    name = "small-only"

    def __init__(self):
        pass

    def choose(self, data, nodes, params):
        return np.full(len(nodes), data.role_index(SMALL, self.name))
